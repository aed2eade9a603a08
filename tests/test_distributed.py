"""torchrun on this CPU: 2 processes, the Gloo backend, 127.0.0.1. Each test starts real processes."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from MLPipeline.extras.Weights import build_model
from tests.conftest import ENGINE, ROOT, make_image_folder

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
    pd.testing.assert_frame_equal(double_history[single_history.columns], single_history, rtol=1e-4)


def test_only_rank_0_logs_progress(one_and_two):
    double = one_and_two[2]
    assert double.stderr.count("test accuracy") == 4  # 3 epochs and the final line, once


def test_predict_on_two_processes_writes_the_same_csv_as_on_one(one_and_two, tiny_data, tmp_path, cli):
    model = one_and_two[0] / "model.pt"
    single = cli("predict", tiny_data, "--model", model, "--csv", tmp_path / "1.csv")  # one process: this one
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
    log = tmp_path / "job.log"
    with open(log, "w") as log_file:  # a file, not a pipe: a pipe nobody reads would fill and block the job
        job = subprocess.Popen(torchrun("--data-dir", tiny_data, "--output-dir", output, "--img-size", "32",
                                        "--weights", "none", "--backbone", "resnet18", "--epochs", "100000"),
                               cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while "epoch 1/" not in log.read_text() and time.monotonic() < deadline:  # training is under way
            assert job.poll() is None, log.read_text()
            time.sleep(0.2)
        os.kill(rank_processes(job.pid)[1], signal.SIGKILL)
        job.wait(timeout=120)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode != 0
    assert (output / "model.pt").read_bytes() == b"the previous model"
    assert not [path for path in output.rglob("*") if path.name.endswith(".tmp")]
    assert {path.name for path in output.iterdir()} <= {"model.pt", "cache", ".run.lock"}  # a stale lock is taken over


def test_ddp_of_unfrozen_layers_on_two_processes_trains_the_weights_of_one(tmp_path, cli):
    """2 Gloo processes at --batch-size 4 see, step by step, the 8 images 1 process sees at --batch-size 8
    (DistributedSampler deals each step's images out), and DDP averages their gradients: the same weights."""
    data = make_image_folder(tmp_path / "data", per_class=10)  # 8 training images a class: 24, 3 steps of 8
    settings = ["--data-dir", data, "--img-size", "32", "--weights", "none", "--backbone", "resnet18",
                "--epochs", "2", "--unfreeze", "last", "--workers", "0"]
    single = cli(*settings, "--output-dir", tmp_path / "one", "--batch-size", "8")  # one process: this one
    assert single.returncode == 0, single.stderr
    double = run(torchrun(*settings, "--output-dir", tmp_path / "two", "--batch-size", "4"))
    assert double.returncode == 0, double.stderr
    one, two = (torch.load(tmp_path / name / "model.pt", weights_only=True)["state_dict"] for name in ("one", "two"))
    torch.manual_seed(42)  # train() seeds so before it builds the model: these are the starting weights
    initial = build_model(3, "resnet18", "none", "last")[0].state_dict()
    assert not torch.allclose(one["backbone.layer4.1.conv2.weight"], initial["backbone.layer4.1.conv2.weight"])
    for name in ("head.weight", "head.bias", "backbone.layer4.1.conv2.weight", "backbone.layer4.0.conv1.weight"):
        torch.testing.assert_close(two[name], one[name], rtol=1e-3, atol=1e-5)


def test_evaluate_on_two_processes_writes_what_one_writes(one_and_two, tiny_data, tmp_path, cli):
    model = one_and_two[0] / "model.pt"
    single = cli("evaluate", tiny_data, "--model", model, "--output-dir", tmp_path / "1")  # one process: this one
    double = run(torchrun("evaluate", tiny_data, "--model", model, "--output-dir", tmp_path / "2"))
    assert single.returncode == 0 and double.returncode == 0, double.stderr
    for name in ("predictions.csv", "per_class.csv", "confusion_matrix.csv"):
        assert (tmp_path / "2" / name).read_bytes() == (tmp_path / "1" / name).read_bytes(), name
    assert double.stdout.replace(str(tmp_path / "2"), "") == single.stdout.replace(str(tmp_path / "1"), "")
