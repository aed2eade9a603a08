"""How well the fitted temperature calibrates, on test images the model has not seen in any copy.

    python benchmarks/calibration_original_data.py --data PATH   # PATH: a pre-split folder (train/ + test/, ...)

Trains `python engine.py --data-dir PATH --val-size 0.2 --dedupe` (the temperature is fitted on the
validation split; --dedupe skips the held-out files that are byte-identical copies of a training file, in
validation and test alike), then scores the test part without those copies (symlinks in a temporary
folder/<class>/) twice with `python engine.py evaluate`: with the fitted temperature, and with a copy of
model.pt whose temperature is 1 (the uncalibrated softmax). Prints each command and its output.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from MLPipeline.extras.Data import build_index  # noqa: E402


def deduplicated_test_folder(data: Path, folder: Path) -> int:
    """Symlinks in folder/<class>/ to the test files that are no copy of a training file; returns how many."""
    logging.disable(logging.WARNING)  # build_index names every copy it skips
    index = build_index(data, dedupe=True)
    logging.disable(logging.NOTSET)
    test = index[(index.split == "test") & (index.skipped == "")]
    for path, label in zip(test.path, test.label):
        (folder / label).mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.abspath(path), folder / label / Path(path).name)
    return len(test)


def engine(arguments: list[str], shown: str) -> None:
    """Run `python engine.py ARGUMENTS`, print the command as `shown` and its output; stop if it fails."""
    print(f"$ python engine.py {shown}", flush=True)
    result = subprocess.run([sys.executable, str(ROOT / "engine.py"), *arguments], cwd=ROOT, capture_output=True,
                            text=True)
    print(result.stdout.rstrip() + "\n", flush=True)
    if result.returncode != 0:
        sys.exit(f"failed (exit {result.returncode}): {result.stderr.strip()[-2000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="a pre-split folder (its test part is scored)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        count = deduplicated_test_folder(args.data, scratch / "test")
        print(f"Test images of {args.data} that are no byte-identical copy of a training image: {count}\n")
        run = scratch / "run"
        engine(["--data-dir", str(args.data), "--val-size", "0.2", "--dedupe", "--output-dir", str(run)],
               f"--data-dir {args.data} --val-size 0.2 --dedupe --output-dir RUN")
        metrics = json.loads((run / "metrics.json").read_text())
        counts = metrics["dataset"]["counts"].values()
        used = {split: sum(count.get(split, 0) for count in counts) for split in ("train", "val", "test")}
        print(f"(the training run: {used['train']} train, {used['val']} validation, {used['test']} test images; "
              f"fitted temperature {metrics['temperature']:.4g}; test accuracy {100 * metrics['test_accuracy']:.2f}%)\n")
        engine(["evaluate", str(scratch / "test"), "--model", str(run / "model.pt"), "--output-dir",
                str(scratch / "eval-fitted")], "evaluate TEST_DEDUPLICATED --model RUN/model.pt")
        # The same weights with temperature 1: what the probabilities would be without calibration.
        checkpoint = torch.load(run / "model.pt", weights_only=True)
        checkpoint["temperature"] = 1.0
        torch.save(checkpoint, scratch / "model-t1.pt")
        engine(["evaluate", str(scratch / "test"), "--model", str(scratch / "model-t1.pt"), "--output-dir",
                str(scratch / "eval-t1")], "evaluate TEST_DEDUPLICATED --model MODEL_WITH_TEMPERATURE_1.pt")


if __name__ == "__main__":
    main()
