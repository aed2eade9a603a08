"""The model: an ImageNet backbone, frozen, with a new linear head for our classes; its checkpoint.

The model normalises its own input with the mean/std its weights were trained with, so callers hand it
images scaled to [0, 1]. A frozen backbone runs under torch.inference_mode(), in channels_last, and in
bfloat16 where the hardware computes it natively.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torchvision
from torch import nn

from MLPipeline.CreateDataset import UserError, first_line

log = logging.getLogger("MLPipeline")
CHECKPOINT_FORMAT = "doc-classifier-checkpoint/1"
PROGRESS_SECONDS = 10.0  # how often a long loop prints a progress line
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class Classifier(nn.Module):
    """A backbone with its ImageNet classifier removed, and a linear head: kept as two parts, so that a frozen
    backbone's features can be computed once and the head trained on them."""

    def __init__(self, backbone: nn.Module, head: nn.Linear, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.backbone, self.head = backbone.requires_grad_(False), head  # frozen: the original recipe
        self.mean, self.std = tuple(mean), tuple(std)
        # Not persistent: the checkpoint records mean/std as plain lists; its state_dict is backbone + head.
        self.register_buffer("mean_tensor", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std_tensor", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    @property
    def frozen(self) -> bool:
        return not any(parameter.requires_grad for parameter in self.backbone.parameters())

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """N x 3 x H x W images scaled to [0, 1] -> the backbone's features, normalised as its weights expect."""
        return self.backbone((images - self.mean_tensor) / self.std_tensor)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.features(images).float()
        with torch.autocast(images.device.type, enabled=False):  # the head in fp32, as it was trained
            return self.head(features)

    def train(self, mode: bool = True) -> "Classifier":
        # BatchNorm keeps its pretrained statistics: with batches of 8 the batch statistics are noise. A frozen
        # backbone stays in eval mode whole (Dropout too): it must compute the same features in every epoch.
        super().train(mode)
        for module in self.backbone.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) or self.frozen:
                module.eval()
        return self


def torchvision_backbone(arch: str, weights: str) -> tuple[nn.Module, dict]:
    """torchvision's `arch` with its ImageNet weights (downloaded once into torchvision's cache) or, with
    weights='none', random ones; returns it and its provenance (arch, weights source, pretrained, mean, std)."""
    pretrained = weights != "none"
    imagenet = torchvision.models.get_model_weights(arch).DEFAULT
    try:
        backbone = torchvision.models.get_model(arch, weights=imagenet if pretrained else None)
    except OSError as error:  # no network, a proxy: the download failed
        raise UserError(f"{arch}'s ImageNet weights could not be downloaded ({error}): put {imagenet.url} in "
                        f"{torch.hub.get_dir()}/checkpoints/, or train with `python engine.py`, which falls "
                        f"back to a pretrained backbone installed with pip") from None
    source = f"torchvision {imagenet}" if pretrained else "none (random init)"
    return backbone, {"arch": arch, "weights_source": source, "pretrained": pretrained,
                      "mean": IMAGENET_MEAN, "std": IMAGENET_STD}


def remove_classifier(backbone: nn.Module) -> int:
    """Replace the ImageNet classifier's last linear layer by Identity; return its input width. ResNets keep
    it in `.fc`; VGG, EfficientNet and ConvNeXt end `.classifier` with it; timm models reset their own."""
    if hasattr(backbone, "reset_classifier"):
        backbone.reset_classifier(0)
        return backbone.num_features
    if isinstance(getattr(backbone, "fc", None), nn.Linear):
        in_features, backbone.fc = backbone.fc.in_features, nn.Identity()
    else:
        in_features, backbone.classifier[-1] = backbone.classifier[-1].in_features, nn.Identity()
    return in_features


def build_model(num_classes: int, arch: str = "resnet50", weights: str = "auto",
                load_backbone=torchvision_backbone) -> tuple[Classifier, dict]:
    """The backbone with its starting weights, frozen, and a fresh linear head; returns (model, provenance).
    load_backbone(arch, weights) -> (backbone, provenance): torchvision's here; engine.py hands in the one
    that falls back to a pretrained backbone installed with pip when torchvision's weights cannot be had."""
    backbone, provenance = load_backbone(arch, weights)
    head = nn.Linear(remove_classifier(backbone), num_classes)
    return Classifier(backbone, head, provenance.pop("mean"), provenance.pop("std")), provenance


# --- Features: the frozen backbone's output for every image, computed once

def fast_bf16(device: torch.device) -> bool:
    """Whether the hardware computes bfloat16 natively: a CUDA GPU that supports it, or a CPU with AVX-512 BF16
    or AMX. There it is about twice as fast as fp32 with features within 0.5% (docs/speed.md); elsewhere
    bfloat16 is emulated, and slower."""
    if device.type == "cuda":  # not counting emulation: a T4 or V100 "supports" bf16 only by emulating it
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return any(getattr(torch.cpu, check, lambda: False)() for check in
               ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))  # private, so asked with care


def inference_batch_size(device: torch.device, img_size: int) -> int:
    """Images per forward pass where nothing trains: 64 on a GPU; on the CPU 16 at 200 px, more for smaller
    images (ResNet50 in bf16 on 2 cores: 64 images/s in batches of 8, 84 of 16, 69 of 32, 58 of 64)."""
    return 64 if device.type == "cuda" else max(1, round(16 * 200 * 200 / img_size ** 2))


def forward_batches(network, batches, device: torch.device, bf16: bool = False, label: str = "forward"):
    """`network`'s outputs for every batch of (inputs, targets, positions, {path: why not}) or (inputs,
    targets), in inference mode, under bfloat16 autocast if asked. Returns the outputs (float32, on the CPU)
    and targets of what was read, its positions, and {path: why} of the files that did not decode, each named
    in a warning. The outputs fill one tensor as they come: memory grows with them alone, never by copies."""
    outputs, targets, positions, failed = None, [], [], {}
    filled, total, started, shown = 0, len(batches.dataset), time.perf_counter(), time.perf_counter()
    with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16, enabled=bf16):
        for inputs, batch_targets, *files in batches:
            if len(inputs):
                inputs = inputs.to(device, non_blocking=True)
                if inputs.ndim == 4:  # images, in the layout the convolutions run fastest in
                    inputs = inputs.contiguous(memory_format=torch.channels_last)
                batch = network(inputs).float().cpu()
                if outputs is None:
                    outputs = batch.new_empty((total, *batch.shape[1:]))
                outputs[filled:filled + len(batch)] = batch
                filled += len(batch)
                targets.append(batch_targets)
            positions += files[0] if files else []
            for path, reason in (files[1] if files else {}).items():
                log.warning("warning: skipped %s: %s", path, reason)
                failed[path] = reason
            if time.perf_counter() - shown > PROGRESS_SECONDS:  # a line every few seconds, for long runs
                shown, done = time.perf_counter(), filled + len(failed)
                log.info("  %s: %d/%d (%.1f images/s)", label, done, total, done / (shown - started))
    if outputs is None:
        return torch.zeros(0, 0), torch.zeros(0, 0), positions, failed
    return outputs[:filled], torch.cat(targets), positions, failed


# --- The checkpoint: a plain dict, loadable with torch.load(path, weights_only=True)

def checkpoint_dict(model: Classifier, classes: list[str], img_size: int, provenance: dict, **extra) -> dict:
    """The weights and everything prediction needs: classes, arch, image size, normalisation, provenance."""
    return {"state_dict": {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()},
            "classes": list(classes), "arch": provenance["arch"], "img_size": img_size, "mean": list(model.mean),
            "std": list(model.std), "head": {"type": "linear", "in_features": model.head.in_features,
                                             "out_features": model.head.out_features},
            "weights_source": provenance["weights_source"], "pretrained": provenance["pretrained"],
            "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "torch_version": str(torch.__version__), "format": CHECKPOINT_FORMAT, **extra}


@contextlib.contextmanager
def atomic_write(path: Path):
    """`with atomic_write(path) as temp_name:` write temp_name, next to `path`; on leaving the block it
    replaces `path` whole, so nobody ever reads half a file; a write that fails (a full disk, a folder we may
    not write to) leaves the old file, and is one OSError that names the file."""
    path, temp_name = Path(path), ""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name[:40]}.", suffix=".tmp")
        os.close(handle)
        yield temp_name
        with open(temp_name, "rb+") as written:
            os.fsync(written.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temp_name, 0o666 & ~umask)  # mkstemp makes owner-only files; give the usual permissions
        os.replace(temp_name, path)
    except OSError as error:
        raise OSError(error.errno, f"could not write {path} ({error.strerror or first_line(error)}); the file "
                      f"there before, if any, is unchanged") from None
    finally:
        if temp_name and os.path.exists(temp_name):
            os.remove(temp_name)


def save_checkpoint(path: Path, checkpoint: dict) -> None:
    with atomic_write(path) as temp_name:
        try:
            torch.save(checkpoint, temp_name)
        except RuntimeError as error:  # how torch.save reports a failed write (a full disk)
            raise OSError(errno.ENOSPC, "No space left on device, or a file size limit: ulimit -f") from None


# --- The original project's entry point (see docs/original-project.md)

class ResNET_Model:
    """The original's model factory: `model_builder()` gives the model `python engine.py` trains."""

    def model_builder(self, num_classes: int = 3, weights: str = "auto",
                      load_backbone=torchvision_backbone) -> Classifier:
        """ResNet50 with ImageNet weights, frozen, with a new linear head for num_classes; `.provenance` says
        where its weights came from (TrainRestNet writes it into the checkpoint). load_backbone: as in
        build_model (MLPipeline.extras.Weights.load_backbone falls back to a pip backbone offline, and then
        the model is that backbone's, EfficientNet-Lite0, as `.provenance["arch"]` says)."""
        model, model.provenance = build_model(num_classes, "resnet50", weights, load_backbone)
        return model
