"""Every training run, as engine.py makes it and as MLPipeline.train gives it to Python: the folders it writes
checked and the output folder locked, then the recipe (MLPipeline.Train.train) with the tool's pieces handed
in, and the reports beside its outputs; a run with any option off its default, or under torchrun, is
Pipeline.train_with_options instead.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import asdict
from pathlib import Path

import pandas as pd

import MLPipeline.extras.Report as Report
from MLPipeline import Train
from MLPipeline.Train import TrainConfig, TrainingRun
from MLPipeline.extras.Folders import index_folder, mark_duplicates
from MLPipeline.extras.ImageFiles import loader
from MLPipeline.extras.OutputFolder import TRAIN_IMAGES, check_write_target, output_lock
from MLPipeline.extras.Weights import load_backbone
from MLPipeline.extras import Familiarity  # noqa: I001 (these two after what they import: file switches less)
from MLPipeline.extras.Config import RunConfig


def train(config: TrainConfig | RunConfig) -> TrainingRun:
    """A training run as engine.py makes it, from Python: the folders checked, the output folder locked, then
    the recipe (all options at their defaults) or the run with the options asked for."""
    config = config if isinstance(config, RunConfig) else RunConfig(**asdict(config))
    with checked_output(config):
        if runs_the_recipe(config):
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


def runs_the_recipe(config: RunConfig) -> bool:
    """Whether the run is the recipe's own: every option of the tool at its default, and one process (a
    torchrun job, WORLD_SIZE > 1, shards its work in Pipeline)."""
    return config.is_the_recipe() and int(os.environ.get("WORLD_SIZE", 1)) == 1


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
