"""The original project's 67.11%, reproduced: its published pipeline run as written, on its own data, then
fixed one bug at a time, cumulatively, back to this project's recipe.

    python benchmarks/original_baseline.py --data PATH      # PATH holds Training_data/ and Testing_Data/
    python benchmarks/original_baseline.py --weights resnet50-11ad3fa6.pth   # every row on ResNet50
    python benchmarks/original_baseline.py --seeds 1 --epochs 1 --rows 0,6   # a quick look on a slow CPU

The data is the original's public Training_data/ + Testing_Data/ (3 classes, 200 + 50 images each); the
default is ../shared/data/original-project next to the project, where there is one.

The published pipeline (written here from its description, not copied). Its data loader, for each file of
each class folder:
  1. cv2.imread(path, cv2.COLOR_BGR2RGB): that constant is 4, which imread reads as IMREAD_ANYCOLOR, so
     colour images stay BGR and grayscale files come back 2-D;
  2. resize to 200x200 (INTER_AREA), float64, not divided by 255: the network gets 0-255, no mean/std;
  3. keep the image only if it has 3 dimensions: grayscale files are dropped without a word;
  4. np.array(image).reshape([3, 200, 200]): a reshape of the H x W x 3 array, not a transpose, so each
     "channel" holds a third of the image's rows, with B, G and R interleaved along the width.
Its model: the frozen ImageNet ResNet50 with a head Linear -> ReLU -> Dropout -> Linear -> LogSoftmax (the
hidden width and dropout rate are not published: 512 and 0.2 here, the usual values of that head), trained
with CrossEntropyLoss on its LogSoftmax outputs and one-hot float targets, Adam on the head at 1e-3, 10
epochs, batches of 8, model.train() every epoch (the backbone's BatchNorm layers normalise each batch by
its own statistics and update their running statistics), and scored on the shuffled test loader (batches
of 8) without model.eval(): dropout and batch statistics stay on. Accuracy is correct / all. Nothing is
seeded, so the published row runs --seeds seeds (0, 1, ...) and reports their spread; a seed sets the
head's initial weights, dropout, and the order of the training and test batches.

Each later row fixes one more bug, over the same seeds; row 6 is this project's recipe, and row 7 checks
it against MLPipeline.train() as a user runs it (its own seed, 42). Rows 1-2 read files with
IMREAD_COLOR (grayscale as three equal channels, still BGR 0-255); from row 3 on, files are read by this
project's decoder (MLPipeline.load_images: RGB, EXIF rotation, INTER_AREA) and the backbone gets them in
[0, 1] through its own normalisation. Each split is decoded once per reader and kept in memory. Rows 3 and 4
share each seed's training (they differ only in how they score). In rows 0-4 the backbone runs in training
mode on every batch of every epoch (about 2 minutes per 10-epoch Lite0 run on a quiet 2-core CPU); in rows
5-6 the frozen backbone in eval mode gives the same features every epoch and seed, so they are computed once.

ResNet50 needs its torchvision ImageNet weights (--weights FILE, or torchvision's cache); without them every
row runs on the pip-installed EfficientNet-Lite0, as `--weights auto` does, and every row says so.
"""
from __future__ import annotations

import argparse
import copy
import logging
import os
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from MLPipeline.extras.Run import RunConfig as TrainConfig  # noqa: E402
from MLPipeline.CreateDataset import UserError
from MLPipeline import build_model
from MLPipeline.extras.Data import load_images
from MLPipeline.extras.Run import train

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "original-project"
EPOCHS, BATCH_SIZE, LR, IMG_SIZE = 10, 8, 1e-3, 200  # the original's recipe
HIDDEN, DROPOUT = 512, 0.2  # the published head's hidden width and dropout rate: not published, assumed
REPORTED = (100, 149)  # the original's 67.11%, as correct / all on the 149 test images its loader keeps
RECIPE_SEED = 42  # MLPipeline.train()'s default seed, for row 7


@dataclass(frozen=True)
class Row:
    """One configuration of the pipeline: which of the published bugs it still has."""
    name: str
    reader: str  # 'published' (grayscale dropped), 'colour' (IMREAD_COLOR, BGR), 'project' (RGB, normalised)
    reshape: bool = True  # the published reshape to 3 x S x S; else a transpose
    score_in_train_mode: bool = True  # no model.eval() before scoring: dropout and batch statistics on
    bn_in_train_mode: bool = True  # model.train() each epoch: BatchNorm normalises by each batch of 8
    published_head: bool = True  # Linear -> ReLU -> Dropout -> Linear -> LogSoftmax; else one Linear


ROWS = (
    Row("the published pipeline (= the original)", "published"),
    Row("+ grayscale files kept (IMREAD_COLOR)", "colour"),
    Row("+ transpose instead of reshape", "colour", reshape=False),
    Row("+ RGB in [0, 1], the backbone's normalisation", "project", reshape=False),
    Row("+ scored in eval mode (model.eval())", "project", reshape=False, score_in_train_mode=False),
    Row("+ BatchNorm in eval mode while training", "project", reshape=False, score_in_train_mode=False,
        bn_in_train_mode=False),
    Row("+ a linear head (= this project's recipe)", "project", reshape=False, score_in_train_mode=False,
        bn_in_train_mode=False, published_head=False),
)
CHECK_ROW = len(ROWS)  # row 7: MLPipeline.train(), one run


@dataclass
class Split:
    """One split as one reader decoded it: uint8 N x S x S x 3 images, class numbers, what was left out."""
    images: torch.Tensor
    labels: torch.Tensor
    dropped: dict[str, str] = field(default_factory=dict)  # path: why


def class_files(folder: Path) -> list[tuple[str, int]]:
    """(path, class number) of every file of every class folder, classes in sorted order (the original's
    one-hot columns: driving_license, others, social_security); every file, as the original reads them."""
    classes = sorted(entry.name for entry in folder.iterdir() if entry.is_dir() and entry.name != ".DS_Store")
    return [(str(path), number) for number, name in enumerate(classes)
            for path in sorted((folder / name).iterdir()) if path.is_file()]


def read_published(path: str, size: int) -> tuple[np.ndarray | None, str]:
    """The published loader's image (S x S x 3 uint8, BGR), or None and why it drops the file. Its float64
    conversion is left to as_network_input: the values are the same whole numbers 0-255."""
    image = cv2.imread(path, cv2.COLOR_BGR2RGB)  # = 4 = IMREAD_ANYCOLOR: BGR stays BGR, grayscale stays 2-D
    if image is None:
        return None, "OpenCV cannot read it (the published loader would stop here, in cv2.resize)"
    image = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
    if image.ndim != 3:
        return None, "grayscale: imread gives a 2-D array, and the published loader keeps only 3-D ones"
    return image, ""


def read_colour(path: str, size: int) -> tuple[np.ndarray | None, str]:
    """The first fix: IMREAD_COLOR gives every readable file 3 channels (still BGR)."""
    image = cv2.imread(path, cv2.IMREAD_COLOR)
    if image is None:
        return None, "OpenCV cannot read it"
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA), ""


def load_split(folder: Path, reader: str, size: int) -> Split:
    """Every file of `folder`'s class folders, decoded by `reader`, once."""
    files = class_files(folder)
    if reader == "project":
        images, dropped = load_images([path for path, _ in files], size)  # RGB; names each file it skips
        labels = [number for path, number in files if path not in dropped]
        return Split(torch.from_numpy(images), torch.tensor(labels, dtype=torch.long), dropped)
    read = read_published if reader == "published" else read_colour
    images, labels, dropped = [], [], {}
    for path, number in files:
        image, why = read(path, size)
        if image is None:
            dropped[path] = why
        else:
            images.append(image)
            labels.append(number)
    stacked = np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8)
    return Split(torch.from_numpy(stacked), torch.tensor(labels, dtype=torch.long), dropped)


def as_network_input(images: torch.Tensor, row: Row) -> torch.Tensor:
    """uint8 N x S x S x 3 -> float32 N x 3 x S x S: the published reshape (each image's np.reshape: the
    same bytes read as 3 x S x S) or a transpose; 0-255 as published, or [0, 1] from row 3 on."""
    count, size = images.shape[0], images.shape[1]
    if row.reshape:
        laid_out = images.reshape(count, 3, size, size)
    else:
        laid_out = images.permute(0, 3, 1, 2)
    inputs = laid_out.float()
    if row.reader == "project":
        inputs = inputs / 255
    return inputs.contiguous(memory_format=torch.channels_last)


def published_head(in_features: int, classes: int) -> nn.Sequential:
    """The published head: log-probabilities out."""
    return nn.Sequential(nn.Linear(in_features, HIDDEN), nn.ReLU(), nn.Dropout(DROPOUT),
                         nn.Linear(HIDDEN, classes), nn.LogSoftmax(dim=1))


def backbone_features(model: nn.Module, inputs: torch.Tensor, row: Row) -> torch.Tensor:
    """The published rows hand the backbone the raw 0-255 BGR input, bypassing the model's normalisation."""
    return model.features(inputs) if row.reader == "project" else model.backbone(inputs)


def set_mode(model: nn.Module, bn_in_train_mode: bool, head_in_train_mode: bool = True) -> None:
    """What model.train() did to the original's frozen ResNet50: its BatchNorm layers (ResNet50's only layers
    that change in training mode) use and update batch statistics. The project's Classifier keeps its frozen
    backbone in eval mode, so only the BatchNorm layers are switched, on Lite0 too."""
    model.train(head_in_train_mode)
    for module in model.backbone.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.train(bn_in_train_mode)


def shuffled_batches(count: int, seed: int) -> list[torch.Tensor]:
    """Positions in shuffled batches of BATCH_SIZE, as a DataLoader with shuffle=True gives them."""
    return list(torch.randperm(count, generator=torch.Generator().manual_seed(seed)).split(BATCH_SIZE))


def extract_features(model: nn.Module, split: Split, row: Row) -> torch.Tensor:
    """The frozen backbone's features in eval mode: the same in every epoch and for every seed."""
    set_mode(model, bn_in_train_mode=False, head_in_train_mode=False)
    with torch.inference_mode():
        return torch.cat([backbone_features(model, as_network_input(split.images[batch], row), row)
                          for batch in torch.arange(len(split.images)).split(BATCH_SIZE)])


@dataclass
class Trained:
    model: nn.Module
    losses: list[float]  # mean training loss of each epoch
    seconds: float


def train_run(pristine: nn.Module, row: Row, split: Split, seed: int, epochs: int,
              features: torch.Tensor | None) -> Trained:
    """One training as `row` has it; with `features`, the head trains on them (BatchNorm in eval mode)."""
    started = time.perf_counter()
    model = copy.deepcopy(pristine)  # BatchNorm in training mode moves running statistics: a fresh backbone
    torch.manual_seed(seed)  # the head's initial weights and dropout
    in_features, classes = pristine.head.in_features, pristine.head.out_features
    model.head = published_head(in_features, classes) if row.published_head else nn.Linear(in_features, classes)
    optimizer = torch.optim.Adam(model.head.parameters(), lr=LR)
    targets = F.one_hot(split.labels, classes).float()  # one-hot float targets, as the original
    losses = []
    for epoch in range(epochs):
        set_mode(model, row.bn_in_train_mode)  # the original's model.train() at the start of every epoch
        total, batches = 0.0, shuffled_batches(len(targets), seed * 1000 + epoch)
        for batch in batches:
            if features is None:
                with torch.no_grad():  # the frozen backbone takes no gradient; its BatchNorm still updates
                    inputs = backbone_features(model, as_network_input(split.images[batch], row), row)
            else:
                inputs = features[batch]
            # CrossEntropyLoss on the head's output: for the published head, on its log-probabilities
            loss = F.cross_entropy(model.head(inputs), targets[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item()
        losses.append(total / len(batches))
    return Trained(model, losses, time.perf_counter() - started)


def correct_count(trained: Trained, row: Row, split: Split, seed: int, features: torch.Tensor | None) -> int:
    """How many test images the model gets right: in training mode on the shuffled test loader, as the
    original scored, or in eval mode."""
    model = copy.deepcopy(trained.model)  # scoring in training mode moves BatchNorm's statistics; rows share
    set_mode(model, row.score_in_train_mode, row.score_in_train_mode)
    correct = 0
    with torch.no_grad():
        for batch in shuffled_batches(len(split.labels), seed * 1000 + 999):
            if features is None:
                inputs = backbone_features(model, as_network_input(split.images[batch], row), row)
            else:
                inputs = features[batch]
            correct += int((model.head(inputs).argmax(1) == split.labels[batch]).sum())
    return correct


def spread(values: list[float]) -> tuple[float, float, float, float]:
    """(mean, std, min, max); std over seeds (n - 1 in the denominator), nan for one seed."""
    array = np.array(values, dtype=float)
    return array.mean(), array.std(ddof=1) if len(array) > 1 else float("nan"), array.min(), array.max()


def points(value: float, signed: bool = False) -> str:
    return "-" if np.isnan(value) else f"{value:+.2f}" if signed else f"{value:.2f}"


def describe(provenance: dict) -> str:
    weights = provenance["weights_source"] if provenance["pretrained"] else "RANDOM INIT"
    return f"{provenance['arch']}, {weights}"


def short(provenance: dict) -> str:
    return f"{provenance['arch']}, {'ImageNet' if provenance['pretrained'] else 'random init'}"


def report_loading(splits: dict[tuple[str, str], Split], totals: dict[str, int], readers: list[str]) -> None:
    labels = {"published": "the published loader (row 0)", "colour": "IMREAD_COLOR (rows 1-2)",
              "project": "this project's decoder (rows 3-7)"}
    for reader in readers:
        counts = ", ".join(f"{len(splits[reader, name].labels)} of {totals[name]} {name}" for name in totals)
        print(f"Loaded by {labels[reader]}: {counts} images.")
        for name in totals:
            for path, why in splits[reader, name].dropped.items():
                print(f"  dropped {path}: {why}")


def parse_rows(text: str) -> list[int]:
    try:
        rows = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        rows = []
    if not rows or not all(0 <= row <= CHECK_ROW for row in rows):
        raise argparse.ArgumentTypeError(f"'{text}': row numbers from 0 to {CHECK_ROW}, separated by commas")
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with Training_data/ and "
                        "Testing_Data/ (default: ../shared/data/original-project next to the project)")
    parser.add_argument("--weights", default="auto", help="a resnet50 state dict (torchvision's "
                        "resnet50-11ad3fa6.pth); default auto: torchvision's cache, else EfficientNet-Lite0 "
                        "from pip")
    parser.add_argument("--backbone", default="resnet50", help="the backbone (default: the original's "
                        "%(default)s; a small one makes a quick test)")
    parser.add_argument("--seeds", type=int, default=5, help="runs of each row, seeds 0, 1, ... (default "
                        "%(default)s)")
    parser.add_argument("--epochs", type=int, default=EPOCHS, help="epochs of every row (default: the "
                        "original's %(default)s)")
    parser.add_argument("--rows", type=parse_rows, default=list(range(CHECK_ROW + 1)),
                        help=f"which rows, e.g. 0,6 (default: all, 0 to {CHECK_ROW}); each keeps its own "
                        f"configuration, whichever others run")
    parser.add_argument("--img-size", type=int, default=IMG_SIZE, help="pixels a side (default: the "
                        "original's %(default)s)")
    args = parser.parse_args(argv)
    if args.seeds < 1 or args.epochs < 1 or args.img_size < 32:
        parser.error("--seeds and --epochs must be at least 1, --img-size at least 32")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    shown = shlex.join(sys.argv[1:] if argv is None else argv)
    print(f"$ python benchmarks/original_baseline.py {shown}".rstrip())
    started = time.perf_counter()
    folders = {"training": args.data / "Training_data", "test": args.data / "Testing_Data"}
    if not all(folder.is_dir() for folder in folders.values()):
        print(f"error: {args.data} does not hold Training_data/ and Testing_Data/. This benchmark needs the "
              f"original project's data set: the folders Training_data/ and Testing_Data/ of its public "
              f"repository (AjNavneet/CNN-MultiClass-Classification-PyTorch, folder Input/Data); pass their "
              f"parent folder with --data.", file=sys.stderr)
        sys.exit(2)
    try:
        run_benchmark(args, folders)
    except UserError as error:  # e.g. a weights file that is not ResNet50's
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    print(f"\nTotal {time.perf_counter() - started:.0f} s; load average {os.getloadavg()[1]:.1f} over the last "
          f"5 minutes on {os.cpu_count()} CPUs (other processes slow every row alike).")


def run_benchmark(args: argparse.Namespace, folders: dict[str, Path]) -> None:
    classes = sorted(entry.name for entry in folders["training"].iterdir()
                     if entry.is_dir() and entry.name != ".DS_Store")
    model_rows = [number for number in args.rows if number < CHECK_ROW]
    readers = [reader for reader in ("published", "colour", "project")
               if any(ROWS[number].reader == reader for number in model_rows)]
    logging.getLogger("MLPipeline").setLevel(logging.ERROR)  # skips are listed below, with the other loaders'
    splits = {(reader, name): load_split(folder, reader, args.img_size)
              for reader in readers for name, folder in folders.items()}
    totals = {name: len(class_files(folder)) for name, folder in folders.items()}
    print(f"Data: {args.data}: {totals['training']} training, {totals['test']} test files, classes "
          f"{', '.join(classes)}; {args.img_size} px.")
    report_loading(splits, totals, readers)

    pristine, provenance = build_model(len(classes), args.backbone, args.weights)
    pristine = pristine.to(memory_format=torch.channels_last)
    instead = "" if provenance["arch"] == args.backbone else (
        f" It is not {args.backbone}: {args.backbone}'s ImageNet weights are not here (pass --weights, or put "
        f"them in torchvision's cache), and no figure below is {args.backbone}'s.")
    print(f"Backbone of every row: {describe(provenance)}.{instead}")
    print(f"Torch {torch.__version__}, {torch.get_num_threads()} CPU threads (load average "
          f"{os.getloadavg()[0]:.1f}); {args.epochs} epoch{'s' if args.epochs > 1 else ''}, batches of "
          f"{BATCH_SIZE}, Adam {LR:g} on the head; "
          f"seeds {', '.join(map(str, range(args.seeds)))}; published head {HIDDEN} hidden, dropout {DROPOUT} "
          f"(assumed: not published).\n")
    print("| # | row | test images | correct per seed | mean | std | min | max | train loss, epoch 1 -> last "
          "| time | backbone |\n|---|---|---|---|---|---|---|---|---|---|---|")

    accuracies, features_for = {}, {}
    previous = {}  # seed: (what the last row trained, its Trained), for a row that only scores differently
    for number in model_rows:
        row = ROWS[number]
        train_split, test_split = splits[row.reader, "training"], splits[row.reader, "test"]
        row_started, features = time.perf_counter(), None
        if not row.bn_in_train_mode:  # features once: frozen backbone in eval mode, scored in eval mode
            key = (row.reader, row.reshape)
            if key not in features_for:
                features_for[key] = (extract_features(pristine, train_split, row),
                                     extract_features(pristine, test_split, row))
            features = features_for[key]
        correct, losses, current, shared = [], [], {}, ""
        for seed in range(args.seeds):
            training = (row.reader, row.reshape, row.bn_in_train_mode, row.published_head)
            if previous.get(seed, (None,))[0] == training:  # rows 3 and 4: each seed's training shared
                trained, shared = previous[seed][1], f" (scoring only: the trainings of row {number - 1})"
            else:
                trained = train_run(pristine, row, train_split, seed, args.epochs,
                                    None if features is None else features[0])
            current[seed] = (training, trained)
            test_features = None if features is None else features[1]
            correct.append(correct_count(trained, row, test_split, seed, test_features))
            losses.append((trained.losses[0], trained.losses[-1]))
        count = len(test_split.labels)
        accuracies[number] = [100 * k / count for k in correct]
        mean, std, low, high = spread(accuracies[number])
        loss = f"{np.mean([first for first, _ in losses]):.3f} -> {np.mean([last for _, last in losses]):.3f}"
        print(f"| {number} | {row.name} | {count} | {' '.join(map(str, correct))} (of {count}) | "
              f"{points(mean)}% "
              f"| {points(std)} | {points(low)}% | {points(high)}% | {loss} | "
              f"{time.perf_counter() - row_started:.0f} s"
              f"{shared} | {short(provenance)} |", flush=True)
        previous = current
    if CHECK_ROW in args.rows:
        print(recipe_check(args, provenance), flush=True)
    summarise(accuracies, provenance, args.seeds)


def recipe_check(args: argparse.Namespace, provenance: dict) -> str:
    """Row 7: MLPipeline.train() with its defaults on the same folders, the backbone every row used."""
    started = time.perf_counter()
    weights = args.weights if provenance["arch"] == args.backbone else "imagenet"  # no second download attempt
    with tempfile.TemporaryDirectory() as output_dir:
        run = train(TrainConfig(data_dir=args.data, output_dir=Path(output_dir), backbone=provenance["arch"],
                                weights=weights, epochs=args.epochs, img_size=args.img_size, seed=RECIPE_SEED))
    truth = torch.tensor([run.classes.index(Path(path).parent.name) for path in run.test_paths])
    correct, count = int((run.test_logits.argmax(1) == truth).sum()), len(truth)
    return (f"| {CHECK_ROW} | check: MLPipeline.train() as a user runs it (its seed {RECIPE_SEED}) | {count} | "
            f"{correct} (of {count}) | {100 * correct / count:.2f}% | | | | | "
            f"{time.perf_counter() - started:.0f} s | "
            f"{short(run.metrics)} |")


def summarise(accuracies: dict[int, list[float]], provenance: dict, seeds: int) -> None:
    """Where the reported 67.11% lies against the published row, and what each fix is worth."""
    used = f"{provenance['arch']}{'' if provenance['arch'] == 'resnet50' else ', not ResNet50'}"
    if 0 in accuracies:
        mean, std, low, high = spread(accuracies[0])
        reported = 100 * REPORTED[0] / REPORTED[1]
        inside = "inside" if low <= reported <= high else "outside"
        print(f"\nThe published pipeline ({used}): {points(mean)}% mean, std {points(std)}, {points(low)}% to "
              f"{points(high)}% over {seeds} seed{'s' if seeds > 1 else ''}; the original's reported "
              f"{reported:.2f}% ({REPORTED[0]}/{REPORTED[1]}) is {inside} that range.")
    pairs = [(before, after) for before, after in zip(sorted(accuracies), sorted(accuracies)[1:])]
    if not pairs:
        return
    print(f"\nWhat each fix is worth ({used}): the row's accuracy minus the row above's, seed by seed, "
          f"in points.\n\n| fix | mean | std | min | max |\n|---|---|---|---|---|")
    for before, after in pairs:
        differences = [b - a for a, b in zip(accuracies[before], accuracies[after])]
        mean, std, low, high = spread(differences)
        name = ROWS[after].name if after == before + 1 else f"rows {before + 1} to {after} together"
        print(f"| {after}: {name} | {points(mean, True)} | {points(std)} | {points(low, True)} | "
              f"{points(high, True)} |")


if __name__ == "__main__":
    main()
