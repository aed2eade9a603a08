"""RunConfig: the recipe's settings (TrainConfig) and the tool's options, each off by default, checked once.

engine.py lists every flag (get_args_parser) and makes a RunConfig of them; the Python API takes one too.
A run whose options are all at their defaults is the recipe's own (MLPipeline.Train.train).
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, fields
from pathlib import Path

from MLPipeline.Train import TrainConfig
from MLPipeline.extras.Common import UserError
from MLPipeline.extras.Familiarity import SHARE
from MLPipeline.extras.ImageFiles import MAX_PIXELS
from MLPipeline.extras.Weights import BACKBONES


@dataclass
class RunConfig(TrainConfig):
    """TrainConfig's recipe, and the options of the tool; see engine.py's flags for what each does."""
    max_pixels: int = MAX_PIXELS  # images with more pixels are skipped unread
    dedupe: bool = False  # skip a held-out file with the same bytes as a training file
    inference_batch_size: int | None = None  # default: the recipe's (ResNet_Model.inference_batch_size)
    cache_dir: Path | None = None  # keep a frozen backbone's features there between runs
    backbone_runtime: str = "pytorch"  # or onnxruntime (or auto: the faster on the first batch)
    feature_cache: bool = True  # False: the network reads the images every epoch, like the original
    schedule: str = "none"
    augment: bool = False
    flips: bool = False
    unfreeze: str = "none"
    backbone_lr: float | None = None
    folds: int = 0
    class_weights: str = "none"
    val_size: float = 0.0
    unfamiliar_share: float = SHARE  # of familiar held-out images the unfamiliar-input threshold flags

    def __post_init__(self):
        super().__post_init__()
        self.cache_dir = None if self.cache_dir is None else Path(self.cache_dir)
        self.check()

    def check(self) -> None:
        """UserError naming the flag, for a value of the wrong type, out of its choices or out of range."""
        for option in fields(self):
            check_option(option.name, getattr(self, option.name))
        if self.folds == 1 or (self.folds and not self.on_features()):
            raise UserError(f"--folds {self.folds}: cross-validation trains 2 or more heads on features computed "
                            f"once, so it takes a frozen backbone without --augment or --no-feature-cache")

    def on_features(self) -> bool:
        """Whether the head trains on a frozen backbone's features computed once, or the network on images."""
        return self.unfreeze == "none" and self.feature_cache and not self.augment

    def held_out(self) -> tuple[str, ...]:
        """The splits besides train: test, and val with --val-size."""
        return ("test", "val") if self.val_size else ("test",)

    def is_the_recipe(self) -> bool:
        """Whether every option of the tool is at its default: the run is then the recipe's own."""
        return all(getattr(self, option.name) == option.default for option in fields(self)
                   if option.name in TOOL_OPTIONS and option.name != "max_pixels")  # the tool's reader takes it

    def recorded(self) -> dict:
        """The options that shaped the weights, as stored in the checkpoint."""
        return {name: getattr(self, name) for name in RECORDED}


UNFREEZE_CHOICES = ("none", "last", "all")
TOOL_OPTIONS = {option.name for option in fields(RunConfig)} - {option.name for option in fields(TrainConfig)}
RECORDED = ("epochs", "batch_size", "lr", "seed", "precision", "schedule", "augment", "flips", "unfreeze",
            "backbone_lr", "class_weights", "val_size")
CHOICES = {"backbone": BACKBONES, "weights": None, "device": ("auto", "cpu", "cuda"), "precision": ("auto", "fp32"),
           "backbone_runtime": ("pytorch", "onnxruntime", "auto"), "schedule": ("none", "cosine"),
           "unfreeze": UNFREEZE_CHOICES, "class_weights": ("none", "balanced")}
BOUNDS = {"epochs": {"at least": 1, "at most": 100_000}, "batch_size": {"at least": 1, "at most": 65_536},
          "lr": {"above": 0, "at most": 1}, "img_size": {"at least": 32, "at most": 1024},
          "test_size": {"above": 0, "below": 1}, "seed": {"at least": 0, "at most": 2**63 - 1},
          "workers": {"at least": 0, "at most": 256}, "max_pixels": {"at least": 1},
          "inference_batch_size": {"at least": 1, "at most": 65_536}, "backbone_lr": {"above": 0, "at most": 1},
          "folds": {"at least": 0, "at most": 100}, "val_size": {"at least": 0, "below": 1},
          "unfamiliar_share": {"above": 0, "below": 1}}
WHOLE = {"epochs", "batch_size", "img_size", "seed", "workers", "max_pixels", "inference_batch_size", "folds"}
COMPARE = {"at least": operator.ge, "above": operator.gt, "at most": operator.le, "below": operator.lt}


def check_option(name: str, value) -> None:
    """Raise UserError, naming the flag, when `value` is not of its option's kind, choices or bounds."""
    flag = "--" + name.replace("_", "-")
    if CHOICES.get(name) and value not in CHOICES[name]:
        raise UserError(f"{flag} must be one of {', '.join(CHOICES[name])}, not {value!r}")
    if name not in BOUNDS or value is None:
        return
    kind = "a whole number" if name in WHOLE else "a finite number"
    right_kind = isinstance(value, int) if name in WHOLE else isinstance(value, (int, float))
    limits = " and ".join(f"{word} {bound}" for word, bound in BOUNDS[name].items())
    if (not right_kind or isinstance(value, bool) or not math.isfinite(value)
            or not all(COMPARE[word](value, bound) for word, bound in BOUNDS[name].items())):
        raise UserError(f"{flag} must be {kind} {limits}, not {value!r}")
