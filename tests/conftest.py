"""Shared test helpers: tiny image folders and running engine.py as a user would.

Everything here is sized for a 2-core CPU: 32 px images, a few files per class, one or two epochs,
and `--weights none` so that no test ever reaches for the network.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

import cv2
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
ENGINE = ROOT / "engine.py"
FAST = ["--img-size", "32", "--weights", "none", "--epochs", "1"]  # train flags for a run of seconds
COLOURS = [(220, 40, 40), (40, 40, 220), (40, 200, 40), (200, 200, 40)]

# pytest-xdist runs one worker per core (pytest.ini: -n 2): each worker, and every engine.py it starts, gets
# its share of the cores, so that one process's OpenMP threads never wait spinning on a core another holds.
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
    import torch
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def make_image_folder(root: Path, classes: tuple[str, ...] = ("alpha", "beta", "gamma"), per_class: int = 8,
                      seed: int = 0, size: tuple[int, int] = (48, 40)) -> Path:
    """root/<class>/<i>.png|jpg: noise with a class-coloured rectangle, so classes are learnable."""
    rng = np.random.default_rng(seed)
    height, width = size
    for class_number, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            image = rng.integers(0, 90, (height, width, 3), dtype=np.uint8)
            top, left = rng.integers(0, height // 3), rng.integers(0, width // 3)
            image[top:top + height // 2, left:left + width // 2] = COLOURS[class_number % len(COLOURS)]
            cv2.imwrite(str(root / name / f"{i:03d}.{'png' if i % 2 else 'jpg'}"), image)
    return root


def train_tiny_model(folder: Path) -> tuple[Path, Path]:
    """A ResNet18 trained for one epoch on folder/data (make_image_folder's): (data folder, output folder)."""
    from MLPipeline.extras.Run import RunConfig as TrainConfig
    from MLPipeline.extras.Run import train
    data = make_image_folder(folder / "data")
    train(TrainConfig(data_dir=data, output_dir=folder / "out", img_size=32, weights="none", epochs=1,
                      backbone="resnet18", workers=0))
    return data, folder / "out"


def interrupted(command: list, ready, signals: int = 1) -> tuple[int, str]:
    """Run `python COMMAND`, send SIGINT `signals` times (0.2 s apart) once a stderr line passes ready(line);
    its exit status and its whole stderr."""
    # SIGINT at its default in the child, whatever this process inherited (a shell's background job ignores it)
    process = subprocess.Popen([sys.executable, *map(str, command)], cwd=ROOT, stderr=subprocess.PIPE, text=True,
                               stdout=subprocess.DEVNULL,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    watchdog = threading.Timer(240, process.kill)
    watchdog.start()
    try:
        seen = []
        for line in process.stderr:
            seen.append(line)
            if ready(line):
                break
        for _ in range(signals):
            process.send_signal(signal.SIGINT)
            time.sleep(0.2)
        seen.append(process.communicate(timeout=120)[1])
    finally:
        watchdog.cancel()
        if process.poll() is None:
            process.kill()
            process.wait()
    return process.returncode, "".join(seen)


def run_engine(*args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python engine.py ARGS` in a fresh process, output captured as text."""
    return subprocess.run([sys.executable, str(ENGINE), *map(str, args)], cwd=cwd or ROOT, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="session", autouse=True)
def offline_torch_home(tmp_path_factory) -> Path:
    """An empty torchvision cache for the whole run (inherited by engine.py subprocesses)."""
    torch_home = tmp_path_factory.mktemp("torch_home")
    os.environ["TORCH_HOME"] = str(torch_home)
    return torch_home


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Tests never touch the network: any attempt to connect over IP fails loudly in-process.

    Unix sockets stay allowed: multiprocessing's fork server talks to its workers through one.
    """
    real_connect = socket.socket.connect

    def refuse(self, address, *args, **kwargs):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            raise OSError("tests must not use the network")
        return real_connect(self, address, *args, **kwargs)
    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """Three classes of eight small images; read-only by convention (copy it before changing it)."""
    return make_image_folder(tmp_path_factory.mktemp("tiny_data"))


@pytest.fixture
def cli(capsys):
    """engine.main(ARGS) in this process, as a CompletedProcess; an uncaught exception becomes a traceback.

    For tests of what the CLI does, not of a fresh interpreter: it saves the seconds of a process start and
    its imports (a few tests keep `run_engine`, the real `python engine.py`, for that)."""
    import engine

    def invoke(*args) -> subprocess.CompletedProcess:
        root = logging.getLogger()
        saved_handlers, saved_level = root.handlers[:], root.level
        capsys.readouterr()
        try:
            try:
                code = engine.main([str(arg) for arg in args])
            except SystemExit as stop:  # argparse
                code = stop.code
            except Exception:  # noqa: BLE001 - as the interpreter would: a traceback and exit 1
                traceback.print_exc()
                code = 1
        finally:
            root.handlers[:] = saved_handlers
            root.setLevel(saved_level)
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out, err)
    return invoke
