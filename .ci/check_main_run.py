"""Check what the README's main command (`python engine.py`) left behind, for .ci/run.

A good default run leaves a model.pt that loads with the project's own loader, a metrics.json that
records a pretrained backbone and a test accuracy far above chance, and a log without a traceback.
Prints one summary line; on failure, one `.ci/run: main run failed: <reason>` line and exit status 1.

    python .ci/check_main_run.py --log LOG --output-dir output [--wall-s SECONDS]
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file from .ci/: the project is one up
from MLPipeline import UserError, load_model  # noqa: E402

# Guessing one of the 3 balanced demo classes scores 33%, and so does a frozen random-init backbone
# (README, Results). ImageNet features should tell the demo documents apart easily; 0.8 leaves room for
# noise while no guessing or random-feature run comes near it.
MIN_TEST_ACCURACY = 0.8


class CheckFailed(Exception):
    """What is wrong with the run, in one line."""


def read_text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError as error:
        raise CheckFailed(f"cannot read {path}: {error.strerror}") from None


def check(log: Path, output_dir: Path) -> str:
    """The summary of a good run; raises CheckFailed naming the first thing wrong."""
    if "Traceback" in read_text(log):
        raise CheckFailed(f"the log holds a Traceback (see {log})")
    try:
        model = load_model(output_dir / "model.pt", device="cpu")
    except UserError as error:
        raise CheckFailed(f"model.pt does not load: {error}") from None
    try:
        metrics = json.loads(read_text(output_dir / "metrics.json"))
    except ValueError as error:
        raise CheckFailed(f"{output_dir / 'metrics.json'} is not valid JSON: {error}") from None
    arch = metrics.get("arch", "(not recorded)")  # the backbone actually used: offline, the Lite0 fallback
    weights, accuracy = metrics.get("weights_source"), metrics["test_accuracy"]
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
    parser.add_argument("--wall-s", type=int, help="the main command's wall time, for the summary")
    args = parser.parse_args()
    try:
        summary = check(args.log, args.output_dir)
    except CheckFailed as error:
        print(f".ci/run: main run failed: {error}", file=sys.stderr)
        return 1
    wall = "" if args.wall_s is None else f", wall {args.wall_s} s"
    print(f"main run ok: {summary}{wall}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
