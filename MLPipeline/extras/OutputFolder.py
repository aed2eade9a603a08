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
import resource
import shutil
import socket
import stat
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from MLPipeline.CreateDataset import UserError, log
from MLPipeline.extras.Files import image_software

LOCK_NAME = ".run.lock"  # in the output folder while a run writes there: who holds it
OWNER = re.compile(r"PID \d+ on [^\s]{1,255}")  # what take_lock writes; anything else is not our file
LEFTOVER = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")  # atomic_write's temporary files (mkstemp names)
DRAWN_HERE = "Matplotlib"  # how the PNGs this project draws (plots, explanations) name their Software
TRAIN_IMAGES = r"(loss_curve|confusion_matrix)\.png"  # the images train writes in its output folder
MIN_FREE = 2**20  # a folder with less free space than this cannot take a lock line and an output


def check_write_target(target: Path, flag: str, *, folder: bool, inputs: Iterable[Path] = (),
                       data_dirs: Iterable[Path] = (), writes: str = "", subfolders: Iterable[str] = (),
                       foreign: str = "") -> None:
    """The gate: the one check of every file and folder the tool writes, before any work. UserError naming
    `flag` and `target` when the target would cost the user a file or feed a later run its outputs.

    Refused: a link, a FIFO or a device; a file where a folder is wanted (folder=True) or the reverse; one of
    the command's `inputs` (a model, an image); a target whose real place (every link on the way resolved) is
    inside, or holds, one of the folders the command reads: each of `data_dirs` and every folder a link in
    them leads to (a later run would read the outputs as data); a `subfolders` name the tool creates inside
    the target that is a link or no folder; an image (by content, whatever its name) or a trained model (a
    torch.save archive) as a file target; in a folder target, an image at a name the command writes (`writes`,
    a regular expression of names) that this project did not draw, or a file named by `foreign` (another
    command's outputs: a training run's model). An earlier output of the same kind (a CSV, an ONNX file, our
    plots) may be replaced: outputs are only ever written whole (atomic_write).
    """
    target, kind = as_path(target, flag), "folder" if folder else "file"
    if target.is_symlink():
        raise UserError(f"{flag} {shown(target)} is a symbolic link: outputs are never written through a link (it "
                        f"could lead to anyone's files); give the real path or another {kind}")
    if target.exists():
        mode = target.stat().st_mode
        if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
            raise UserError(f"{flag} {shown(target)} is not a regular file or folder (a FIFO, a device or a "
                            f"socket): give another {kind}")
        if folder != stat.S_ISDIR(mode):
            raise UserError(f"{flag} {shown(target)} is a {'file' if folder else 'folder'}; give a {kind} "
                            f"(a new name is created)")
    for path in inputs:
        if is_same_path(target, Path(path)):
            raise UserError(f"{flag} {shown(target)} is {shown(path)}, an input of this command: give another {kind}")
    resolved = target.resolve()
    for data_dir, real in read_folders(data_dirs):
        if real == resolved or real in resolved.parents:
            raise UserError(f"{flag} {shown(target)} is inside the data folder {shown(data_dir)}"
                            f"{'' if real == Path(data_dir).resolve() else f' (through a link to {shown(real)})'}, "
                            f"which this command reads: its outputs would be read as images; choose a {kind} "
                            f"outside it")
        if resolved in real.parents:
            raise UserError(f"{flag} {shown(target)} holds the data folder {shown(data_dir)}"
                            f"{'' if real == Path(data_dir).resolve() else f' (through a link, {shown(real)})'}, "
                            f"which this command reads: its outputs would mix with the data; choose a {kind} "
                            f"outside it")
    for name in subfolders:
        if (target / name).is_symlink() or ((target / name).exists() and not (target / name).is_dir()):
            raise UserError(f"{flag} {shown(target)} holds {name}, where this command writes a folder of its own, "
                            f"but it is a link or no folder: it is never written or deleted through; remove it "
                            f"or choose another {kind}")
    if not folder and target.is_file() and image_software(target) is not None:
        raise UserError(f"{flag} {shown(target)} is an existing image: give a new file name")
    if not folder and target.is_file() and is_checkpoint(target):
        raise UserError(f"{flag} {shown(target)} is a trained model (a PyTorch checkpoint), which is never "
                        f"replaced: give a new file name")
    for path in (target.iterdir() if folder and (writes or foreign) and target.is_dir() else ()):
        if writes and re.fullmatch(writes, path.name) and path.is_file() and drawn_elsewhere(path):
            raise UserError(f"{flag} {shown(target)} holds {shown(path.name)}, an image this project did not "
                            f"draw, where it would write one of that name: choose another {kind}")
        if foreign and re.fullmatch(foreign, path.name):
            raise UserError(f"{flag} {shown(target)} holds {shown(path.name)}, the output of another command (a "
                            f"trained model and its outputs), which this command would overwrite: choose another "
                            f"{kind}")


def read_folders(data_dirs: Iterable[Path]) -> list[tuple[Path, Path]]:
    """(data folder, real folder) for each data folder and each folder it leads to through a link at any depth
    (the folder walk follows links): where the command's reads really lead."""
    found: dict[Path, Path] = {}
    for data_dir in data_dirs:
        found.setdefault(Path(data_dir).resolve(), Path(data_dir))
        for here, subfolders, _ in os.walk(data_dir, followlinks=True):
            links = [name for name in subfolders if os.path.islink(os.path.join(here, name))]
            subfolders[:] = [name for name in subfolders if name not in links]
            for name in links:  # a link's target, and what lies under it, are read as data too
                real = Path(os.path.realpath(os.path.join(here, name)))
                if real not in found:
                    found[real] = Path(data_dir)
                    subfolders.append(name)  # walked once (loops end here)
    return [(data_dir, real) for real, data_dir in found.items()]


def is_checkpoint(path: Path) -> bool:
    """Whether a file is a torch.save archive (a trained model): a zip holding a data.pkl."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("data.pkl") for name in archive.namelist())
    except (OSError, zipfile.BadZipFile, ValueError):
        return False


def as_path(value, what: str) -> Path:
    """A path given through the API or a flag: a str or any os.PathLike; anything else (bytes, a tensor, an image,
    None) is refused with its type named, never turned into a name."""
    if isinstance(value, (str, os.PathLike)) and not isinstance(value, bytes):
        path = os.fspath(value)
        if isinstance(path, str):
            return Path(path)
    raise UserError(f"{what} must be a path (a str or os.PathLike), not a {type(value).__name__}")


def shown(name) -> str:
    """A name as messages print it: as it is, or with repr's escapes when it holds a control character (a
    newline in a file name must not start a forged line of its own)."""
    text = str(name)
    return text if text.isprintable() else repr(text)


def printable(text: str) -> str:
    """A message with every control character escaped: one line, whatever the names in it hold."""
    return text if text.isprintable() else "".join(char if char.isprintable() else repr(char)[1:-1]
                                                   for char in text)


def own_folder(folder: Path) -> Path:
    """A folder the tool creates inside its target (explained/, a class folder of the demo data), created when
    missing: never a link or anything but a folder, so nothing is written or deleted through it."""
    folder = Path(folder)
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise UserError(f"{shown(folder)} is a symbolic link or no folder: nothing is written or deleted through "
                        f"it (it could lead to anyone's files); remove it or choose another output folder")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def remove_own(path: Path, names: str) -> bool:
    """Delete `path` only when it is the tool's own earlier output: a plain file (no link), its name one the tool
    gives (`names`, a regular expression) and its content an image this project drew. Anything else stays."""
    path = Path(path)
    if path.is_symlink() or not path.is_file() or not re.fullmatch(names, path.name):
        return False
    software = image_software(path)
    if software is None or not software.startswith(DRAWN_HERE):
        return False
    path.unlink()
    return True


def check_room(path: Path, needed: int = 0) -> None:
    """Before the work: OSError naming `path` when the disk there has less than `needed` bytes (and a minimum)
    free, or the process may not write a file that large (ulimit -f)."""
    folder = Path(path)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return  # not known here: the write itself says
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if free < needed + MIN_FREE:
        raise OSError(errno.ENOSPC, f"could not write {shown(path)} (No space left on device: {free / 1e6:.1f} MB "
                      f"free, {max(needed, MIN_FREE) / 1e6:.1f} MB needed); free some space or choose another folder")
    if limit != resource.RLIM_INFINITY and limit < max(needed, 1):
        raise OSError(errno.EFBIG, f"could not write {shown(path)} (File too large: this process may write files "
                      f"of at most {limit} bytes (ulimit -f), {needed} needed); raise the limit")


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
    check_room(output_dir)
    created = [folder for folder in (output_dir, *output_dir.parents) if not folder.exists()]
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        handle = take_lock(output_dir / LOCK_NAME)
    except OSError as error:  # a full disk, a folder we may not write to: nothing of this run is left there
        lock = output_dir / LOCK_NAME
        with contextlib.suppress(OSError):  # a lock file begun and never written
            if not lock.is_symlink() and lock.stat().st_size == 0:
                lock.unlink()
        remove_empty(created)
        raise OSError(error.errno, f"could not write {shown(output_dir / LOCK_NAME)} ({error.strerror or error})") \
            from None
    except UserError:
        remove_empty(created)
        raise
    try:
        remove_leftovers(output_dir)
        yield
    finally:
        os.remove(output_dir / LOCK_NAME)  # before unlocking: take_lock checks that it locked the file still there
        os.close(handle)
        remove_empty(created)


def remove_empty(folders: list[Path]) -> None:
    """The folders a run created (deepest first), removed while empty: a failed run leaves no empty folder."""
    for folder in folders:
        with contextlib.suppress(OSError):  # not empty: this run wrote its outputs
            folder.rmdir()


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
    try:
        os.ftruncate(handle, 0)
        os.pwrite(handle, f"PID {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    except OSError:
        os.close(handle)
        raise
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
        for leftover in sub.glob(".*.tmp") if sub.is_dir() and not sub.is_symlink() else ():
            if LEFTOVER.fullmatch(leftover.name) and leftover.is_file() and not leftover.is_symlink():
                leftover.unlink()
                log.info("removed %s, left by a run that was stopped while writing it", leftover)


HANDOVER_FAILURES = ("unable to resize file", "unable to write to file", "unable to mmap", "unable to open shared")


def worker_handover_failed(error: BaseException) -> str:
    """The message for a decoding worker that could not hand its batch over (worker processes pass batches
    through shared memory: a full /dev/shm, or ulimit -f), or "" for any other error."""
    text = str(error)
    if not any(failure in text for failure in HANDOVER_FAILURES):
        return ""
    reason = next((line.strip() for line in text.splitlines() if any(f in line for f in HANDOVER_FAILURES)), "")
    return (f"a decoding worker could not hand over its batch through shared memory ({reason}): the shared "
            f"memory (/dev/shm) is full or too small, or a file size limit (ulimit -f) is set; pass --workers 0 "
            f"(decode in this process), or give the container more shared memory (docker --shm-size)")
