"""Side-by-side speed of the choices the data path makes, each measured against its alternative in one run.

    python benchmarks/bench_speed.py                   # the demo set, 40 images per class, 200 px
    python benchmarks/bench_speed.py --per-class 250   # the full 750-image demo set

Prints, for the same images:
  cache:    a first training run (decode + features) against a second one with another --lr (features
            read from output/cache/);
  features: the frozen backbone's feature extraction in PyTorch against ONNX Runtime (--backbone-runtime);
  decode:   image files decoded in the main process (--workers 0) against 2 DataLoader worker processes;
  augment:  the batched augmenter (one grid_sample and one colour map per batch) against torchvision's
            transforms v2 applied image by image, on batches of 8 at 200 px.
"""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from MLPipeline.extras.Augment import make_augmenter  # noqa: E402
from MLPipeline.CreateDataset import image_batches  # noqa: E402
from MLPipeline.extras.Files import list_images
from MLPipeline.extras.OnnxBackbone import FrozenBackbone  # noqa: E402
from MLPipeline.extras.Weights import build_model
from MLPipeline.ResNet_Model import fast_bf16, forward_batches  # noqa: E402
from MLPipeline.extras.SyntheticData import make_demo_data  # noqa: E402
from MLPipeline.extras.Run import RunConfig as TrainConfig  # noqa: E402
from MLPipeline.extras.Run import train

CPU = torch.device("cpu")


def timed(function, *args, **kwargs):
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - start


def cache_rows(data: Path, img_size: int, backbone: str) -> None:
    output = Path(tempfile.mkdtemp())
    settings = dict(data_dir=data, output_dir=output, img_size=img_size, backbone=backbone, weights="imagenet",
                    cache_dir=output / "cache")
    first = train(TrainConfig(**settings))
    second = train(TrainConfig(**settings, lr=1e-4))
    first_s, second_s = first.metrics["timings_s"]["data_s"], second.metrics["timings_s"]["data_s"]
    print(f"cache: {backbone} at {img_size} px, python engine.py --cache-dir twice on the same output folder")
    print(f"  first run   decode + features {first_s:7.2f} s   total {first.metrics['timings_s']['total_s']:6.1f} s")
    print(f"  second run  decode + features {second_s:7.2f} s   total {second.metrics['timings_s']['total_s']:6.1f} s"
          f"   ({first_s / max(second_s, 1e-3):.0f}x less for decode + features)")


def files_through(network, paths: list[str], img_size: int, device: torch.device, batch_size: int, workers: int = 0,
                  bf16: bool = False):
    """network's outputs for the files, decoded by `workers` processes: a training run's feature extraction."""
    return forward_batches(network, image_batches(paths, img_size, batch_size, workers), device, bf16)


def feature_rows(paths: list[str], img_size: int, backbone: str) -> None:
    model = build_model(3, backbone, "imagenet")[0].eval().to(CPU, memory_format=torch.channels_last)
    runtimes = {"pytorch": (model.features, False), "onnxruntime": (FrozenBackbone(model, CPU, "onnxruntime"), False)}
    if fast_bf16(CPU):
        runtimes["pytorch bf16"] = (model.features, True)
    speeds = {}
    for name, (network, bf16) in runtimes.items():
        files_through(network, paths[:16], img_size, CPU, 8, bf16=bf16)  # warm-up (ONNX Runtime: the export)
        (features, *_), seconds = timed(files_through, network, paths, img_size, CPU, 8, workers=2, bf16=bf16)
        speeds[name] = len(paths) / seconds
    print(f"features: {backbone} at {img_size} px, {len(paths)} images, batches of 8, 2 decode workers")
    print(f"  PyTorch {speeds['pytorch']:.1f} images/s, ONNX Runtime {speeds['onnxruntime']:.1f} images/s "
          f"({speeds['onnxruntime'] / speeds['pytorch']:.2f}x)" + (
              f", PyTorch bf16 {speeds['pytorch bf16']:.1f} ({speeds['pytorch bf16'] / speeds['pytorch']:.2f}x)"
              if "pytorch bf16" in speeds else ""))


def decode_rows(paths: list[str], img_size: int) -> None:
    nothing = lambda inputs: inputs.new_zeros(len(inputs), 0)  # noqa: E731 - decode only
    speeds = {}
    for workers in (0, 2):
        files_through(nothing, paths[:16], img_size, CPU, 8, workers)
        _, seconds = timed(files_through, nothing, paths, img_size, CPU, 8, workers)
        speeds[workers] = len(paths) / seconds
    print(f"decode: {len(paths)} files to {img_size} px: main process {speeds[0]:.1f} images/s, 2 worker "
          f"processes {speeds[2]:.1f} images/s ({speeds[2] / speeds[0]:.2f}x)")


def augment_rows(img_size: int, repeats: int = 20) -> None:
    from torchvision.transforms import v2
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker
    images = torch.rand(8, 3, img_size, img_size)
    batched = make_augmenter(img_size)
    per_image = v2.Compose([v2.RandomResizedCrop(img_size, scale=(0.75, 1.0), ratio=(0.85, 1.18), antialias=True),
                            v2.RandomRotation(8), v2.RandomPerspective(0.15, p=0.5),
                            v2.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3)])
    times = {}
    for name, augment in (("batched", lambda: batched(images)), ("v2", lambda: [per_image(im) for im in images])):
        augment()
        _, seconds = timed(lambda: [augment() for _ in range(repeats)])
        times[name] = 1000 * seconds / repeats
    print(f"augment: 8 images at {img_size} px on 1 thread: batched {times['batched']:.1f} ms, torchvision v2 image "
          f"by image {times['v2']:.1f} ms ({times['v2'] / times['batched']:.1f}x)")
    torch.set_num_threads(threads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=40)
    parser.add_argument("--img-size", type=int, default=200)
    parser.add_argument("--backbone", default="efficientnet_lite0", help="a backbone whose weights are here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    data = Path(tempfile.mkdtemp()) / "demo"
    make_demo_data(data, per_class=args.per_class)
    paths = [str(path) for path in list_images(data)]
    print(f"{len(paths)} demo images; torch {torch.__version__}, {torch.get_num_threads()} threads")
    cache_rows(data, args.img_size, args.backbone)
    feature_rows(paths, args.img_size, args.backbone)
    decode_rows(paths, args.img_size)
    augment_rows(args.img_size)


if __name__ == "__main__":
    main()
