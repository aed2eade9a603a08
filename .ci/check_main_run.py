"""Check what the README's main command (`python engine.py`) left behind, for .ci/run.

A good default run, on the demo data it generates, leaves a model.pt that loads with the project's own
loader and a metrics.json that records a pretrained backbone, the default recipe's 10 epochs, 600 training
and 150 test images with none skipped, and a test accuracy far above chance; every output was written
after the run started (none is left from an earlier run); and its log has no traceback. Prints one
summary line; on failure, one `.ci/run: main run failed: <reason>` line and exit status 1.

    python .ci/check_main_run.py --log LOG --output-dir output --started EPOCH_SECONDS [--wall-s SECONDS]
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file from .ci/: the project is one up
from MLPipeline.CreateDataset import UserError  # noqa: E402
from MLPipeline import load_model

# Guessing one of the 3 balanced demo classes scores 33%, and so does a frozen random-init backbone
# (README, Results). ImageNet features should tell the demo documents apart easily; 0.8 leaves room for
# noise while no guessing or random-feature run comes near it.
MIN_TEST_ACCURACY = 0.8
EPOCHS = 10  # the original's recipe, the default
IMAGES = {"train": 600, "test": 150}  # the demo data: 250 per class, split 80/20
OUTPUTS = ("model.pt", "metrics.json", "history.csv", "split.csv", "loss_curve.png", "confusion_matrix.png")


class CheckFailed(Exception):
    """What is wrong with the run, in one line."""


def read_text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError as error:
        raise CheckFailed(f"cannot read {path}: {error.strerror}") from None


def check(log: Path, output_dir: Path, started: float) -> str:
    """The summary of a good run; raises CheckFailed naming the first thing wrong."""
    if "Traceback" in read_text(log):
        raise CheckFailed(f"the log holds a Traceback (see {log})")
    for name in OUTPUTS:
        if not (output_dir / name).is_file():
            raise CheckFailed(f"{output_dir / name} was not written")
        if (output_dir / name).stat().st_mtime < started:
            raise CheckFailed(f"{output_dir / name} is older than the run: left from an earlier one")
    try:
        model = load_model(output_dir / "model.pt", device="cpu")
    except UserError as error:
        raise CheckFailed(f"model.pt does not load: {error}") from None
    try:
        metrics = json.loads(read_text(output_dir / "metrics.json"))
    except ValueError as error:
        raise CheckFailed(f"{output_dir / 'metrics.json'} is not valid JSON: {error}") from None
    arch = metrics.get("arch")  # the backbone actually used: offline, the Lite0 fallback
    weights, accuracy = metrics.get("weights_source"), metrics["test_accuracy"]
    if not arch or not weights or model.info.get("arch") != arch:
        raise CheckFailed(f"the backbone is not recorded in metrics.json and model.pt alike ({arch}, {weights})")
    if len(metrics["history"]) != EPOCHS or metrics["config"]["epochs"] != EPOCHS:
        raise CheckFailed(f"the run trained {len(metrics['history'])} epochs, not the default {EPOCHS}")
    counts = {split: sum(per_split.get(split, 0) for per_split in metrics["dataset"]["counts"].values())
              for split in IMAGES}
    if counts != IMAGES:
        raise CheckFailed(f"the run used {counts} images, not the demo data's {IMAGES}")
    if metrics["dataset"]["skipped_count"]:
        raise CheckFailed(f"the run skipped {metrics['dataset']['skipped_count']} file(s): "
                          f"{', '.join(list(metrics['dataset']['skipped'])[:3])}")
    if metrics.get("pretrained") is not True:
        raise CheckFailed(f"backbone {arch} is not pretrained (weights: {weights}); the default run must "
                          f"train on ImageNet features")
    if accuracy < MIN_TEST_ACCURACY:
        raise CheckFailed(f"test accuracy {100 * accuracy:.2f}% is below {100 * MIN_TEST_ACCURACY:.0f}% "
                          f"({len(model.classes)} classes, chance {100 / len(model.classes):.2f}%)")
    return f"backbone {arch}, weights {weights}, pretrained True, test accuracy {100 * accuracy:.2f}%"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--log", type=Path, required=True, help="the main command's combined output")
    parser.add_argument("--output-dir", type=Path, default=Path("output"), help="the run's output folder")
    parser.add_argument("--started", type=float, required=True, help="when the run started (seconds since 1970)")
    parser.add_argument("--wall-s", type=int, help="the main command's wall time, for the summary")
    args = parser.parse_args()
    try:
        summary = check(args.log, args.output_dir, args.started)
    except CheckFailed as error:
        print(f".ci/run: main run failed: {error}", file=sys.stderr)
        return 1
    wall = "" if args.wall_s is None else f", wall {args.wall_s} s"
    print(f"main run ok: {summary}{wall}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
