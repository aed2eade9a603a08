"""Images unlike the training images: what the unfamiliar-input review catches, in-source and cross-source.

    python benchmarks/bench_familiarity.py --original PATH --demo PATH [--work DIR] [--reuse]
                                           [--train-args=ARGS]

PATH: the original project's data (Training_data/ + Testing_Data/) and the demo documents (Data/ after
`python engine.py make-demo-data`). Trains a model on each (`python engine.py --data-dir PATH --val-size
0.2`, or --train-args='' for the default run; kept in DIR; --reuse keeps the models already there), then runs
`python engine.py predict ... --min-confidence 0.9 --csv FILE` on each model's own test split (in-source)
and on all the other source's images (cross-source), and reads three ways of deciding from each CSV:
today's (--no-review --min-confidence 0.9: confidence alone), the default (review on, no --min-confidence:
unfamiliar images to review) and both (review on, --min-confidence 0.9). Then noise and smooth random
pictures, made here, through each model (a foreign set), and the score's costs: seconds to fit and to score,
bytes in model.pt (and for ResNet50's 2048 features). Not a test: it reads data outside the repository.
"""
from __future__ import annotations

import argparse
import io
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from MLPipeline.extras import Familiarity  # noqa: E402
from MLPipeline.extras.Data import load_images  # noqa: E402
from MLPipeline.extras.Predict import load_model, predict  # noqa: E402

MIN_CONFIDENCE = 0.9


def engine(arguments: list[str]) -> str:
    """`python engine.py ARGUMENTS`, printed first; its stdout. Stops the benchmark if it fails."""
    print("$ python engine.py " + " ".join(arguments if len(arguments) < 12 else [*arguments[:3], "...",
                                                                                  *arguments[-6:]]), flush=True)
    result = subprocess.run([sys.executable, str(ROOT / "engine.py"), *arguments], cwd=ROOT, capture_output=True,
                            text=True)
    if result.returncode != 0:
        sys.exit(f"failed (exit {result.returncode}): {result.stderr.strip()[-2000:]}")
    return result.stdout


def decided_by(table: pd.DataFrame) -> dict[str, np.ndarray]:
    """Which rows each way of deciding keeps, read from one CSV of predict --min-confidence 0.9."""
    return {f"--no-review --min-confidence {MIN_CONFIDENCE:g} (today)": (table.confidence >= MIN_CONFIDENCE).to_numpy(),
            "default (review on)": ~table.reason.fillna("").str.contains(Familiarity.UNFAMILIAR).to_numpy(),
            f"default --min-confidence {MIN_CONFIDENCE:g}": (table.reason.fillna("") == "").to_numpy()}


def rows_of(case: str, table: pd.DataFrame) -> list[dict]:
    """One row per way of deciding: images, accuracy of all, decided, right and wrong among them."""
    truth = table.input.map(lambda path: Path(path).parent.name)
    correct = (table.label == truth).to_numpy()
    return [{"case": case, "deciding": how, "images": len(table), "accuracy_all": correct.mean(),
             "decided": int(kept.sum()), "coverage": kept.mean(), "right": int((kept & correct).sum()),
             "wrong": int((kept & ~correct).sum()), "accuracy_decided": correct[kept].mean() if kept.any() else np.nan}
            for how, kept in decided_by(table).items()]


def foreign_images(count: int, size: int, seed: int = 0) -> dict[str, list[np.ndarray]]:
    """Pictures no document source gives: uniform noise, and smooth random colour fields with a few shapes."""
    rng = np.random.default_rng(seed)
    noise = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(count)]
    smooth = []
    for _ in range(count):
        field = cv2.resize(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8), (size, size), interpolation=cv2.INTER_CUBIC)
        for _ in range(3):
            centre, radius = tuple(int(v) for v in rng.integers(0, size, 2)), int(rng.integers(size // 10, size // 3))
            cv2.circle(field, centre, radius, tuple(int(v) for v in rng.integers(0, 256, 3)), -1)
        smooth.append(field)
    return {"uniform noise": noise, "smooth colour fields with discs": smooth}


def costs(model_path: Path, features: torch.Tensor, labels: torch.Tensor) -> dict:
    """Seconds to fit the score (as the default run does) and to score the images; model.pt's bytes with and
    without it; the bytes it would take for ResNet50's 2048 features."""
    checkpoint = torch.load(model_path, weights_only=True)
    started = time.perf_counter()
    score = Familiarity.fit(features, labels, len(checkpoint["classes"]))
    fit_s = time.perf_counter() - started
    started = time.perf_counter()
    Familiarity.distances(score, features)
    score_s = time.perf_counter() - started

    def size(value) -> int:
        buffer = io.BytesIO()
        torch.save(value, buffer)
        return buffer.tell()
    without = {key: value for key, value in checkpoint.items() if key != "unfamiliar_score"}
    resnet50 = Familiarity.fit(torch.rand(len(labels), 2048), labels, len(checkpoint["classes"]))
    return {"fit_s": fit_s, "score_s_per_1000": 1000 * score_s / len(features), "images": len(features),
            "model_pt_bytes": size(checkpoint), "score_bytes": size(checkpoint) - size(without),
            "resnet50_score_bytes": size(resnet50), "width": features.shape[1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--original", type=Path, required=True, help="the original's Training_data/ + Testing_Data/")
    parser.add_argument("--demo", type=Path, required=True, help="the demo documents (make-demo-data)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_familiarity"), help="models and CSVs go here")
    parser.add_argument("--reuse", action="store_true", help="keep the models already trained in --work")
    parser.add_argument("--train-args", default="--val-size 0.2", help="training flags (default: %(default)s; "
                        "'' for the default run, whose threshold comes from out-of-fold training images)")
    args = parser.parse_args()
    sources = {"original": args.original.resolve(), "demo": args.demo.resolve()}
    rows, foreign, cost = [], [], {}
    for name, data in sources.items():
        model_dir = args.work / f"model_{name}"
        if not (args.reuse and (model_dir / "model.pt").exists()):
            engine(["--data-dir", str(data), *args.train_args.split(), "--output-dir", str(model_dir)])
        split = pd.read_csv(model_dir / "split.csv", keep_default_na=False)
        model = str(model_dir / "model.pt")
        other = next(path for key, path in sources.items() if key != name)
        for case, paths in ((f"{name} -> its own test split", split.path[(split.split == "test")
                                                                          & (split.skipped == "")].tolist()),
                            (f"{name} -> {next(key for key in sources if key != name)}", [str(other)])):
            csv = args.work / f"{case.replace(' ', '_').replace('>', '')}.csv"
            engine(["predict", *paths, "--model", model, "--min-confidence", str(MIN_CONFIDENCE), "--csv", str(csv)])
            rows += rows_of(case, pd.read_csv(csv, keep_default_na=False, na_values={"confidence": [""]}))
        loaded = load_model(model, "cpu")
        for kind, images in foreign_images(50, loaded.img_size).items():
            table = predict(loaded, images)
            foreign.append({"model": name, "images": f"{len(images)} {kind}", "unfamiliar": int(
                table.reason.str.contains(Familiarity.UNFAMILIAR).sum()), "highest confidence": table.confidence.max()})
        train = split[(split.split == "train") & (split.skipped == "")]
        images, skipped = load_images(train.path.tolist(), loaded.img_size)
        outputs = loaded.outputs(images)
        labels = torch.tensor(train.label[~train.path.isin(list(skipped))].map(loaded.classes.index).to_numpy())
        cost[name] = costs(Path(model), outputs[:, len(loaded.classes):], labels)
        cost[name]["backbone"] = f"{loaded.info['arch']} ({loaded.info['weights_source']})"
    pd.set_option("display.width", 200)
    print("\nDecisions (predict --min-confidence 0.9 --csv, read three ways):")
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda value: f"{value:.3f}"))
    print("\nA foreign set, made on the fly (predict on arrays, review on):")
    print(pd.DataFrame(foreign).to_string(index=False, float_format=lambda value: f"{value:.3f}"))
    print("\nCosts (this machine):")
    print(pd.DataFrame(cost).T.to_string())


if __name__ == "__main__":
    main()
