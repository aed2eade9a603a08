"""This project's recipe against the original project's training loop, on the original's own data.

    python benchmarks/original_baseline.py --data PATH      # PATH holds Training_data/ and Testing_Data/
    python benchmarks/original_baseline.py --weights resnet50-11ad3fa6.pth   # ResNet50, as the original
    python benchmarks/original_baseline.py --backbones      # also this project's recipe on Lite0, Lite1, Lite2
    python benchmarks/original_baseline.py --loop-epochs 1  # the original's loop for 1 epoch: on a slow CPU

The data is the original project's public Training_data/ + Testing_Data/ (3 classes, 200 + 50 images
each); the default is ../shared/data/original-project next to the project, where there is one.

The original's published training code (reproduced here, not copied) trains only fc, as this project
does, but differs in three ways, added here one at a time, cumulatively:
  1. model.train() every epoch: the frozen backbone's BatchNorm layers normalise with each batch of 8's
     statistics and update their running statistics from them throughout training;
  2. the test score without model.eval(): each shuffled test batch of 8 normalised by its own statistics;
  3. images read by OpenCV as BGR and only divided by 255, without the ImageNet mean/std.
Otherwise both are the same recipe: cross-entropy on one-hot float targets, Adam on the head at 1e-3,
10 epochs, batches of 8, 200x200 squashed images (this project resizes with INTER_AREA, the original with
cv2.resize's default; that difference is not measured here).

Row 1 is MLPipeline.train() as a user runs it (frozen backbone in eval mode, features computed once, the
head trained on them; its wall time includes its own decoding). The other rows share one decode, timed
in the header, and run the original's loop written out below; with the BatchNorm layers in eval mode it
computes each image's features once, as the frozen backbone gives the same ones every epoch. Rows that
differ only in how they score share one training (their wall time counts it once each, and says whose).
The last row scores the original's training in eval mode: its model.eval() added, nothing else changed.
With BatchNorm in training mode the backbone runs on every batch of every epoch, and in that mode it is
slower than in eval mode too, so --loop-epochs trains rows 2 on for fewer epochs where the original's 10
would take hours on a small CPU; every row of the loop then has that number,
and row 1 keeps the recipe's 10. Each row's accuracy is on the 150 test images as given, and on those that are not byte-identical copies
of a training image. ResNet50 needs its torchvision ImageNet weights (--weights, or torchvision's cache);
without them every row uses the pip-installed EfficientNet-Lite0, as `--weights auto` does.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from MLPipeline import TrainConfig, build_index, train  # noqa: E402
from MLPipeline.CreateDataset import (forward_batches, load_images, mark_skipped, to_model_input,  # noqa: E402
                                      usable)
from MLPipeline.ResNet_Model import Classifier, build_model, inference_batch_size, prepare_model  # noqa: E402
from MLPipeline.Weights import PIP_BACKBONES, resolve_weights  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "original-project"
SEED, EPOCHS, BATCH_SIZE, LR, IMG_SIZE = 42, 10, 8, 1e-3, 200  # the original's recipe
CPU = torch.device("cpu")


@dataclass
class Images:
    """One split, decoded once: uint8 N x S x S x 3 RGB, class numbers, and which are copies of a training file."""
    images: np.ndarray
    labels: torch.Tensor
    is_copy: np.ndarray


@dataclass(frozen=True)
class Variant:
    """Which of the original's training differences a run of its loop has."""
    bn_updates: bool = False
    bgr_unnormalised: bool = False


def load_data(data: Path) -> tuple[list[str], dict[str, Images], float]:
    """(classes, {'train', 'test'}: Images, seconds spent decoding) through the project's own index and decoder.
    build_index marks each test file that is a byte-identical copy of a training file (its duplicate_of)."""
    index = build_index(data)
    start = time.perf_counter()
    images, skipped = load_images(index.path.tolist(), IMG_SIZE)
    seconds = time.perf_counter() - start
    index = usable(mark_skipped(index, skipped))
    classes = sorted(index.label.unique())
    splits = {}
    for split in ("train", "test"):
        rows = (index.split == split).to_numpy()
        part = index[rows]
        splits[split] = Images(images[rows], torch.tensor(part.label.map(classes.index).to_numpy()),
                               (part.duplicate_of != "").to_numpy())
    return classes, splits, seconds


def batchnorm_in_train_mode(model: Classifier) -> None:
    """What the original's model.train() did to the frozen backbone: only its BatchNorm layers change
    behaviour (ResNet50 has no dropout; Lite0's before its classifier is not the original's)."""
    model.train()  # the head; Classifier keeps the frozen backbone in eval mode
    for module in model.backbone.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.train()


def as_variant(images: np.ndarray, model: Classifier, variant: Variant) -> np.ndarray:
    """BGR without normalisation: the channels reversed, and the model's mean/std made 0 and 1."""
    if not variant.bgr_unnormalised:
        return images
    model.mean_tensor.zero_()
    model.std_tensor.fill_(1.0)
    return np.ascontiguousarray(images[..., ::-1])


def forward_images(network: Callable[[torch.Tensor], torch.Tensor], images: np.ndarray) -> torch.Tensor:
    """`network`'s outputs for decoded uint8 images, in inference mode, in the project's CPU batch size."""
    inputs = to_model_input(torch.from_numpy(images))
    loader = DataLoader(TensorDataset(inputs, torch.zeros(len(inputs))), inference_batch_size(CPU, IMG_SIZE))
    # total 0: no progress lines, which count files read and would divide by zero on tensor batches
    return forward_batches(network, loader, CPU, 0)[0]


def batches(count: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Shuffled positions in batches of BATCH_SIZE, as a DataLoader with shuffle=True gives them."""
    return list(torch.randperm(count, generator=generator).split(BATCH_SIZE))


def train_original_loop(model: Classifier, images: np.ndarray, labels: torch.Tensor, variant: Variant,
                        generator: torch.Generator, epochs: int = EPOCHS) -> None:
    """`epochs` of Adam on the head, cross-entropy on one-hot targets, in shuffled batches of BATCH_SIZE."""
    optimizer = torch.optim.Adam(model.head.parameters(), lr=LR)
    targets = F.one_hot(labels, model.head.out_features).float()  # one-hot float targets, as the original
    model.train()  # a frozen Classifier's backbone, BatchNorm included, in eval mode
    # BatchNorm in eval mode: the features are the same every epoch, so computed once.
    features = None if variant.bn_updates else forward_images(model.features, images)
    pixels = torch.from_numpy(images)
    for _ in range(epochs):
        if variant.bn_updates:
            batchnorm_in_train_mode(model)
        else:
            model.train()
        for batch in batches(len(images), generator):
            if features is None:
                inputs = to_model_input(pixels[batch]).contiguous(memory_format=torch.channels_last)
                outputs = model(inputs)  # the backbone's weights take no gradient, so it builds no graph
            else:
                outputs = model.head(features[batch])
            loss = F.cross_entropy(outputs, targets[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


def predictions(model: Classifier, images: np.ndarray, in_train_mode: bool, generator: torch.Generator,
                ) -> torch.Tensor:
    """Each test image's predicted class: in eval mode, or as the original scored, in training mode on
    shuffled batches of BATCH_SIZE (each normalised by its own statistics)."""
    if not in_train_mode:
        return forward_images(model.eval(), images).argmax(1)
    batchnorm_in_train_mode(model)
    predicted, pixels = torch.empty(len(images), dtype=torch.long), torch.from_numpy(images)
    with torch.no_grad():
        for batch in batches(len(images), generator):
            inputs = to_model_input(pixels[batch]).contiguous(memory_format=torch.channels_last)
            predicted[batch] = model(inputs).argmax(1)
    return predicted


def accuracies(correct: np.ndarray, is_copy: np.ndarray) -> str:
    """'as given / deduplicated' accuracy, with the deduplicated count."""
    return f"{100 * correct.mean():.2f}% | {100 * correct[~is_copy].mean():.2f}% ({(~is_copy).sum()})"


def choose_backbone(weights: str) -> tuple[str, str]:
    """(backbone, weights) for every row: ResNet50 with `weights` where they can be had, else what `auto`
    falls back to; resolved once, so that no later row tries a download again."""
    arch, _, _, pretrained = resolve_weights("resnet50", weights)
    if arch == "resnet50":
        return arch, weights if pretrained else "none"
    return arch, "imagenet"


def fresh_model(classes: list[str], backbone: tuple[str, str]) -> tuple[Classifier, dict]:
    torch.manual_seed(SEED)  # the head's initial weights: the same in every row
    model, provenance = build_model(len(classes), *backbone)
    return prepare_model(model, CPU), provenance


def describe(provenance: dict) -> str:
    return f"{provenance['arch']}, {provenance['weights_source'] if provenance['pretrained'] else 'RANDOM INIT'}"


def project_recipe_row(data: Path, backbone: str, weights: str, scratch: Path) -> tuple[str, float, str]:
    """MLPipeline.train() with its defaults (the original recipe) on the pre-split data: (accuracies,
    seconds, backbone used)."""
    start = time.perf_counter()
    output_dir = Path(tempfile.mkdtemp(dir=scratch))  # its own feature cache too: no row reuses another's features
    run = train(TrainConfig(data_dir=data, output_dir=output_dir, backbone=backbone, weights=weights, seed=SEED))
    seconds = time.perf_counter() - start
    truth = np.array([run.classes.index(Path(path).parent.name) for path in run.test_paths])
    correct = run.test_logits.argmax(1).numpy() == truth
    is_copy = np.isin(run.test_paths, list(run.metrics["dataset"]["duplicates"]))
    return accuracies(correct, is_copy), seconds, describe(run.metrics)


# (row, the differences it trains with, scored in training mode?): rows that differ only in scoring share a training
LOOP_ROWS = (
    ("original's loop, none of its differences", Variant(), False),
    ("+ BN statistics updated while training", Variant(bn_updates=True), False),
    ("+ scoring in training mode", Variant(bn_updates=True), True),
    ("+ BGR without normalisation (= the original)", Variant(bn_updates=True, bgr_unnormalised=True), True),
    ("the original, scored in eval mode (its model.eval() added)", Variant(bn_updates=True, bgr_unnormalised=True),
     False),
)


def loop_rows(classes: list[str], splits: dict[str, Images], backbone: tuple[str, str],
              print_row: Callable[[str, str, str, str], None], epochs: int = EPOCHS) -> None:
    """The original's loop, its differences added one at a time; each training done once."""
    trained = {}  # Variant -> (model, its test images, training seconds, first row number)
    train_set, test_set = splits["train"], splits["test"]
    for number, (row, variant, score_in_train_mode) in enumerate(LOOP_ROWS, start=2):
        start = time.perf_counter()
        if variant not in trained:
            model, provenance = fresh_model(classes, backbone)
            train_images = as_variant(train_set.images, model, variant)
            train_original_loop(model, train_images, train_set.labels, variant,
                                torch.Generator().manual_seed(SEED), epochs)  # the same batches in every row
            trained[variant] = (model, as_variant(test_set.images, model, variant), time.perf_counter() - start,
                                number)
        model, test_images, training_seconds, first_row = trained[variant]
        start = time.perf_counter()
        # A copy: scoring in training mode moves BatchNorm's running statistics, which another row scores with.
        predicted = predictions(copy.deepcopy(model), test_images, score_in_train_mode,
                                torch.Generator().manual_seed(SEED))
        seconds = training_seconds + time.perf_counter() - start
        shared = f" (the training of row {first_row})" if first_row != number else ""
        row += "" if epochs == EPOCHS else f", {epochs} epoch{'s' if epochs > 1 else ''}"
        print_row(row, accuracies((predicted == test_set.labels).numpy(), test_set.is_copy), f"{seconds:.0f} s{shared}",
                  describe(provenance))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with Training_data/ and "
                        "Testing_Data/ (default: ../shared/data/original-project next to the project)")
    parser.add_argument("--weights", default="auto", help="a resnet50 state dict (torchvision's "
                        "resnet50-11ad3fa6.pth); default: torchvision's cache, else EfficientNet-Lite0 from pip")
    parser.add_argument("--backbones", action="store_true", help="also a table of this project's recipe with "
                        f"each pip backbone ({', '.join(PIP_BACKBONES)})")
    parser.add_argument("--loop-epochs", type=int, default=EPOCHS, help="epochs of the original's loop, rows 2 "
                        "on (default: the original's %(default)s)")
    args = parser.parse_args()
    started = time.perf_counter()
    if not (args.data / "Training_data").is_dir() or not (args.data / "Testing_Data").is_dir():
        print(f"error: {args.data} does not hold Training_data/ and Testing_Data/. This benchmark needs the "
              f"original project's data set: the folders Training_data/ and Testing_Data/ of its public "
              f"repository (AjNavneet/CNN-MultiClass-Classification-PyTorch, folder Input/Data); pass their "
              f"parent folder with --data.", file=sys.stderr)
        sys.exit(2)
    logging.getLogger("MLPipeline").setLevel(logging.ERROR)  # train()'s per-file duplicate warnings, 4 times over

    classes, splits, decode_seconds = load_data(args.data)
    with contextlib.redirect_stdout(sys.stderr):  # torch.hub's "Downloading: ..." line, not part of the table
        backbone = choose_backbone(args.weights)
    provenance = fresh_model(classes, backbone)[1]
    print(f"Data: {args.data}: {len(splits['train'].images)} training, {len(splits['test'].images)} test images "
          f"({splits['test'].is_copy.sum()} of them byte-identical copies of a training image), {IMG_SIZE} px; "
          f"decoded once in {decode_seconds:.0f} s for rows 2 on.")
    instead = "" if backbone[0] == "resnet50" else (" (ResNet50's ImageNet weights are not here: pass --weights "
                                                    "or put them in torchvision's cache)")
    print(f"Backbone: {describe(provenance)}{instead}. Torch {torch.__version__}, {torch.get_num_threads()} CPU "
          f"threads (load average {os.getloadavg()[0]:.1f}), seed {SEED}, batches of {BATCH_SIZE}, Adam {LR:g} on the "
          f"head; row 1 {EPOCHS} epochs, the original's loop (rows 2 on) {args.loop_epochs}"
          f"{'' if args.loop_epochs == EPOCHS else f' (--loop-epochs; the original trained {EPOCHS})'}.\n")
    columns = f"test accuracy ({len(splits['test'].images)}) | deduplicated (count) | wall time | backbone, weights |"
    print(f"| row | {columns}\n|---|---|---|---|---|")

    def print_row(row: str, accuracy: str, seconds: str, used: str) -> None:
        print(f"| {row} | {accuracy} | {seconds} | {used} |", flush=True)

    with tempfile.TemporaryDirectory() as scratch:
        accuracy, seconds, used = project_recipe_row(args.data, *backbone, Path(scratch))
        print_row("this project's recipe: MLPipeline.train() (BN in eval mode, features once)", accuracy,
                  f"{seconds:.0f} s", used)
        loop_rows(classes, splits, backbone, print_row, args.loop_epochs)
        if args.backbones:
            print("\nThis project's recipe (MLPipeline.train(), defaults) with each pip backbone, "
                  "--weights imagenet:\n")
            print(f"| backbone | {columns}\n|---|---|---|---|---|")
            for backbone in PIP_BACKBONES:
                accuracy, seconds, used = project_recipe_row(args.data, backbone, "imagenet", Path(scratch))
                print_row(backbone, accuracy, f"{seconds:.0f} s", used)
    print(f"\nTotal {time.perf_counter() - started:.0f} s; load average {os.getloadavg()[1]:.1f} over the last 5 "
          f"minutes on {os.cpu_count()} CPUs (other processes slow every row alike).")


if __name__ == "__main__":
    main()
