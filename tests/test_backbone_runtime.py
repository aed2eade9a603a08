"""A frozen backbone run by ONNX Runtime: the same features as PyTorch's, chosen only when asked for or faster,
and PyTorch whenever the export cannot be had; and the augmenter's colour map, written as one linear map."""
from __future__ import annotations

import logging

import pytest
import torch

from MLPipeline.extras.Run import RunConfig as TrainConfig
from MLPipeline.extras.Run import train
from MLPipeline import Train
from MLPipeline.extras import Pipeline
from MLPipeline.extras import Augment
from MLPipeline.extras.Augment import jitter_colours
from MLPipeline.extras.OnnxBackbone import MIN_IMAGES_TO_COMPARE, FrozenBackbone
from MLPipeline.extras.Weights import build_model


CPU = torch.device("cpu")


class Watched(torch.nn.Module):
    """A FrozenBackbone that notes which runtime computed each batch (a module: it stands in a network)."""

    def __init__(self, backbone, calls: list):
        super().__init__()
        self.backbone, self.calls = backbone, calls

    @property
    def name(self) -> str:
        return self.backbone.name

    def forward(self, images):
        features = self.backbone(images)
        self.calls.append(self.backbone.name)
        return features


def frozen_resnet18():
    torch.manual_seed(0)
    return build_model(3, "resnet18", "none")[0].eval().to(CPU, memory_format=torch.channels_last)


def test_onnxruntime_gives_pytorchs_features_and_keeps_running():
    model, images = frozen_resnet18(), torch.rand(3, 3, 32, 32)
    backbone = FrozenBackbone(model, CPU, "onnxruntime")
    with torch.inference_mode():
        expected, first, later = model.features(images), backbone(images), backbone(images[:2])
    assert backbone.name == "onnxruntime" and backbone.run is not model.features
    assert not model.training  # the export left the model in the mode it found it in
    torch.testing.assert_close(first, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(later, expected[:2], rtol=1e-4, atol=1e-4)


def test_auto_leaves_a_small_run_to_pytorch_without_exporting(monkeypatch):
    model, images = frozen_resnet18(), torch.rand(2, 3, 32, 32)
    monkeypatch.setattr(torch.onnx, "export", lambda *args, **kwargs: pytest.fail("exported for a small run"))
    backbone = FrozenBackbone(model, CPU, "auto", images=MIN_IMAGES_TO_COMPARE - 1)
    with torch.inference_mode():
        assert torch.equal(backbone(images), model.features(images))
    assert backbone.run == model.features and backbone.name == "pytorch"


def test_an_export_that_fails_falls_back_to_pytorch_with_a_warning(monkeypatch, caplog):
    model, images = frozen_resnet18(), torch.rand(2, 3, 32, 32)

    def broken_export(*args, **kwargs):
        raise RuntimeError("exporter gone")
    monkeypatch.setattr(torch.onnx, "export", broken_export)
    backbone = FrozenBackbone(model, CPU, "auto", images=MIN_IMAGES_TO_COMPARE)
    with caplog.at_level(logging.WARNING), torch.inference_mode():
        features = backbone(images)
        torch.testing.assert_close(features, model.features(images))
    assert backbone.name == "pytorch" and "exporter gone" in caplog.text


def test_auto_keeps_the_faster_runtime(monkeypatch):
    model = frozen_resnet18()
    speeds = iter([10.0, 20.0])  # PyTorch's first batch, then ONNX Runtime's

    def timed(run, images):
        with torch.no_grad():
            return next(speeds), run(images)
    monkeypatch.setattr("MLPipeline.extras.OnnxBackbone.timed", timed)
    backbone = FrozenBackbone(model, CPU, "auto", images=MIN_IMAGES_TO_COMPARE)
    with torch.inference_mode():
        backbone(torch.rand(2, 3, 32, 32))
    assert backbone.name == "onnxruntime"
    speeds = iter([20.0, 10.0])
    slower = FrozenBackbone(model, CPU, "auto", images=MIN_IMAGES_TO_COMPARE)
    with torch.inference_mode():
        slower(torch.rand(2, 3, 32, 32))
    assert slower.name == "pytorch" and slower.run == model.features


def test_training_in_either_runtime_gives_the_same_model(tiny_data, tmp_path):
    settings = dict(data_dir=tiny_data, img_size=32, weights="none", backbone="resnet18", epochs=3, device="cpu",
                    precision="fp32")
    runs = {runtime: train(TrainConfig(output_dir=tmp_path / runtime, backbone_runtime=runtime, **settings))
            for runtime in ("pytorch", "onnxruntime")}
    assert {runtime: run.metrics.get("backbone_runtime", "pytorch") for runtime, run in runs.items()} == {
        "pytorch": "pytorch", "onnxruntime": "onnxruntime"}
    torch.testing.assert_close(runs["onnxruntime"].test_logits, runs["pytorch"].test_logits, rtol=1e-3, atol=1e-4)


def test_augmented_training_runs_its_frozen_backbone_in_onnxruntime(tiny_data, tmp_path, monkeypatch):
    augmented, backbone_batches = [], []
    real_augmenter, real_backbone = Augment.make_augmenter, Pipeline.frozen_backbone

    def counting_augmenter(*args):
        augment = real_augmenter(*args)
        return lambda images: augmented.append(len(images)) or augment(images)

    def watched_backbone(*args):
        return Watched(real_backbone(*args), backbone_batches)
    monkeypatch.setattr(Augment, "make_augmenter", counting_augmenter)
    monkeypatch.setattr(Pipeline, "frozen_backbone", watched_backbone)
    run = train(TrainConfig(data_dir=tiny_data, output_dir=tmp_path, img_size=32, weights="none", backbone="resnet18",
                            epochs=2, device="cpu", augment=True, backbone_runtime="onnxruntime", workers=0))
    train_images = run.metrics["dataset"]["counts"]
    assert sum(augmented) == 2 * sum(counts["train"] for counts in train_images.values())  # every image, each epoch
    assert run.metrics["trained_on"] == "images" and run.metrics["backbone_runtime"] == "onnxruntime"
    assert backbone_batches and set(backbone_batches) == {"onnxruntime"}  # features and training batches alike


def test_the_colour_jitter_is_brightness_then_contrast_then_saturation():
    pixels = torch.rand(4, 3, 16, 16) * 255
    torch.manual_seed(3)
    jittered = jitter_colours(pixels)
    torch.manual_seed(3)  # the same three factors per image, drawn in the same order
    brightness, contrast, saturation = (torch.empty(4).uniform_(0.7, 1.3).view(4, 1, 1, 1) for _ in range(3))
    luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    step = pixels * brightness
    mean_grey = (step * luma).sum(1, keepdim=True).mean((2, 3), keepdim=True)
    step = (step - mean_grey) * contrast + mean_grey
    grey = (step * luma).sum(1, keepdim=True)
    torch.testing.assert_close(jittered, grey + (step - grey) * saturation, rtol=1e-4, atol=1e-3)
