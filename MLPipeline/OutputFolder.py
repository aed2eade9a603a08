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
from collections.abc import Iterator
from pathlib import Path

from MLPipeline.Common import UserError, log

LOCK_NAME = ".run.lock"  # in the output folder while a run writes there: who holds it
OWNER = re.compile(r"PID \d+ on [^\s]{1,255}")  # what take_lock writes; anything else is not our file
LEFTOVER = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")  # atomic_write's temporary files (mkstemp names)


def check_output_dir(output_dir: Path, data_dir: Path | None = None) -> None:
    """An output folder may not exist yet, but must not be a file, nor lie inside the data folder (a second
    run would index the first one's plots as a class of images): checked before any work is done."""
    if Path(output_dir).exists() and not Path(output_dir).is_dir():
        raise UserError(f"output folder {output_dir} is a file; choose a folder with --output-dir")
    output = Path(output_dir).resolve()
    if data_dir is not None and Path(data_dir).resolve() in (output, *output.parents):
        raise UserError(f"the output folder {output_dir} is inside the data folder {data_dir}: its plots would be "
                        f"read as images of a class; choose an --output-dir outside it")


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
