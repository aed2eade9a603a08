"""The basics every machinery module uses: the user-error type and the device (the recipe's own), files
written whole with every failure one clear line, checked loading of PyTorch files, signals, progress lines.
"""
from __future__ import annotations

import contextlib
import errno
import os
import signal
import stat
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from MLPipeline.CreateDataset import UserError, first_line, log
from MLPipeline.ResNet_Model import PROGRESS_SECONDS  # noqa: F401 (how often long loops print a line)
from MLPipeline.ResNet_Model import atomic_write as replace_whole
from MLPipeline.Train import pick_device

__all__ = ["UserError", "log", "pick_device", "atomic_write", "safe_torch_load", "first_line",
           "progress_reporter", "request_stop", "stop_if_asked", "STOP_REQUESTED", "Terminated", "check_archive"]

# The most a checkpoint or weights file may hold: the largest this project writes or reads (VGG16's weights)
# is under 600 MB, so a file or archive beyond it is damaged or hostile, never one to expand.
MAX_LOAD_BYTES = 4 * 2**30


def safe_torch_load(path: Path, what: str) -> dict:
    """torch.load restricted to tensors and plain containers: a crafted pickle is refused, never run; a file
    whose bytes changed, or that would expand beyond any file this project writes, is refused before."""
    check_archive(Path(path), what)
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many kinds for files that are not checkpoints
        if "GLOBAL" in str(error):
            raise UserError(f"{path} was refused: it asks to load Python objects other than tensors and plain "
                            f"values (loading it could run code), so it is not a {what} of this project") from None
        raise UserError(f"{path} is not a readable {what} (corrupt, truncated or not a PyTorch file: "
                        f"{type(error).__name__})") from None
    if not isinstance(loaded, dict):
        raise UserError(f"{path} is not a {what}: it holds a {type(loaded).__name__}, not a dict")
    return loaded


def check_archive(path: Path, what: str) -> None:
    """Refuse a model file larger than MAX_LOAD_BYTES unread, and a zip archive that is damaged or a bomb.

    torch.save writes a zip archive whose members carry a CRC-32, which torch.load never checks: a model
    with a few changed bytes would load and give other answers. Every member is read and checked here, after
    the sizes its archive declares are bounded (a zip bomb is refused before anything is expanded)."""
    size = os.stat(path).st_size
    if size > MAX_LOAD_BYTES:
        raise UserError(f"{path} is {size / 1e9:.1f} GB, larger than any {what} this project reads or writes "
                        f"(at most {MAX_LOAD_BYTES / 1e9:.1f} GB): refused unread")
    if not zipfile.is_zipfile(path):
        return  # torch's legacy format, or not a PyTorch file at all: torch.load judges it
    with open(path, "rb") as file:  # the archive must end where its end record says: nothing appended
        file.seek(max(0, size - 65_557))
        tail = file.read()
    end = tail.rfind(b"PK\x05\x06")
    if end < 0 or end + 22 + int.from_bytes(tail[end + 20:end + 22], "little") != len(tail):
        raise UserError(f"{path} is damaged (bytes follow the end of its archive: something was appended after it "
                        f"was written); replace it with a good copy or train again")
    try:
        with zipfile.ZipFile(path) as archive:
            expanded = sum(member.file_size for member in archive.infolist())
            # torch.save stores its members uncompressed: one that would expand several-fold is a zip bomb
            bomb = expanded > min(MAX_LOAD_BYTES, 4 * size + 2**20)
            # each member read, never past its declared size, and its CRC-32 compared
            damaged = None if bomb else archive.testzip()
    except Exception as error:  # zipfile and zlib raise many kinds for a damaged archive
        raise UserError(f"{path} is damaged ({type(error).__name__}: {first_line(error)}): it is not the "
                        f"{what} that was written") from None
    if bomb:
        raise UserError(f"{path} would expand from {size / 1e6:.1f} MB to {expanded / 1e6:.0f} MB, which no {what} "
                        f"that torch.save writes does (a zip bomb?): refused unread")
    if damaged:
        raise UserError(f"{path} is damaged ({damaged} fails its CRC check: its bytes changed after it was "
                        f"written); replace it with a good copy or train again")


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's or `kill`'s stop): handled like Ctrl-C, so the run ends the same clean way."""


# The stop a signal asked for (KeyboardInterrupt or Terminated), or nothing. The handler only records it; the
# run's loops read it (stop_if_asked) and raise in their own code, never inside a logging call, a worker's fork
# or a __del__, where a raise from the handler would print tracebacks (a second Ctrl-C among them).
STOP_REQUESTED: list = []


def request_stop(signal_number: int, frame) -> None:
    """The handler of SIGINT and SIGTERM (engine.py installs it): record the stop; the run stops at its next
    batch. It writes one line itself, the first time only: the logging module is not safe in a handler."""
    if not STOP_REQUESTED:
        os.write(2, b"stopping at the next batch...\n")
    STOP_REQUESTED[:] = [Terminated if signal_number == signal.SIGTERM else KeyboardInterrupt]


def stop_if_asked(*_) -> None:
    """Raise the stop a signal asked for, if any: every long loop calls it (a progress update, a module's
    forward while engine.py trains); its arguments, a forward hook's, are ignored."""
    if STOP_REQUESTED:
        raise STOP_REQUESTED[0]()


@contextlib.contextmanager
def atomic_write(path: Path) -> Iterator[str]:
    """The recipe's atomic_write (the file replaced whole, or left as it was), for the tool's outputs: a link,
    a FIFO or a device at `path` is refused, never replaced, and a failed write (a full disk, a folder we may
    not write to) is one error naming the file."""
    path = Path(path)
    if path.is_symlink() or (path.exists() and not stat.S_ISREG(path.stat().st_mode)):
        raise UserError(f"{path} is {'a symbolic link' if path.is_symlink() else 'not a regular file'}, so it is "
                        f"not replaced: choose another file name")
    try:
        with replace_whole(path) as temp_name:
            yield temp_name
    except RuntimeError as error:  # torch.save reports a failed write (a full disk) as a RuntimeError
        if not any(text in str(error) for text in ("PytorchStreamWriter", "write failed", "unexpected pos")):
            raise
        raise OSError(errno.EIO, f"could not write {path} ({first_line(error)}); the file there before, if "
                      f"any, is unchanged") from None


def progress_reporter(label: str, total: int) -> Callable[[int], None]:
    """A callback that logs 'label: done/total (rate, time left)' at most every PROGRESS_SECONDS.

    Hand-written rather than tqdm: one plain line every few seconds reads well in a log file or CI output,
    where a redrawn bar does not, and it goes through the same logger as every other line.
    """
    start = last = time.perf_counter()

    def update(done: int) -> None:
        nonlocal last
        stop_if_asked()
        now = time.perf_counter()
        if now - last >= PROGRESS_SECONDS and 0 < done < total:
            rate = done / (now - start)
            log.info("  %s: %d/%d (%.1f images/s, %.0f s left)", label, done, total, rate, (total - done) / rate)
            last = now
    return update
