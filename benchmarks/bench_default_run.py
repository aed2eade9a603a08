"""The default run against a plain script of the original's loop, and its memory as the folder grows.

    python benchmarks/bench_default_run.py                  # 750 demo images: speed, side by side
    python benchmarks/bench_default_run.py --per-class 40   # a quick look (the ratio grows with the images)
    python benchmarks/bench_default_run.py --memory         # peak memory on 1,500 and 15,000 images

speed: `python engine.py --weights none` (ResNet50, random init, so that nothing but the code differs) and
the original's loop written plainly (every image decoded into memory, the whole ResNet50 forward on every
batch of 8 in every one of the 10 epochs, Adam on fc), each in a fresh process on the same images, timed
from start to exit; prints both and their ratio.
memory: `python engine.py` (ResNet18 at 96 px, random init, one epoch) on 1,500 demo images and on 15,000
(each file hard-linked ten times), peak resident memory of each (/usr/bin/time -f %M); prints the growth
against the features' own size (13,500 rows of 512 floats) x 1.1 + 64 MB.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENGINE = ROOT / "engine.py"


def plain_loop(data_dir: Path, epochs: int = 10, batch_size: int = 8, img_size: int = 200) -> None:
    """The original's training as a plain script: no feature cache, no streaming, nothing of this project."""
    import cv2
    import numpy as np
    import torch
    import torchvision

    torch.manual_seed(0)
    classes = sorted(path.name for path in data_dir.iterdir() if path.is_dir())
    images, labels = [], []
    for number, name in enumerate(classes):
        for path in sorted((data_dir / name).iterdir()):
            image = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
            images.append(cv2.resize(image, (img_size, img_size), interpolation=cv2.INTER_AREA))
            labels.append(number)
    inputs = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div(255)
    targets = torch.nn.functional.one_hot(torch.tensor(labels), len(classes)).float()
    test = torch.randperm(len(inputs))[:len(inputs) // 5]
    train = torch.ones(len(inputs), dtype=torch.bool)
    train[test] = False
    model = torchvision.models.resnet50(weights=None)
    model.requires_grad_(False)
    model.fc = torch.nn.Linear(model.fc.in_features, len(classes))
    optimizer = torch.optim.Adam(model.fc.parameters(), lr=1e-3)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(inputs[train], targets[train]),
                                         batch_size, shuffle=True)
    for epoch in range(epochs):
        model.train()
        for batch, batch_targets in loader:
            loss = torch.nn.functional.cross_entropy(model(batch), batch_targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():  # the test images in batches of 8, as the original's test loader
            predicted = torch.cat([model(batch).argmax(1) for batch in inputs[test].split(batch_size)])
        accuracy = (predicted == targets[test].argmax(1)).float().mean().item()
        print(f"epoch {epoch + 1}/{epochs}  loss {loss.item():.4f}  test accuracy {100 * accuracy:.2f}%", flush=True)


def timed_run(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def peak_memory_mb(command: list[str]) -> float:
    """The command's peak resident memory, as /usr/bin/time -f %M reports it (kilobytes)."""
    report = subprocess.run(["/usr/bin/time", "-f", "%M", *command], cwd=ROOT, check=True, capture_output=True,
                            text=True).stderr.strip().splitlines()[-1]
    return int(report) / 1024


def make_demo(folder: Path, per_class: int) -> Path:
    subprocess.run([sys.executable, str(ENGINE), "make-demo-data", "--out", str(folder), "--per-class",
                    str(per_class)], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return folder


def speed(per_class: int) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        data = make_demo(Path(scratch) / "data", per_class)
        count = sum(1 for _ in data.rglob("*.*") if _.parent != data)
        import torch
        print(f"{count} demo images, 10 epochs at 200 px, ResNet50 random init; torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
        ours = timed_run([sys.executable, str(ENGINE), "--weights", "none", "--data-dir", str(data),
                          "--output-dir", str(Path(scratch) / "output")])
        print(f"  python engine.py --weights none   {ours:7.1f} s", flush=True)
        plain = timed_run([sys.executable, __file__, "--plain-loop", str(data)])
        print(f"  the original's loop, plainly      {plain:7.1f} s")
        print(f"  ratio {plain / ours:.1f}x")


def memory() -> None:
    with tempfile.TemporaryDirectory() as scratch:
        small = make_demo(Path(scratch) / "small", 500)
        large = Path(scratch) / "large"
        for path in small.rglob("*.*"):
            if path.parent == small:
                continue
            for copy in range(10):
                target = large / path.parent.name / f"{copy}-{path.name}"
                target.parent.mkdir(parents=True, exist_ok=True)
                os.link(path, target)
        settings = ["--weights", "none", "--backbone", "resnet18", "--img-size", "96", "--epochs", "1"]
        peaks = {}
        for name, data in (("1,500", small), ("15,000", large)):
            peaks[name] = peak_memory_mb([sys.executable, str(ENGINE), "--data-dir", str(data), "--output-dir",
                                          str(Path(scratch) / f"out-{len(peaks)}"), *settings])
            print(f"  {name:>6} images: peak {peaks[name]:7.1f} MB", flush=True)
        features_mb = 13_500 * 512 * 4 / 2**20
        growth, bound = peaks["15,000"] - peaks["1,500"], features_mb * 1.1 + 64
        print(f"  growth {growth:.1f} MB for 13,500 more images; their features {features_mb:.1f} MB; bound "
              f"{bound:.1f} MB (features x 1.1 + 64 MB): {'within' if growth <= bound else 'OVER'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-class", type=int, default=250, help="demo images per class (default: 250)")
    parser.add_argument("--memory", action="store_true", help="measure peak memory instead of speed")
    parser.add_argument("--plain-loop", type=Path, help=argparse.SUPPRESS)  # the timed subprocess
    args = parser.parse_args()
    if args.plain_loop:
        plain_loop(args.plain_loop)
    elif args.memory:
        memory()
    else:
        speed(args.per_class)


if __name__ == "__main__":
    main()
