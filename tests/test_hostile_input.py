"""Hostile and careless input: nothing hangs, no model is lost, nothing is written where it should not be.

Each test reproduces one case a careless or hostile user met (FIFOs and device links in the data, a
planted lock, formula-like names, --csv at the model, 150 classes, output inside the data, tampered
model files, a full disk, SIGTERM) and checks the answer: a named skip or one `error:` line, exit 2.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import onnx
import pandas as pd
import pytest
import torch

from MLPipeline.extras import SyntheticData
from MLPipeline.extras.Export import DIGEST_KEY, model_digest
from MLPipeline.extras.OutputFolder import LOCK_NAME
from tests.conftest import ENGINE, FAST, ROOT, make_image_folder, train_tiny_model
from tests.test_bad_input import assert_user_error, fake_previous_outputs, snapshot

FAST_TRAIN = [*FAST, "--backbone", "resnet18", "--workers", "0"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny trained model and its export, shared by the tests that only read them."""
    from MLPipeline import export_model
    data, output = train_tiny_model(tmp_path_factory.mktemp("hostile"))
    export_model(output / "model.pt", "onnx")
    return data, output


def copy_of(data, target):
    shutil.copytree(data, target, symlinks=True)
    return target


# --- files that are not files ------------------------------------------------------------------------------

def test_a_fifo_in_a_class_folder_is_skipped_by_train_predict_and_evaluate(trained, tmp_path, cli):
    data = copy_of(trained[0], tmp_path / "data")
    os.mkfifo(data / "alpha" / "x.jpg")
    result = cli("--data-dir", data, "--output-dir", tmp_path / "out", *FAST_TRAIN)  # a hang would stop here
    assert result.returncode == 0, result.stderr
    assert "x.jpg: not a regular file" in result.stderr
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["dataset"]["skipped_count"] == 1
    predicted = cli("predict", data / "alpha", "--model", trained[1] / "model.pt")
    assert predicted.returncode == 2 and "x.jpg: not a regular file" in predicted.stderr
    evaluated = cli("evaluate", data, "--model", trained[1] / "model.pt", "--output-dir", tmp_path / "e")
    assert evaluated.returncode == 0, evaluated.stderr


def test_links_to_endless_devices_are_never_read_nor_hashed(trained, tmp_path, cli):
    data = tmp_path / "data"
    copy_of(trained[0], data / "train")
    copy_of(trained[0], data / "test")
    (data / "train" / "alpha" / "zero.jpg").symlink_to("/dev/zero")
    (data / "test" / "alpha" / "random.jpg").symlink_to("/dev/urandom")
    (data / "test" / "beta" / "empty.jpg").write_bytes(b"")
    started = time.monotonic()
    result = cli("--data-dir", data, "--output-dir", tmp_path / "out", *FAST_TRAIN)
    assert result.returncode == 0, result.stderr
    assert "zero.jpg: not a regular file" in result.stderr and "random.jpg: not a regular file" in result.stderr
    assert time.monotonic() - started < 120


# --- the lock ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("planted", ["symlink", "fifo", "foreign text"])
def test_a_planted_lock_is_refused_never_followed_read_out_or_truncated(trained, tmp_path, cli, planted):
    output, secret = tmp_path / "out", tmp_path / "secret.txt"
    output.mkdir()
    secret.write_text("the password is swordfish\n")
    lock = output / LOCK_NAME
    if planted == "symlink":
        lock.symlink_to(secret)
    elif planted == "fifo":
        os.mkfifo(lock)
    else:
        lock.write_text("the password is swordfish\n")
    result = cli("--data-dir", trained[0], "--output-dir", output, *FAST_TRAIN)
    assert_user_error(result, LOCK_NAME)
    assert "swordfish" not in result.stdout + result.stderr
    assert secret.read_text() == "the password is swordfish\n"
    assert not (output / "model.pt").exists()


# --- what is written -----------------------------------------------------------------------------------------

def test_formula_like_names_are_neutralised_in_every_csv(tmp_path, cli):
    data = make_image_folder(tmp_path / "data", classes=("=HYPERLINK(1)", "+plus", "@at"))
    os.rename(data / "+plus" / "000.jpg", data / "+plus" / "-minus.jpg")
    assert cli("--data-dir", data, "--output-dir", tmp_path / "out", *FAST_TRAIN).returncode == 0
    assert cli("predict", data, "--model", tmp_path / "out" / "model.pt", "--csv", tmp_path / "p.csv").returncode == 0
    assert cli("evaluate", data, "--model", tmp_path / "out" / "model.pt", "--output-dir", tmp_path / "e",
               "--workers", "0").returncode == 0
    for path in (tmp_path / "out" / "split.csv", tmp_path / "p.csv", tmp_path / "e" / "per_class.csv",
                 tmp_path / "e" / "confusion_matrix.csv", tmp_path / "e" / "predictions.csv"):
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
        cells = [*table.columns, *table.to_numpy().ravel()]
        assert not [cell for cell in cells if cell[:1] in ("=", "+", "-", "@")], path
        assert any(cell.startswith("'=HYPERLINK") or cell.startswith("p_'=") for cell in cells), path


def test_csv_may_not_replace_the_model_an_input_a_link_or_a_pipe(trained, tmp_path, cli):
    model = trained[1] / "model.pt"
    before = model.read_bytes()
    image = next((trained[0] / "alpha").iterdir())
    link, fifo = tmp_path / "link.csv", tmp_path / "fifo.csv"
    link.symlink_to(tmp_path / "elsewhere.csv")
    os.mkfifo(fifo)
    for csv, named in ((model, "model.pt"), (image, image.name), (link, "link.csv"), (fifo, "fifo.csv")):
        result = cli("predict", image, "--model", model, "--csv", csv)
        assert_user_error(result, named)
    assert model.read_bytes() == before and link.is_symlink() and not (tmp_path / "elsewhere.csv").exists()


def test_a_reader_that_stops_early_costs_neither_the_csv_nor_a_traceback(trained, tmp_path):
    command = (f"{sys.executable} {ENGINE} predict {trained[0]} --model {trained[1] / 'model.pt'} "
               f"--csv {tmp_path / 'p.csv'} --workers 0 | head -1")
    result = subprocess.run(["bash", "-o", "pipefail", "-c", command], capture_output=True, text=True, timeout=180)
    assert "Traceback" not in result.stderr and "Broken pipe" not in result.stderr, result.stderr
    assert len(pd.read_csv(tmp_path / "p.csv")) == 24


def test_150_classes_get_their_model_and_a_note_instead_of_a_giant_plot(tmp_path, cli):
    data = tmp_path / "data"
    for number in range(150):
        make_image_folder(data, classes=(f"class{number:03d}",), per_class=2, seed=number, size=(16, 16))
    result = cli("--data-dir", data, "--output-dir", tmp_path / "out", *FAST_TRAIN, "--test-size", "0.5")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "model.pt").exists() and not (tmp_path / "out" / "confusion_matrix.png").exists()
    assert "confusion_matrix.png not drawn for 150 classes" in result.stderr


def test_the_output_folder_may_not_lie_inside_the_data_folder(trained, tmp_path, cli):
    data = copy_of(trained[0], tmp_path / "data")
    assert_user_error(cli("--data-dir", data, "--output-dir", data / "run", *FAST_TRAIN), "inside the data folder")
    assert not (data / "run").exists()


def test_evaluate_will_not_overwrite_a_training_output_folder(trained, tmp_path, cli):
    output = copy_of(trained[1], tmp_path / "out")
    before = snapshot(output)
    assert_user_error(cli("evaluate", trained[0], "--model", output / "model.pt", "--output-dir", output), str(output))
    assert snapshot(output) == before


def test_a_plot_that_fails_is_a_warning_and_the_model_is_written(trained, tmp_path, cli, monkeypatch):
    from MLPipeline.extras import Report

    def broken(*args):
        raise MemoryError("no room for the figure")
    monkeypatch.setattr(Report, "plot_confusion_matrix", broken)
    result = cli("--data-dir", trained[0], "--output-dir", tmp_path / "out", *FAST_TRAIN)
    assert result.returncode == 0 and "could not draw" in result.stderr and "no room" in result.stderr
    assert (tmp_path / "out" / "model.pt").exists()


def test_a_class_folder_whose_name_is_not_utf8_is_plotted_and_saved(trained, tmp_path):
    data = copy_of(trained[0], tmp_path / "data")
    os.rename(data / "gamma", os.fsdecode(bytes(data / "gamma").replace(b"gamma", b"g\xffmma")))
    # A fresh process: the name goes to stdout byte for byte, which pytest's own capture cannot hold
    result = subprocess.run([sys.executable, str(ENGINE), "--data-dir", data, "--output-dir", tmp_path / "out",
                             *FAST_TRAIN], capture_output=True, text=True, errors="replace", timeout=300)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "confusion_matrix.png").stat().st_size and (tmp_path / "out" / "model.pt").exists()


# --- tampered model files ------------------------------------------------------------------------------------

@pytest.mark.parametrize("change", [{"img_size": None}, {"img_size": -5}, {"img_size": 2.5}, {"img_size": "32"},
                                    {"classes": []}, {"temperature": float("nan")}, "nan-head"])
def test_a_tampered_checkpoint_is_one_error_line(trained, tmp_path, cli, change):
    checkpoint = torch.load(trained[1] / "model.pt", weights_only=True)
    if change == "nan-head":
        checkpoint["state_dict"]["head.weight"][0, 0] = float("nan")
    else:
        checkpoint.update(change)
    torch.save(checkpoint, tmp_path / "model.pt")
    assert_user_error(cli("predict", trained[0], "--model", tmp_path / "model.pt"), "model.pt")


def edited_onnx(source, target, change) -> None:
    model = onnx.load(source)
    metadata = {entry.key: entry.value for entry in model.metadata_props}
    classes = json.loads(metadata["classes"])
    edits = {"fewer classes": {"classes": json.dumps(classes[:-1])},
             "more classes": {"classes": json.dumps(classes + ["delta"])},
             "classes a dict": {"classes": json.dumps({"a": 1})}, "bad JSON": {"classes": "[not json"},
             "no classes": {"classes": None}, "wrong img_size": {"img_size": "64"},
             "NaN temperature": {"temperature": "NaN"}, "no export_format": {"export_format": None}}[change]
    for key, value in edits.items():
        if value is None:
            metadata.pop(key)
        else:
            metadata[key] = value
    del model.metadata_props[:]
    for key, value in metadata.items():
        model.metadata_props.add(key=key, value=value)
    model.metadata_props.add(key=DIGEST_KEY, value=model_digest(model))  # an edit made with care: its checks
    onnx.save(model, target)


def test_an_onnx_export_with_changed_bytes_is_refused(trained, tmp_path, cli):
    raw = bytearray((trained[1] / "model.onnx").read_bytes())
    raw[len(raw) // 2] ^= 0x40  # inside the weights: ONNX Runtime would run it all the same
    (tmp_path / "model.onnx").write_bytes(bytes(raw))
    assert_user_error(cli("predict", trained[0], "--model", tmp_path / "model.onnx"), "model.onnx", "damaged")


@pytest.mark.parametrize("change", ["fewer classes", "more classes", "classes a dict", "bad JSON", "no classes",
                                    "wrong img_size", "NaN temperature", "no export_format"])
def test_tampered_onnx_metadata_is_one_error_line(trained, tmp_path, cli, change):
    edited_onnx(trained[1] / "model.onnx", tmp_path / "model.onnx", change)
    assert_user_error(cli("predict", trained[0], "--model", tmp_path / "model.onnx"), "model.onnx")


# --- a full disk, interruptions and what they leave -----------------------------------------------------------

def test_a_full_disk_while_saving_the_model_is_one_error_line_and_keeps_the_previous_outputs(
        trained, tmp_path, cli, monkeypatch):
    output = tmp_path / "out"
    previous = fake_previous_outputs(output)
    real_save = torch.save

    def full_disk(value, path, *args, **kwargs):
        if "state_dict" in value:  # the model; the feature cache before it is written as usual
            raise RuntimeError("[enforce fail at inline_container.cc] PytorchStreamWriter failed writing file "
                               "data/0: file write failed")
        return real_save(value, path, *args, **kwargs)
    monkeypatch.setattr(torch, "save", full_disk)
    assert_user_error(cli("--data-dir", trained[0], "--output-dir", output, *FAST_TRAIN), "model.pt")
    assert snapshot(output)["model.pt"] == previous["model.pt"]
    assert not [path for path in output.rglob("*.tmp")]


def test_an_export_the_disk_cannot_hold_is_refused_before_it_starts(trained, tmp_path, cli, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    assert_user_error(cli("export", "--model", trained[1] / "model.pt", "--format", "pt2", "--out",
                          tmp_path / "model.pt2"), "MB free")
    assert not list(tmp_path.iterdir())


def test_temporary_files_a_killed_run_left_are_removed_by_the_next(trained, tmp_path, cli):
    output = tmp_path / "out"
    (output / "cache").mkdir(parents=True)
    leftovers = [output / ".model.pt.k2j4h5g6.tmp", output / "cache" / ".features-0123456789abcdef.pt.a1b2c3d4.tmp"]
    for leftover in leftovers:
        leftover.write_bytes(b"half a file")
    assert cli("--data-dir", trained[0], "--output-dir", output, *FAST_TRAIN).returncode == 0
    assert not any(leftover.exists() for leftover in leftovers)


def test_sigterm_is_handled_like_ctrl_c(trained, tmp_path):
    output = tmp_path / "out"
    previous = fake_previous_outputs(output)
    log = tmp_path / "run.log"
    with open(log, "w") as log_file:  # a file, not a pipe nobody reads
        run = subprocess.Popen([sys.executable, str(ENGINE), "--data-dir", trained[0], "--output-dir", output,
                                *FAST_TRAIN, "--epochs", "100000"], cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while "epoch 1/" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        run.send_signal(signal.SIGTERM)
        assert run.wait(timeout=60) == 143
    finally:
        if run.poll() is None:
            run.kill()
    assert "terminated:" in log.read_text() and "Traceback" not in log.read_text()
    kept = {name: state for name, state in snapshot(output).items() if not name.startswith("cache")}
    assert kept == previous  # the previous outputs as they were, and no lock left (the feature cache may be new)


def test_demo_data_interrupted_half_way_leaves_no_partial_dataset(tmp_path, monkeypatch):
    written = []

    def interrupted(job):
        if len(written) == 5:
            raise KeyboardInterrupt
        written.append(job)
        return real(job)
    real = SyntheticData.write_sample
    monkeypatch.setattr(SyntheticData, "write_sample", interrupted)
    with pytest.raises(KeyboardInterrupt):
        SyntheticData.make_demo_data(tmp_path / "Data", per_class=3, workers=1)
    assert [path.name for path in (tmp_path / "Data").iterdir() if not path.name.startswith(".")] == []
    monkeypatch.undo()
    counts = SyntheticData.make_demo_data(tmp_path / "Data", per_class=3, workers=1)
    assert counts == {name: 3 for name in SyntheticData.CLASS_NAMES}
    assert sorted(path.name for path in (tmp_path / "Data").iterdir()) == sorted(SyntheticData.CLASS_NAMES)
