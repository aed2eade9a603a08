"""The output folder: one run at a time, and no file there that a run did not write.

The recipe wraps its run in `output_lock(output_dir)`. The lock is the kernel's (flock) on
output_dir/.run.lock, which holds "PID N on HOST" so that a second run can name the first. The kernel
lets go when the process ends, however it ends, so a lock file a killed run left is just taken over.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import socket
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path

from MLPipeline.CreateDataset import UserError, log
from MLPipeline.extras.Files import image_software

LOCK_NAME = ".run.lock"  # in the output folder while a run writes there: who holds it
OWNER = re.compile(r"PID \d+ on [^\s]{1,255}")  # what take_lock writes; anything else is not our file
LEFTOVER = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")  # atomic_write's temporary files (mkstemp names)
DRAWN_HERE = "Matplotlib"  # how the PNGs this project draws (plots, explanations) name their Software
TRAIN_IMAGES = r"(loss_curve|confusion_matrix)\.png"  # the images train writes in its output folder


def check_write_target(target: Path, flag: str, *, folder: bool, inputs: Iterable[Path] = (),
                       data_dirs: Iterable[Path] = (), writes: str = "") -> None:
    """The one check of every option that writes, before any work: UserError naming `flag` and `target` when
    the target would cost the user a file or feed a later run its outputs.

    Refused: a link, a FIFO or a device; a file where a folder is wanted (folder=True) or the reverse; one of
    the command's `inputs` (a model, an image); a place inside (or equal to) one of the `data_dirs` it reads
    (a later run would read the outputs as data); an image (by content, whatever its name) as a file target;
    in a folder target, an image at a name the command writes (`writes`, a regular expression of names)
    that this project did not draw. An earlier output of the same kind (a CSV, an ONNX file, our plots) may be
    replaced: outputs are only ever written whole (atomic_write).
    """
    target, kind = Path(target), "folder" if folder else "file"
    if target.is_symlink():
        raise UserError(f"{flag} {target} is a symbolic link: outputs are never written through a link (it could "
                        f"lead to anyone's files); give the real path or another {kind}")
    if target.exists():
        mode = target.stat().st_mode
        if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
            raise UserError(f"{flag} {target} is not a regular file or folder (a FIFO, a device or a socket): "
                            f"give another {kind}")
        if folder != stat.S_ISDIR(mode):
            raise UserError(f"{flag} {target} is a {'file' if folder else 'folder'}; give a {kind} "
                            f"(a new name is created)")
    for path in inputs:
        if is_same_path(target, Path(path)):
            raise UserError(f"{flag} {target} is {path}, an input of this command: give another {kind}")
    resolved = target.resolve()
    for data_dir in data_dirs:
        if Path(data_dir).resolve() in (resolved, *resolved.parents):
            raise UserError(f"{flag} {target} is inside the data folder {data_dir}, which this command reads: "
                            f"its outputs would be read as images; choose a {kind} outside it")
    if not folder and target.is_file() and image_software(target) is not None:
        raise UserError(f"{flag} {target} is an existing image: give a new file name")
    for path in (target.iterdir() if folder and writes and target.is_dir() else ()):
        if re.fullmatch(writes, path.name) and path.is_file() and drawn_elsewhere(path):
            raise UserError(f"{flag} {target} holds {path.name}, an image this project did not draw, where it "
                            f"would write one of that name: choose another {kind}")


def drawn_elsewhere(path: Path) -> bool:
    """An image (by content) that this project's plots and explanations are not: a user's, never replaced."""
    software = image_software(path)
    return software is not None and not software.startswith(DRAWN_HERE)


def is_same_path(first: Path, second: Path) -> bool:
    """Whether two paths name one file or folder (links, hard links and `..` seen through)."""
    if first.exists() and second.exists():
        return os.path.samefile(first, second)
    return first.resolve() == second.resolve()


@contextlib.contextmanager
def output_lock(output_dir: Path) -> Iterator[None]:
    """Hold output_dir for one run: another run on it fails at once, naming this process.

    Temporary files that a killed run left behind are removed once the lock is held (no other run is
    writing there then). An output folder this run had to create and never wrote to is removed with the lock.
    """
    output_dir = Path(output_dir)
    created = not output_dir.exists()
    output_dir.mkdir(parents=True, exist_ok=True)
    handle = take_lock(output_dir / LOCK_NAME)
    try:
        remove_leftovers(output_dir)
        yield
    finally:
        os.remove(output_dir / LOCK_NAME)  # before unlocking: take_lock checks that it locked the file still there
        os.close(handle)
        if created:
            with contextlib.suppress(OSError):  # not empty: this run wrote its outputs
                output_dir.rmdir()


def take_lock(path: Path) -> int:
    """Lock `path` (created if need be) and write our PID and host in it; UserError if another process holds it.

    A link, a FIFO, a device or a file of someone else's content planted there is refused, never read out,
    followed or truncated: in a shared folder it could point at anyone's file.
    """
    while True:
        try:  # O_NONBLOCK: opening a planted FIFO must not wait for a writer
            handle = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
        except OSError as error:
            if error.errno != errno.ELOOP:
                raise
            raise UserError(f"{path} is a symbolic link, not a lock file of this project: remove it") from None
        status = os.fstat(handle)
        if not stat.S_ISREG(status.st_mode) or status.st_nlink != 1:
            os.close(handle)
            raise UserError(f"{path} is not a lock file of this project (not a plain file of its own): remove it")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = lock_owner(handle) or "a process that is starting"
            os.close(handle)
            raise UserError(f"output folder {path.parent} is in use by another run ({owner}): wait for it to end, "
                            f"or choose another --output-dir") from None
        if is_same_file(handle, path):
            break
        os.close(handle)  # its holder removed that file as it finished: lock the one there now
    stale = lock_owner(handle)
    if stale is None:
        os.close(handle)
        raise UserError(f"{path} holds something other than this project's lock line: remove it")
    if stale:
        log.warning("warning: took over the lock of %s from a run that ended without releasing it (%s)",
                    path.parent, stale)
    os.ftruncate(handle, 0)
    os.pwrite(handle, f"PID {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    return handle


def lock_owner(handle: int) -> str | None:
    """The "PID N on HOST" line of a lock file; "" when it is empty, None when it holds anything else."""
    text = os.pread(handle, 300, 0).decode(errors="replace").strip()
    return text if not text or OWNER.fullmatch(text) else None


def is_same_file(handle: int, path: Path) -> bool:
    try:
        status = os.stat(path)
    except FileNotFoundError:
        return False
    return (status.st_dev, status.st_ino) == (os.fstat(handle).st_dev, os.fstat(handle).st_ino)


def remove_leftovers(folder: Path) -> None:
    """Temporary files of an earlier run that was killed while writing: never complete, never read."""
    for sub in (folder, folder / "cache"):
        for leftover in sub.glob(".*.tmp") if sub.is_dir() else ():
            if LEFTOVER.fullmatch(leftover.name) and leftover.is_file() and not leftover.is_symlink():
                leftover.unlink()
                log.info("removed %s, left by a run that was stopped while writing it", leftover)
