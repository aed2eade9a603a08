"""The data: index the class folders, split them, and decode images in batches.

One image from disk to the network:
    load_image: the file's bytes -> 8-bit RGB (OpenCV) -> img_size x img_size (INTER_AREA)
    -> to_model_input: 3 x S x S float32 in [0, 1] (the model normalises it with its backbone's mean/std).
A file that does not decode is skipped and named, and the run goes on (it stops only when too few images
are left to train and test on).
"""
from __future__ import annotations

import logging
import os
import zlib
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".heic", ".heif", ".avif",
                    ".jp2"}
# Pre-split layouts, the first pair found wins; folder names are matched case-insensitively.
PRESPLIT_PAIRS = (("training_data", "testing_data"), ("train", "test"), ("train", "val"))
log = logging.getLogger("MLPipeline")  # engine.py prints it, to stderr


class UserError(Exception):
    """A mistake the user can fix: engine.py prints the message and exits with status 2."""


def first_line(error: Exception) -> str:
    """An exception's message, first line only: what a user needs, not a library's page of context."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


class BadImageError(Exception):
    """This one file cannot be used as an image: it is skipped, named with the reason."""


# --- 1. Index: a row (path, label, split, skipped) per file, the class being its folder

def index_folder(folder: Path) -> pd.DataFrame:
    """One row (path, label, skipped) per file under folder/<class>/; `skipped` says why a file is not used."""
    rows = []
    for class_dir in sorted(path for path in Path(folder).iterdir() if path.is_dir()):
        for path in sorted(path for path in class_dir.rglob("*") if path.is_file()):
            known = path.suffix.lower() in IMAGE_EXTENSIONS
            rows.append((str(path), class_dir.name, "" if known else f"unsupported file type {path.suffix}"))
    return pd.DataFrame(rows, columns=["path", "label", "skipped"])


def find_presplit(data_dir: Path) -> tuple[Path, Path] | None:
    """The (train, test) folders of a pre-split layout (the original's Training_data/ + Testing_Data/), or
    None for a folder of classes."""
    folders = {}
    for path in sorted(path for path in Path(data_dir).iterdir() if path.is_dir()):
        name = path.name.lower()
        if name in folders and any(name in pair for pair in PRESPLIT_PAIRS):  # Train/ and train/: which one?
            raise UserError(f"{data_dir} holds two folders named {name} but for case: merge or rename them")
        folders[name] = path
    pair = next(((folders[train], folders[test]) for train, test in PRESPLIT_PAIRS
                 if train in folders and test in folders), None)
    if pair:
        log.info("pre-split layout: training on %s, testing on %s", pair[0].name, pair[1].name)
        others = sorted(path.name for path in folders.values()
                        if path not in pair and not path.name.startswith("."))
        if others:
            log.warning("warning: folder(s) %s in %s are not part of the train/test pair; ignored",
                        ", ".join(others), data_dir)
    return pair


def check_data_dir(data_dir: Path) -> None:
    if not Path(data_dir).is_dir():
        problem = "is not a folder" if Path(data_dir).exists() else "does not exist"
        raise UserError(f"data folder {data_dir} {problem}")


def build_index(data_dir: Path, test_size: float = 0.2, seed: int = 42, index_folder=index_folder) -> pd.DataFrame:
    """Every file under data_dir with its class and split: as a pre-split layout gives them, or a seeded
    stratified draw of test_size of each class. index_folder: how one folder of classes is walked."""
    check_data_dir(data_dir)
    presplit = find_presplit(data_dir)
    if presplit:
        train, test = (index_folder(folder) for folder in presplit)
        index = pd.concat([train.assign(split="train"), test.assign(split="test")], ignore_index=True)
        unknown = sorted(set(test.label) - set(train.label))
        if unknown:  # a one-hot column would mean another class in each folder
            raise UserError(f"{presplit[1]} has class folder(s) {', '.join(unknown)} that {presplit[0]} lacks: "
                            f"name the class folders alike")
    else:
        index = stratified_split(index_folder(data_dir), test_size, seed)
    classes = index[index.skipped == ""].label.nunique()
    if classes == 0:
        raise UserError(f"no images found in {data_dir}: put them in one sub-folder per class "
                        f"(e.g. {data_dir}/cats/*.jpg, {data_dir}/dogs/*.jpg)")
    if classes == 1:
        raise UserError(f"{data_dir} has images of 1 class; at least 2 class folders are needed")
    return index


def stratified_split(index: pd.DataFrame, fraction: float, seed: int, to_split: str = "test") -> pd.DataFrame:
    """Move round(fraction * n) 'train' images of each class (at least one) to `to_split`, by a seeded shuffle.
    Each class has its own random stream: adding images to one class leaves the others' split as it was."""
    index = index.assign(split=index.get("split", "train"))
    not_skipped = index.get("skipped", "") == ""  # files known not to be images are not drawn
    for label, rows in index[(index.split == "train") & not_skipped].groupby("label"):
        if len(rows) < 2:
            raise UserError(f"class '{label}' has {len(rows)} training image; each class needs at least 2 "
                            f"to be split into train and {to_split}: add images or remove the folder")
        rng = np.random.default_rng([seed, zlib.crc32(os.fsencode(label))])  # fsencode: any folder name
        moved = min(len(rows) - 1, max(1, round(fraction * len(rows))))
        index.loc[rng.permutation(rows.index)[:moved], "split"] = to_split
    return index


# --- 2. Decode: a file -> S x S x 3 uint8 RGB -> 3 x S x S float in [0, 1]

def resize(image: np.ndarray, img_size: int) -> np.ndarray:
    """Squash to img_size x img_size as the original did (aspect ratio not kept); INTER_AREA avoids aliasing."""
    return cv2.resize(image, (img_size, img_size), interpolation=cv2.INTER_AREA)


def load_image(path: str | Path, img_size: int) -> np.ndarray:
    """A file as an img_size x img_size x 3 uint8 RGB array; BadImageError when it does not decode."""
    try:
        image = cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_COLOR)  # fromfile: any file name
    except (OSError, cv2.error) as error:
        raise BadImageError(f"cannot be read ({error})") from None
    if image is None:
        raise BadImageError("not an image, or corrupt")
    return resize(cv2.cvtColor(image, cv2.COLOR_BGR2RGB), img_size)


def to_model_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 ... x H x W x 3 -> float32 ... x 3 x H x W scaled to [0, 1] (the model normalises it further)."""
    return images.movedim(-1, -3).float().div(255)


class ImageDataset(Dataset):
    """Image files as model inputs, decoded when a batch asks for them (in the DataLoader's workers).

    Item i is (input, target, i, None), or (None, target, i, (path, why)) for a file that does not decode:
    decoded_batch leaves it out of its batch. load_image: how a file becomes S x S x 3 uint8 RGB pixels.
    """

    def __init__(self, paths: list[str], img_size: int, targets: torch.Tensor | None = None,
                 load_image=load_image):
        self.paths, self.img_size, self.load_image = paths, img_size, load_image
        self.targets = targets if targets is not None else torch.zeros(len(paths), 0)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, position: int):
        try:
            image = self.load_image(self.paths[position], self.img_size)
        except BadImageError as error:
            return None, self.targets[position], position, (self.paths[position], str(error))
        return to_model_input(torch.from_numpy(image)), self.targets[position], position, None


def decoded_batch(items: list) -> tuple[torch.Tensor, torch.Tensor, list[int], dict[str, str]]:
    """The DataLoader's collate_fn for ImageDataset: (inputs, targets, positions) of the files that decoded,
    and {path: why} of those that did not."""
    good = [item for item in items if item[0] is not None]
    inputs = torch.stack([item[0] for item in good]) if good else torch.zeros(0, 3, 1, 1)
    targets = torch.stack([item[1] for item in good]) if good else torch.zeros(0)
    if get_worker_info() is not None:  # a worker's batch goes through shared memory: a failure raised here reaches
        inputs, targets = inputs.share_memory_(), targets.share_memory_()  # the main process (else it waits forever)
    return inputs, targets, [item[2] for item in good], dict(item[3] for item in items if item[0] is None)


def image_batches(paths: list[str], img_size: int, batch_size: int, workers: int = 0,
                  targets: torch.Tensor | None = None, load_image=load_image, **loader) -> DataLoader:
    """Batches of (inputs, targets, positions, {path: why not}) in the order of `paths`: `workers` processes
    decode ahead of the network, so memory holds a few batches, never the dataset."""
    return DataLoader(ImageDataset(paths, img_size, targets, load_image), batch_size, num_workers=workers,
                      collate_fn=decoded_batch, **loader)


# --- The original project's entry point (see docs/original-project.md)

class CreateDataset:
    """The original's data loader, on the recipe's decode path. It remembers the classes of the folders it
    read, so that TrainRestNet can name the model's outputs (the original's arrays carry no names)."""
    folders_read: list[tuple[str, list[str]]] = []

    @staticmethod
    def last_classes() -> list[str] | None:
        """The classes of the last folder read (the test folder, read after the training one): they must be
        the training folder's, or the one-hot columns of the two would name different classes."""
        read = CreateDataset.folders_read
        if len(read) == 2 and read[0][1] != read[1][1]:
            (train_dir, train_classes), (test_dir, test_classes) = read
            raise UserError(f"the class folders of {test_dir} ({', '.join(test_classes)}) differ from those of "
                            f"{train_dir} ({', '.join(train_classes)}): name them alike")
        return CreateDataset.folders_read[-1][1] if CreateDataset.folders_read else None

    def create_dataset(self, folder: str | Path, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
        """The images of folder/<class>/* as (N x 3 x S x S float32 in [0, 1], N x C one-hot float32), with
        the classes in sorted order; files that do not decode are skipped with a warning. Squares only: a
        checkpoint has one image size."""
        if width != height:
            raise UserError(f"create_dataset resizes to squares, so width and height must be equal, not "
                            f"{width} and {height}: the trained model predicts on {width}x{width} images")
        index = index_folder(folder)
        usable = index.skipped == ""  # a file of another type is named; a folder of nothing else is no class
        for path, why in zip(index.path[~usable], index.skipped[~usable]):
            log.warning("warning: skipped %s: %s", path, why)
        classes = sorted(index.label[usable].unique())
        images, labels = [], []
        for path, label in zip(index.path[usable], index.label[usable]):
            try:
                images.append(load_image(path, width))
                labels.append(classes.index(label))
            except BadImageError as error:
                log.warning("warning: skipped %s: %s", path, error)
        if not images:
            raise UserError(f"no readable images in the class folders of {folder}")
        CreateDataset.folders_read = [*CreateDataset.folders_read[-1:], (str(folder), classes)]
        one_hot = torch.nn.functional.one_hot(torch.tensor(labels), len(classes)).float()
        return to_model_input(torch.from_numpy(np.stack(images))).numpy(), one_hot.numpy()
