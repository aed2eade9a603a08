"""The trust features end to end: cross-validation on features computed once, the temperature fitted on the
validation split and used by predict, the review decision, evaluate's calibration outputs, class weights."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from MLPipeline import Train, load_model, predict
from MLPipeline.extras import Files
from MLPipeline.extras.Run import RunConfig as TrainConfig
from MLPipeline.extras.Run import train
from MLPipeline.extras.Calibration import calibrated_probabilities
from MLPipeline.extras.Files import list_images
from MLPipeline.extras.Data import load_images
from tests.conftest import make_image_folder

SETTINGS = dict(img_size=32, weights="none", backbone="resnet18", workers=0)


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """A model trained with a validation split, so with a fitted temperature; shared by the tests that read it."""
    folder = tmp_path_factory.mktemp("calibrated")
    data = make_image_folder(folder / "data", per_class=20)  # 12 validation images: enough to fit T on
    run = train(TrainConfig(data_dir=data, output_dir=folder / "output", epochs=3, val_size=0.25, **SETTINGS))
    return data, folder / "output", run


def test_the_temperature_fitted_on_the_validation_split_calibrates_predict(calibrated):
    data, output, run = calibrated
    checkpoint = torch.load(output / "model.pt", weights_only=True)
    assert checkpoint["calibrated"] is True and checkpoint["temperature"] == run.metrics["temperature"]
    assert checkpoint["temperature"] > 0 and checkpoint["temperature"] != 1.0
    model = load_model(output / "model.pt", device="cpu")
    paths = [str(path) for path in list_images(data)][:6]
    probabilities = predict(model, paths)[[f"p_{name}" for name in model.classes]].to_numpy()
    logits = model.logits(load_images(paths, model.img_size)[0])
    np.testing.assert_allclose(probabilities, calibrated_probabilities(logits, checkpoint["temperature"]).numpy(),
                               rtol=1e-5, atol=1e-6)
    assert not np.allclose(probabilities, logits.softmax(1).numpy(), atol=1e-4)  # the temperature changed them


def test_without_a_validation_split_the_checkpoint_says_it_is_not_calibrated(tiny_data, tmp_path):
    run = train(TrainConfig(data_dir=tiny_data, output_dir=tmp_path, epochs=1, **SETTINGS))
    checkpoint = torch.load(tmp_path / "model.pt", weights_only=True)
    assert "calibrated" not in checkpoint and "temperature" not in checkpoint  # the recipe's: no calibration
    assert load_model(tmp_path / "model.pt").temperature == 1.0 and "calibrated" not in run.metrics


@pytest.mark.parametrize("threshold, reviewed", [("1.0", "all"), ("0", "none")])
def test_min_confidence_one_sends_everything_to_review_and_zero_nothing(calibrated, cli, tmp_path, threshold,
                                                                       reviewed):
    data, output, _ = calibrated
    result = cli("predict", data, "--model", output / "model.pt", "--min-confidence", threshold,
                 "--csv", tmp_path / "p.csv", "--no-review")  # confidence alone (unfamiliar inputs: test_familiarity)
    assert result.returncode == 0, result.stderr  # a review is an answer, not an error
    table = pd.read_csv(tmp_path / "p.csv")
    expected = table.label if reviewed == "none" else pd.Series(["review"] * len(table))
    assert table.decision.tolist() == expected.tolist() and table.label.notna().all()
    assert f"review: {0 if reviewed == 'none' else len(table)} of {len(table)} image(s)" in result.stdout


def test_a_min_confidence_outside_0_and_1_is_a_user_error(calibrated, cli):
    data, output, _ = calibrated
    result = cli("predict", data, "--model", output / "model.pt", "--min-confidence", "1.5")
    assert result.returncode == 2 and result.stderr.count("error:") == 1 and "--min-confidence" in result.stderr


def test_evaluate_reports_calibration_coverage_and_review(calibrated, cli, tmp_path):
    data, output, _ = calibrated
    result = cli("evaluate", data, "--model", output / "model.pt", "--output-dir", tmp_path / "e",
                 "--min-confidence", "0.9", "--no-review")
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert 0 <= metrics["expected_calibration_error"] <= 1 and (tmp_path / "e" / "calibration.png").stat().st_size
    coverage = pd.read_csv(tmp_path / "e" / "coverage.csv")
    assert coverage.threshold.tolist() == [0.5, 0.7, 0.8, 0.9, 0.95, 0.99]
    assert coverage.kept.is_monotonic_decreasing and "expected calibration error" in result.stdout
    predictions = pd.read_csv(tmp_path / "e" / "predictions.csv")
    reviewed = (predictions.decision == "review").sum()
    assert metrics["review"]["images"] == reviewed == (predictions.confidence < 0.9).sum()


def test_folds_score_every_image_once_on_features_computed_once(tmp_path, monkeypatch):
    data = make_image_folder(tmp_path / "data", per_class=9)
    decoded = []
    real = Files.read_image
    monkeypatch.setattr(Files, "read_image", lambda *args: decoded.append(args[0]) or real(*args))
    run = train(TrainConfig(data_dir=data, output_dir=tmp_path / "out", epochs=2, folds=3, **SETTINGS))
    assert sorted(decoded) == sorted(str(path) for path in list_images(data))  # each file once, for all folds
    folds = run.metrics["cross_validation"]
    assert folds["k"] == 3 and sum(fold["images"] for fold in folds["folds"]) == 27  # every image scored once
    table = pd.read_csv(tmp_path / "out" / "folds.csv")
    assert table.fold.astype(str).tolist() == ["1", "2", "3", "mean", "std"]
    assert run.metrics["history"] and (tmp_path / "out" / "model.pt").exists()  # then the final model, as ever


def test_balanced_class_weights_weigh_each_class_by_its_inverse_share(tmp_path, monkeypatch):
    data = make_image_folder(tmp_path / "data", classes=("few", "many"), per_class=20)
    for path in sorted((data / "few").iterdir())[5:]:
        path.unlink()  # 5 and 20 images: 4 and 16 train
    weights = []
    real = Train.train_one_epoch
    monkeypatch.setattr(Train, "train_one_epoch",
                        lambda *args, **kwargs: weights.append(args[4] if len(args) > 4 else kwargs.get("weight"))
                        or real(*args, **kwargs))
    train(TrainConfig(data_dir=data, output_dir=tmp_path / "out", epochs=1, class_weights="balanced", **SETTINGS))
    torch.testing.assert_close(weights[0].cpu(), torch.tensor([20 / (2 * 4), 20 / (2 * 16)]))
    assert torch.load(tmp_path / "out" / "model.pt", weights_only=True)["training"]["class_weights"] == "balanced"
