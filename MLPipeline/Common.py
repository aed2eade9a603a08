"""The basics every module uses: the user-error type, atomic file writes, the device, progress lines.

It imports nothing from the project, so data, model, report, training and prediction can all import it.
"""
from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

log = logging.getLogger("MLPipeline")

PROGRESS_SECONDS = 10.0  # how often long loops print a progress line


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
