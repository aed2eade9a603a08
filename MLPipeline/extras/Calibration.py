"""How far the model's confidence can be trusted: temperature scaling, calibration error, the reliability plot,
coverage at confidence thresholds and the risk-coverage plot, and class weights for unbalanced training sets.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure  # a bare Figure needs no GUI backend and no global pyplot state

from MLPipeline.CreateDataset import UserError, log
from MLPipeline.extras.Checkpoint import TEMPERATURE_RANGE  # beyond it, held-out logits are degenerate, not mis-scaled
from MLPipeline.extras.Report import save_figure

MIN_CALIBRATION_IMAGES = 10  # fewer held-out images say too little about the confidence to fit it
THRESHOLDS = (0.5, 0.7, 0.8, 0.9, 0.95, 0.99)
REVIEW = "review"  # the decision of an image sent to review (unfamiliar, or below --min-confidence)


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float | None:
    """The T > 0 minimising the cross-entropy of softmax(logits / T) on held-out logits; None, with a warning
    saying why, when they cannot calibrate: fewer than MIN_CALIBRATION_IMAGES, no mistake among them (the
    loss then falls all the way to T = 0: every probability would be sharpened to certainty), or a T at the
    edge of TEMPERATURE_RANGE. The model then stays uncalibrated (T = 1).

    A golden-section search over log T: the loss is convex in 1/T, hence unimodal in log T, so the search
    needs no starting point or step size and gives the same T every time. The loss is computed in NumPy
    (float64), on the CPU: for the search's many small evaluations PyTorch's thread pool costs more than the sums.
    """
    logits = logits.detach().cpu().double().numpy()
    rows, labels = np.arange(len(logits)), labels.detach().cpu().numpy()
    if len(labels) < MIN_CALIBRATION_IMAGES:
        return not_calibrated(f"the validation split has {len(labels)} image(s), too few to fit a temperature "
                              f"on (at least {MIN_CALIBRATION_IMAGES})")
    if (logits.argmax(1) == labels).all():
        return not_calibrated(f"the model gets all {len(labels)} validation images right, so nothing there says "
                              f"how far its confidence can be trusted")

    def loss(log_t: float) -> float:
        scaled = logits / math.exp(log_t)
        top = scaled.max(1)
        log_sum = top + np.log(np.exp(scaled - top[:, None]).sum(1))  # log-sum-exp, safe from overflow
        return float((log_sum - scaled[rows, labels]).mean())

    low, high = (math.log(bound) for bound in TEMPERATURE_RANGE)
    ratio = (math.sqrt(5) - 1) / 2
    left, right = high - ratio * (high - low), low + ratio * (high - low)
    left_loss, right_loss = loss(left), loss(right)
    for _ in range(60):  # the bracket shrinks 0.618x a step: 60 steps narrow log T to under 1e-11
        if left_loss <= right_loss:
            high, right, right_loss = right, left, left_loss
            left = high - ratio * (high - low)
            left_loss = loss(left)
        else:
            low, left, left_loss = left, right, right_loss
            right = low + ratio * (high - low)
            right_loss = loss(right)
    temperature = math.exp((low + high) / 2)
    if not TEMPERATURE_RANGE[0] * 1.01 < temperature < TEMPERATURE_RANGE[1] / 1.01:
        return not_calibrated(f"the best temperature lies at the edge of its range {TEMPERATURE_RANGE} "
                              f"({temperature:.3g}): the validation logits are degenerate, not mis-scaled")
    return temperature


def not_calibrated(why: str) -> None:
    log.warning("warning: the probabilities are left uncalibrated (temperature 1): %s; a larger --val-size "
                "gives temperature scaling more to fit", why)


def calibrated_probabilities(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """softmax(logits / T): what predict reports once training has stored a temperature."""
    return (logits.float() / temperature).softmax(-1)


def reliability_bins(probabilities: np.ndarray, labels: np.ndarray, bins: int = 15) -> pd.DataFrame:
    """Top-1 confidence in `bins` equal-width bins (lower, upper]: count, mean confidence and accuracy of each
    (NaN in an empty bin)."""
    probabilities, labels = np.asarray(probabilities, dtype=np.float64), np.asarray(labels)
    confidence, correct = probabilities.max(1), probabilities.argmax(1) == labels
    which = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    count = np.bincount(which, minlength=bins)
    with np.errstate(invalid="ignore"):  # 0 / 0 in an empty bin: NaN, as it should be
        mean_confidence = np.bincount(which, confidence, minlength=bins) / count
        accuracy = np.bincount(which, correct, minlength=bins) / count
    edges = np.linspace(0, 1, bins + 1)
    return pd.DataFrame({"lower": edges[:-1], "upper": edges[1:], "count": count,
                         "mean_confidence": mean_confidence, "accuracy": accuracy})


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """ECE: the count-weighted mean of |accuracy - mean confidence| over equal-width top-1 confidence bins."""
    table = reliability_bins(probabilities, labels, bins)
    filled = table[table["count"] > 0]
    gaps = (filled.accuracy - filled.mean_confidence).abs()
    return float((gaps * filled["count"]).sum() / filled["count"].sum())


def plot_reliability(bins_table: pd.DataFrame, ece: float, path: Path, title: str) -> None:
    """calibration.png: accuracy against confidence per bin, the diagonal a calibrated model would follow,
    and the number of images in each bin."""
    figure = Figure(figsize=(5.5, 6))
    reliability, counts = figure.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    centres, width = (bins_table.lower + bins_table.upper) / 2, bins_table.upper - bins_table.lower
    filled = bins_table["count"] > 0
    reliability.bar(centres[filled], bins_table.accuracy[filled], width=width[filled], edgecolor="black",
                    color="tab:blue", alpha=0.7, label="accuracy")
    reliability.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    reliability.plot(bins_table.mean_confidence[filled], bins_table.accuracy[filled], "o", color="tab:red",
                     markersize=4, label="mean confidence of the bin")
    for centre, accuracy, count in zip(centres[filled], bins_table.accuracy[filled], bins_table["count"][filled]):
        reliability.text(centre, min(accuracy, 0.93) + 0.02, str(count), ha="center", fontsize=7)
    reliability.set(xlim=(0, 1), ylim=(0, 1.05), ylabel="accuracy",
                    title=f"{title}\nexpected calibration error {100 * ece:.2f}%")
    reliability.title.set_fontsize(9)
    reliability.legend(loc="upper left", fontsize=8)
    counts.bar(centres, bins_table["count"], width=width, edgecolor="black", color="tab:grey")
    counts.set(xlabel="confidence (top probability)", ylabel="images")
    save_figure(figure, path)


def risk_coverage(confidence: np.ndarray, correct: np.ndarray, kept: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A confidence threshold lowered over the `kept` images, one at a time: the share of all images decided
    (coverage) and the share of those decided that are wrong (risk) at each step."""
    order = np.argsort(-confidence[kept], kind="stable")
    decided = np.arange(1, len(order) + 1)
    return decided / len(confidence), np.cumsum(~correct[kept][order]) / decided


def plot_risk_coverage(confidence: np.ndarray, correct: np.ndarray, familiar: np.ndarray | None,
                       decided: np.ndarray | None, path: Path, title: str) -> None:
    """risk_coverage.png: risk against coverage for confidence alone, for confidence once the unfamiliar images
    are sent to review, and the point of the decisions made."""
    figure = Figure(figsize=(5.5, 4.2))
    axes = figure.subplots()
    axes.plot(*risk_coverage(confidence, correct, np.ones(len(confidence), dtype=bool)), label="confidence alone")
    if familiar is not None and not familiar.all():
        axes.plot(*risk_coverage(confidence, correct, familiar), label="confidence, unfamiliar images to review")
    if decided is not None:
        risk = 1 - correct[decided].mean() if decided.any() else 0.0
        axes.plot(decided.mean(), risk, "o", color="tab:red",
                  label=f"the decisions: {100 * decided.mean():.1f}% decided, {100 * risk:.1f}% of them wrong")
    axes.set(xlim=(0, 1.02), ylim=(0, None), xlabel="coverage (share of the images decided)",
             ylabel="risk (share of the decided that are wrong)", title=title)
    axes.title.set_fontsize(9)
    axes.legend(fontsize=8)
    save_figure(figure, path)


def to_review(confidence: np.ndarray, min_confidence: float | None) -> np.ndarray:
    """Which top probabilities go to review: below min_confidence, or all of them when it is 1 (float32 rounds
    probabilities just under 1 up to 1, and 'at least 1.0' would otherwise keep those)."""
    confidence = np.asarray(confidence)
    if min_confidence is None:
        return np.zeros(confidence.shape, dtype=bool)
    return (confidence < min_confidence) | (min_confidence >= 1)


def coverage_table(probabilities: np.ndarray, labels: np.ndarray,
                   thresholds: tuple[float, ...] = THRESHOLDS) -> pd.DataFrame:
    """For each threshold, the images a --min-confidence of it would keep: count, share, and their accuracy
    (NaN when it keeps none)."""
    probabilities, labels = np.asarray(probabilities), np.asarray(labels)
    confidence, correct = probabilities.max(1), probabilities.argmax(1) == labels
    rows = []
    for threshold in thresholds:
        kept = ~to_review(confidence, threshold)
        rows.append({"threshold": threshold, "kept": int(kept.sum()), "kept_share": float(kept.mean()),
                     "accuracy_on_kept": float(correct[kept].mean()) if kept.any() else math.nan})
    return pd.DataFrame(rows)


def coverage_lines(table: pd.DataFrame, images: int) -> list[str]:
    """The console line of each coverage_table() row; `images`: how many the table was made from."""
    return [f"confidence >= {row.threshold:g}: {row.kept}/{images} images kept ({100 * row.kept_share:.1f}%), "
            + (f"accuracy {100 * row.accuracy_on_kept:.2f}% on them" if row.kept else "none to score")
            for row in table.itertuples()]


def balanced_class_weights(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Cross-entropy weights n / (C * n_c), sklearn's "balanced": each class weighs the same in the loss.

    When every class has training images they average 1 over them, so the loss keeps its scale. A class with
    none gets weight 0: it is never a target, and inf * 0 would make the loss NaN.
    """
    counts = torch.bincount(labels.long().cpu(), minlength=num_classes).double()
    weights = torch.where(counts > 0, len(labels) / (num_classes * counts.clamp(min=1)), torch.zeros(()))
    return weights.float().to(labels.device)


def check_probability(value: float, flag: str) -> float:
    """A threshold given on the command line must be a number in [0, 1] (NaN fails the comparison too)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not 0 <= number <= 1:
        raise UserError(f"{flag} must be a probability between 0 and 1, got {value}")
    return number
