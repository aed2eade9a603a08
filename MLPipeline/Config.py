"""A training run's settings, TrainConfig: the original's recipe as its defaults, and every other option.

Each option is one line below: its default, its help and its bounds. `python engine.py train` has one flag
per line (add_arguments, at the end of this file) and a TrainConfig is checked once, as it is made.
"""
from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

from PIL import Image

from MLPipeline.Common import UserError
from MLPipeline.ResNet_Model import BACKBONES, UNFREEZE_CHOICES


def option(default, help: str, at_least=None, above=None, at_most=None, below=None, choices: tuple = (),
           group: str = "", recorded: bool = False, kind: type | None = None):
    """One option: numbers must be finite and within the bounds given; `recorded` options shaped the weights
    and are stored in the checkpoint; `group` places the flag in --help; `kind`: the type, if not the default's."""
    bounds = {"at least": at_least, "above": above, "at most": at_most, "below": below}
    return field(default=default, metadata={"help": help, "choices": choices, "group": group, "recorded": recorded,
                                            "bounds": {k: v for k, v in bounds.items() if v is not None},
                                            "kind": kind or type(default)})


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
                       at_most=2**63 - 1,
                       recorded=True)
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
    backbone_runtime: str = option("auto", "what runs a frozen backbone on the CPU: auto (a run of 500 images or "
                                   "more tries ONNX Runtime on its first batch and keeps the faster), pytorch, or "
                                   "onnxruntime", choices=("auto", "pytorch", "onnxruntime"))
    cache_dir: Path | None = option(None, "where a frozen backbone's features are kept between runs (default: "
                                    "OUTPUT_DIR/cache)", kind=Path)
    workers: int = option(min(4, os.cpu_count() or 1), "worker processes that decode images ahead of the network "
                          "(0: the main process)", at_least=0, at_most=256)
    max_pixels: int = option(Image.MAX_IMAGE_PIXELS, "images with more pixels are skipped, unread (a safe limit on "
                             "memory); raise it for big scans", at_least=1)
    dedupe: bool = option(False, "a test (or val) file with the same bytes as a training file is always reported; "
                          "--dedupe also skips it, keeping the training copy")
    backbone: str = option("resnet50", "network to fine-tune", choices=BACKBONES, group=IMPROVEMENT)
    schedule: str = option("none", "cosine: anneal the learning rate to 0 over the epochs",
                           choices=("none", "cosine"), group=IMPROVEMENT, recorded=True)
    augment: bool = option(False, "random crops, small rotations, perspective, brightness/contrast/colour "
                           "jitter on training images (the network then reads the images every epoch)",
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
                             "choose) and fit the temperature that calibrates the probabilities on it", at_least=0, below=1,
                             group=IMPROVEMENT, recorded=True)

    def __post_init__(self):
        self.data_dir, self.output_dir = Path(self.data_dir), Path(self.output_dir)
        self.check()

    def check(self) -> None:
        """Raise UserError for settings out of range (train() checks the device and the folders as it starts)."""
        for option_field in fields(self):
            check_option(option_field, getattr(self, option_field.name))
        if self.folds == 1 or (self.folds and not self.on_features()):
            raise UserError(f"--folds {self.folds}: cross-validation trains 2 or more heads on features computed "
                            f"once, so it takes a frozen backbone without --augment or --no-feature-cache")

    def on_features(self) -> bool:
        """Whether the head trains on a frozen backbone's features computed once, or the network on images."""
        return self.unfreeze == "none" and self.feature_cache and not self.augment

    def recorded(self) -> dict:
        """The options that shaped the weights, as stored in the checkpoint."""
        return {option.name: getattr(self, option.name) for option in fields(self) if option.metadata["recorded"]}


def check_option(option_field, value) -> None:
    """Raise UserError, naming the flag, when `value` breaks its option's choices or bounds."""
    rules, flag = option_field.metadata, "--" + option_field.name.replace("_", "-")
    if rules["choices"] and value not in rules["choices"]:
        raise UserError(f"{flag} must be one of {', '.join(rules['choices'])}, not {value}")
    bounds = rules["bounds"]
    if value is None or not bounds:
        return
    broken = (value < bounds.get("at least", -math.inf) or value <= bounds.get("above", -math.inf)
              or value > bounds.get("at most", math.inf) or value >= bounds.get("below", math.inf))
    if broken or not math.isfinite(value):
        limits = " and ".join(f"{name} {bound}" for name, bound in bounds.items())
        raise UserError(f"{flag} must be a finite number {limits}, not {value}")


OPTIONS = {option.name: option for option in fields(TrainConfig)}


def add_arguments(parser: argparse.ArgumentParser, names=tuple(OPTIONS), defaults: dict | None = None) -> None:
    """The flags of TrainConfig's options (all, or those named), placed in --help by their group.
    defaults: the command line's own, where they differ from TrainConfig's (engine.py's folders)."""
    groups = {"": parser}
    for name in names:
        rules, default = OPTIONS[name].metadata, (defaults or {}).get(name, OPTIONS[name].default)
        if rules["group"] not in groups:
            groups[rules["group"]] = parser.add_argument_group(rules["group"])
        flag = "--" + name.replace("_", "-")
        if isinstance(OPTIONS[name].default, bool):  # --augment / --no-augment
            groups[rules["group"]].add_argument(flag, action=argparse.BooleanOptionalAction, default=default,
                                                help=rules["help"])
        else:
            groups[rules["group"]].add_argument(flag, type=rules["kind"], default=default,
                                                choices=rules["choices"] or None, help=rules["help"] + (
                                                    "" if default is None else " (default: %(default)s)"))
