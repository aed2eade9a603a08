"""benchmarks/original_baseline.py: the original's published loader, head and scoring as written, and the
benchmark's smallest run end to end, on tiny generated images (no network, no shared data)."""
from __future__ import annotations

import importlib.util
import logging
import re
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from tests.conftest import ROOT

spec = importlib.util.spec_from_file_location("original_baseline", ROOT / "benchmarks" / "original_baseline.py")
baseline = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = baseline  # dataclasses look their module up there
spec.loader.exec_module(baseline)

SIZE = 16
CLASSES = ("driving_license", "others", "social_security")


def bgr_noise(seed: int, size: int = SIZE) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


@pytest.fixture
def folder(tmp_path) -> Path:
    """One class folder of the original's layout: a colour PNG, a colour JPEG and a grayscale PNG."""
    root = tmp_path / "Testing_Data" / "others"
    root.mkdir(parents=True)
    cv2.imwrite(str(root / "colour.png"), bgr_noise(0))  # lossless, at the loader's size: no resize change
    cv2.imwrite(str(root / "colour.jpg"), bgr_noise(1, 40))
    cv2.imwrite(str(root / "gray.png"), np.full((SIZE, SIZE), 128, np.uint8))
    return root.parent


def test_the_published_loader_drops_a_grayscale_file_and_keeps_colour_ones(folder):
    split = baseline.load_split(folder, "published", SIZE)
    assert len(split.images) == 2 and split.labels.tolist() == [0, 0]
    assert list(split.dropped) == [str(folder / "others" / "gray.png")]
    assert "grayscale" in split.dropped[str(folder / "others" / "gray.png")]
    # The first fix keeps it, as three equal channels.
    kept = baseline.load_split(folder, "colour", SIZE)
    assert len(kept.images) == 3 and not kept.dropped


def test_the_published_loader_gives_bgr_0_to_255_reshaped_not_transposed(folder):
    bgr = bgr_noise(0)
    loaded = baseline.load_split(folder, "published", SIZE).images[1:2]  # colour.png (after colour.jpg)
    assert np.array_equal(loaded[0].numpy(), bgr)  # BGR, as stored
    published = baseline.as_network_input(loaded, baseline.ROWS[0])[0].numpy()
    assert published.dtype == np.float32 and published.max() > 1  # 0-255: no division, no mean/std
    assert np.array_equal(published, np.reshape(bgr.astype(np.float64), (3, SIZE, SIZE)))
    assert not np.array_equal(published, bgr.transpose(2, 0, 1))
    # The fix: a transpose; from row 3 on, RGB from the project's decoder, in [0, 1].
    fixed = baseline.as_network_input(loaded, baseline.ROWS[2])[0].numpy()
    assert np.array_equal(fixed, bgr.transpose(2, 0, 1))
    rgb = baseline.load_split(folder, "project", SIZE).images[1:2]
    assert np.array_equal(rgb[0].numpy(), bgr[..., ::-1])
    recipe = baseline.as_network_input(rgb, baseline.ROWS[6])[0].numpy()
    assert np.allclose(recipe, bgr[..., ::-1].transpose(2, 0, 1) / 255)


def test_the_published_head_outputs_log_probabilities():
    torch.manual_seed(0)
    head = baseline.published_head(20, 3).eval()
    outputs = head(torch.randn(5, 20) * 10)
    assert (outputs <= 0).all()
    assert torch.allclose(outputs.exp().sum(1), torch.ones(5))
    assert [type(layer) for layer in head] == [nn.Linear, nn.ReLU, nn.Dropout, nn.Linear, nn.LogSoftmax]


def test_training_mode_switches_only_batchnorm_in_the_frozen_backbone():
    model, _ = baseline.build_model(3, "resnet18", "none")
    model.backbone.extra = nn.Dropout()  # a layer that changes in training mode but is not BatchNorm
    baseline.set_mode(model, bn_in_train_mode=True)
    batchnorms = [module for module in model.backbone.modules() if isinstance(module, nn.BatchNorm2d)]
    assert model.head.training and all(module.training for module in batchnorms)
    assert not model.backbone.extra.training
    baseline.set_mode(model, bn_in_train_mode=False, head_in_train_mode=False)
    assert not any(module.training for module in model.modules())


def make_dataset(root: Path) -> Path:
    """The original's layout with 4 training and 2 test images a class, and one grayscale test file."""
    for split, count in (("Training_data", 4), ("Testing_Data", 2)):
        for number, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                image = bgr_noise(10 * number + i, 40) // 4 + np.uint8(60 * number)
                cv2.imwrite(str(root / split / name / f"{i}.{'png' if i % 2 else 'jpg'}"), image)
    cv2.imwrite(str(root / "Testing_Data" / "others" / "gray.png"), np.full((40, 40), 90, np.uint8))
    return root


def test_the_smallest_configuration_runs_end_to_end(tmp_path, capsys, monkeypatch):
    data = make_dataset(tmp_path / "data")
    project_log = logging.getLogger("MLPipeline")
    monkeypatch.setattr(project_log, "level", project_log.level)  # the script quiets it: not the tests after
    baseline.main(["--data", str(data), "--backbone", "resnet18", "--weights", "none", "--img-size", "32",
                   "--seeds", "2", "--epochs", "1", "--rows", "0,3,4,6,7"])
    out = capsys.readouterr().out
    assert out.startswith("$ python benchmarks/original_baseline.py --data ")
    assert "Loaded by the published loader (row 0): 12 of 12 training, 6 of 7 test images." in out
    assert re.search(r"dropped .*gray\.png: grayscale", out)
    assert "Backbone of every row: resnet18, RANDOM INIT." in out
    rows = {line.split(" | ")[0].strip("| "): line for line in out.splitlines() if re.match(r"\| \d \|", line)}
    assert sorted(rows) == ["0", "3", "4", "6", "7"]
    assert re.search(r"\| 6 \| \d \d \(of 6\) \|", rows["0"])  # 2 seeds, on the 6 test images kept
    assert re.search(r"\| 7 \| \d \d \(of 7\) \|", rows["6"])
    assert "scoring only: the trainings of row 3" in rows["4"]
    assert all("resnet18, random init" in line for line in rows.values())
    assert re.search(r"the original's reported 67\.11% \(100/149\) is (inside|outside) that range", out)
    assert "| 6: rows 5 to 6 together |" in out and "| 3: rows 1 to 3 together |" in out


def test_a_missing_data_folder_is_one_error_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        baseline.main(["--data", str(tmp_path / "nowhere")])
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Training_data/" in err[0]


@pytest.mark.parametrize("rows", ["8", "a", ""])
def test_rows_out_of_range_are_refused(rows, capsys):
    with pytest.raises(SystemExit) as stopped:
        baseline.parse_args(["--rows", rows])
    assert stopped.value.code == 2
    assert "row numbers from 0 to 7" in capsys.readouterr().err
