"""The original recipe against each of its suggested improvements, on the same data, seed and split.

    python benchmarks/compare_improvements.py            # every row, on Data/ (the demo set if it is empty)
    python benchmarks/compare_improvements.py --quick    # 1 epoch, 64 px: checks every row runs
    python benchmarks/compare_improvements.py --rows 1 6 # the original recipe and augmentation only

Each row runs `python engine.py FLAGS` as printed in its command column, plus `--cache-dir` naming one
folder for all rows: the frozen rows after the first find their features there (the feature cache at
work), the others compute what they need. It reads the metrics.json each run writes; wall time is the
whole command's, start-up and decoding included.
Prints a Markdown table for the README.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Offline, `--weights auto` gives every torchvision backbone's row the same pip-installed EfficientNet-Lite0
# (the backbone column says which one ran), so --all adds the other backbones only where their weights exist.
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
)
OTHER_BACKBONES = tuple((name, ["--backbone", name]) for name in
                        ("resnet18", "resnet101", "vgg16", "efficientnet_b0", "convnext_tiny"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 epoch at 64 px: a smoke test of every row")
    parser.add_argument("--all", action="store_true", help="also the other torchvision backbones (worth it where "
                        "their ImageNet weights can be had)")
    parser.add_argument("--rows", type=int, nargs="+", help="only these rows, numbered from 1 in table order")
    args = parser.parse_args()
    quick_flags = ["--epochs", "1", "--img-size", "64"] if args.quick else []
    print("| change | command | test accuracy | wall time | backbone used | weights |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as scratch:
        for number, (change, flags) in enumerate(ROWS + (OTHER_BACKBONES if args.all else ()), start=1):
            if args.rows and number not in args.rows:
                continue
            output_dir = Path(scratch) / str(number)
            start = time.perf_counter()
            result = subprocess.run([sys.executable, str(ROOT / "engine.py"), *flags, *quick_flags,
                                     "--output-dir", str(output_dir), "--cache-dir", str(Path(scratch) / "cache")],
                                    cwd=ROOT, capture_output=True, text=True)
            seconds = time.perf_counter() - start
            command = " ".join(["python engine.py", *flags, *quick_flags])
            if result.returncode != 0:
                print(f"| {change} | `{command}` | failed (exit {result.returncode}): "
                      f"{(result.stderr.strip().splitlines() or [''])[-1]} | | | |")
                continue
            metrics = json.loads((output_dir / "metrics.json").read_text())
            weights = "ImageNet" if metrics["pretrained"] else "**random init**"
            print(f"| {change} | `{command}` | {100 * metrics['test_accuracy']:.2f}% | {seconds / 60:.1f} min | "
                  f"{metrics['arch']} | {weights} |", flush=True)


if __name__ == "__main__":
    main()
