"""K-fold cross-validation of the head on features computed once: every image is scored by a head that did not
train on it, so the accuracy comes with its spread over folds instead of resting on one test split.

The recipe hands its own epoch loop in (train_one_epoch), so the folds train exactly as the final model does
(same batches, optimiser, loss and epochs).
"""
from __future__ import annotations

import os
import zlib
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, TensorDataset

import MLPipeline.extras.Report as Report
from MLPipeline.extras.Calibration import balanced_class_weights
from MLPipeline.extras.Common import UserError, log
from MLPipeline.extras.Files import find_presplit

Head = Callable[[torch.Tensor], torch.Tensor]  # features -> logits


def check_fold_counts(labels: Sequence, k: int) -> None:
    """UserError, naming the class, when a class has fewer images than folds: every fold needs one of each.
    labels: a class name per image, so that the message names the user's folder."""
    if k < 2:
        raise UserError(f"--folds {k}: cross-validation needs at least 2 folds")
    names, counts = np.unique(np.asarray(labels), return_counts=True)
    for name, count in zip(names, counts):
        if count < k:
            raise UserError(f"class '{name}' has {count} images, fewer than --folds {k}: every fold needs one "
                            f"of each class; lower --folds or add images")


def stratified_folds(labels: np.ndarray, k: int, seed: int, classes: list[str] | None = None) -> list[np.ndarray]:
    """The positions of `labels` cut into k folds (each sorted), every position in exactly one.

    Each class's positions are shuffled by a generator of its own, seeded by (seed, label) as
    stratified_split does, then dealt round-robin, so each class has n_c // k or n_c // k + 1 images in every
    fold. The deal goes on where the previous class stopped, so the fold sizes differ by at most one as well.
    classes: the names of labels that are class indices, for the messages.
    """
    labels = np.asarray(labels)
    check_fold_counts([classes[label] for label in labels] if classes else labels, k)
    folds: list[list[int]] = [[] for _ in range(k)]
    next_fold = 0
    for label in np.unique(labels):
        positions = np.flatnonzero(labels == label)
        rng = np.random.default_rng([seed, zlib.crc32(os.fsencode(str(label)))])  # fsencode: any folder name
        for offset, position in enumerate(rng.permutation(positions)):
            folds[(next_fold + offset) % k].append(int(position))
        next_fold = (next_fold + len(positions)) % k
    return [np.array(sorted(fold), dtype=np.int64) for fold in folds]


def cross_validate(features: torch.Tensor, labels: torch.Tensor, classes: list[str], k: int, seed: int,
                   train_head: Callable[[torch.Tensor, torch.Tensor], Head]) -> dict:
    """Train k heads, each on all folds but one, and score the fold it left out.

    train_head(train_features, train_labels) returns a function from features to logits (e.g. the trained
    nn.Linear); it is called k times, and its heads are called under no_grad. The spread over folds is the
    sample standard deviation (ddof=1): the folds are a sample of the splits the data could have had.
    Returns k, classes, the per-fold rows, mean/std of accuracy and of each class's recall, the pooled
    confusion matrix and accuracy, and `out_of_fold_logits` (N x C, on the CPU; row i from the head that did
    not train on image i). json_ready() drops the logits for metrics.json.
    """
    label_array = labels.cpu().numpy()
    out_of_fold = torch.empty(len(labels), len(classes))
    rows = []
    for number, held_out in enumerate(stratified_folds(label_array, k, seed, classes), start=1):
        in_fold = np.zeros(len(labels), dtype=bool)
        in_fold[held_out] = True
        train_positions = torch.from_numpy(np.flatnonzero(~in_fold)).to(features.device)
        head = train_head(features[train_positions], labels[train_positions])
        with torch.no_grad():
            logits = head(features[torch.from_numpy(held_out).to(features.device)]).float().cpu()
        out_of_fold[held_out] = logits
        report = Report.classification_report(label_array[held_out], logits.argmax(1).numpy(), classes)
        rows.append({"fold": number, "images": len(held_out), "accuracy": report["accuracy"],
                     "recall": {row["class"]: row["recall"] for row in report["per_class"]}})
        log.info("fold %d/%d: %d images, accuracy %.2f%%", number, k, len(held_out), 100 * report["accuracy"])
    accuracies = np.array([row["accuracy"] for row in rows])
    recalls = {name: np.array([row["recall"][name] for row in rows]) for name in classes}
    pooled = Report.classification_report(label_array, out_of_fold.argmax(1).numpy(), classes)
    return {"k": k, "seed": seed, "classes": list(classes), "folds": rows,
            "mean_accuracy": float(accuracies.mean()), "std_accuracy": float(accuracies.std(ddof=1)),
            "min_accuracy": float(accuracies.min()), "max_accuracy": float(accuracies.max()),
            "recall_mean": {name: float(values.mean()) for name, values in recalls.items()},
            "recall_std": {name: float(values.std(ddof=1)) for name, values in recalls.items()},
            "pooled_accuracy": pooled["accuracy"], "confusion_matrix": pooled["confusion_matrix"],
            "out_of_fold_logits": out_of_fold}


def json_ready(result: dict) -> dict:
    """cross_validate()'s result without the logits tensor: the `cross_validation` entry of metrics.json."""
    return {key: value for key, value in result.items() if key != "out_of_fold_logits"}


def folds_table(result: dict) -> pd.DataFrame:
    """folds.csv: one row per fold (images, accuracy, recall_<class>), then a 'mean' and a 'std' row."""
    recall_columns = {name: f"recall_{name}" for name in result["classes"]}
    table = pd.DataFrame([{"fold": str(row["fold"]), "images": row["images"], "accuracy": row["accuracy"],
                           **{recall_columns[name]: value for name, value in row["recall"].items()}}
                          for row in result["folds"]])
    spread = pd.DataFrame([
        {"fold": "mean", "accuracy": result["mean_accuracy"],
         **{recall_columns[name]: value for name, value in result["recall_mean"].items()}},
        {"fold": "std", "accuracy": result["std_accuracy"],
         **{recall_columns[name]: value for name, value in result["recall_std"].items()}}])
    table = pd.concat([table, spread], ignore_index=True)
    return table.astype({"images": "Int64"})  # the mean and std rows have no count: blank, not 12.0 and NaN


def summary_line(result: dict) -> str:
    """'5-fold cross-validation: accuracy 98.2% ± 0.9 (min 97.0, max 99.2)', in percentage points."""
    return (f"{result['k']}-fold cross-validation: accuracy {100 * result['mean_accuracy']:.1f}% "
            f"± {100 * result['std_accuracy']:.1f} (min {100 * result['min_accuracy']:.1f}, "
            f"max {100 * result['max_accuracy']:.1f})")


def cross_validation(data: dict, classes: list[str], config, device: torch.device, train_one_epoch) -> dict:
    """--folds K: K heads, each trained by the recipe's own loop (train_one_epoch, handed in) on all folds but
    one and scoring the fold it did not see, on the features computed once: `data` holds each split's Subset of
    one TensorDataset. A pre-split folder's test part is the user's, and left out. Returns metrics.json's entry.
    """
    presplit = find_presplit(config.data_dir) is not None
    rows = [row for name, split in data.items() if not (presplit and name == "test") for row in split.indices]
    features, targets = (tensor[rows] for tensor in next(iter(data.values())).dataset.tensors)

    def train_head(fold_features: torch.Tensor, labels: torch.Tensor) -> torch.nn.Module:
        torch.manual_seed(config.seed)  # every fold's head starts as the final model's does
        head = torch.nn.Linear(features.shape[1], len(classes)).to(device)
        optimizer = torch.optim.Adam(head.parameters(), lr=config.lr)
        fold = TensorDataset(fold_features, torch.nn.functional.one_hot(labels, len(classes)).float())
        weight = (balanced_class_weights(labels, len(classes)).to(device) if config.class_weights == "balanced"
                  else None)
        order = torch.Generator().manual_seed(config.seed)  # the recipe's order
        batches = DataLoader(fold, config.batch_size, shuffle=True, generator=order)
        for _ in range(config.epochs):
            train_one_epoch(head.train(), batches, optimizer, device, weight)
        return head.eval().cpu()
    result = cross_validate(features, targets.argmax(1), classes, config.folds, config.seed, train_head)
    log.info("%s; the final model trains on the training split as without --folds", summary_line(result))
    return json_ready(result)
