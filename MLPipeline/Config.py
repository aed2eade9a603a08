"""A training run's settings, TrainConfig: the original's recipe as its defaults, and every other option.

Each option is defined once, with `option()`: its help, bounds, choices and CLI group travel with the field,
so the CLI flag (engine.py), the dataclass and its check (check_option) follow from that one line.
"""
from __future__ import annotations

import math
import os
from dataclasses import Field, dataclass, field, fields
from pathlib import Path

from MLPipeline.Common import UserError, pick_device
from MLPipeline.ImageFiles import MAX_PIXELS
from MLPipeline.OutputFolder import check_output_dir
from MLPipeline.ResNet_Model import BACKBONES, UNFREEZE_CHOICES


def option(default, help: str, at_least=None, above=None, at_most=None, below=None, choices: tuple = (),
           group: str = "", recorded: bool = False, kind: type | None = None):
    """One training option, defined once: the CLI flag (--name-with-dashes), TrainConfig and its check follow.

    Numbers must be finite and within the bounds given; `recorded` options shaped the weights and are stored
    in the checkpoint; `group` places the flag in the CLI's help; `kind` is the type (by default the default's).
    """
    bounds = {"at least": at_least, "above": above, "at most": at_most, "below": below}
    return field(default=default, metadata={"help": help, "bounds": {k: v for k, v in bounds.items() if v is not None},
                                            "choices": choices, "group": group, "recorded": recorded,
                                            "kind": kind or type(default)})


def check_option(option_field: Field, value) -> None:
    """Raise UserError when `value` breaks the rules of its option (a field of TrainConfig)."""
    rules, flag = option_field.metadata, "--" + option_field.name.replace("_", "-")
    if rules["choices"] and value not in rules["choices"]:
        raise UserError(f"{flag} must be one of {', '.join(rules['choices'])}, not {value}")
    if value is None or not rules["bounds"]:
        return
    broken = {"at least": value < rules["bounds"].get("at least", -math.inf),
              "above": value <= rules["bounds"].get("above", -math.inf),
              "at most": value > rules["bounds"].get("at most", math.inf),
              "below": value >= rules["bounds"].get("below", math.inf)}
    if not math.isfinite(value) or any(broken.values()):
        limits = " and ".join(f"{name} {bound}" for name, bound in rules["bounds"].items())
        raise UserError(f"{flag} must be a finite number {limits}, not {value}")


def check_options(config) -> None:
    """Raise UserError for the first option of a config (a dataclass of options) out of its bounds."""
    for option_field in fields(config):
        check_option(option_field, getattr(config, option_field.name))


def recorded_options(config) -> dict:
    """The options that shaped the weights, as stored in the checkpoint."""
    return {option_field.name: getattr(config, option_field.name) for option_field in fields(config)
            if option_field.metadata["recorded"]}


IMPROVEMENT = "the original's suggested improvements (all off by default)"
TRUST = "how far to trust the model (off by default)"


@dataclass
class TrainConfig:
    """A training run's settings; the defaults are the original project's recipe."""
    data_dir: Path = option(Path("Data"), "folder of class sub-folders, or a pre-split pair (train/+test/, "
                            "train/+val/, Training_data/+Testing_Data/)")
    output_dir: Path = option(Path("output"), "where model.pt, metrics and plots are written")
    epochs: int = option(10, "passes over the training images", at_least=1, at_most=100_000, recorded=True)
    batch_size: int = option(8, "training batch size", at_least=1, at_most=65_536, recorded=True)
    lr: float = option(1e-3, "Adam learning rate of the head", above=0, at_most=1, recorded=True)
    img_size: int = option(200, "images are resized to this many pixels a side", at_least=32, at_most=1024)
    test_size: float = option(0.2, "test fraction of each class", above=0, below=1)
    seed: int = option(42, "seed of the split, the head's initial weights and the shuffling", at_least=0,
                       at_most=2**63 - 1, recorded=True)
    weights: str = option("auto", "auto (the backbone's ImageNet weights; when they cannot be had, the "
                          "pip-installed ImageNet EfficientNet-Lite0 instead, with a warning) | imagenet (the "
                          "backbone's own, or an error) | none (random init) | PATH to a state dict")
    device: str = option("auto", "auto uses the GPU when PyTorch sees one", choices=("auto", "cpu", "cuda"))
    feature_cache: bool = option(True, "compute a frozen backbone's features once and train the head on them "
                                 "(--no-feature-cache: the full forward pass every batch, like the original; "
                                 "same results, much slower)")
    inference_batch_size: int | None = option(None, "batch size of feature extraction and scoring (default: 64 "
                                              "on a GPU; on the CPU 8 at 200 px, more for smaller images)",
                                              at_least=1, at_most=65_536, kind=int)
    backbone_runtime: str = option("pytorch", "what runs a frozen backbone on the CPU: pytorch, onnxruntime, or "
                                   "auto (a run of 500 images or more tries ONNX Runtime on its first batch and "
                                   "keeps the faster)", choices=("pytorch", "onnxruntime", "auto"))
    cache_dir: Path | None = option(None, "where a frozen backbone's features are kept between runs (default: "
                                    "OUTPUT_DIR/cache)", kind=Path)
    workers: int = option(min(4, os.cpu_count() or 1), "worker processes that decode images ahead of the "
                          "network (0: the main process)", at_least=0, at_most=256)
    max_pixels: int = option(MAX_PIXELS, "images with more pixels are skipped, unread (a safe limit on memory); "
                             "raise it for big scans", at_least=1)
    dedupe: bool = option(False, "a test (or val) file with the same bytes as a training file is always reported; "
                          "--dedupe also skips it, keeping the training copy")
    backbone: str = option("resnet50", "network to fine-tune", choices=BACKBONES, group=IMPROVEMENT)
    schedule: str = option("none", "cosine: anneal the learning rate to 0 over the epochs",
                           choices=("none", "cosine"), group=IMPROVEMENT, recorded=True)
    augment: bool = option(False, "random crops, small rotations, perspective, brightness/contrast/colour "
                           "jitter on training images (the backbone then runs on every training batch)",
                           group=IMPROVEMENT, recorded=True)
    flips: bool = option(False, "with --augment, also mirror images; off by default because mirrored text never "
                         "occurs in real photos of documents", group=IMPROVEMENT, recorded=True)
    unfreeze: str = option("none", "also train the backbone's last stage (layer4 on ResNets) or all of it; "
                           "BatchNorm keeps its pretrained statistics", choices=UNFREEZE_CHOICES,
                           group=IMPROVEMENT, recorded=True)
    backbone_lr: float | None = option(None, "learning rate of unfrozen backbone layers (default: --lr / 10)",
                                       above=0, at_most=1, group=IMPROVEMENT, recorded=True, kind=float)
    folds: int = option(0, "K-fold cross-validation of the head (stratified, seeded) over all usable images, or "
                        "the training part of a pre-split folder; then the final model trains as without it",
                        at_least=0, at_most=100, group=TRUST)
    class_weights: str = option("none", "balanced: weigh the loss of each class inversely to its share of the "
                                "training images", choices=("none", "balanced"), group=TRUST, recorded=True)
    val_size: float = option(0.0, "carve this fraction of each class's training images out as a validation "
                             "set, keep the epoch with the lowest validation loss (the test set is never used to "
                             "choose) and fit the temperature that calibrates the probabilities on it", at_least=0,
                             below=1, group=IMPROVEMENT, recorded=True)

    def check(self) -> None:
        """Raise UserError for settings out of range, before any work is done."""
        check_options(self)
        if self.folds == 1 or (self.folds and (self.augment or self.unfreeze != "none" or not self.feature_cache)):
            raise UserError(f"--folds {self.folds}: cross-validation trains 2 or more heads on features computed "
                            f"once, so it takes a frozen backbone without --augment or --no-feature-cache")
        pick_device(self.device)
        check_output_dir(self.output_dir, self.data_dir)
