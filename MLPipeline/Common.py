"""The basics every module uses: the user-error type, atomic file writes, the device, progress lines.

It imports nothing from the project, so every other module can import it.
"""
from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
import signal
import stat
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

log = logging.getLogger("MLPipeline")

PROGRESS_SECONDS = 10.0  # how often long loops print a progress line
# The most a checkpoint or weights file may hold: the largest this project writes or reads (VGG16's weights)
# is under 600 MB, so a file or archive beyond it is damaged or hostile, never one to expand.
MAX_LOAD_BYTES = 4 * 2**30


class UserError(Exception):
    """A mistake the user can fix: the CLI prints the message and exits with status 2."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's or `kill`'s stop): handled like Ctrl-C, so the run ends the same clean way."""


# The stop a signal asked for (KeyboardInterrupt or Terminated), or None. A KeyboardInterrupt raised while
# the DataLoader forks a worker lands in an at-fork hook, which swallows it; every progress update raises it
# again, so a Ctrl-C always stops the run at the next batch.
STOP_REQUESTED: list = []


def request_stop(signal_number: int, frame) -> None:
    """The handler of SIGINT and SIGTERM (engine.py installs it): remember the stop, and stop now."""
    STOP_REQUESTED[:] = [Terminated if signal_number == signal.SIGTERM else KeyboardInterrupt]
    raise STOP_REQUESTED[0]()


def first_line(error: Exception) -> str:
    """An exception's message, first line only: what a user needs, not a library's page of context."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


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


@contextlib.contextmanager
def atomic_write(path: Path) -> Iterator[str]:
    """`with atomic_write(path) as temp_name:` write temp_name, next to `path`; on leaving the block it is
    os.replace'd in whole, so readers never see half a file.

    A link, a FIFO or a device at `path` is refused, never replaced. A write that fails (a full disk,
    whatever the writer raises, Ctrl-C) leaves the previous file as it was and no temporary file behind.
    """
    path = Path(path)
    if path.is_symlink() or (path.exists() and not stat.S_ISREG(path.stat().st_mode)):
        raise UserError(f"{path} is {'a symbolic link' if path.is_symlink() else 'not a regular file'}, so it is "
                        f"not replaced: choose another file name")
    path.parent.mkdir(parents=True, exist_ok=True)
    temp_name = ""
    try:
        # The name's first 40 characters (160 bytes at most): any legal name leaves room for the 14 added
        handle, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name[:40]}.", suffix=".tmp")
        os.close(handle)
        yield temp_name
        with open(temp_name, "rb+") as written:
            os.fsync(written.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temp_name, 0o666 & ~umask)  # mkstemp makes owner-only files; give the usual permissions
        os.replace(temp_name, path)
    except OSError as error:  # a full disk, a folder we may not write to: named with the file, one line
        raise OSError(error.errno, f"could not write {path} ({error.strerror or first_line(error)}); the file "
                      f"there before, if any, is unchanged") from None
    except RuntimeError as error:  # torch.save reports a failed write (a full disk) as a RuntimeError
        if "PytorchStreamWriter" not in str(error) and "write failed" not in str(error):
            raise
        raise OSError(errno.EIO, f"could not write {path} ({first_line(error)}); the file there before, if "
                      f"any, is unchanged") from None
    finally:
        if temp_name and os.path.exists(temp_name):
            os.remove(temp_name)


def pick_device(name: str) -> torch.device:
    """'auto' = the GPU when there is one; asking for CUDA without one is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda"):
        raise UserError(f"unknown device '{name}': use auto, cpu or cuda")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but PyTorch sees no CUDA GPU here; use --device cpu")
    return torch.device(name)


def autocast(device: torch.device, training: bool = False):
    """bf16 mixed precision on CUDA; a no-op on the CPU.

    A GPU without bf16 gets fp16 for inference only: training in fp16 would need gradient scaling, and the
    small heads trained here gain nothing from it, so that path trains in fp32.
    """
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    enabled = device.type == "cuda" and (bf16 or not training)
    return torch.autocast("cuda", dtype=torch.bfloat16 if bf16 else torch.float16, enabled=enabled)


def progress_reporter(label: str, total: int) -> Callable[[int], None]:
    """A callback that logs 'label: done/total (rate, time left)' at most every PROGRESS_SECONDS.

    Hand-written rather than tqdm: one plain line every few seconds reads well in a log file or CI output,
    where a redrawn bar does not, and it goes through the same logger as every other line.
    """
    start = last = time.perf_counter()

    def update(done: int) -> None:
        nonlocal last
        if STOP_REQUESTED:
            raise STOP_REQUESTED[0]()
        now = time.perf_counter()
        if now - last >= PROGRESS_SECONDS and 0 < done < total:
            rate = done / (now - start)
            log.info("  %s: %d/%d (%.1f images/s, %.0f s left)", label, done, total, rate, (total - done) / rate)
            last = now
    return update


def setup_logging() -> None:
    """Progress lines to stdout, warnings to stderr, both as bare messages.

    A file name that is not valid UTF-8 goes to stdout byte for byte, as the disk has it (predictions are
    read by scripts); stderr shows it escaped (as \\udcXX), Python's default for the real stderr.
    """
    for stream, errors in ((sys.stdout, "surrogateescape"), (sys.stderr, "backslashreplace")):
        if isinstance(stream, io.TextIOWrapper):  # not when something else took it over (a notebook)
            stream.reconfigure(errors=errors)
    to_stdout = logging.StreamHandler(sys.stdout)
    to_stdout.addFilter(lambda record: record.levelno < logging.WARNING)
    to_stderr = logging.StreamHandler(sys.stderr)
    to_stderr.setLevel(logging.WARNING)
    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[to_stdout, to_stderr], force=True)
    for talkative in ("onnxscript", "onnx_ir"):  # the ONNX exporter's notes on each of its passes
        logging.getLogger(talkative).setLevel(logging.WARNING)
