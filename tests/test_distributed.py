"""torchrun on this CPU: 2 processes, the Gloo backend, 127.0.0.1. Each test starts real processes."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from tests.conftest import ENGINE, ROOT

TRAIN = ["--img-size", "32", "--weights", "none", "--backbone", "resnet18", "--epochs", "3"]


def torchrun(*args, processes: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
            str(ENGINE), *map(str, args)]


def run(command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def one_and_two(tiny_data, tmp_path_factory):
    """The same frozen-backbone training run in one process and in two."""
    folder = tmp_path_factory.mktemp("distributed")
    single = run([sys.executable, str(ENGINE), "--data-dir", tiny_data, "--output-dir", folder / "one", *TRAIN])
    assert single.returncode == 0, single.stderr
    double = run(torchrun("--data-dir", tiny_data, "--output-dir", folder / "two", *TRAIN))
    assert double.returncode == 0, double.stderr
    return folder / "one", folder / "two", double


def test_two_processes_train_the_same_head_as_one(one_and_two):
    one, two, double = one_and_two
    single_model = torch.load(one / "model.pt", weights_only=True)["state_dict"]
    double_model = torch.load(two / "model.pt", weights_only=True)["state_dict"]
    for name in ("head.weight", "head.bias"):
        torch.testing.assert_close(double_model[name], single_model[name], rtol=1e-4, atol=1e-6)
    assert (two / "split.csv").read_bytes() == (one / "split.csv").read_bytes()
    single_history, double_history = pd.read_csv(one / "history.csv"), pd.read_csv(two / "history.csv")
    pd.testing.assert_frame_equal(double_history.drop(columns="elapsed_s"), single_history.drop(columns="elapsed_s"),
                                  rtol=1e-4)


def test_only_rank_0_logs_progress(one_and_two):
    double = one_and_two[2]
    assert double.stdout.count("test accuracy") == 4  # 3 epochs and the final line, once


def test_predict_on_two_processes_writes_the_same_csv_as_on_one(one_and_two, tiny_data, tmp_path):
    model = one_and_two[0] / "model.pt"
    single = run([sys.executable, str(ENGINE), "predict", tiny_data, "--model", model, "--csv", tmp_path / "1.csv"])
    double = run(torchrun("predict", tiny_data, "--model", model, "--csv", tmp_path / "2.csv"))
    assert single.returncode == 0 and double.returncode == 0, double.stderr
    assert (tmp_path / "2.csv").read_bytes() == (tmp_path / "1.csv").read_bytes()
    assert len(pd.read_csv(tmp_path / "2.csv")) == 24
    assert double.stdout == single.stdout  # printed once, in the input order


def rank_processes(launcher: int) -> dict[int, int]:
    """{rank: pid} of the processes torchrun started (its children with RANK in their environment)."""
    ranks = {}
    for task in Path(f"/proc/{launcher}/task").iterdir():
        for child in (task / "children").read_text().split():
            environment = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
            for variable in environment:
                if variable.startswith(b"RANK="):
                    ranks[int(variable[5:])] = int(child)
    return ranks


def test_a_process_that_dies_ends_the_job_and_leaves_the_previous_outputs(tiny_data, tmp_path):
    output = tmp_path / "output"
    output.mkdir()
    (output / "model.pt").write_bytes(b"the previous model")
    job = subprocess.Popen(torchrun("--data-dir", tiny_data, "--output-dir", output, "--img-size", "32",
                                    "--weights", "none", "--backbone", "resnet18", "--epochs", "100000"),
                           cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in job.stdout:  # wait until training is under way
            if line.startswith("epoch 1/"):
                break
        os.kill(rank_processes(job.pid)[1], signal.SIGKILL)
        job.wait(timeout=120)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode != 0
    assert (output / "model.pt").read_bytes() == b"the previous model"
    assert not [path for path in output.rglob("*") if path.name.endswith(".tmp")]
    assert {path.name for path in output.iterdir()} <= {"model.pt", "cache", ".run.lock"}  # a stale lock is taken over
