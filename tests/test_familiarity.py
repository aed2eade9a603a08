"""Issue 38, inputs unlike the training images go to review: the unfamiliar-input score fitted in training and
kept in model.pt, the threshold it stores and predict uses, the decisions and their reasons in the CSV and the
API, evaluate's coverage and risk-coverage plot, and models that have no score (older ones, .onnx)."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from MLPipeline import load_model, predict
from MLPipeline.extras import Familiarity
from MLPipeline.extras.Common import UserError
from MLPipeline.extras.Run import RunConfig
from MLPipeline.extras.Data import load_images
from MLPipeline.extras.Run import train
from tests.conftest import make_image_folder, train_tiny_model

SETTINGS = dict(img_size=32, weights="none", backbone="resnet18", workers=0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The default run (the recipe, with the tool's save) of a tiny model: (data folder, output folder)."""
    return train_tiny_model(tmp_path_factory.mktemp("familiarity"))


def noise(count: int = 1, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(count)]


def training_paths(output) -> list[str]:
    split = pd.read_csv(output / "split.csv", keep_default_na=False)
    return split.path[split.split == "train"].tolist()


def edited_model(output, tmp_path, edit) -> str:
    """A copy of model.pt with edit(checkpoint) applied."""
    checkpoint = torch.load(output / "model.pt", weights_only=True)
    edit(checkpoint)
    torch.save(checkpoint, tmp_path / "model.pt")
    return str(tmp_path / "model.pt")


def test_a_foreign_image_scores_above_every_training_image(tiny):
    _, output = tiny
    model = load_model(output / "model.pt", "cpu")
    training = predict(model, training_paths(output))
    foreign = predict(model, noise(3))
    assert training.unfamiliarity.notna().all() and len(training) == 18
    assert foreign.unfamiliarity.min() > training.unfamiliarity.max()
    assert foreign.decision.eq("review").all() and foreign.reason.eq("unfamiliar").all()


def test_the_score_is_fitted_in_training_and_recorded_with_its_share(tiny):
    _, output = tiny
    score = torch.load(output / "model.pt", weights_only=True)["unfamiliar_score"]
    assert score["whiten"].shape == (512, 512) and score["centres"].shape == (3, 512)  # resnet18: 512 features
    assert score["whiten"].dtype == torch.float16 and score["unfamiliar_share"] == Familiarity.SHARE
    assert score["threshold_from"] == "5-fold out-of-fold training images" and score["held_out_images"] == 18
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["unfamiliar_score"]["threshold"] == score["threshold"]


def test_the_threshold_flags_the_stated_share_of_held_out_images():
    generator = torch.Generator().manual_seed(0)
    features, labels = torch.rand(300, 16, generator=generator), torch.arange(300) % 3
    held_out = (torch.rand(100, 16, generator=generator), torch.arange(100) % 3)
    score = Familiarity.fit(features, labels, 3, held_out, share=0.05)
    assert score["threshold_from"] == "validation split" and score["held_out_images"] == 100
    assert (Familiarity.own_distances(score, *held_out) > score["threshold"]).sum() == 5
    without = Familiarity.fit(features, labels, 3, share=0.1, folds=4)
    assert without["threshold_from"] == "4-fold out-of-fold training images" and without["held_out_images"] == 300
    assert 0.5 * score["threshold"] < without["threshold"] < 2 * score["threshold"]


def test_the_stored_threshold_is_the_one_predict_uses(tiny):
    data, output = tiny
    paths = training_paths(output)[:8] + [str(data / "beta" / "000.jpg")]
    model = load_model(output / "model.pt", "cpu")
    threshold = torch.load(output / "model.pt", weights_only=True)["unfamiliar_score"]["threshold"]
    assert model.unfamiliar_score["threshold"] == threshold
    stored = predict(model, paths)
    expected = (stored.unfamiliarity > 1) | (stored.closest_class != stored.label)
    assert (stored.reason == expected.map({True: "unfamiliar", False: ""})).all()

    def with_threshold(value):
        model.unfamiliar_score["threshold"] = value
        return predict(model, paths)
    doubled = with_threshold(2 * threshold)
    np.testing.assert_allclose(doubled.unfamiliarity, stored.unfamiliarity / 2, rtol=1e-5)
    assert with_threshold(threshold / 1000).reason.eq("unfamiliar").all()  # everything is now far
    huge = with_threshold(1000 * threshold)  # only an image closest to another class's training images stays flagged
    assert (huge.decision.eq("review") == huge.closest_class.ne(huge.label)).all()


def test_review_reasons_reach_the_csv_and_the_api(tiny, cli, tmp_path):
    data, output = tiny
    familiar = str(data / "alpha" / "000.jpg")
    model = load_model(output / "model.pt", "cpu")
    table = predict(model, [familiar, *noise()], min_confidence=1.0)  # 1.0: everything is low confidence
    assert table.reason.tolist() == ["low confidence", "unfamiliar; low confidence"]
    assert table.decision.tolist() == ["review", "review"] and table.label.notna().all()
    assert predict(model, noise(), review=False).columns.tolist() == [
        "input", "label", "confidence", "p_alpha", "p_beta", "p_gamma", "error"]  # no review: as before
    result = cli("predict", familiar, data / "beta", "--model", output / "model.pt", "--csv", tmp_path / "p.csv")
    assert result.returncode == 0, result.stderr
    written = pd.read_csv(tmp_path / "p.csv", keep_default_na=False)
    assert written.columns.tolist() == ["input", "label", "confidence", "p_alpha", "p_beta", "p_gamma", "decision",
                                        "reason", "unfamiliarity", "closest_class", "error"]
    api = predict(model, [familiar, str(data / "beta")])
    assert written.reason.tolist() == api.reason.tolist() and written.decision.tolist() == api.decision.tolist()
    assert f"review: {(api.reason != '').sum()} of 9 image(s)" in result.stdout
    both = cli("predict", familiar, "--model", output / "model.pt", "--min-confidence", "1", "--no-review")
    assert both.returncode == 0 and "review (low confidence)" in both.stdout


def test_evaluate_reports_coverage_the_accuracy_of_the_decided_and_the_risk_coverage_plot(tiny, cli, tmp_path):
    data, output = tiny
    result = cli("evaluate", data, "--model", output / "model.pt", "--output-dir", tmp_path / "e",
                 "--min-confidence", "0.5")
    assert result.returncode == 0, result.stderr
    review = json.loads((tmp_path / "e" / "metrics.json").read_text())["review"]
    predictions = pd.read_csv(tmp_path / "e" / "predictions.csv", keep_default_na=False)
    decided = predictions[predictions.decision != "review"]
    assert review["decided"] == len(decided) and review["coverage"] == len(decided) / 24
    assert review["unfamiliar"] == predictions.reason.str.contains("unfamiliar").sum() >= 1
    assert review["low_confidence"] == (predictions.confidence < 0.5).sum()
    if len(decided):
        assert review["accuracy_on_the_rest"] == (decided.label == decided.predicted).mean()
    assert (tmp_path / "e" / "risk_coverage.png").read_bytes()[:4] == b"\x89PNG"
    assert "decided" in result.stdout


def test_a_model_without_the_score_still_predicts_with_one_note(tiny, cli, tmp_path):
    data, output = tiny
    old = edited_model(output, tmp_path, lambda checkpoint: checkpoint.pop("unfamiliar_score"))
    result = cli("predict", data / "alpha", "--model", old, "--csv", tmp_path / "p.csv")
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("note:") == 1 and "cannot flag inputs unlike its training images" in result.stderr
    table = pd.read_csv(tmp_path / "p.csv", keep_default_na=False)
    assert "unfamiliarity" not in table and (table.decision == table.label).all() and (table.reason == "").all()
    assert predict(load_model(old, "cpu"), noise()).decision.tolist() != ["review"]  # it cannot see the noise
    confident = cli("predict", data / "alpha", "--model", old, "--min-confidence", "1")
    assert confident.returncode == 0 and "review: 8 of 8 image(s)" in confident.stdout


@pytest.mark.parametrize("field, value", [("whiten", float("nan")), ("centres", "shape"), ("threshold", -1.0),
                                          ("threshold", "12"), ("unfamiliar_share", 1.5), ("method", "knn"),
                                          ("held_out_images", None)])
def test_a_damaged_score_is_refused_with_one_error_line(tiny, cli, tmp_path, field, value):
    data, output = tiny

    def damage(checkpoint):
        score = checkpoint["unfamiliar_score"]
        if field == "whiten":
            score["whiten"][0, 0] = value
        elif value == "shape":
            score[field] = score[field][:2]
        else:
            score[field] = value
    result = cli("predict", data / "alpha", "--model", edited_model(output, tmp_path, damage))
    assert result.returncode == 2 and result.stderr.count("error:") == 1 and "Traceback" not in result.stderr
    assert "unfamiliar-input score" in result.stderr and field in result.stderr


def test_a_validation_split_sets_the_threshold_with_the_share_asked_for(tmp_path):
    data = make_image_folder(tmp_path / "data", per_class=10)
    run = train(RunConfig(data_dir=data, output_dir=tmp_path / "out", epochs=1, val_size=0.25,
                          unfamiliar_share=0.2, **SETTINGS))
    score = torch.load(tmp_path / "out" / "model.pt", weights_only=True)["unfamiliar_score"]
    assert score["threshold_from"] == "validation split" and score["unfamiliar_share"] == 0.2
    assert score["held_out_images"] == (run.index.split == "val").sum() == 6
    with pytest.raises(UserError, match="--unfamiliar-share"):
        RunConfig(data_dir=data, unfamiliar_share=1.0)


def test_a_run_on_images_computes_the_features_it_fits_the_score_on(tiny, tmp_path):
    data, _ = tiny
    train(RunConfig(data_dir=data, output_dir=tmp_path / "out", epochs=1, augment=True, **SETTINGS))
    model = load_model(tmp_path / "out" / "model.pt", "cpu")
    assert model.unfamiliar_score["threshold_from"] == "5-fold out-of-fold training images"
    images, _ = load_images(training_paths(tmp_path / "out"), 32)
    features = model.outputs(images)[:, 3:]
    labels = torch.tensor(pd.read_csv(tmp_path / "out" / "split.csv").query("split == 'train'").label.map(
        model.classes.index).to_numpy())
    refitted = Familiarity.fit(features, labels, 3)
    assert refitted["threshold"] == pytest.approx(model.unfamiliar_score["threshold"], rel=1e-3)
