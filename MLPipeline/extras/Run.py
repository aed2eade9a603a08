"""Every training run, as engine.py makes it and as MLPipeline.train gives it to Python: its settings
(RunConfig: the recipe's TrainConfig and the tool's options, each off by default, checked once), the folders
it writes checked and the output folder locked, then the recipe (MLPipeline.Train.train) with the tool's
pieces handed in, and the reports beside its outputs. A run with any option off its default, or under
torchrun, is Pipeline.train_with_options instead.

engine.py lists every flag (get_args_parser) and makes a RunConfig of them; the Python API takes one too.
"""
from __future__ import annotations

import contextlib
import math
import operator
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import pandas as pd

import MLPipeline.extras.Report as Report
from MLPipeline import Train
from MLPipeline.CreateDataset import UserError
from MLPipeline.Train import TrainConfig, TrainingRun
from MLPipeline.extras import Familiarity
from MLPipeline.extras.Files import MAX_PIXELS, index_folder, loader, mark_duplicates
from MLPipeline.extras.OutputFolder import TRAIN_IMAGES, as_path, check_write_target, output_lock
from MLPipeline.extras.Weights import BACKBONES, load_backbone


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
    unfamiliar_share: float = Familiarity.SHARE  # of familiar held-out images the unfamiliar-input threshold flags

    def __post_init__(self):
        self.data_dir, self.output_dir = as_path(self.data_dir, "data_dir"), as_path(self.output_dir, "output_dir")
        self.cache_dir = None if self.cache_dir is None else as_path(self.cache_dir, "cache_dir")
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
        """Whether the run is the recipe's own: every option of the tool at its default, and one process (a
        torchrun job, WORLD_SIZE > 1, shards its work in Pipeline)."""
        return int(os.environ.get("WORLD_SIZE", 1)) == 1 and all(
            getattr(self, option.name) == option.default for option in fields(self)
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
    right_kind = isinstance(value, int) if name in WHOLE else isinstance(value, (int, float))
    if (not right_kind or isinstance(value, bool) or not math.isfinite(value)
            or not all(COMPARE[word](value, bound) for word, bound in BOUNDS[name].items())):
        kind = "a whole number" if name in WHOLE else "a finite number"
        limits = " and ".join(f"{word} {bound}" for word, bound in BOUNDS[name].items())
        raise UserError(f"{flag} must be {kind} {limits}, not {value!r}")


def train(config: TrainConfig | RunConfig) -> TrainingRun:
    """A training run as engine.py makes it, from Python: the folders checked, the output folder locked, then
    the recipe (all options at their defaults) or the run with the options asked for."""
    config = config if isinstance(config, RunConfig) else RunConfig(**asdict(config))
    with checked_output(config):
        if config.is_the_recipe():
            run = Train.train(config, **recipe_pieces(config))
            write_reports(run, config.output_dir)
            return run
        from MLPipeline.extras.Pipeline import train_with_options  # the machinery the options need
        return train_with_options(config)


@contextlib.contextmanager
def checked_output(config: RunConfig):
    """Before any work: the folders the run writes checked (no link, no file of the user's, nothing inside
    the data); then the output folder locked for the run (under torchrun, by rank 0)."""
    check_write_target(config.output_dir, "--output-dir", folder=True, data_dirs=[config.data_dir],
                       writes=TRAIN_IMAGES)
    if config.cache_dir:
        check_write_target(config.cache_dir, "--cache-dir", folder=True, data_dirs=[config.data_dir])
    with output_lock(config.output_dir) if int(os.environ.get("RANK", 0)) == 0 else contextlib.nullcontext():
        yield


def recipe_pieces(config: RunConfig) -> dict:
    """What engine.py hands the recipe's train(): the tool's folder walk (links, loops, sidecars, PDFs named),
    decoder (every format, EXIF rotation, the pixel limit), weights policy (a pretrained backbone offline) and
    save (model.pt also keeps the unfamiliar-input score, fitted on the training features)."""
    return {"index_folder": index_folder, "load_image": loader(config.max_pixels), "load_backbone": load_backbone,
            "save": Familiarity.save_outputs}


def write_reports(run: TrainingRun, output_dir: Path) -> None:
    """split.csv (every file, why it was skipped, which held-out file copies a training file), history.csv
    and the plots, beside the recipe's metrics.json and model.pt. A plot that fails is a warning."""
    Report.write_csv(output_dir / "split.csv", mark_duplicates(run.index))
    Report.write_csv(output_dir / "history.csv", pd.DataFrame(run.metrics["history"]))
    Report.plot_training(run.metrics, output_dir)
