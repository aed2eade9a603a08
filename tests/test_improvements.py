"""The original's suggested improvements as options: each works end to end on a tiny dataset."""
from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from MLPipeline import load_model, predict
from MLPipeline.extras import Augment
from MLPipeline.extras.Run import RunConfig as TrainConfig
from MLPipeline.extras.Run import train
from MLPipeline.extras.Augment import make_augmenter, random_homographies
from MLPipeline.extras.Weights import build_model
from tests.conftest import FAST, run_engine


def fast_config(data_dir, output_dir, **overrides) -> TrainConfig:
    settings = dict(data_dir=data_dir, output_dir=output_dir, epochs=1, img_size=32, weights="none")
    return TrainConfig(**{**settings, **overrides})


@pytest.mark.parametrize("arch", ["resnet18", "vgg16", "efficientnet_b0", "convnext_tiny"])
def test_each_backbone_family_trains_saves_and_predicts(arch, tiny_data, tmp_path):
    run = train(fast_config(tiny_data, tmp_path, backbone=arch))
    model = load_model(tmp_path / "model.pt", device="cpu")
    assert model.info["arch"] == arch and model.info["head"]["out_features"] == 3
    assert isinstance(model.network.head, torch.nn.Linear)
    results = predict(model, run.test_paths)
    expected = run.test_logits.softmax(1)
    torch.testing.assert_close(torch.tensor(results[[f"p_{c}" for c in run.classes]].to_numpy(), dtype=torch.float32),
                               expected, rtol=1e-4, atol=1e-5)


def test_augmenter_changes_each_image_and_keeps_the_shape():
    images = torch.rand(4, 3, 40, 40)
    torch.manual_seed(0)
    augmented = make_augmenter(40)(images)
    assert augmented.shape == images.shape and augmented.dtype == torch.float32
    assert 0 <= augmented.min() and augmented.max() <= 1
    assert all(not torch.equal(before, after) for before, after in zip(images, augmented))


def test_flips_mirror_about_half_the_images_and_only_when_asked():
    torch.manual_seed(0)
    mirrored = (random_homographies(400, flips=True)[:, 0, 0] < 0).float().mean()
    assert 0.4 < mirrored < 0.6
    assert (random_homographies(400, flips=False)[:, 0, 0] > 0).all()


def test_augment_runs_the_uncached_path_and_is_recorded(tiny_data, tmp_path, monkeypatch):
    made, augmented = [], []

    def counting_augmenter(img_size, flips=False):
        made.append(flips)
        augment = make_augmenter(img_size, flips)
        return lambda images: augmented.append(len(images)) or augment(images)
    monkeypatch.setattr(Augment, "make_augmenter", counting_augmenter)
    run = train(fast_config(tiny_data, tmp_path, augment=True, flips=True, epochs=2, workers=0))
    assert run.metrics["trained_on"] == "images"
    assert made == [True]  # --flips reaches the augmenter
    assert sum(augmented) == 2 * sum(counts["train"] for counts in run.metrics["dataset"]["counts"].values())
    training = torch.load(tmp_path / "model.pt", weights_only=True)["training"]
    assert training["augment"] is True and training["flips"] is True


@pytest.mark.parametrize("unfreeze, layer1_changes", [("last", False), ("all", True)])
def test_unfreeze_trains_the_chosen_layers_at_a_lower_rate_and_keeps_batchnorm_statistics(
        unfreeze, layer1_changes, tiny_data, tmp_path):
    torch.manual_seed(42)  # train() seeds the same way, so this is the model it starts from
    initial, _ = build_model(3, "resnet18", "none", unfreeze)
    run = train(fast_config(tiny_data, tmp_path, backbone="resnet18", unfreeze=unfreeze))
    trained = run.model.backbone
    changed = lambda name: not torch.equal(initial.backbone.get_parameter(name), trained.get_parameter(name))  # noqa: E731
    assert changed("layer4.1.conv2.weight")
    assert changed("layer1.0.conv1.weight") == layer1_changes
    torch.testing.assert_close(initial.backbone.layer4[1].bn2.running_mean, trained.layer4[1].bn2.running_mean)
    assert run.metrics["trained_on"] == "images"
    # Adam moves each weight by at most about its learning rate per step: the backbone's is --lr / 10.
    steps = -(-sum(counts["train"] for counts in run.metrics["dataset"]["counts"].values()) // 8)
    backbone_change = (initial.backbone.get_parameter("layer4.1.conv2.weight")
                       - trained.get_parameter("layer4.1.conv2.weight")).abs().max().item()
    head_change = (initial.head.weight - run.model.head.weight).abs().max().item()
    assert 0 < backbone_change <= steps * 1e-4 * 1.05 < head_change


def test_cosine_schedule_lowers_the_learning_rate_each_epoch(tiny_data, tmp_path):
    cosine = train(fast_config(tiny_data, tmp_path / "cosine", epochs=3, schedule="cosine", lr=1e-3))
    constant = train(fast_config(tiny_data, tmp_path / "constant", epochs=3, lr=1e-3))
    cosine_rates = [row["lr"] for row in cosine.metrics["history"]]
    assert cosine_rates[0] == pytest.approx(1e-3) and cosine_rates[0] > cosine_rates[1] > cosine_rates[2] > 0
    assert "lr" not in constant.metrics["history"][0]  # the recipe's run: a constant rate, not recorded


def test_validation_split_chooses_the_epoch_and_leaves_the_test_split_alone(tiny_data, tmp_path):
    plain = train(fast_config(tiny_data, tmp_path / "plain", epochs=4))
    validated = train(fast_config(tiny_data, tmp_path / "validated", epochs=4, val_size=0.25))
    plain_split, validated_split = (pd.read_csv(tmp_path / name / "split.csv") for name in ("plain", "validated"))
    assert (plain_split.split == "test").tolist() == (validated_split.split == "test").tolist()
    assert (validated_split.split == "val").sum() == 3 * round(0.25 * 6)
    history = validated.metrics["history"]
    best = min(history, key=lambda row: row["val_loss"])
    assert validated.metrics["best_epoch"] == best["epoch"]
    assert validated.metrics["test_loss"] == pytest.approx(best["test_loss"], rel=1e-5)
    assert "best_epoch" not in plain.metrics  # the recipe's run keeps its last epoch


def test_improvement_flags_reach_the_checkpoint_from_the_command_line(tiny_data, tmp_path):
    result = run_engine("--data-dir", tiny_data, "--output-dir", tmp_path, *FAST, "--backbone", "resnet18",
                        "--augment", "--unfreeze", "last", "--schedule", "cosine", "--val-size", "0.25",
                        "--backbone-lr", "1e-5")
    assert result.returncode == 0, result.stderr
    assert "val accuracy" in result.stderr
    checkpoint = torch.load(tmp_path / "model.pt", weights_only=True)
    assert checkpoint["arch"] == "resnet18"
    assert {key: checkpoint["training"][key] for key in ("augment", "unfreeze", "schedule", "val_size")} == {
        "augment": True, "unfreeze": "last", "schedule": "cosine", "val_size": 0.25}
    assert json.loads((tmp_path / "metrics.json").read_text())["config"]["backbone_lr"] == 1e-5


def test_augment_runs_no_backbone_pass_before_its_epochs(tiny_data, tmp_path, monkeypatch):
    """--augment reads the training images every epoch: features computed before the first epoch would be
    thrown away, so the backbone first runs inside the first epoch (the files are only decoded before it)."""
    from MLPipeline import Train
    from MLPipeline.ResNet_Model import Classifier
    events = []
    real_epoch, real_features = Train.train_one_epoch, Classifier.features
    monkeypatch.setattr(Train, "train_one_epoch", lambda *args: events.append("epoch") or real_epoch(*args))
    monkeypatch.setattr(Classifier, "features",
                        lambda self, images: events.append(len(images)) or real_features(self, images))
    run = train(fast_config(tiny_data, tmp_path, augment=True, epochs=2, workers=0, backbone="resnet18"))
    assert events[0] == "epoch", events[:5]  # not one image through the backbone before training starts
    trained = sum(counts["train"] for counts in run.metrics["dataset"]["counts"].values())
    first_epoch = events[1:events.index("epoch", 1)]
    assert sum(first_epoch) >= trained  # the first epoch's training batches, then the held-out scoring
