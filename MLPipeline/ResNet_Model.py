"""Build backbone + head, resolve pretrained weights, freeze, save/load the checkpoint."""
from __future__ import annotations

import logging
import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import torch
import torchvision
from torch import nn

from MLPipeline.CreateDataset import IMAGENET_MEAN, IMAGENET_STD, UserError

log = logging.getLogger("MLPipeline")

BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "vgg16", "efficientnet_b0",
             "convnext_tiny")
UNFREEZE_CHOICES = ("none", "last", "all")
CHECKPOINT_FORMAT = "doc-classifier-checkpoint/1"
CHECKPOINT_KEYS = ("format", "state_dict", "classes", "arch", "img_size", "mean", "std", "head",
                   "weights_source", "pretrained", "created_utc", "torch_version")


class Classifier(nn.Module):
    """A torchvision backbone with its ImageNet classifier removed, and a linear head for our classes.

    Kept as two parts so that a frozen backbone's features can be computed once and the head trained on them.
    unfreeze: 'none' trains the head only (the original recipe), 'last' also the backbone's final stage
    (layer4 on ResNets), 'all' the whole network.
    """

    def __init__(self, backbone: nn.Module, head: nn.Linear, unfreeze: str = "none"):
        super().__init__()
        self.backbone, self.head, self.frozen = backbone, head, unfreeze == "none"
        self.backbone.requires_grad_(unfreeze == "all")
        if unfreeze == "last":
            last_stage(backbone).requires_grad_(True)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))

    def train(self, mode: bool = True) -> "Classifier":
        # BatchNorm keeps its pretrained statistics: with batches of 8 the batch statistics are noise,
        # and a frozen backbone must compute the same features in every epoch.
        super().train(mode)
        for module in self.backbone.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) or self.frozen:
                module.eval()
        return self


def resolve_weights(arch: str, weights: str) -> tuple[dict | None, str, bool]:
    """The backbone's starting weights as (state_dict or None, source description, pretrained?).

    weights: 'auto' = torchvision's ImageNet weights through its cache ($TORCH_HOME/hub/checkpoints),
    downloaded when online, else a loud warning and random init; 'imagenet' = the same but an error when
    they cannot be had; 'none' = random init; anything else = a local state-dict file in torchvision's format.
    """
    if weights == "none":
        return None, "none (random init)", False
    if weights not in ("auto", "imagenet"):
        return load_weights_file(Path(weights)), f"file {weights}", True
    imagenet = torchvision.models.get_model_weights(arch).DEFAULT
    file_name = imagenet.url.rsplit("/", 1)[-1]
    cache_dir = Path(torch.hub.get_dir()) / "checkpoints"
    try:
        state_dict = imagenet.get_state_dict(progress=False, check_hash=True, weights_only=True)
        return state_dict, f"torchvision {imagenet} ({file_name})", True
    except Exception as error:
        advice = (f"tried torchvision {imagenet}: {type(error).__name__}: {error}. To use them offline, download "
                  f"{imagenet.url} and put {file_name} in {cache_dir}/ (or pass --weights /path/to/{file_name})")
        if weights == "imagenet":
            raise UserError(f"ImageNet weights unavailable: {advice}") from None
        log.warning("warning: %s\nwarning: ImageNet weights unavailable, training from RANDOM INIT; "
                    "results are recorded with pretrained: false and will be far below a pretrained run "
                    "(pass --weights none to silence this).", advice)
        return None, "none (auto: ImageNet weights unavailable)", False


def load_weights_file(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"weights file {path} {'is a folder' if path.is_dir() else 'does not exist'} "
                        f"(--weights takes auto, imagenet, none or a file)")
    return safe_torch_load(path, "weights file")


def safe_torch_load(path: Path, what: str) -> dict:
    """torch.load restricted to tensors and plain containers: a crafted pickle is refused, never run."""
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many kinds for files that are not checkpoints
        if "GLOBAL" in str(error):
            raise UserError(f"{path} was refused: it asks to load Python objects other than tensors and plain "
                            f"values (loading it could run code), so it is not a {what} of this project") from None
        raise UserError(f"{path} is not a readable {what} (corrupt, truncated or not a PyTorch file: "
                        f"{type(error).__name__})") from None
    if not isinstance(loaded, dict):
        raise UserError(f"{path} is not a {what}: it holds a {type(loaded).__name__}, not a dict")
    return loaded


def last_stage(backbone: nn.Module) -> nn.Module:
    """The final stage of a backbone: layer4 of a ResNet, else the last block of `.features` with weights."""
    if hasattr(backbone, "layer4"):
        return backbone.layer4
    return [block for block in backbone.features if any(True for _ in block.parameters())][-1]


def build_model(num_classes: int, arch: str = "resnet50", weights: str = "auto",
                unfreeze: str = "none") -> tuple[Classifier, dict]:
    """The backbone with starting weights and a fresh linear head; returns (model, provenance)."""
    if arch not in torchvision.models.list_models(torchvision.models):
        raise UserError(f"unknown backbone '{arch}'")
    state_dict, source, pretrained = resolve_weights(arch, weights)
    backbone = torchvision.models.get_model(arch, weights=None)
    if state_dict is not None:
        try:
            backbone.load_state_dict(state_dict)
        except RuntimeError as error:
            raise UserError(f"weights from {source} do not fit {arch}; pass the --backbone they were made for "
                            f"({str(error).splitlines()[0]})") from None
    in_features = remove_classifier(backbone)
    model = Classifier(backbone, nn.Linear(in_features, num_classes), unfreeze)
    return model, {"weights_source": source, "pretrained": pretrained}


def remove_classifier(backbone: nn.Module) -> int:
    """Replace the ImageNet classifier's last linear layer by Identity; return its input width.

    ResNets keep it in `.fc`; VGG, EfficientNet and ConvNeXt end `.classifier` with it.
    """
    if isinstance(getattr(backbone, "fc", None), nn.Linear):
        in_features, backbone.fc = backbone.fc.in_features, nn.Identity()
    else:
        in_features, backbone.classifier[-1] = backbone.classifier[-1].in_features, nn.Identity()
    return in_features


def checkpoint_dict(model: Classifier, classes: list[str], arch: str, img_size: int, provenance: dict,
                    extra: dict | None = None) -> dict:
    """Everything prediction needs, as tensors and plain values only (loadable with weights_only=True)."""
    return {
        "format": CHECKPOINT_FORMAT,
        "state_dict": {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()},
        "classes": list(classes), "arch": arch, "img_size": img_size,
        "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
        "head": {"type": "linear", "in_features": model.head.in_features, "out_features": model.head.out_features},
        "weights_source": provenance["weights_source"], "pretrained": provenance["pretrained"],
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torch_version": str(torch.__version__),
        **(extra or {}),
    }


def save_atomically(path: Path, write) -> None:
    """Call write(temp_path) next to `path`, then os.replace it in: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(temp_name)
        with open(temp_name, "rb+") as written:
            os.fsync(written.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temp_name, 0o666 & ~umask)  # mkstemp makes owner-only files; give the usual permissions
        os.replace(temp_name, path)
    finally:
        if os.path.exists(temp_name):
            os.remove(temp_name)


def save_checkpoint(path: Path, checkpoint: dict) -> None:
    save_atomically(path, lambda temp_name: torch.save(checkpoint, temp_name))


def load_checkpoint(path: Path) -> tuple[Classifier, dict]:
    """Rebuild the trained model from a checkpoint file; returns (model in eval mode on CPU, checkpoint)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"model file {path} is a folder; pass the .pt file itself")
    if not path.is_file():
        raise UserError(f"model file {path} does not exist: train one first with `python engine.py`")
    checkpoint = safe_torch_load(path, "model file")
    missing = [key for key in CHECKPOINT_KEYS if key not in checkpoint]
    if checkpoint.get("format") != CHECKPOINT_FORMAT or missing:
        raise UserError(f"{path} is not a model file of this project (missing: {', '.join(missing) or 'format'})")
    if not (isinstance(checkpoint["classes"], list) and isinstance(checkpoint["state_dict"], dict)):
        raise UserError(f"{path} is damaged: its classes or weights are not of the expected kind")
    try:
        model, _ = build_model(len(checkpoint["classes"]), checkpoint["arch"], weights="none")
        model.load_state_dict(checkpoint["state_dict"])
    except (RuntimeError, TypeError, ValueError, AttributeError) as error:
        raise UserError(f"{path} does not match its declared architecture {checkpoint['arch']} with "
                        f"{len(checkpoint['classes'])} classes: {str(error).splitlines()[0]}") from None
    return model.eval(), checkpoint
