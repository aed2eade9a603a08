"""The basics every module uses: the user-error type, atomic file writes, the device, progress lines.

It imports nothing from the project, so data, model, report, training and prediction can all import it.
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

log = logging.getLogger("MLPipeline")

PROGRESS_SECONDS = 10.0  # how often long loops print a progress line
LOCK_NAME = ".run.lock"  # in the output folder while a run writes there: who holds it


class UserError(Exception):
    """A mistake the user can fix: the CLI prints the message and exits with status 2."""


def save_atomically(path: Path, write: Callable[[str], None]) -> None:
    """Call write(temp_path) next to `path`, then os.replace it in: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(temp_name)
        with open(temp_name, "rb+") as written:
            os.fsync(written.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temp_name, 0o666 & ~umask)  # mkstemp makes owner-only files; give the usual permissions
        os.replace(temp_name, path)
    finally:
        if os.path.exists(temp_name):
            os.remove(temp_name)


def check_output_dir(output_dir: Path) -> None:
    """An output folder may not exist yet, but must not be a file: checked before any work is done."""
    if Path(output_dir).exists() and not Path(output_dir).is_dir():
        raise UserError(f"output folder {output_dir} is a file; choose a folder with --output-dir")


@contextlib.contextmanager
def output_lock(output_dir: Path) -> Iterator[None]:
    """Hold output_dir for one run: another run on it fails at once, naming this process.

    The lock is the kernel's (flock) on output_dir/.run.lock, which holds "PID N on HOST" for that message. The
    kernel lets go when the process ends, however it ends, so a lock file a killed run left is just taken over.
    An output folder this run had to create and never wrote to is removed with the lock.
    """
    output_dir = Path(output_dir)
    created = not output_dir.exists()
    output_dir.mkdir(parents=True, exist_ok=True)
    handle = take_lock(output_dir / LOCK_NAME)
    try:
        yield
    finally:
        os.remove(output_dir / LOCK_NAME)  # before unlocking: take_lock checks that it locked the file still there
        os.close(handle)
        if created:
            with contextlib.suppress(OSError):  # not empty: this run wrote its outputs
                output_dir.rmdir()


def take_lock(path: Path) -> int:
    """Lock `path` (created if need be) and write our PID and host in it; UserError if another process holds it."""
    while True:
        handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.read(handle, 1000).decode(errors="replace").strip() or "a process that is starting"
            os.close(handle)
            raise UserError(f"output folder {path.parent} is in use by another run ({owner}): wait for it to end, "
                            f"or choose another --output-dir") from None
        if is_same_file(handle, path):
            break
        os.close(handle)  # its holder removed that file as it finished: lock the one there now
    stale = os.read(handle, 1000).decode(errors="replace").strip()
    if stale:
        log.warning("warning: took over the lock of %s from a run that ended without releasing it (%s)",
                    path.parent, stale)
    os.ftruncate(handle, 0)
    os.pwrite(handle, f"PID {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    return handle


def is_same_file(handle: int, path: Path) -> bool:
    try:
        status = os.stat(path)
    except FileNotFoundError:
        return False
    return (status.st_dev, status.st_ino) == (os.fstat(handle).st_dev, os.fstat(handle).st_ino)


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
    """A callback that logs 'label: done/total (rate, time left)' at most every PROGRESS_SECONDS."""
    start = last = time.perf_counter()

    def update(done: int) -> None:
        nonlocal last
        now = time.perf_counter()
        if now - last >= PROGRESS_SECONDS and done < total:
            rate = done / (now - start)
            log.info("  %s: %d/%d (%.1f images/s, %.0f s left)", label, done, total, rate, (total - done) / rate)
            last = now
    return update


# --------------------------------------------------------------------------------------- several processes
# `torchrun --nproc_per_node=N engine.py ...` starts N copies of the program with RANK, WORLD_SIZE and
# LOCAL_RANK set. Each takes its shard of the images; rank 0 alone logs progress and writes outputs.

def world() -> tuple[int, int]:
    """(this process's rank, number of processes) in the job it has joined: (0, 1) until start_distributed()
    (a process that never joins, e.g. predicting with an .onnx file, works alone on everything)."""
    if not torch.distributed.is_initialized():
        return 0, 1
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def is_main_process() -> bool:
    return world()[0] == 0


def start_distributed(device: torch.device) -> torch.device:
    """Join the torchrun job, if there is one (NCCL on GPUs, Gloo on CPUs); returns this process's device.

    Every process but rank 0 logs warnings only, so progress is printed once.
    """
    rank, size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))  # set by torchrun
    if size == 1 or torch.distributed.is_initialized():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=
                                         device if device.type == "cuda" else None)
    if rank != 0:
        log.setLevel(logging.WARNING)
    return device


def gather(item) -> list:
    """Every process's `item` (any picklable value), in rank order; [item] in a single process."""
    if not torch.distributed.is_initialized():
        return [item]
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, item)
    return gathered


def shard(items: list) -> list[int]:
    """The positions of `items` this process handles: every WORLD_SIZE-th, from its rank."""
    rank, size = world()
    return list(range(rank, len(items), size))
