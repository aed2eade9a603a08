"""The data: find the class folders, index every image with its split, and read batches of images.

One image's path from disk to the network:
    read_image (any format -> 8-bit RGB, EXIF rotation applied) -> cv2.resize to img_size x img_size
    (INTER_AREA) -> to_model_input: 3 x S x S float32 in [0, 1], which the model normalises itself
    with its own backbone's mean/std.
"""
from __future__ import annotations

import os
import zlib
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from MLPipeline.Common import UserError, log
from MLPipeline.Folders import (IMAGE_EXTENSIONS, check_data_dir, find_presplit, index_folder, list_images,
                                mark_duplicates)
from MLPipeline.ImageFiles import BadImageError, read_image

__all__ = ["build_index", "stratified_split", "load_image", "load_images", "image_batches", "list_images",
           "to_model_input", "usable", "skip_reasons", "mark_skipped", "CreateDataset"]


def build_index(data_dir: Path, test_size: float = 0.2, seed: int = 42, val_size: float = 0.0,
                dedupe: bool = False) -> pd.DataFrame:
    """Every file under data_dir as a row (path, label, split, skipped, duplicate_of).

    The class is the sub-folder; the split is 'train' or 'test' (and 'val' with val_size): drawn per class
    with a seed, or as given by a pre-split layout (train/ + test/, ...). `skipped` says why a file cannot be
    used ("" for images); `duplicate_of` names the training file a held-out file is a copy of.
    """
    check_data_dir(data_dir)
    presplit = find_presplit(data_dir)
    if presplit:
        train_index, test_index = (index_folder(folder) for folder in presplit)
        check_same_classes(presplit[0], sorted(set(train_index.label)), presplit[1], sorted(set(test_index.label)))
        index = pd.concat([train_index.assign(split="train"), test_index.assign(split="test")], ignore_index=True)
        check_classes(index, data_dir)
    else:
        index = index_folder(data_dir)
        check_classes(index, data_dir)
        index = stratified_split(index, test_size, seed)
    if val_size:
        index = stratified_split(index, val_size, seed, to_split="val")
    return mark_duplicates(index, dedupe)


def check_same_classes(train_dir, train_classes: list[str], test_dir, test_classes: list[str]) -> None:
    """A test folder's classes must be training classes, by exact name: `Others` beside `others` would be a
    class of its own, or, in the original's one-hot columns, the wrong column. UserError naming both."""
    unknown = sorted(set(test_classes) - set(train_classes))
    if unknown:
        case_only = {name.lower() for name in unknown} <= {name.lower() for name in train_classes}
        raise UserError(f"the class folders of {test_dir} ({', '.join(test_classes)}) differ from those of "
                        f"{train_dir} ({', '.join(train_classes)}){' only in upper/lower case' if case_only else ''}"
                        f": name them alike")


def check_classes(index: pd.DataFrame, data_dir: Path) -> None:
    if index.empty:
        raise UserError(f"no images found in {data_dir}: put them in one sub-folder per class "
                        f"(e.g. {data_dir}/cats/*.jpg, {data_dir}/dogs/*.jpg); "
                        f"recognised: {' '.join(sorted(IMAGE_EXTENSIONS))}")
    if index.label.nunique() < 2:
        raise UserError(f"{data_dir} has images of {index.label.nunique()} class; at least 2 class folders are needed")


def stratified_split(index: pd.DataFrame, fraction: float, seed: int, to_split: str = "test") -> pd.DataFrame:
    """Move round(fraction * n) 'train' images of each class (at least one) to `to_split`, by a seeded shuffle.

    Each class has its own random stream, so adding a class or an image to one class leaves the others' split.
    """
    index = index.assign(split=index.get("split", "train"))
    not_skipped = index.get("skipped", "") == ""  # files known not to be images are not drawn
    for label, rows in index[(index.split == "train") & not_skipped].groupby("label"):
        rng = np.random.default_rng([seed, zlib.crc32(os.fsencode(label))])  # fsencode: any folder name
        if len(rows) < 2:
            raise UserError(f"class '{label}' has {len(rows)} training image; each class needs at least 2 "
                            f"to be split into train and {to_split}: add images or remove the folder")
        moved = min(len(rows) - 1, max(1, round(fraction * len(rows))))
        index.loc[rng.permutation(rows.index)[:moved], "split"] = to_split
    return index


def check_enough_left(used: pd.DataFrame, classes: list[str], needs_val: bool) -> None:
    """After skipping bad files, every class still needs a training image, and each split an image."""
    for label in classes:
        if not ((used.label == label) & (used.split == "train")).any():
            raise UserError(f"class '{label}' has no usable training images (after skipping unreadable files)")
    for split in ("test", "val") if needs_val else ("test",):
        if not (used.split == split).any():
            raise UserError(f"the {split} split has no usable images: add images or check the folder layout")
    for label in sorted(set(classes) - set(used.label[used.split == "test"])):
        log.warning("warning: class '%s' has no test images; its precision and recall will read 0", label)


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


def resize(image: np.ndarray, img_size: int) -> np.ndarray:
    """Squash to img_size x img_size as the original did (aspect ratio not kept); INTER_AREA avoids aliasing."""
    return cv2.resize(image, (img_size, img_size), interpolation=cv2.INTER_AREA)


def load_image(path: str | Path, img_size: int, max_pixels: int | None = None) -> np.ndarray:
    """A file as an img_size x img_size x 3 uint8 RGB array; BadImageError says why a file cannot be used."""
    return resize(read_image(path, img_size, max_pixels), img_size)


def to_model_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 ... x H x W x 3 -> float32 ... x 3 x H x W scaled to [0, 1] (the model normalises it further)."""
    return images.movedim(-1, -3).float().div(255)


class ImageDataset(torch.utils.data.Dataset):
    """Image files as model inputs, decoded when a batch asks for them (in the DataLoader's workers).

    Item i is (input, one-hot target, i, None), or (None, target, i, (path, why it cannot be used)): a bad
    file is left out of its batch by decoded_batch, named, and never stops a run.
    """

    def __init__(self, paths: list[str], img_size: int, targets: torch.Tensor | None = None,
                 max_pixels: int | None = None):
        self.paths, self.img_size, self.max_pixels = paths, img_size, max_pixels
        self.targets = targets if targets is not None else torch.zeros(len(paths), 0)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, position: int) -> tuple[torch.Tensor | None, torch.Tensor, int, tuple[str, str] | None]:
        try:
            image = load_image(self.paths[position], self.img_size, self.max_pixels)
        except BadImageError as error:
            return None, self.targets[position], position, (self.paths[position], str(error))
        return to_model_input(torch.from_numpy(image)), self.targets[position], position, None


def decoded_batch(items: list) -> tuple[torch.Tensor, torch.Tensor, list[int], dict[str, str]]:
    """The DataLoader's collate_fn for ImageDataset: (inputs, targets, positions) of the files that decoded,
    and {path: why} of those that did not."""
    good = [item for item in items if item[0] is not None]
    inputs = torch.stack([item[0] for item in good]) if good else torch.zeros(0, 3, 1, 1)
    targets = torch.stack([item[1] for item in good]) if good else torch.zeros(0)
    return inputs, targets, [item[2] for item in good], dict(item[3] for item in items if item[0] is None)


def image_batches(paths: list[str], img_size: int, batch_size: int, workers: int = 0,
                  targets: torch.Tensor | None = None, max_pixels: int | None = None,
                  sampler: torch.utils.data.Sampler | None = None, pin_memory: bool = False) -> DataLoader:
    """Batches of (inputs, targets, positions, {path: why not}) read from `paths` in order (or the sampler's);
    `workers` processes decode ahead of the network (ResNet_Model.forward_batches runs it), so decoding
    overlaps compute and memory holds a few batches, never the dataset."""
    return DataLoader(ImageDataset(paths, img_size, targets, max_pixels), batch_size,
                      sampler=sampler, num_workers=workers, collate_fn=decoded_batch, pin_memory=pin_memory)


def unreadable(paths: list[str], img_size: int, workers: int = 0, max_pixels: int | None = None) -> dict[str, str]:
    """{path: why} of the files that do not decode, each named in a warning: what a run that reads the images
    every epoch learns before its first epoch (decoding only; no network runs)."""
    failed = {}
    for *_, batch_failed in image_batches(paths, img_size, 64, workers, max_pixels=max_pixels):
        failed.update(batch_failed)
        for path, reason in batch_failed.items():
            log.warning("warning: skipped %s: %s", path, reason)
    return failed


def load_images(paths: list[str], img_size: int, max_pixels: int | None = None,
                ) -> tuple[np.ndarray, dict[str, str]]:
    """A few files decoded into memory: (N x S x S x 3 uint8 of the good ones, {bad path: reason}).

    For prediction of a handful and for tests; datasets go through image_batches, batch by batch.
    """
    images, skipped = [], {}
    for path in map(str, paths):
        try:
            images.append(load_image(path, img_size, max_pixels))
        except BadImageError as error:
            skipped[path] = str(error)
            log.warning("warning: skipped %s: %s", path, error)
    return (np.stack(images) if images else np.zeros((0, img_size, img_size, 3), np.uint8)), skipped


# --- The original project's entry point (see docs/original-project.md)

class CreateDataset:
    """The original's data loader, on this project's decode path.

    The original script keeps only the arrays, so the class names would be lost on the way to TrainRestNet:
    `folders_read` keeps the last two folders read with their classes (the script reads the training folder,
    then the test folder), the one piece of state its unchanged script needs (TrainRestNet's `classes=`
    overrides it).
    """
    folders_read: list[tuple[str, list[str]]] = []

    def create_dataset(self, folder: str | Path, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
        """The images of folder/<class>/* as (N x 3 x H x W float32 in [0, 1], N x C one-hot float32).

        Classes are the sub-folders in sorted order, each a column of the one-hot labels; unreadable files are
        skipped with a warning, as in training. Images are squares: a checkpoint has one image size and
        prediction resizes to it, so width must equal height.
        """
        if width != height:
            raise UserError(f"create_dataset resizes to squares, so width and height must be equal, not "
                            f"{width} and {height}: the trained model predicts on {width}x{width} images")
        check_data_dir(folder)
        index = index_folder(folder)
        check_classes(index, folder)
        images, skipped = load_images(usable(index).path.tolist(), width)
        if len(images) == 0:
            raise UserError(f"no readable images in {folder}")
        classes = sorted(index.label.unique())
        labels = torch.tensor(usable(mark_skipped(index, skipped)).label.map(classes.index).to_numpy())
        CreateDataset.folders_read = [*CreateDataset.folders_read[-1:], (str(folder), classes)]
        one_hot = torch.nn.functional.one_hot(labels, len(classes)).float()
        return to_model_input(torch.from_numpy(images)).numpy(), one_hot.numpy()

    @staticmethod
    def last_classes() -> list[str] | None:
        """The classes of the last folder read, once checked against the folder read before it (training, then
        test): one-hot columns of other classes would give the model the wrong names. None before any read."""
        if len(CreateDataset.folders_read) == 2:
            (train_dir, train_classes), (test_dir, test_classes) = CreateDataset.folders_read
            check_same_classes(train_dir, train_classes, test_dir, test_classes)
            missing = sorted(set(train_classes) - set(test_classes))
            if missing:  # the one-hot columns of the two folders would not match
                raise UserError(f"{test_dir} lacks the class folder(s) {', '.join(missing)} of {train_dir}")
        return CreateDataset.folders_read[-1][1] if CreateDataset.folders_read else None
