"""Grad-CAM explanations (MLPipeline/Explain.py): where the heatmap points, what it leaves alone, and the CLI."""
from __future__ import annotations

import copy
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from conftest import make_image_folder
from MLPipeline.extras import Explain
from MLPipeline.extras.Common import UserError
from MLPipeline.extras.Export import export_model
from MLPipeline.extras.Predict import load_model, predict
from MLPipeline.extras.Weights import BACKBONES
from MLPipeline.ResNet_Model import Classifier
from MLPipeline.extras.Weights import build_model
from MLPipeline.extras.Run import RunConfig as TrainConfig
from MLPipeline.extras.Run import train

SIDE = 64


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory) -> Path:
    """model.pt of one small run (conftest's FAST settings, ResNet18) on tiny_data; shared by the module."""
    output_dir = tmp_path_factory.mktemp("explain_model")
    train(TrainConfig(data_dir=tiny_data, output_dir=output_dir, epochs=1, img_size=32, weights="none",
                      backbone="resnet18"))
    return output_dir / "model.pt"


@pytest.fixture(scope="module")
def model(trained):
    return load_model(trained, "cpu")


@pytest.fixture(scope="module")
def onnx_file(trained) -> Path:
    return export_model(trained, "onnx")


# --- target_layer and gradcam on every backbone

def expected_layer(arch: str, backbone: nn.Module) -> nn.Module:
    if arch.startswith("resnet"):
        return backbone.layer4
    if arch == "vgg16":
        return backbone.features[29]  # the last ReLU, before the final max-pool
    return backbone.bn2 if arch.startswith("efficientnet_lite") else backbone.features[-1]


@pytest.mark.parametrize("arch", BACKBONES)
def test_every_backbone_has_a_spatial_last_stage(arch):
    torch.manual_seed(0)
    network, _ = build_model(3, arch, "none")
    assert Explain.target_layer(network) is expected_layer(arch, network.backbone)
    shapes = []
    handle = Explain.target_layer(network).register_forward_hook(lambda module, i, out: shapes.append(out.shape))
    heatmaps, probabilities = Explain.gradcam(network, torch.rand(1, 3, SIDE, SIDE))
    handle.remove()
    assert len(shapes) == 1 and len(shapes[0]) == 4 and min(shapes[0][2:]) >= 2, shapes  # a map, not a vector
    assert heatmaps.shape == (1, SIDE, SIDE) and heatmaps.dtype == np.float32
    assert 0 <= heatmaps.min() and heatmaps.max() <= 1
    assert probabilities.shape == (1, 3) and np.isclose(probabilities.sum(), 1, atol=1e-5)


# --- localisation: a small network trained here, on images whose classes differ in one quadrant only

class TinyBackbone(nn.Module):
    """Two conv stages and a last one named layer4 (as on a ResNet, so target_layer finds it): a 16 x 16 map."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(),
                                  nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.layer4 = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layer4(self.stem(images)).mean((2, 3))


def patch_images(count: int, seed: int, quadrant: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Dim noise with a 12-px square somewhere in one quadrant: red for class 0, blue for class 1."""
    rng = np.random.default_rng(seed)
    images = rng.uniform(0, 0.3, (count, 3, SIDE, SIDE)).astype(np.float32)
    labels = np.arange(count) % 2
    colours = np.array([[0.9, 0.2, 0.2], [0.2, 0.2, 0.9]], np.float32)
    for image, label in zip(images, labels):
        top, left = rng.integers(2, SIDE // 2 - 16, 2) + np.array(quadrant) * SIDE // 2
        image[:, top:top + 12, left:left + 12] = colours[label][:, None, None]
    return torch.from_numpy(images), torch.from_numpy(labels)


def quadrant_share(heatmaps: np.ndarray, quadrant: tuple[int, int]) -> np.ndarray:
    row, column = quadrant[0] * SIDE // 2, quadrant[1] * SIDE // 2
    return heatmaps[:, row:row + SIDE // 2, column:column + SIDE // 2].sum((1, 2)) / heatmaps.sum((1, 2))


def test_heatmap_points_at_the_quadrant_that_tells_the_classes_apart():
    torch.manual_seed(0)
    network = Classifier(TinyBackbone(), nn.Linear(16, 2), (0.5,) * 3, (0.25,) * 3)
    network.backbone.requires_grad_(True)  # unfrozen: the backbone learns too
    images, labels = patch_images(64, seed=0, quadrant=(0, 0))
    optimiser = torch.optim.Adam(network.parameters(), 1e-2)
    network.train()
    for _ in range(40):
        loss = nn.functional.cross_entropy(network(images), labels)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    network.eval()
    test_images, test_labels = patch_images(32, seed=100, quadrant=(0, 0))
    heatmaps, probabilities = Explain.gradcam(network, test_images)
    assert (probabilities.argmax(1) == test_labels.numpy()).mean() == 1.0
    share = quadrant_share(heatmaps, (0, 0))
    assert share.mean() > 0.5, share  # uniform would be 0.25
    # The same network on patches it never saw in the bottom-right: the heatmap follows the patch
    moved, _ = patch_images(32, seed=200, quadrant=(1, 1))
    assert quadrant_share(Explain.gradcam(network, moved)[0], (1, 1)).mean() > 0.5


def test_a_map_without_evidence_stays_zero():
    torch.manual_seed(0)
    network, _ = build_model(2, "resnet18", "none")
    nn.init.zeros_(network.head.bias)
    nn.init.zeros_(network.head.weight)  # no channel counts for any class: the gradients are all zero
    heatmaps, probabilities = Explain.gradcam(network.eval(), torch.rand(2, 3, SIDE, SIDE))
    assert np.array_equal(heatmaps, np.zeros((2, SIDE, SIDE), np.float32))  # not 0 / 0
    np.testing.assert_allclose(probabilities, 0.5)


# --- explaining leaves the model as it was

def model_state(network: nn.Module) -> tuple[dict, dict, dict]:
    return (copy.deepcopy(network.state_dict()),
            {name: None if p.grad is None else p.grad.clone() for name, p in network.named_parameters()},
            {name: module.training for name, module in network.named_modules()})


def assert_same_state(before: tuple, after: tuple) -> None:
    (weights, grads, modes), (weights_after, grads_after, modes_after) = before, after
    assert weights.keys() == weights_after.keys()
    assert all(torch.equal(weights[key], weights_after[key]) for key in weights)  # BatchNorm buffers included
    assert all((grads[name] is None) == (grads_after[name] is None) for name in grads)
    assert all(torch.equal(grads[name], grads_after[name]) for name in grads if grads[name] is not None)
    assert modes == modes_after


def test_explaining_changes_no_weight_statistic_grad_or_mode():
    torch.manual_seed(0)
    network, _ = build_model(2, "resnet18", "none", unfreeze="all")  # every parameter requires grad
    images = torch.rand(4, 3, SIDE, SIDE)
    network.eval()
    outputs = network(images).detach()
    network.train()  # Classifier.train: BatchNorm stays in eval, the rest trains
    nn.functional.cross_entropy(network(images), torch.tensor([0, 1, 0, 1])).backward()
    network.head.bias.grad = None  # a parameter without .grad must stay without
    before = model_state(network)
    heatmaps, _ = Explain.gradcam(network, images)
    assert_same_state(before, model_state(network))
    with torch.inference_mode():  # callers inside inference mode get the same maps
        inside, _ = Explain.gradcam(network, images)
    np.testing.assert_allclose(inside, heatmaps, atol=1e-5)
    with pytest.raises(RuntimeError):  # a class the head does not have: the error comes out...
        Explain.gradcam(network, images, [0, 1, 2, 7])
    assert_same_state(before, model_state(network))  # ...with the mode restored
    assert not Explain.target_layer(network)._forward_hooks  # and the hook removed
    network.eval()
    assert torch.equal(network(images), outputs)


# --- explain(), overlay(), names

def test_explain_gives_a_map_of_the_original_size_and_the_predicted_probabilities(model, tiny_data):
    image = np.random.default_rng(0).integers(0, 255, (50, 80, 3), dtype=np.uint8)  # not square
    heatmap, probabilities = Explain.explain(model, image)
    assert heatmap.shape == (50, 80) and 0 <= heatmap.min() and heatmap.max() <= 1
    assert list(probabilities) == model.classes
    row = predict(model, [image]).iloc[0]  # the image the network saw is the one predict() classifies
    # predict() runs the backbone in bfloat16 where the CPU computes it natively; Grad-CAM's gradients in fp32
    np.testing.assert_allclose([probabilities[name] for name in model.classes],
                               [row[f"p_{name}"] for name in model.classes], atol=2e-3)
    path = sorted((tiny_data / "beta").iterdir())[0]
    heatmap, _ = Explain.explain(model, path, "gamma")
    assert heatmap.shape == cv2.imread(str(path)).shape[:2] == (48, 40)
    with pytest.raises(UserError, match="alpha, beta, gamma"):
        Explain.explain(model, image, "delta")


def test_explanations_need_the_pytorch_model(onnx_file):
    onnx_model = load_model(onnx_file, "cpu")
    with pytest.raises(UserError, match="PyTorch model"):
        Explain.explain(onnx_model, np.zeros((40, 40, 3), np.uint8))


def test_overlay_is_the_jet_colour_map_in_rgb_over_the_image():
    image = np.full((30, 20, 3), 200, np.uint8)
    blended = Explain.overlay(image, np.zeros((7, 7), np.float32), alpha=0.5)  # a small map is resized
    assert blended.shape == image.shape and blended.dtype == np.uint8
    np.testing.assert_array_equal(blended[0, 0], [100, 100, 164])  # jet's 0 is dark blue (0, 0, 128) in RGB
    hot = Explain.overlay(image, np.ones((30, 20), np.float32), alpha=0.5)
    np.testing.assert_array_equal(hot[0, 0], [164, 100, 100])  # and its 1 dark red


def test_explanation_names_never_clash_and_are_always_valid():
    assert Explain.explanation_name(0, "a/scan.jpg") != Explain.explanation_name(1, "b/scan.jpg")
    assert Explain.explanation_name(3, "in/My scan (2).JPG") == "0003-My_scan__2_.png"
    odd = Explain.explanation_name(12, b"caf\xe9 \xff.png".decode("utf-8", "surrogateescape"))
    assert odd == "0012-caf___.png"  # two bytes that are not UTF-8, and a space
    odd.encode("utf-8")  # no surrogate left
    assert len(Explain.explanation_name(1, "x" * 300 + ".png")) == len("0001-") + 60 + len(".png")


# --- the CLI

def test_predict_explain_writes_one_picture_per_classified_input(model, trained, tmp_path, cli):
    folders = [make_image_folder(tmp_path / name, ("alpha",), per_class=2, seed=seed)
               for seed, name in enumerate(("one", "two"))]  # the same file names in both
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"these bytes are not an image")
    out = tmp_path / "explained"
    result = cli("predict", *folders, corrupt, "--model", trained, "--explain", out, "--device", "cpu")
    assert result.returncode == 2, result.stderr  # the corrupt file could not be classified
    written = sorted(out.iterdir())
    assert len(written) == 4 and len({path.name for path in written}) == 4, written
    assert not [path for path in written if "corrupt" in path.name]
    assert all(cv2.imread(str(path)) is not None for path in written)
    assert f"explanations: 4 image(s) in {out}" in result.stdout


def test_explain_paths_skips_files_that_do_not_decode(model, tiny_data, tmp_path):
    good = sorted((tiny_data / "alpha").iterdir())[:2]
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG but nothing after")
    paths = [str(good[0]), str(corrupt), str(tmp_path / "missing.jpg"), str(good[1])]
    written = Explain.explain_paths(model, paths, tmp_path / "out", batch_size=2)
    assert written == {paths[0]: tmp_path / "out" / "0000-000.png", paths[3]: tmp_path / "out" / "0003-001.png"}
    assert sorted((tmp_path / "out").iterdir()) == sorted(written.values())


def test_an_onnx_model_cannot_explain(onnx_file, tiny_data, tmp_path, cli):
    image = sorted((tiny_data / "alpha").iterdir())[0]
    result = cli("predict", image, "--model", onnx_file, "--explain", tmp_path / "out")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: explanations need"), lines
    assert not (tmp_path / "out").exists() and not result.stdout  # refused before anything was classified
    result = cli("evaluate", tiny_data, "--model", onnx_file, "--explain-count", "2", "--output-dir", tmp_path / "e")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_evaluate_explains_the_misclassified_and_the_least_confident_correct(model, trained, tiny_data, tmp_path,
                                                                             cli):
    out = tmp_path / "evaluation"
    (out / "explained").mkdir(parents=True)
    from MLPipeline.extras.Explain import write_explanation  # a picture of an earlier run: this project's own
    write_explanation(out / "explained" / "9999-stale.png", np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8)), "old")
    result = cli("evaluate", tiny_data, "--model", trained, "--output-dir", out, "--explain-count", "2",
                 "--device", "cpu")
    assert result.returncode == 0, result.stderr
    predictions = pd.read_csv(out / "predictions.csv")
    wrong = (predictions.label != predictions.predicted).sum()
    assert 0 < wrong < len(predictions) - 2, "the test needs both kinds; change the fixture's run"
    assert len(list((out / "explained").glob("*.png"))) == wrong + 2  # the stale picture went
    assert (out / "misclassified.png").is_file()


def test_evaluate_grid_shows_the_predicted_class_heatmap(model, tiny_data, tmp_path):
    paths = [str(path) for path in sorted((tiny_data / "alpha").iterdir())[:3]]
    images = np.stack([cv2.resize(cv2.imread(path)[:, :, ::-1], (32, 32)) for path in paths])
    predictions = pd.DataFrame({"path": paths, "label": ["alpha"] * 3, "predicted": ["beta", "gamma", "alpha"],
                                "confidence": [0.5, 0.6, 0.7]})
    grid = Explain.explain_evaluation(model, predictions, images[:2], tmp_path, count=1)
    heatmaps = Explain.explain_images(model, images[:2], [1, 2])  # beta, gamma: the predicted classes
    np.testing.assert_array_equal(grid, [Explain.overlay(image, heat) for image, heat in zip(images, heatmaps)])
    assert sorted(path.name for path in (tmp_path / "explained").iterdir()) == ["0000-000.png", "0001-001.png",
                                                                                "0002-002.png"]
