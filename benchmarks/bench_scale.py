"""Memory and speed as datasets grow; the feature cache's second run; augmentation. All side by side, one run.

    python benchmarks/bench_scale.py                          # 1k, 5k, 20k images; ResNet50 at 64 px
    python benchmarks/bench_scale.py --sizes 500 2000 --skip-cache --skip-augment   # a quick look

Prints, measured in this one run:
  scale:    peak resident memory and images/s of feature extraction at each dataset size, the previous
            path (decode every image into memory, then run the backbone in NCHW batches of 64) against the
            streaming one (chunks through the backbone as they decode, channels_last batches of the CPU's
            size, the feature cache saved as a training run saves it); each measurement is a fresh process.
            Both in PyTorch: a run that picks ONNX Runtime exports the backbone first, and that one-off
            peak (hundreds of MB) would hide the growth being measured. ResNet50's 2,048 features per
            image are the default backbone's at any image size; 64 px keeps the run short. The images are the demo set's photos, hard-linked under new names to reach each size
            (decoding a link costs what decoding a copy does);
  cache:    `python engine.py` twice on the 750 demo images (ResNet50 at 200 px), the second with only
            --lr changed: the time in decoding and features, and end to end;
  augment:  --augment on the demo images at 200 px, for each backbone of --augment-backbones (by default
            EfficientNet-Lite0, what `python engine.py --augment` trains where torchvision's ResNet50
            weights cannot be downloaded, and ResNet50): the previous loop (torchvision transforms image by
            image in the training loop, PyTorch NCHW, the test split through the whole network every
            epoch) against this project's (one batched warp in DataLoader workers, the frozen backbone in
            the faster of PyTorch and ONNX Runtime, held-out features once), and the floor: the backbone's
            forward pass alone, in that runtime, on what any augmenting loop must run through it.
Backbones run from random init (--weights none): speed does not depend on the weights' values.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from MLPipeline.CreateDataset import list_images, load_images, one_hot, to_model_input  # noqa: E402
from MLPipeline.Export import FrozenBackbone  # noqa: E402
from MLPipeline.FeatureCache import FeatureCache, backbone_fingerprint, extract_features  # noqa: E402
from MLPipeline.ResNet_Model import build_model, forward_in_batches, prepare_model  # noqa: E402
from MLPipeline.SyntheticData import make_demo_data  # noqa: E402
from MLPipeline.Train import TrainConfig, train  # noqa: E402


def linked_dataset(demo: Path, size: int, folder: Path) -> Path:
    """`size` files in the demo's class folders, hard links to the demo photos in turn."""
    photos = list_images(demo)
    for number in range(size):
        photo = photos[number % len(photos)]
        target = folder / photo.parent.name / f"{number:06d}{photo.suffix}"
        target.parent.mkdir(parents=True, exist_ok=True)
        os.link(photo, target)
    return folder


def previous_forward(network, images: np.ndarray, batch_size: int) -> torch.Tensor:
    """The inference loop this project had before: NCHW float batches (this CPU's oneDNN is faster on
    channels_last, which the project now uses)."""
    with torch.inference_mode():
        return torch.cat([network(to_model_input(torch.from_numpy(images[start:start + batch_size])).contiguous())
                          for start in range(0, len(images), batch_size)])


def measure_features(path_kind: str, folder: str, backbone: str, img_size: int) -> dict:
    """In this (fresh) process: features of every image the given way; seconds and peak memory."""
    model = build_model(3, backbone, "none")[0].eval()
    if path_kind == "streaming":
        model = prepare_model(model, torch.device("cpu"))
    paths, device = [str(path) for path in list_images(Path(folder))], torch.device("cpu")
    start = time.perf_counter()
    if path_kind == "in-memory":
        images, _ = load_images(paths, img_size)
        features = previous_forward(model.features, images, 64)
    else:  # as a training run does it: with the feature cache, saved at the end
        cache = FeatureCache(Path(tempfile.mkdtemp()), backbone_fingerprint(model, backbone, img_size))
        features = extract_features(model, paths, img_size, device, None, cache)[0]
        cache.update(paths, list(range(len(paths))), features)
        cache.save()
        shutil.rmtree(cache.path.parent)
    return {"seconds": time.perf_counter() - start, "images": len(paths),
            "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "features_mb": features.numel() * 4 / 2**20}


def scale_table(demo: Path, scratch: Path, sizes: list[int], backbone: str, img_size: int) -> None:
    print(f"\nscale: feature extraction, {backbone} at {img_size} px, {torch.get_num_threads()} threads")
    print(f"{'images':>8} {'previous MB':>12} {'streaming MB':>13} {'previous img/s':>15} {'streaming img/s':>16} "
          f"{'features MB':>12}")
    rows = {}
    for size in sizes:
        folder = linked_dataset(demo, size, scratch / f"linked_{size}")
        for kind in ("in-memory", "streaming"):
            result = subprocess.run([sys.executable, __file__, "--measure", kind, str(folder), "--backbone", backbone,
                                     "--img-size", str(img_size)], capture_output=True, text=True, check=True)
            rows[size, kind] = json.loads(result.stdout.strip().splitlines()[-1])
        before, after = rows[size, "in-memory"], rows[size, "streaming"]
        print(f"{size:>8} {before['peak_mb']:>12.0f} {after['peak_mb']:>13.0f} "
              f"{size / before['seconds']:>15.1f} {size / after['seconds']:>16.1f} {after['features_mb']:>12.1f}",
              flush=True)
    first, last = rows[sizes[0], "streaming"], rows[sizes[-1], "streaming"]
    growth, allowed = last["peak_mb"] - first["peak_mb"], 1.1 * (last["features_mb"] - first["features_mb"])
    print(f"streaming peak memory {sizes[0]} -> {sizes[-1]} images: +{growth:.0f} MB; the features themselves "
          f"+{last['features_mb'] - first['features_mb']:.0f} MB (target: growth <= features + 10% = {allowed:.0f} MB)")


def engine_run(demo: Path, output_dir: Path, *flags: str) -> tuple[float, dict]:
    start = time.perf_counter()
    subprocess.run([sys.executable, str(ROOT / "engine.py"), "--data-dir", str(demo), "--output-dir",
                    str(output_dir), "--backbone", "resnet50", "--weights", "none", *flags],
                   capture_output=True, text=True, check=True)
    return time.perf_counter() - start, json.loads((output_dir / "metrics.json").read_text())


def cache_table(demo: Path, scratch: Path) -> None:
    print("\ncache: python engine.py --backbone resnet50 --weights none, twice on the same output folder")
    first_wall, first = engine_run(demo, scratch / "cached_run")
    second_wall, second = engine_run(demo, scratch / "cached_run", "--lr", "1e-4")
    data_first, data_second = first["timings_s"]["data_s"], second["timings_s"]["data_s"]
    print(f"{'run':<26} {'decode + features s':>20} {'end to end s':>13} {'test acc':>9}")
    print(f"{'first':<26} {data_first:>20.2f} {first_wall:>13.1f} {100 * first['test_accuracy']:>8.2f}%")
    print(f"{'second (--lr 1e-4)':<26} {data_second:>20.2f} {second_wall:>13.1f} "
          f"{100 * second['test_accuracy']:>8.2f}%")
    print(f"decode + features {data_first / max(data_second, 1e-3):.0f}x less time (target >= 50x); "
          f"end to end {first_wall / second_wall:.1f}x faster (target >= 4x)")


def previous_augment_run(demo: Path, epochs: int, img_size: int, arch: str) -> float:
    """The loop this project had before: torchvision v2 transforms image by image in the main thread, and
    the test split through the whole network (batches of 8) every epoch. Returns its seconds."""
    from torchvision.transforms import v2
    transform = v2.Compose([v2.RandomResizedCrop(img_size, scale=(0.75, 1.0), ratio=(0.85, 1.18)),
                            v2.RandomRotation(8), v2.RandomPerspective(0.15, p=0.5),
                            v2.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3)])
    start = time.perf_counter()
    paths = [str(path) for path in list_images(demo)]
    labels = torch.tensor([["driving_license", "others", "social_security"].index(Path(p).parent.name)
                           for p in paths])
    images, _ = load_images(paths, img_size)
    test = np.arange(len(paths)) % 5 == 0
    train_images, train_labels = torch.from_numpy(images[~test]), labels[torch.from_numpy(~test)]
    torch.manual_seed(0)
    model = build_model(3, arch, "none")[0]
    optimizer = torch.optim.Adam(model.head.parameters(), 1e-3)
    for _ in range(epochs):
        model.train()
        for batch in torch.randperm(len(train_labels)).split(8):
            augmented = torch.stack([transform(image.permute(2, 0, 1)) for image in train_images[batch]])
            logits = model(to_model_input(augmented.permute(0, 2, 3, 1)))
            loss = F.cross_entropy(logits, one_hot(train_labels[batch], 3))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        previous_forward(model, images[test], 8)
    return time.perf_counter() - start


def augment_table(demo: Path, scratch: Path, epochs: int, backbones: list[str]) -> None:
    print(f"\naugment: --augment --weights none at 200 px, {epochs} epoch(s), 750 demo images")
    print(f"{'backbone':<20} {'previous loop s':>16} {'this project s':>15} {'faster':>7}   {'runtime':<12} "
          f"{'floor s':>8}")
    for arch in backbones:
        previous_s = previous_augment_run(demo, epochs, 200, arch)
        start = time.perf_counter()
        run = train(TrainConfig(data_dir=demo, output_dir=scratch / f"augmented_{arch}", backbone=arch,
                                weights="none", augment=True, epochs=epochs, device="cpu"))
        current_s = time.perf_counter() - start
        floor_s = backbone_floor(demo, epochs, arch)
        print(f"{arch:<20} {previous_s:>16.1f} {current_s:>15.1f} {previous_s / current_s:>6.1f}x   "
              f"{run.metrics['backbone_runtime']:<12} {floor_s:>8.1f}", flush=True)
    print(f"target: --augment >= 2x faster. floor: the backbone's forward pass alone, in the runtime the run "
          f"picked, on the 600 training images x {epochs} epoch(s) and the 150 test images once")


def backbone_floor(demo: Path, epochs: int, arch: str) -> float:
    """Seconds of the backbone's forward pass alone (no gradients; the runtime a run would pick) for what any
    augmenting loop must run through it; timed on 96 of the demo images."""
    model = prepare_model(build_model(3, arch, "none")[0].eval(), torch.device("cpu"))
    network = FrozenBackbone(model, torch.device("cpu"), "auto", images=600 * epochs + 150)
    images, _ = load_images([str(path) for path in list_images(demo)[:96]], 200)
    forward_in_batches(network, images[:8], torch.device("cpu"))  # picks the runtime, and warms it up
    start = time.perf_counter()
    forward_in_batches(network, images, torch.device("cpu"))
    return (600 * epochs + 150) * (time.perf_counter() - start) / len(images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000, 20000])
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--augment-epochs", type=int, default=2)
    parser.add_argument("--augment-backbones", nargs="+", default=["efficientnet_lite0", "resnet50"])
    parser.add_argument("--skip-cache", action="store_true")
    parser.add_argument("--skip-augment", action="store_true")
    parser.add_argument("--measure", nargs=2, metavar=("KIND", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure_features(*args.measure, args.backbone, args.img_size)))
        return
    with tempfile.TemporaryDirectory() as scratch:
        demo = Path(scratch) / "demo"
        make_demo_data(demo)
        print(f"demo data: 750 images; torch {torch.__version__}, {os.cpu_count()} CPUs")
        scale_table(demo, Path(scratch), args.sizes, args.backbone, args.img_size)
        if not args.skip_cache:
            cache_table(demo, Path(scratch))
        if not args.skip_augment:
            augment_table(demo, Path(scratch), args.augment_epochs, args.augment_backbones)


if __name__ == "__main__":
    main()
