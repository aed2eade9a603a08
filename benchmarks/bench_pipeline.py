"""Side-by-side speed of the original's training loop and this project's, on the same images and seed.

    python benchmarks/bench_pipeline.py                 # the 750-image demo set, 10 epochs, 200 px
    python benchmarks/bench_pipeline.py --per-class 20  # a quick look

Prints, measured in this one run:
  decode:   the original's way (full-size decode + resize, one image at a time) against load_images
            (reduced-scale JPEG decode, one thread per core), in images/s;
  training: the original's loop (the whole ResNet50 forward on every batch of 8, every epoch) against
            the frozen-feature cache, in wall time, images/s (epochs x images / wall time) and test accuracy.
"""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from MLPipeline.extras.Files import list_images, read_image  # noqa: E402
from MLPipeline.extras.Data import load_images
from MLPipeline.CreateDataset import resize
from MLPipeline.extras.SyntheticData import make_demo_data  # noqa: E402
from MLPipeline.extras.Common import pick_device  # noqa: E402
from MLPipeline.extras.Run import RunConfig as TrainConfig  # noqa: E402
from MLPipeline.extras.Run import train


def decode_original_way(paths: list[Path], img_size: int) -> np.ndarray:
    return np.stack([resize(read_image(path), img_size) for path in paths])


def timed(function, *args):
    start = time.perf_counter()
    result = function(*args)
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, help="images to use (default: generate the demo set)")
    parser.add_argument("--per-class", type=int, default=250, help="demo images per class when generating")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--img-size", type=int, default=200)
    parser.add_argument("--weights", default="auto")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")

    with tempfile.TemporaryDirectory() as scratch:
        data_dir = args.data_dir or Path(scratch) / "demo"
        if args.data_dir is None:
            make_demo_data(data_dir, args.per_class, seed=0)
        paths = list_images(data_dir)
        device = pick_device(args.device)
        print(f"{len(paths)} images in {data_dir}, {args.epochs} epochs at {args.img_size} px, device {device}, "
              f"torch {torch.__version__}, {torch.get_num_threads()} threads")

        original_images, original_s = timed(decode_original_way, paths, args.img_size)
        (project_images, _), project_s = timed(load_images, [str(p) for p in paths], args.img_size)
        difference = np.abs(original_images.astype(int) - project_images.astype(int)).mean()
        print(f"\ndecode   original {len(paths) / original_s:8.1f} images/s   project {len(paths) / project_s:8.1f} "
              f"images/s   ratio {original_s / project_s:.2f}x   (mean pixel difference {difference:.2f}/255)")

        rows = []
        for name, cache in (("original loop", False), ("feature cache", True)):
            config = TrainConfig(data_dir=data_dir, output_dir=Path(scratch) / name.replace(" ", "_"),
                                 epochs=args.epochs, img_size=args.img_size, weights=args.weights,
                                 device=args.device, feature_cache=cache)
            run, seconds = timed(train, config)
            rows.append((name, seconds, len(paths) * args.epochs / seconds, run.metrics["test_accuracy"],
                         run.metrics["pretrained"]))
        print(f"\n{'training':14} {'wall s':>8} {'images/s':>9} {'test acc':>9}  pretrained")
        for name, seconds, speed, accuracy, pretrained in rows:
            print(f"{name:14} {seconds:8.1f} {speed:9.1f} {100 * accuracy:8.2f}%  {pretrained}")
        print(f"speed-up (end to end, decode included): {rows[0][1] / rows[1][1]:.1f}x")


if __name__ == "__main__":
    main()
