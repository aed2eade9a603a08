"""The recipe's data steps for real-world folders and files, and for the options that need more of them.

The recipe (MLPipeline/CreateDataset.py) indexes, splits and decodes; here the same steps walk odd folders
(Files.index_folder), decode every format safely (Files.read_image), carve out a validation split,
mark copies across splits, and check what is left after the files that did not decode.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from MLPipeline.CreateDataset import BadImageError, UserError, image_batches, log, stratified_split
from MLPipeline.CreateDataset import build_index as recipe_index
from MLPipeline.extras.Files import index_folder, load_image, loader, mark_duplicates

__all__ = ["build_index", "load_image", "load_images", "usable", "mark_skipped", "skip_reasons",
           "unreadable", "image_batches", "stratified_split", "BadImageError"]


def build_index(data_dir: Path, test_size: float = 0.2, seed: int = 42, val_size: float = 0.0,
                dedupe: bool = False) -> pd.DataFrame:
    """The recipe's index of data_dir, its folders walked by Files.index_folder; with val_size, a validation
    split carved out of each class's training images; `duplicate_of` names the training file a held-out file
    is a copy of (with dedupe, that copy is skipped)."""
    index = recipe_index(data_dir, test_size, seed, index_folder)
    if val_size:
        index = stratified_split(index, val_size, seed, to_split="val")
    return mark_duplicates(index, dedupe)


def usable(index: pd.DataFrame) -> pd.DataFrame:
    """The rows of the files that can be used (not skipped for any reason)."""
    return index[index.skipped == ""]


def mark_skipped(index: pd.DataFrame, skipped: dict[str, str]) -> pd.DataFrame:
    """The index with each file that failed to decode given its reason; earlier reasons are kept."""
    return index.assign(skipped=[skipped.get(path, reason) for path, reason in zip(index.path, index.skipped)])


def skip_reasons(index: pd.DataFrame) -> dict[str, str]:
    """{path: why it was not used} for every file of the index that was not."""
    skipped = index[index.skipped != ""]
    return dict(zip(skipped.path, skipped.skipped))


def unreadable(paths: list[str], img_size: int, workers: int = 0, max_pixels: int | None = None) -> dict[str, str]:
    """{path: why} of the files that do not decode, each named in a warning: what a run that reads the images
    every epoch learns before its first epoch (decoding only; no network runs)."""
    failed = {}
    for *_, batch_failed in image_batches(paths, img_size, 64, workers, load_image=loader(max_pixels)):
        failed.update(batch_failed)
        for path, reason in batch_failed.items():
            log.warning("warning: skipped %s: %s", path, reason)
    return failed


def load_images(paths: list[str], img_size: int, max_pixels: int | None = None,
                ) -> tuple[np.ndarray, dict[str, str]]:
    """A few files decoded into memory: (N x S x S x 3 uint8 of the good ones, {bad path: reason}).
    For prediction of a handful and for tests; datasets go through image_batches, batch by batch."""
    images, skipped = [], {}
    for path in map(str, paths):
        try:
            images.append(load_image(path, img_size, max_pixels))
        except BadImageError as error:
            skipped[path] = str(error)
            log.warning("warning: skipped %s: %s", path, error)
    return (np.stack(images) if images else np.zeros((0, img_size, img_size, 3), np.uint8)), skipped
