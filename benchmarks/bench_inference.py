"""Side-by-side inference speed of one model: PyTorch eager (model.pt) against ONNX Runtime (model.onnx).

    python benchmarks/bench_inference.py                   # ResNet50 at 200 px, 66 demo images
    python benchmarks/bench_inference.py --threads 1       # both runtimes on one thread

Prints images/s of predict() with each runtime, at batch 1 and batch 64, measured in this one run:
  decode excluded: logits of images already decoded and resized (the network alone);
  decode included: predict() on the image files (decode, resize, network, probabilities).
The backbone is randomly initialised (--weights none): weights do not change how fast a network runs, and
nothing is downloaded. Each measurement runs PyTorch then ONNX Runtime, back to back, after one warm-up batch,
and keeps the fastest of --repeats passes.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from MLPipeline.extras.Files import list_images  # noqa: E402
from MLPipeline.extras.Data import load_images
from MLPipeline.extras.Export import export_model  # noqa: E402
from MLPipeline.extras.Predict import load_model, predict  # noqa: E402
from MLPipeline.extras.Weights import BACKBONES  # noqa: E402
from MLPipeline.extras.Weights import build_model
from MLPipeline.ResNet_Model import checkpoint_dict, save_checkpoint
from MLPipeline.extras.SyntheticData import make_demo_data  # noqa: E402


def images_per_second(model, images: np.ndarray, paths: list[str], batch_size: int, decode: bool,
                      repeats: int) -> float:
    """predict()'s speed with decoding (from the files) or without it (logits of the decoded images); the best
    of `repeats` passes, as timeit does: on a shared machine the slower passes measure the neighbours."""
    model.logits(images[:batch_size], batch_size)  # warm-up: first-call allocations and tuning
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        if decode:
            predict(model, paths, batch_size)
        else:
            model.logits(images, batch_size)
        best = min(best, time.perf_counter() - start)
    return len(paths) / best


def save_untrained_model(path: Path, classes: list[str], backbone: str, img_size: int) -> None:
    """A checkpoint as training writes it, with random weights: what is measured is speed, not accuracy."""
    model, provenance = build_model(len(classes), backbone, weights="none")
    save_checkpoint(path, checkpoint_dict(model, classes, img_size, provenance))


def onnx_session(path: Path, threads: int) -> onnxruntime.InferenceSession:
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads  # 0: ONNX Runtime's default, one thread per physical core
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-class", type=int, default=22, help="demo images per class (3 classes)")
    parser.add_argument("--img-size", type=int, default=200)
    parser.add_argument("--backbone", default="resnet50", choices=BACKBONES)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--repeats", type=int, default=3, help="passes per measurement; the fastest counts")
    parser.add_argument("--threads", type=int, default=0, help="threads of each runtime (default: each one's own)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")

    with tempfile.TemporaryDirectory() as scratch:
        data_dir, model_path = Path(scratch) / "demo", Path(scratch) / "model.pt"
        counts = make_demo_data(data_dir, args.per_class, seed=0)
        paths = [str(path) for path in list_images(data_dir)]
        save_untrained_model(model_path, sorted(counts), args.backbone, args.img_size)
        onnx_path = export_model(model_path, "onnx")
        if args.threads:
            torch.set_num_threads(args.threads)
        models = {"PyTorch": load_model(model_path, "cpu"),
                  "ONNX Runtime": dataclasses.replace(load_model(onnx_path, "cpu"),
                                                      session=onnx_session(onnx_path, args.threads))}
        images = load_images(paths, args.img_size)[0]
        print(f"{len(paths)} demo images, {args.backbone} (random init) at {args.img_size} px; CPU: torch "
              f"{torch.__version__} on {torch.get_num_threads()} threads, ONNX Runtime {onnxruntime.__version__} on "
              f"{args.threads or 'its default number of'} threads")

        logits = {name: model.logits(images) for name, model in models.items()}
        difference = (logits["PyTorch"] - logits["ONNX Runtime"]).abs().max().item()
        same = np.array_equal(*(logit.argmax(1).numpy() for logit in logits.values()))
        print(f"largest logit difference {difference:.2g}; same predicted classes: {same}\n")

        print(f"{'batch':>5}  {'decode':9} {'PyTorch':>10} {'ONNX Runtime':>13}  {'ratio':>6}   (images/s)")
        for batch_size in args.batch_sizes:
            for decode in (False, True):
                speeds = {name: images_per_second(model, images, paths, batch_size, decode, args.repeats)
                          for name, model in models.items()}
                print(f"{batch_size:5}  {'included' if decode else 'excluded':9} {speeds['PyTorch']:10.1f} "
                      f"{speeds['ONNX Runtime']:13.1f}  {speeds['ONNX Runtime'] / speeds['PyTorch']:5.2f}x")


if __name__ == "__main__":
    main()
