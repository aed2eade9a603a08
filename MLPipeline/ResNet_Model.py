"""Build backbone + head with its starting weights (chosen by MLPipeline.Weights), freeze, save/load the checkpoint.

Backbones come from torchvision and, for ones that every machine can have pretrained offline, from timm:
EfficientNet-Lite0/1/2, whose ImageNet weights install with pip. Each model normalises its own input, with
the mean/std its weights were trained with, so callers hand it images scaled to [0, 1].
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path

import torch
import torchvision
from torch import nn

from MLPipeline.Common import (UserError, atomic_write, autocast, first_line, log, progress_reporter,
                              safe_torch_load)
from MLPipeline.Weights import (BACKBONES, PIP_BACKBONES, TORCHVISION_BACKBONES, fit_state_dict, normalisation,
                                resolve_weights)

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
    if arch in PIP_BACKBONES:
        import timm  # only these backbones need timm; importing it takes a second
        return timm.create_model(arch, pretrained=False)
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
        try:
            backbone.load_state_dict(fit_state_dict(arch, state_dict, backbone))
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
    with atomic_write(path) as temp_name:
        torch.save(checkpoint, temp_name)


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
    if not isinstance(checkpoint["state_dict"], dict):
        raise UserError(f"{path} is damaged: its weights are not of the expected kind")
    check_model_info(checkpoint, path)
    if not all(torch.isfinite(tensor).all() for tensor in checkpoint["state_dict"].values()
               if isinstance(tensor, torch.Tensor) and tensor.is_floating_point()):
        raise UserError(f"{path} is damaged: its weights hold NaN or infinite values (a run that diverged?)")
    try:
        backbone = create_backbone(checkpoint["arch"])
        model = Classifier(backbone, nn.Linear(remove_classifier(backbone), len(checkpoint["classes"])),
                           checkpoint["mean"], checkpoint["std"])
        model.load_state_dict(checkpoint["state_dict"])
    except (RuntimeError, TypeError, ValueError, AttributeError) as error:
        raise UserError(f"{path} does not match its declared architecture {checkpoint['arch']} with "
                        f"{len(checkpoint['classes'])} classes: {first_line(error)}") from None
    return model.eval(), checkpoint


def check_model_info(info: dict, source) -> dict:
    """What prediction relies on, checked: a non-empty list of distinct class names, a whole img_size in range,
    3 finite means and positive stds, a finite positive temperature (1 when absent: an older checkpoint).
    UserError naming `source` (a checkpoint or an exported file) otherwise. Returns info, completed."""
    info.setdefault("temperature", 1.0)
    classes, size, temperature = info.get("classes"), info.get("img_size"), info.get("temperature")
    problems = []
    if not (isinstance(classes, list) and classes and all(isinstance(name, str) for name in classes)
            and len(set(classes)) == len(classes)):
        problems.append("classes")
    if isinstance(size, bool) or not isinstance(size, int) or not 8 <= size <= 4096:
        problems.append("img_size")
    if not all(is_number_list(info.get(key), 3) for key in ("mean", "std")) or min(info["std"]) <= 0:
        problems.append("mean and std")
    if not is_number_list([temperature], 1) or temperature <= 0:
        problems.append("temperature")
    if problems:
        raise UserError(f"{source} is damaged or edited: its {', '.join(problems)} cannot be used "
                        f"(classes {str(classes)[:80]}, img_size {size!r}, temperature {temperature!r})")
    return info


def is_number_list(values, length: int) -> bool:
    return (isinstance(values, list) and len(values) == length
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values))


def optimizer_for(model: Classifier, lr: float, backbone_lr: float | None = None) -> torch.optim.Adam:
    """Adam for the head at lr and, when layers of the backbone are unfrozen, for them at backbone_lr (by
    default lr / 10: pretrained layers need only small steps)."""
    backbone_parameters = [p for p in model.backbone.parameters() if p.requires_grad]
    return torch.optim.Adam([{"params": model.head.parameters(), "lr": lr},
                             {"params": backbone_parameters, "lr": backbone_lr or lr / 10}])


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


def forward_batches(network: Callable[[torch.Tensor], torch.Tensor], batches, device: torch.device, total: int,
                    label: str = "forward") -> tuple[torch.Tensor, torch.Tensor, list[int], dict[str, str]]:
    """`network`'s outputs for every batch of (inputs, targets, ...), in inference mode: feature extraction,
    scoring, prediction. Returns the outputs (float32, on the CPU) and targets in the batches' order and, for
    batches of image files (image_batches), the positions read and {path: why not} of the rest, each named in
    a warning. total: how many items the batches hold (the outputs are filled into one tensor of that size,
    never stacked from a list: no second copy of the features).
    """
    outputs, targets, positions, failed = None, [], [], {}
    update, seen, filled = progress_reporter(label, total), 0, 0
    with torch.inference_mode(), autocast(device):
        for inputs, batch_targets, *files in batches:
            seen += len(inputs) + (len(files[1]) if files else 0)  # decoded and failed alike
            if len(inputs):
                inputs = inputs.to(device, non_blocking=True)
                if inputs.ndim == 4:  # images: in the layout of prepare_model's weights, which convolutions run fastest
                    inputs = inputs.contiguous(memory_format=torch.channels_last)
                batch_outputs = network(inputs).float().cpu()
                if outputs is None:
                    outputs = batch_outputs.new_empty((max(total, len(batch_outputs)), *batch_outputs.shape[1:]))
                outputs[filled:filled + len(batch_outputs)] = batch_outputs
                filled += len(batch_outputs)
                targets.append(batch_targets)
            if files:
                positions += files[0]
                failed.update(files[1])
                for path, reason in files[1].items():
                    log.warning("warning: skipped %s: %s", path, reason)
            update(seen)
    if outputs is None:
        return torch.zeros(0, 0), torch.zeros(0, 0), positions, failed
    return outputs[:filled], torch.cat(targets), positions, failed


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
