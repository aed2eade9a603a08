"""Issue 37: one gate for every file the tool writes or deletes. Each test is one numbered case of the issue."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ENGINE, ROOT, interrupted, make_image_folder, train_tiny_model
from MLPipeline.CreateDataset import UserError


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """(data folder, output folder with model.pt): one tiny model shared by the module's tests."""
    return train_tiny_model(tmp_path_factory.mktemp("gate"))


def error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
    return lines[0]


def test_case1_evaluate_never_writes_or_deletes_through_a_linked_explained(trained, tmp_path, cli):
    data, out = trained
    charts = tmp_path / "charts"
    charts.mkdir()
    (charts / "mine.png").write_bytes(b"a chart of mine")
    (tmp_path / "ev").mkdir()
    (tmp_path / "ev" / "explained").symlink_to(charts)
    line = error_line(cli("evaluate", data, "--model", out / "model.pt", "--output-dir", tmp_path / "ev",
                          "--workers", "0"))
    assert "explained" in line and "link" in line
    assert sorted(path.name for path in charts.iterdir()) == ["mine.png"]
    # the folder it scores inside its output folder: refused before the work
    shutil.copytree(data, tmp_path / "ev2" / "explained")
    line = error_line(cli("evaluate", tmp_path / "ev2" / "explained", "--model", out / "model.pt",
                          "--output-dir", tmp_path / "ev2", "--workers", "0"))
    assert "holds the data folder" in line


def test_case1_only_the_tools_own_pictures_are_deleted(trained, tmp_path):
    from MLPipeline.extras.Explain import explain_evaluation
    from MLPipeline.extras.Predict import load_model
    data, out = trained
    explained = tmp_path / "explained"
    explained.mkdir()
    (explained / "notes.png").write_text("not an image: my notes")
    (explained / "0001-old.png").write_text("not drawn here either")
    import pandas as pd
    predictions = pd.DataFrame({"path": [], "label": [], "predicted": [], "confidence": []})
    explain_evaluation(load_model(out / "model.pt"), predictions, np.zeros((0, 32, 32, 3), np.uint8), tmp_path)
    assert sorted(path.name for path in explained.iterdir()) == ["0001-old.png", "notes.png"]


def test_case2_a_linked_class_folder_is_data_too(tmp_path, cli, trained):
    data = make_image_folder(tmp_path / "Data", classes=("alpha", "beta"), per_class=4)
    elsewhere = tmp_path / "X"
    shutil.move(data / "beta", elsewhere)
    (data / "beta").symlink_to(elsewhere)
    line = error_line(cli("--data-dir", data, "--output-dir", elsewhere, "--img-size", "32", "--weights", "none",
                          "--epochs", "1", "--workers", "0"))
    assert "data folder" in line and "link" in line
    assert not (elsewhere / "model.pt").exists()
    # predict --explain into a folder that a folder it reads links to
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "sub").symlink_to(elsewhere)
    line = error_line(cli("predict", inputs, "--model", trained[1] / "model.pt", "--explain", elsewhere,
                          "--workers", "0"))
    assert "data folder" in line


def test_case3_a_cache_folder_linked_into_the_data_or_holding_it_is_refused(tmp_path, cli):
    data = make_image_folder(tmp_path / "Data", classes=("alpha", "beta"), per_class=4)
    out = tmp_path / "OUT"
    out.mkdir()
    (out / "cache").symlink_to(data / "beta")
    (data / "beta" / ".features-x.abcdefgh.tmp").write_text("a file of the user's that looks like a leftover")
    result = cli("--data-dir", data, "--output-dir", out, "--img-size", "32", "--weights", "none", "--epochs", "1",
                 "--workers", "0", "--backbone", "resnet18")
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(path.name for path in (data / "beta").iterdir() if not path.name[0].isdigit()) == [
        ".features-x.abcdefgh.tmp"]  # nothing removed or written through OUT/cache
    assert "link" in error_line(cli("--data-dir", data, "--output-dir", tmp_path / "o2", "--cache-dir", out / "cache",
                                     "--img-size", "32", "--weights", "none", "--epochs", "1"))
    shutil.copytree(data, tmp_path / "o3" / "cache")
    assert "holds the data folder" in error_line(cli("--data-dir", tmp_path / "o3" / "cache", "--output-dir",
                                                     tmp_path / "o3", "--img-size", "32", "--weights", "none"))


def test_case4_a_full_disk_while_saving_the_model_is_one_error_line(tmp_path, trained, monkeypatch, cli):
    from MLPipeline import ResNet_Model

    def full(checkpoint, name):
        Path(name).write_bytes(b"part")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(OSError, match="could not write .*model.pt .No space left on device") as caught:
        ResNet_Model.save_checkpoint(tmp_path / "new" / "model.pt", {})
    assert "enforce" not in str(caught.value)
    assert list((tmp_path / "new").iterdir()) == []  # no temporary file left


def test_case4_a_full_disk_at_lock_time_names_the_path_and_leaves_nothing(tmp_path, monkeypatch, cli):
    from MLPipeline.extras import OutputFolder
    real_pwrite = os.pwrite

    def full(handle, data, offset):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(OSError, match=r"could not write .*new.*\.run\.lock \(No space left on device\)"):
        with OutputFolder.output_lock(tmp_path / "new"):
            pass
    monkeypatch.setattr(os, "pwrite", real_pwrite)
    assert not (tmp_path / "new").exists()


def engine_under_file_limit(max_bytes: int, args: list) -> subprocess.CompletedProcess:
    """engine.py ARGS in a fresh process whose files may grow to max_bytes (ulimit -f)."""
    script = (f"import resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, ({max_bytes}, resource.RLIM_INFINITY));"
              f"sys.argv = ['engine.py', *{[str(arg) for arg in args]!r}]; sys.path.insert(0, {str(ROOT)!r}); "
              f"import engine; sys.exit(engine.main())")
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)


def test_case4_a_file_size_limit_is_refused_before_an_export(trained, tmp_path):
    data, out = trained
    result = engine_under_file_limit(10_000 * 1024, ["export", "--format", "pt2", "--model", out / "model.pt",
                                                      "--out", tmp_path / "m.pt2"])
    assert "File too large" in error_line(result) and "ulimit -f" in error_line(result)
    assert not (tmp_path / "m.pt2").exists()


def test_case5_demo_data_never_replaces_a_users_image_or_writes_through_a_link(tmp_path, cli):
    from MLPipeline.extras.SyntheticData import CLASS_NAMES
    out = tmp_path / "demo"
    (out / CLASS_NAMES[0]).mkdir(parents=True)
    mine = out / CLASS_NAMES[0] / f"{CLASS_NAMES[0]}_0000.jpg"
    mine.write_bytes(b"my own photo")
    line = error_line(cli("make-demo-data", "--out", out, "--per-class", "1", "--force"))
    assert "never replaced" in line and mine.read_bytes() == b"my own photo"
    assert sorted(path.name for path in out.iterdir()) == [CLASS_NAMES[0]]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "d2").mkdir()
    (tmp_path / "d2" / CLASS_NAMES[1]).symlink_to(elsewhere)
    assert "link" in error_line(cli("make-demo-data", "--out", tmp_path / "d2", "--per-class", "1"))
    assert list(elsewhere.iterdir()) == []


def test_case6_evaluate_locks_before_the_work_and_keeps_a_training_runs_outputs(trained, tmp_path, cli, monkeypatch):
    from MLPipeline.extras import Predict
    data, out = trained
    run = tmp_path / "run"
    shutil.copytree(out, run)
    (run / "model.pt").rename(run / "best.pt")
    before = (run / "metrics.json").read_bytes()
    assert "another command" in error_line(cli("evaluate", data, "--model", run / "best.pt", "--output-dir", run,
                                               "--workers", "0"))
    assert (run / "metrics.json").read_bytes() == before
    scored = []
    monkeypatch.setattr(Predict, "file_outputs", lambda *args, **kwargs: scored.append(1))
    from MLPipeline.extras.OutputFolder import output_lock
    with output_lock(tmp_path / "busy"):
        line = error_line(cli("evaluate", data, "--model", out / "model.pt", "--output-dir", tmp_path / "busy",
                              "--workers", "0"))
    assert "in use" in line and scored == []  # refused before a single image was scored


def test_case6_export_never_replaces_a_trained_model(trained, tmp_path, cli):
    data, out = trained
    other = tmp_path / "other" / "model.pt"
    other.parent.mkdir()
    shutil.copy(out / "model.pt", other)
    before = other.read_bytes()
    assert "trained model" in error_line(cli("export", "--format", "pt2", "--model", out / "model.pt", "--out", other))
    assert other.read_bytes() == before


def test_case7_numbers_read_back_or_given_are_checked(trained, tmp_path):
    from MLPipeline.extras.Checkpoint import check_model_info
    from MLPipeline.extras.Predict import load_model, predict
    data, out = trained
    info = {"classes": ["a", "b"], "img_size": 32, "mean": [0.5] * 3, "std": [0.2] * 3, "temperature": 1e-300}
    with pytest.raises(UserError, match="temperature"):
        check_model_info(info, "m.pt")
    model = load_model(out / "model.pt")
    for bad in (math.nan, 2, "x"):
        with pytest.raises(UserError, match="min_confidence"):
            predict(model, [str(data)], min_confidence=bad)
    from MLPipeline.extras.Run import RunConfig
    with pytest.raises(UserError, match="--epochs"):
        RunConfig(epochs=1.5)


def test_case7_an_onnx_model_with_a_nan_weight_is_refused(trained, tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from onnx import numpy_helper

    from MLPipeline.extras.Export import export_model, load_onnx_model, model_digest
    path = export_model(trained[1] / "model.pt", "onnx", tmp_path / "m.onnx")
    model = onnx.load(str(path))
    weights = next(w for w in model.graph.initializer if w.data_type == 1 and numpy_helper.to_array(w).size > 1)
    array = numpy_helper.to_array(weights).copy()
    array.flat[0] = np.nan
    weights.CopyFrom(numpy_helper.from_array(array, weights.name))
    model.metadata_props.add(key="sha256", value="")
    digest_key = [entry.key for entry in model.metadata_props][-1]
    from MLPipeline.extras import Export
    model_digest(model)  # drops the old digest entry
    model.metadata_props.add(key=Export.DIGEST_KEY, value=model_digest(model))
    del digest_key
    path.write_bytes(model.SerializeToString())
    with pytest.raises(UserError, match="not finite"):
        load_onnx_model(path)


def test_case8_no_onnxruntime_is_one_error_line(trained, tmp_path):
    data, out = trained
    (tmp_path / "m.onnx").write_bytes(b"x")
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    (blocked / "onnxruntime.py").write_text("raise ImportError('onnxruntime is broken here')")
    environment = {**os.environ, "PYTHONPATH": str(blocked)}
    for args in (["predict", data, "--model", tmp_path / "m.onnx"], ["export", "--model", out / "model.pt",
                                                                      "--out", tmp_path / "x.onnx"]):
        result = subprocess.run([sys.executable, str(ENGINE), *map(str, args)], capture_output=True, text=True,
                                env=environment, timeout=300)
        assert "onnxruntime" in error_line(result) and "Traceback" not in result.stderr


def test_case9_train_and_Train_side_by_side_are_refused(tmp_path):
    from MLPipeline.CreateDataset import find_presplit
    for name in ("Train", "train", "test"):
        (tmp_path / name / "a").mkdir(parents=True)
    if len({path.name for path in tmp_path.iterdir()}) < 3:
        pytest.skip("a case-insensitive file system")
    with pytest.raises(UserError, match="but for case"):
        find_presplit(tmp_path)


def test_case9_ctrl_c_while_the_libraries_load_is_exit_130_not_a_traceback():
    # -X importtime names each module as it is loaded: torch's come after engine.py installs its first handler
    status, stderr = interrupted(["-X", "importtime", ENGINE, "--help"], lambda line: "| torch" in line)
    assert status == 130, stderr[-3000:]
    assert "interrupted: nothing was written" in stderr and "Traceback" not in stderr, stderr[-3000:]


def test_case9_two_ctrl_c_while_workers_decode_stop_cleanly(tmp_path, trained):
    """The handler only records the stop and the loop raises it: two Ctrl-C during an epoch that decodes images
    in two worker processes end the run with exit 130, one line, no traceback from a worker, a __del__ or a
    logging call, and the previous model untouched."""
    output = tmp_path / "out"
    shutil.copytree(trained[1], output)
    before = (output / "model.pt").read_bytes()
    command = [ENGINE, "--data-dir", trained[0], "--output-dir", output, "--img-size", "32", "--weights", "none",
               "--backbone", "resnet18", "--augment", "--epochs", "1000", "--workers", "2"]
    status, stderr = interrupted(command, lambda line: line.startswith("epoch 1/"), signals=2)
    assert status == 130, stderr[-3000:]
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr[-3000:]
    assert stderr.count("stopping at the next batch") == 1 and "interrupted:" in stderr
    assert (output / "model.pt").read_bytes() == before
    assert not [path.name for path in output.iterdir() if path.name.startswith(".")]


def test_case9_a_newline_in_a_path_cannot_forge_a_line(tmp_path, cli):
    result = cli("--data-dir", tmp_path / "nothing\nerror: fake", "--output-dir", tmp_path / "o", "--weights", "none")
    assert len([line for line in result.stderr.splitlines() if line.startswith("error:")]) == 1
    assert "\\n" in error_line(result)


def test_case9_api_paths_are_str_or_pathlike(trained):
    from pathlib import PurePosixPath

    from MLPipeline.extras.Predict import load_model, predict
    from MLPipeline.extras.Run import RunConfig
    data, out = trained
    model = load_model(out / "model.pt")
    assert len(predict(model, PurePosixPath(data), workers=0)) > 0
    for bad in (bytes(str(data), "utf-8"), torch.zeros(3), None, [None]):
        with pytest.raises(UserError, match="must be a path"):
            predict(model, bad)
    with pytest.raises(UserError, match="not a bytes"):
        RunConfig(data_dir=b"Data")


def test_case9_cache_in_float16_and_appended_bytes(tmp_path, trained):
    from MLPipeline.extras.Common import safe_torch_load
    from MLPipeline.extras.FeatureCache import CACHE_FORMAT, load_cache
    torch.save({"format": CACHE_FORMAT, "fingerprint": "f" * 32, "keys": ["k"], "rows": [0],
                "features": torch.zeros(1, 4, dtype=torch.float16)}, tmp_path / f"features-{'f' * 16}.pt")
    assert load_cache(tmp_path, "f" * 32, 4).rows == {}  # unusable: computed again
    appended = tmp_path / "model.pt"
    appended.write_bytes((trained[1] / "model.pt").read_bytes() + b"\0" * 100)
    with pytest.raises(UserError, match="appended"):
        safe_torch_load(appended, "checkpoint")


def test_case10_a_worker_that_cannot_hand_over_its_batch_is_one_error_line_not_a_hang(trained, tmp_path):
    data, out = trained
    result = engine_under_file_limit(1024, ["predict", data, "--model", out / "model.pt", "--workers", "2"])
    line = error_line(result)
    assert "shared memory" in line and "--workers 0" in line
