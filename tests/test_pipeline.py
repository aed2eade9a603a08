"""End to end: train from the CLI and the API, then use the model (predict, evaluate, import)."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

import engine
from MLPipeline import load_model, predict
from MLPipeline.extras import Report, SyntheticData
from MLPipeline.extras.Run import RunConfig as TrainConfig
from MLPipeline.extras.Run import train
from MLPipeline.extras.Predict import evaluate
from tests.conftest import FAST, ROOT, make_image_folder, run_engine

OUTPUTS = ("model.pt", "metrics.json", "history.csv", "loss_curve.png", "confusion_matrix.png", "split.csv")


def fast_config(data_dir, output_dir, **overrides) -> TrainConfig:
    settings = dict(data_dir=data_dir, output_dir=output_dir, epochs=2, img_size=32, weights="none")
    return TrainConfig(**{**settings, **overrides})


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    """One model trained through the API, shared by the tests that use a trained model."""
    output_dir = tmp_path_factory.mktemp("trained")
    return train(fast_config(tiny_data, output_dir)), output_dir


def test_engine_trains_and_writes_every_output(tiny_data, tmp_path):
    result = run_engine("train", "--data-dir", tiny_data, "--output-dir", tmp_path, *FAST[:-1], "2")
    assert result.returncode == 0, result.stderr
    assert len(re.findall(r"^epoch \d/2 .*test accuracy", result.stderr, re.M)) == 2
    assert all((tmp_path / name).stat().st_size > 0 for name in OUTPUTS)
    checkpoint = torch.load(tmp_path / "model.pt", weights_only=True)
    assert checkpoint["classes"] == ["alpha", "beta", "gamma"] and checkpoint["arch"] == "resnet50"
    assert checkpoint["pretrained"] is False and checkpoint["img_size"] == 32
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["pretrained"] is False and "random init" in metrics["weights_source"]
    assert metrics["test_accuracy"] == pytest.approx(metrics["history"][-1]["test_accuracy"])
    assert np.array(metrics["confusion_matrix"]).sum() == 6  # round(0.2 * 8) = 2 test images per class
    split = pd.read_csv(tmp_path / "split.csv")
    assert len(split) == 24 and (split.split == "test").sum() == 6
    assert len(pd.read_csv(tmp_path / "history.csv")) == 2


def test_presplit_train_val_with_two_classes(tmp_path):
    make_image_folder(tmp_path / "data" / "train", classes=("cat", "dog"), per_class=6)
    make_image_folder(tmp_path / "data" / "val", classes=("cat", "dog"), per_class=3, seed=1)
    result = run_engine("--data-dir", tmp_path / "data", "--output-dir", tmp_path / "out", *FAST)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["classes"] == ["cat", "dog"]
    assert metrics["dataset"]["counts"] == {"cat": {"test": 3, "train": 6}, "dog": {"test": 3, "train": 6}}


def test_plain_engine_run_generates_demo_data_when_data_is_empty(tmp_path, monkeypatch):
    data_dir = tmp_path / "Data"
    data_dir.mkdir()
    (data_dir / "README.md").write_text("only a readme")
    real_generator = SyntheticData.make_demo_data
    monkeypatch.setattr(engine, "DEFAULT_DATA_DIR", data_dir)
    monkeypatch.setattr(SyntheticData, "make_demo_data", lambda out: real_generator(out, per_class=5))
    assert engine.main(["--output-dir", str(tmp_path / "out"), *FAST]) == 0
    assert sorted(p.name for p in data_dir.iterdir() if p.is_dir()) == ["driving_license", "others",
                                                                       "social_security"]
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["dataset"]["skipped_count"] == 0


def test_feature_cache_gives_the_same_numbers_as_the_full_forward_path(tiny_data, tmp_path):
    # On the CPU, in fp32 both ways: on a GPU the full-forward path would train under bf16 autocast.
    # One batch per epoch: the two paths draw their batches in different orders (the images path shards them).
    same = dict(epochs=3, device="cpu", precision="fp32", batch_size=64)
    cached = train(fast_config(tiny_data, tmp_path / "cached", **same))
    uncached = train(fast_config(tiny_data, tmp_path / "uncached", feature_cache=False, **same))
    for key in ("train_loss", "test_loss", "test_accuracy"):
        assert [row[key] for row in cached.metrics["history"]] == pytest.approx(
            [row[key] for row in uncached.metrics["history"]], rel=1e-4, abs=1e-5)
    torch.testing.assert_close(cached.test_logits, uncached.test_logits, rtol=1e-4, atol=1e-4)
    assert "trained_on" not in cached.metrics and uncached.metrics["trained_on"] == "images"  # the recipe's, then not


def test_fresh_process_reproduces_the_logits_of_training(trained):
    run, output_dir = trained
    script = ("import json, sys; from MLPipeline import load_model, load_images; "
              "model = load_model(sys.argv[1], device='cpu'); paths = json.loads(sys.argv[2]); "
              "print(json.dumps(model.logits(load_images(paths, model.img_size)[0]).tolist()))")
    result = subprocess.run([sys.executable, "-c", script, str(output_dir / "model.pt"), json.dumps(run.test_paths)],
                            cwd=ROOT, capture_output=True, text=True, check=True)
    torch.testing.assert_close(torch.tensor(json.loads(result.stdout)), run.test_logits, rtol=1e-4, atol=1e-4)


def test_readme_api_example_runs_as_written(trained, tiny_data, tmp_path):
    """The Python example in README.md, run verbatim where its file names exist."""
    readme = (ROOT / "README.md").read_text()
    example = re.search(r"<!-- api-example -->\s*```python\n(.*?)```", readme, re.S).group(1)
    _, output_dir = trained
    shutil.copy(output_dir / "model.pt", (tmp_path / "output").mkdir() or tmp_path / "output" / "model.pt")
    for path in re.findall(r'"(Data/[^"]+)"', example):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(sorted((tiny_data / "alpha").glob("*.jpg"))[0], tmp_path / path)
    result = subprocess.run([sys.executable, "-c", example], cwd=tmp_path, capture_output=True, text=True,
                            env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("alpha") + result.stdout.count("beta") + result.stdout.count("gamma") >= 2


def test_predict_cli_prints_each_image_writes_csv_and_names_bad_files(trained, tiny_data, tmp_path, cli):
    run, output_dir = trained
    inputs = tmp_path / "inbox"
    shutil.copytree(tiny_data / "beta", inputs / "nested")
    (inputs / "broken.jpg").write_bytes(b"not an image")
    good = sorted(str(p) for p in (inputs / "nested").iterdir())
    result = cli("predict", inputs, "--model", output_dir / "model.pt", "--csv", tmp_path / "p.csv", "--top-k", "2",
                 "--no-review")
    assert result.returncode == 2
    lines = result.stdout.strip().splitlines()
    assert sorted(line.split("\t")[0] for line in lines) == good
    assert all(len(line.split("\t")) == 3 for line in lines)  # path + top-2 classes
    assert "broken.jpg" in result.stderr and "Traceback" not in result.stderr
    table = pd.read_csv(tmp_path / "p.csv")
    assert len(table) == len(good) + 1
    probabilities = table[[f"p_{name}" for name in run.classes]].dropna()
    np.testing.assert_allclose(probabilities.sum(axis=1), 1, atol=1e-5)
    clean = cli("predict", *good[:2], "--model", output_dir / "model.pt", "--no-review")
    assert clean.returncode == 0 and len(clean.stdout.strip().splitlines()) == 2


def test_classification_report_matches_a_hand_count():
    report = Report.classification_report(np.array([0, 0, 1, 1, 2]), np.array([0, 1, 1, 1, 0]), ["a", "b", "c"])
    assert report["accuracy"] == pytest.approx(3 / 5)
    assert report["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    a, b, c = report["per_class"]
    assert (a["precision"], a["recall"], a["support"]) == (pytest.approx(1 / 2), pytest.approx(1 / 2), 2)
    assert (b["precision"], b["recall"]) == (pytest.approx(2 / 3), 1.0) and b["f1"] == pytest.approx(0.8)
    assert (c["precision"], c["recall"], c["f1"]) == (0.0, 0.0, 0.0)


def test_evaluate_writes_outputs_that_agree_with_its_predictions(trained, tiny_data, tmp_path, caplog):
    run, output_dir = trained
    folder = tmp_path / "labelled"
    shutil.copytree(tiny_data, folder)
    make_image_folder(folder, classes=("zebra",), per_class=2)
    model = load_model(output_dir / "model.pt", device="cpu")
    report = evaluate(model, folder, tmp_path / "eval")
    assert "zebra" in caplog.text and report["unknown_classes"] == ["zebra"]
    predictions = predict(model, [folder / name for name in run.classes])
    truth = predictions.input.str.extract(r"labelled/(\w+)/")[0]
    assert report["accuracy"] == pytest.approx((predictions.label == truth).mean())
    hand_confusion = pd.crosstab(truth, predictions.label).reindex(index=run.classes, columns=run.classes,
                                                                   fill_value=0)
    assert report["confusion_matrix"] == hand_confusion.to_numpy().tolist()
    saved = pd.read_csv(tmp_path / "eval" / "confusion_matrix.csv", index_col=0)
    assert saved.to_numpy().tolist() == report["confusion_matrix"]
    per_class = pd.read_csv(tmp_path / "eval" / "per_class.csv")
    assert per_class["support"].tolist() == [8, 8, 8]
    assert all((tmp_path / "eval" / name).stat().st_size > 0 for name in ("confusion_matrix.png", "misclassified.png"))


def test_class_names_that_are_not_identifiers_work_end_to_end(tmp_path, cli):
    make_image_folder(tmp_path / "data", classes=("ID card", "driving-licence"), per_class=5)
    assert cli("--data-dir", tmp_path / "data", "--output-dir", tmp_path / "out", *FAST).returncode == 0
    result = cli("predict", tmp_path / "data" / "ID card", "--model", tmp_path / "out" / "model.pt", "--top-k", "2",
                 "--no-review")
    assert result.returncode == 0, result.stderr
    assert all(line.count("ID card") >= 2 and "driving-licence" in line for line in result.stdout.splitlines())


def test_data_folder_with_only_unsupported_files_is_an_error_not_demo_data(tmp_path, monkeypatch, capsys):
    data_dir = tmp_path / "Data"
    (data_dir / "phone").mkdir(parents=True)
    (data_dir / "phone" / "IMG_0001.MOV").write_bytes(b"a video, not an image")
    monkeypatch.setattr(engine, "DEFAULT_DATA_DIR", data_dir)
    assert engine.main(["--output-dir", str(tmp_path / "out"), *FAST]) == 2
    assert "no images found" in capsys.readouterr().err
    assert sorted(p.name for p in data_dir.rglob("*")) == ["IMG_0001.MOV", "phone"]


def test_a_mistyped_command_is_named(capsys):
    with pytest.raises(SystemExit) as exit_info:
        engine.main(["prdict", "x.jpg"])
    assert exit_info.value.code == 2 and "unknown command 'prdict'" in capsys.readouterr().err


def test_evaluate_scores_the_test_part_of_a_presplit_folder(trained, tiny_data, tmp_path):
    _, output_dir = trained
    shutil.copytree(tiny_data, tmp_path / "data" / "test")
    make_image_folder(tmp_path / "data" / "train", per_class=2)
    report = evaluate(load_model(output_dir / "model.pt", device="cpu"), tmp_path / "data", tmp_path / "eval")
    assert report["images"] == 24 and not report["unknown_classes"]
