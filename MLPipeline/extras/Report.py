"""Metrics files and plots (pandas + matplotlib); every file is written atomically.

CSV cells a spreadsheet would run as a formula (starting with = + - @, a tab or a carriage return) get a
leading apostrophe, OWASP's convention for CSV injection. JSON is strict: NaN and infinities become null.
A plot that cannot be drawn is a warning: it never costs the model.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure  # a bare Figure needs no GUI backend and no global pyplot state

from MLPipeline.Train import confusion_matrix, loss_and_accuracy  # noqa: F401 (re-exported)
from MLPipeline.CreateDataset import first_line, log
from MLPipeline.ResNet_Model import atomic_write

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
MAX_MATRIX_CLASSES = 40  # beyond this a confusion-matrix figure is unreadable: metrics.json has the numbers


def classification_report(true_labels: np.ndarray, predicted: np.ndarray, classes: list[str]) -> dict:
    """Accuracy, confusion matrix (rows = true, columns = predicted) and per-class precision/recall/F1."""
    confusion = confusion_matrix(true_labels, predicted, len(classes))
    hits = np.diag(confusion)
    predicted_counts, true_counts = confusion.sum(0), confusion.sum(1)
    precision = np.divide(hits, predicted_counts, out=np.zeros(len(classes)), where=predicted_counts > 0)
    recall = np.divide(hits, true_counts, out=np.zeros(len(classes)), where=true_counts > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(len(classes)),
                   where=precision + recall > 0)
    per_class = [{"class": name, "precision": float(p), "recall": float(r), "f1": float(f), "support": int(n)}
                 for name, p, r, f, n in zip(classes, precision, recall, f1, true_counts)]
    return {"accuracy": float(hits.sum() / max(confusion.sum(), 1)), "classes": list(classes),
            "confusion_matrix": confusion.tolist(), "per_class": per_class}


def strict_json(value):
    """`value` with every non-finite float replaced by None (JSON has no NaN)."""
    if isinstance(value, dict):
        return {key: strict_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(item) for item in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


def write_json(path: Path, data: dict) -> None:
    text = json.dumps(strict_json(data), indent=2, allow_nan=False) + "\n"
    with atomic_write(path) as temp_name:
        Path(temp_name).write_text(text, errors="surrogateescape")


def neutralised(cell):
    """A text cell that a spreadsheet would take for a formula, with a leading apostrophe."""
    return "'" + cell if isinstance(cell, str) and cell.startswith(FORMULA_STARTS) else cell


def write_csv(path: Path, table: pd.DataFrame) -> None:
    """A CSV file in UTF-8, formula-like cells neutralised; a file name that is not valid UTF-8 is written byte
    for byte, as the disk has it (read it back with encoding_errors="surrogateescape")."""
    table = table.map(neutralised).rename(columns=neutralised)
    with atomic_write(path) as temp_name:
        table.to_csv(temp_name, index=False, errors="surrogateescape")


def printable(text: str) -> str:
    """A name as matplotlib can draw it: bytes that are not UTF-8 shown as the replacement character."""
    return str(text).encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def draw(plot, *args) -> None:
    """plot(*args), and a warning instead of an exception when it fails: a plot never costs the outputs."""
    try:
        plot(*args)
    except Exception as error:  # matplotlib raises many kinds (memory, fonts, odd names)
        path = next((arg for arg in args if isinstance(arg, Path)), plot.__name__)
        log.warning("warning: could not draw %s (%s: %s)", path, type(error).__name__, first_line(error))


def plot_training(metrics: dict, output_dir: Path) -> None:
    """loss_curve.png and confusion_matrix.png of a training run."""
    draw(plot_loss_curve, pd.DataFrame(metrics["history"]), backbone_title(metrics), output_dir / "loss_curve.png")
    draw(plot_confusion_matrix, np.array(metrics["confusion_matrix"]), metrics["classes"],
         output_dir / "confusion_matrix.png")


def save_figure(figure: Figure, path: Path) -> None:
    with atomic_write(path) as temp_name:
        figure.savefig(temp_name, format="png", dpi=110, bbox_inches="tight")


def backbone_title(info: dict) -> str:
    """'resnet50, pretrained: <source>' or '..., NOT pretrained (random init)', from a checkpoint or metrics."""
    return (f"{info['arch']}, " + (f"pretrained: {info['weights_source']}" if info["pretrained"]
                                   else "NOT pretrained (random init)"))


def plot_loss_curve(history: pd.DataFrame, title: str, path: Path) -> None:
    figure = Figure(figsize=(9, 3.6))
    loss_axes, accuracy_axes = figure.subplots(1, 2)
    loss_axes.plot(history.epoch, history.train_loss, marker="o", label="train")
    loss_axes.plot(history.epoch, history.test_loss, marker="o", label="test")
    loss_axes.set(xlabel="epoch", ylabel="cross-entropy loss", title="Loss")
    loss_axes.legend()
    accuracy_axes.plot(history.epoch, 100 * history.test_accuracy, marker="o", color="tab:green")
    accuracy_axes.set(xlabel="epoch", ylabel="test accuracy (%)", title="Test accuracy")
    figure.suptitle(title, fontsize=9)
    save_figure(figure, path)


def plot_confusion_matrix(confusion: np.ndarray, classes: list[str], path: Path) -> None:
    if len(classes) > MAX_MATRIX_CLASSES:
        log.info("confusion_matrix.png not drawn for %d classes (unreadable over %d): the matrix is in "
                 "metrics.json", len(classes), MAX_MATRIX_CLASSES)
        return
    classes = [printable(name) for name in classes]
    figure = Figure(figsize=(1.4 * len(classes) + 2.5, 1.2 * len(classes) + 2))
    axes = figure.subplots()
    axes.imshow(confusion, cmap="Blues")
    axes.set(xticks=range(len(classes)), yticks=range(len(classes)), xlabel="predicted", ylabel="true",
             title=f"Confusion matrix ({confusion.sum()} images)")
    axes.set_xticklabels(classes, rotation=30, ha="right")
    axes.set_yticklabels(classes)
    for (row, column), count in np.ndenumerate(confusion):
        axes.text(column, row, str(count), ha="center", va="center",
                  color="white" if count > confusion.max() / 2 else "black")
    save_figure(figure, path)


def plot_misclassified(images: np.ndarray, titles: list[str], path: Path, columns: int = 6) -> None:
    """A grid of the given images, each titled 'true -> predicted'."""
    rows = max(1, -(-len(images) // columns))
    figure = Figure(figsize=(2.2 * columns, 2.7 * rows))
    for position, axes in enumerate(figure.subplots(rows, columns, squeeze=False).flat):
        axes.axis("off")
        if position < len(images):
            axes.imshow(images[position])
            axes.set_title(printable(titles[position]), fontsize=7)
    if not len(images):
        figure.suptitle("no misclassified images")
    save_figure(figure, path)


def write_evaluation(output_dir: Path, report: dict, predictions: pd.DataFrame, misclassified: np.ndarray) -> None:
    """metrics.json, per_class.csv, confusion_matrix.csv/.png, predictions.csv and misclassified.png.

    misclassified: the images of the first misclassified rows of `predictions`, in order.
    """
    write_json(output_dir / "metrics.json", report)
    write_csv(output_dir / "per_class.csv", pd.DataFrame(report["per_class"]))
    confusion = np.array(report["confusion_matrix"])
    write_csv(output_dir / "confusion_matrix.csv",
              pd.DataFrame(confusion, index=report["classes"], columns=report["classes"])
              .rename_axis("true \\ predicted").reset_index())
    draw(plot_confusion_matrix, confusion, report["classes"], output_dir / "confusion_matrix.png")
    write_csv(output_dir / "predictions.csv", predictions)
    wrong = np.flatnonzero((predictions.label != predictions.predicted).to_numpy())[:len(misclassified)]
    draw(plot_misclassified, misclassified, [f"{predictions.label[i]}\n-> {predictions.predicted[i]}\n"
                                             f"{Path(predictions.path[i]).name[:24]}" for i in wrong],
         output_dir / "misclassified.png")
