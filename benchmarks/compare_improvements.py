"""The original recipe against each of its suggested improvements, on the same data, seed and split.

    python benchmarks/compare_improvements.py            # every row, on Data/ (the demo set if it is empty)
    python benchmarks/compare_improvements.py --quick    # 1 epoch, 64 px: checks every row runs
    python benchmarks/compare_improvements.py --rows 1 6 # the original recipe and augmentation only
    python benchmarks/compare_improvements.py --data PATH --rows 1 2 3 4 5 6 7 10 11 12 --row-epochs 7 3

Each row runs `python engine.py --data-dir DATA FLAGS` as printed in its command column, plus `--cache-dir`
naming one folder for all rows: the frozen rows after the first find their features there (the feature
cache at work), the others compute what they need. It reads the metrics.json each run writes; wall time is
the whole command's, start-up and decoding included. --row-epochs ROW N trains a row for N epochs instead,
for the rows that run the backbone on every batch (--augment, --unfreeze) where 10 would take too long;
the change and command columns show it.

With --cv-folds K (default 5; 0: none), the recipe and the frozen row of highest test accuracy are run again
with --folds K on the data's unique images: a temporary folder of symlinks, one per distinct file content
(the first met, training files first), so that no image is in two folds. Its mean ± std is that of the K
held-out folds' accuracies (std with ddof 1). Prints Markdown tables for the README.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from MLPipeline.extras.Data import build_index  # noqa: E402
from MLPipeline.extras.Files import file_digest  # noqa: E402

# Offline, `--weights auto` gives every torchvision backbone's row the same pip-installed EfficientNet-Lite0
# (the backbone column says which one ran), so --all adds the other backbones only where their weights exist.
# New rows go at the end: the README cites rows by number.
ROWS = (
    ("original recipe (frozen backbone, 10 epochs, Adam 1e-3)", []),
    ("train longer", ["--epochs", "30"]),
    ("lower learning rate", ["--lr", "1e-4"]),
    ("cosine learning-rate schedule", ["--schedule", "cosine"]),
    ("keep the best epoch on a validation split", ["--val-size", "0.1"]),
    ("augmentation", ["--augment"]),
    ("fine-tune the last stage too", ["--unfreeze", "last"]),
    ("contrast: frozen random-init backbone", ["--weights", "none"]),
    ("contrast: ResNet18 from scratch, every layer trained", ["--backbone", "resnet18", "--weights", "none",
                                                              "--unfreeze", "all"]),
    *((f"backbone {name}", ["--backbone", name, "--weights", "imagenet"])
      for name in ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")),
)
OTHER_BACKBONES = tuple((name, ["--backbone", name]) for name in
                        ("resnet18", "resnet101", "vgg16", "efficientnet_b0", "convnext_tiny"))


def reads_images_every_epoch(flags: list[str]) -> bool:
    """Rows whose backbone runs on every training batch: the slow ones, and the ones --folds refuses."""
    return "--augment" in flags or "--unfreeze" in flags


def run_engine(flags: list[str], output_dir: Path, cache_dir: Path) -> tuple[dict | str, float]:
    """`python engine.py FLAGS`: (its metrics.json, or the last line of its error output; seconds)."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, str(ROOT / "engine.py"), *flags, "--output-dir", str(output_dir),
                             "--cache-dir", str(cache_dir)], cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        return f"failed (exit {result.returncode}): {(result.stderr.strip().splitlines() or [''])[-1]}", seconds
    return json.loads((output_dir / "metrics.json").read_text()), seconds


def unique_images_folder(data: Path, folder: Path) -> int:
    """Symlinks in folder/<class>/ to one file of each distinct content under data (pre-split or not);
    returns how many. Names carry the split, as a training and a test file may share a name."""
    logging.disable(logging.WARNING)  # build_index names every copy it finds; the count is what matters here
    index = build_index(data)
    logging.disable(logging.NOTSET)
    index = index[index.skipped == ""].assign(digest=lambda rows: rows.path.map(file_digest))
    unique = index[index.digest != ""].drop_duplicates("digest")  # the training copy first: build_index's order
    for path, label, split in zip(unique.path, unique.label, unique.split):
        (folder / label).mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.abspath(path), folder / label / f"{split}_{Path(path).name}")
    return len(unique)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT / "Data", help="folder of class folders or a pre-split "
                        "pair (default: Data/; engine.py writes the demo set there when it is empty)")
    parser.add_argument("--quick", action="store_true", help="1 epoch at 64 px: a smoke test of every row")
    parser.add_argument("--all", action="store_true", help="also the other torchvision backbones (worth it where "
                        "their ImageNet weights can be had)")
    parser.add_argument("--rows", type=int, nargs="+", help="only these rows, numbered from 1 in table order")
    parser.add_argument("--row-epochs", type=int, nargs=2, action="append", default=[], metavar=("ROW", "N"),
                        help="train row ROW for N epochs instead (for the slow rows; repeatable)")
    parser.add_argument("--cv-folds", type=int, default=5, help="K of the cross-validation runs on the unique "
                                                                "images (default: %(default)s; 0: none)")
    args = parser.parse_args()
    quick_flags = ["--epochs", "1", "--img-size", "64"] if args.quick else []
    # engine.py's demo data goes only into its own default Data/, so that folder is passed only when asked for
    data_flags = [] if args.data == ROOT / "Data" else ["--data-dir", str(args.data)]
    measured = []  # (number, change, flags, metrics) of the rows that ran
    print("| # | change | command | test accuracy | wall time | backbone used | weights |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as scratch:
        cache_dir = Path(scratch) / "cache"
        for number, (change, flags) in enumerate(ROWS + (OTHER_BACKBONES if args.all else ()), start=1):
            if args.rows and number not in args.rows:
                continue
            epochs = dict(args.row_epochs).get(number)
            if epochs and not args.quick:
                change, flags = f"{change} ({epochs} epochs, for time)", flags + ["--epochs", str(epochs)]
            command = " ".join(["python engine.py", *data_flags, *flags, *quick_flags])
            metrics, seconds = run_engine(data_flags + flags + quick_flags, Path(scratch) / str(number), cache_dir)
            if isinstance(metrics, str):
                print(f"| {number} | {change} | `{command}` | {metrics} | | | |", flush=True)
                continue
            measured.append((number, change, flags, metrics))
            weights = "ImageNet" if metrics["pretrained"] else "**random init**"
            print(f"| {number} | {change} | `{command}` | {100 * metrics['test_accuracy']:.2f}% | "
                  f"{seconds / 60:.1f} min | {metrics['arch']} | {weights} |", flush=True)
        if args.cv_folds:
            cross_validation_table(args, measured, Path(scratch), cache_dir, quick_flags)


def cross_validation_table(args: argparse.Namespace, measured: list, scratch: Path, cache_dir: Path,
                           quick_flags: list[str]) -> None:
    """The --folds runs of the recipe (row 1) and of the best frozen row, on the unique images."""
    frozen = [row for row in measured if not reads_images_every_epoch(row[2])]
    if not frozen:
        return
    chosen = [row for row in frozen if row[0] == 1][:1]
    best = max(frozen, key=lambda row: row[3]["test_accuracy"])  # the first of equals: the recipe where it ties
    chosen += [best] if best not in chosen else []
    unique_dir = scratch / "unique"
    count = unique_images_folder(args.data, unique_dir)
    print(f"\n{args.cv_folds}-fold cross-validation on the {count} unique images of {args.data} (symlinks to "
          f"one copy of each distinct file; the folds are stratified and seeded):\n")
    print("| # | change | command | mean ± std accuracy | folds | wall time | backbone used |")
    print("|---|---|---|---|---|---|---|")
    for number, change, flags, _ in chosen:
        command_flags = ["--data-dir", str(unique_dir), "--folds", str(args.cv_folds), *flags, *quick_flags]
        metrics, seconds = run_engine(command_flags, scratch / f"folds-{number}", cache_dir)
        command = " ".join(["python engine.py", "--data-dir UNIQUE", *command_flags[2:]])
        if isinstance(metrics, str):
            print(f"| {number} | {change} | `{command}` | {metrics} | | | |", flush=True)
            continue
        folds = metrics["cross_validation"]
        accuracies = ", ".join(f"{100 * fold['accuracy']:.1f}" for fold in folds["folds"])
        print(f"| {number} | {change} | `{command}` | {100 * folds['mean_accuracy']:.2f}% ± "
              f"{100 * folds['std_accuracy']:.2f} | {accuracies} | {seconds / 60:.1f} min | {metrics['arch']} |",
              flush=True)


if __name__ == "__main__":
    main()
