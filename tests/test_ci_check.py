""".ci/check_main_run.py, the check of the README's main run in CI: it accepts the outputs of a good
default run and rejects a run of too few epochs, one that skipped a file, and outputs left from before."""
from __future__ import annotations

import importlib.util
import json
import os
import time

import pytest

from MLPipeline.extras.Run import RunConfig as TrainConfig
from MLPipeline.extras.Run import train
from tests.conftest import ROOT

spec = importlib.util.spec_from_file_location("check_main_run", ROOT / ".ci" / "check_main_run.py")
check_main_run = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check_main_run)


@pytest.fixture
def default_run(tiny_data, tmp_path):
    """A small real run's outputs, its metrics made to say what the default run's say (the demo data's counts,
    10 epochs, a pretrained backbone), so that only what each test changes is wrong."""
    started = time.time() - 1
    output = tmp_path / "output"
    train(TrainConfig(data_dir=tiny_data, output_dir=output, img_size=32, weights="none", backbone="resnet18",
                      epochs=1, workers=0))
    metrics = json.loads((output / "metrics.json").read_text())
    metrics["history"] = metrics["history"] * 10
    metrics["config"]["epochs"] = 10
    metrics["dataset"]["counts"] = {"a": {"train": 200, "test": 50}, "b": {"train": 200, "test": 50},
                                    "c": {"train": 200, "test": 50}}
    metrics.update(pretrained=True, test_accuracy=0.97)
    (output / "metrics.json").write_text(json.dumps(metrics))
    log = tmp_path / "main.log"
    log.write_text("epoch 10/10 ...\n")
    return output, log, started


def rewrite_metrics(output, change) -> None:
    metrics = json.loads((output / "metrics.json").read_text())
    change(metrics)
    (output / "metrics.json").write_text(json.dumps(metrics))


def test_a_good_default_run_is_accepted(default_run):
    output, log, started = default_run
    assert "test accuracy 97.00%" in check_main_run.check(log, output, started)


def test_one_epoch_is_rejected(default_run):
    output, log, started = default_run
    rewrite_metrics(output, lambda metrics: metrics.update(history=metrics["history"][:1]))
    with pytest.raises(check_main_run.CheckFailed, match="1 epochs"):
        check_main_run.check(log, output, started)


def test_a_run_that_skipped_a_file_is_rejected(default_run):
    output, log, started = default_run
    rewrite_metrics(output, lambda metrics: metrics["dataset"].update(skipped_count=1, skipped={"bad.jpg": "empty"}))
    with pytest.raises(check_main_run.CheckFailed, match="bad.jpg"):
        check_main_run.check(log, output, started)


def test_other_image_counts_are_rejected(default_run):
    output, log, started = default_run
    rewrite_metrics(output, lambda metrics: metrics["dataset"]["counts"]["a"].update(train=199))
    with pytest.raises(check_main_run.CheckFailed, match="599"):
        check_main_run.check(log, output, started)


@pytest.mark.parametrize("name", ["model.pt", "confusion_matrix.png"])
def test_outputs_older_than_the_run_are_rejected(default_run, name):
    output, log, started = default_run
    os.utime(output / name, (started - 60, started - 60))
    with pytest.raises(check_main_run.CheckFailed, match="older than the run"):
        check_main_run.check(log, output, started)


def test_a_traceback_in_the_log_is_rejected(default_run):
    output, log, started = default_run
    log.write_text("Traceback (most recent call last):\n")
    with pytest.raises(check_main_run.CheckFailed, match="Traceback"):
        check_main_run.check(log, output, started)
