"""Inputs unlike the training images: the unfamiliarity score, fitted when the model is trained, kept in model.pt.

The score is the Mahalanobis distance of an image's backbone features (L2-normalised) to the Gaussian of the
class the head gives it: one Gaussian per class around the training images' features, with one shared
covariance (Lee et al. 2018, "A simple unified framework for detecting out-of-distribution samples"). The
covariance is shrunk halfway to its mean variance: a few hundred images cannot estimate 1280 x 1280 (ResNet50:
2048 x 2048) numbers. An image is unfamiliar when that distance is above the threshold (set on held-out images
of the training source so that `share` of them are above it), or when another class's Gaussian lies closer
than the one of the class it was given. It sees a different look (another source, a scanner, noise); it cannot
see a different document that looks like a known class (docs/unfamiliar-inputs.md).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from MLPipeline import Train
from MLPipeline.CreateDataset import UserError, log

SHARE = 0.05  # of familiar held-out images flagged unfamiliar: what the threshold means
SHRINK = 0.5  # how far the shared covariance is pulled towards its mean variance (measured: 0.35 to 0.9 alike)
FOLDS = 5  # without a validation split, the threshold comes from each fold's distances under the other folds'
CHUNK = 4096  # training features normalised in float64 at a time
METHOD = "mahalanobis-l2/1"  # the stored fields below, and how the score is computed from them
UNFAMILIAR, LOW_CONFIDENCE = "unfamiliar", "low confidence"


def save_outputs(output_dir: Path, metrics: dict, checkpoint: dict, data: dict) -> None:
    """The recipe's save, with the score fitted on its training features stored in model.pt (the default run)."""
    checkpoint["unfamiliar_score"] = fit_on_splits(data, len(checkpoint["classes"]))
    metrics["unfamiliar_score"] = summary(checkpoint["unfamiliar_score"])
    Train.save_outputs(output_dir, metrics, checkpoint)


def summary(score: dict | None) -> dict | None:
    """metrics.json's account of a score: its fields other than the Gaussians."""
    return score and {key: value for key, value in score.items() if not isinstance(value, torch.Tensor)}


def fit_on_splits(data: dict, num_classes: int, share: float = SHARE, folds: int = FOLDS) -> dict | None:
    """fit() on the recipe's datasets (each split a Subset of one TensorDataset(features, one-hot targets)): the
    training rows read where they are, the threshold from the "val" split when there is one."""
    features, targets = data["train"].dataset.tensors
    rows = torch.as_tensor(data["train"].indices, dtype=torch.long)
    held_out = None
    if "val" in data:
        val_features, val_targets = data["val"].dataset.tensors
        held_out = (val_features[data["val"].indices], val_targets[data["val"].indices].argmax(1))
    return fit(features, targets[rows].argmax(1), num_classes, held_out, share, folds, rows=rows)


def fit(features: torch.Tensor, labels: torch.Tensor, num_classes: int, held_out: tuple | None = None,
        share: float = SHARE, folds: int = FOLDS, rows: torch.Tensor | None = None) -> dict | None:
    """What model.pt keeps: the Gaussians of the training features, and the threshold that `share` of the
    held-out (features, labels) exceed; without held-out images, the distances of each of `folds` folds of the
    training images under Gaussians fitted on the other folds. None, with a warning, when nothing can set it.
    rows: the rows of `features` that are the training images, `labels` theirs in order (default: every row);
    they are read a chunk at a time, never copied whole."""
    rows = torch.arange(len(features)) if rows is None else rows
    totals = moments(features, rows, labels, num_classes)
    score = stored(*gaussians(*totals))
    if held_out is not None and len(held_out[0]):
        reference, source = own_distances(score, *held_out), "validation split"
    else:  # each fold's Gaussians from the totals less the fold's own moments: one pass over the features
        fold = torch.empty(len(labels), dtype=torch.long)
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
        fold[order[labels[order].argsort(stable=True)]] = torch.arange(len(labels)) % folds  # stratified
        reference = torch.cat([fold_distances(*gaussians(*(total - part for total, part in zip(
            totals, moments(features, rows[fold == k], labels[fold == k], num_classes)))),
            normalised(features[rows[fold == k]]), labels[fold == k]) for k in range(folds)])
        source = f"{folds}-fold out-of-fold training images"
    reference = reference[reference.isfinite()]  # a class missing from a fold has no Gaussian there
    if not len(reference):
        log.warning("warning: too few images to set the unfamiliar-input threshold on: the model cannot flag "
                    "unfamiliar inputs")
        return None
    return {**score, "threshold": torch.quantile(reference, 1 - share).item(), "unfamiliar_share": float(share),
            "threshold_from": source, "held_out_images": len(reference), "method": METHOD}


def normalised(features: torch.Tensor) -> torch.Tensor:
    """L2-normalised, in float64: the fold moments are differences of sums."""
    return F.normalize(features.double(), dim=1)


def moments(features: torch.Tensor, rows: torch.Tensor, labels: torch.Tensor,
            num_classes: int) -> tuple[torch.Tensor, ...]:
    """What the Gaussians are made of: the sum of x x^T, and each class's sum of x and count, over the given
    rows of `features` (normalised), summed CHUNK rows at a time: memory stays flat as the images grow."""
    gram = torch.zeros(features.shape[1], features.shape[1], dtype=torch.float64)
    sums = torch.zeros(num_classes, features.shape[1], dtype=torch.float64)
    for start in range(0, len(rows), CHUNK):
        x = normalised(features[rows[start:start + CHUNK]])
        gram += x.T @ x
        sums.index_add_(0, labels[start:start + CHUNK], x)
    return gram, sums, torch.bincount(labels, minlength=num_classes).double()


def gaussians(gram: torch.Tensor, sums: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each class's mean (NaN for a class without images) and the Cholesky factor of the shared covariance
    around them, shrunk (positive definite even when every class has one image, and no spread)."""
    means = sums / counts[:, None]
    covariance = gram - sums[counts > 0].T @ means[counts > 0]
    covariance /= counts.sum()
    spread = covariance.diagonal().mean().clamp(min=1e-6)
    covariance *= 1 - SHRINK  # pulled towards spread x I in place: D x D float64 is 32 MB for ResNet50
    covariance.diagonal().add_(SHRINK * spread)
    return means, torch.linalg.cholesky(covariance)


def fold_distances(means: torch.Tensor, factor: torch.Tensor, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each (L2-normalised) x's distance to its own class's Gaussian (means, Cholesky factor)."""
    return torch.linalg.solve_triangular(factor, (x - means[labels]).T, upper=False).norm(dim=0).float()


def stored(means: torch.Tensor, factor: torch.Tensor) -> dict[str, torch.Tensor]:
    """The Gaussians as model.pt keeps them, in float16 (half the bytes; the threshold is set with these values):
    the whitening matrix W (the Cholesky factor's inverse) and each mean through it: distance = |Wx - Wm|."""
    whiten = torch.linalg.solve_triangular(factor, torch.eye(len(factor), dtype=factor.dtype), upper=False)
    return {"whiten": whiten.half(), "centres": (means @ whiten.T).half()}


def distances(score: dict, features: torch.Tensor) -> torch.Tensor:
    """N x C: each image's distance to each class's Gaussian."""
    whitened = F.normalize(features.float(), dim=1) @ score["whiten"].float().T
    return torch.cdist(whitened, score["centres"].float())


def own_distances(score: dict, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return distances(score, features).gather(1, labels[:, None].long())[:, 0]


class WithFeatures(nn.Module):
    """A classifier's logits with its backbone's features beside them, N x (classes + features): one pass gives
    predict both the label and the score."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.network.features(images).float()
        with torch.autocast(images.device.type, enabled=False):  # the head in fp32, as Classifier.forward
            return torch.cat([self.network.head(features), features], 1)


def review_table(score: dict | None, probabilities: np.ndarray, features: torch.Tensor, classes: list[str],
                 min_confidence: float | None, review: bool = True) -> pd.DataFrame:
    """Each image's decision (its label, or 'review'), why it goes to review (unfamiliar, low confidence, or
    both; empty when decided) and, with a score, its unfamiliarity (distance / threshold: above 1, unfamiliar)
    and the class whose training images it lies closest to. review=False: only min_confidence sends to review."""
    from MLPipeline.extras.Calibration import REVIEW, to_review  # prediction only: off the training path
    flags_unfamiliar = review and score is not None
    if REVIEW in classes and (flags_unfamiliar or min_confidence is not None):
        raise UserError(f"a class is named '{REVIEW}', the decision given to images sent to review: rename that "
                        f"folder, or pass --no-review without --min-confidence")
    probabilities = np.asarray(probabilities)
    predicted = probabilities.argmax(1)
    table = pd.DataFrame(index=range(len(probabilities)))
    unfamiliar = np.zeros(len(probabilities), dtype=bool)
    if score is not None:
        measured = distances(score, features).numpy() if len(predicted) else np.zeros((0, len(classes)))
        closest = measured.argmin(1)
        table["unfamiliarity"] = measured[np.arange(len(predicted)), predicted] / score["threshold"]
        table["closest_class"] = pd.Series([classes[c] for c in closest], dtype=object)
        unfamiliar = flags_unfamiliar & ((table.unfamiliarity.to_numpy() > 1) | (closest != predicted))
    low = to_review(probabilities.max(1), min_confidence)
    table.insert(0, "reason", pd.Series(["; ".join(why for why, flagged in ((UNFAMILIAR, u), (LOW_CONFIDENCE, c))
                                                   if flagged) for u, c in zip(unfamiliar, low)], dtype=object))
    table.insert(0, "decision", pd.Series([REVIEW if why else classes[c] for why, c in zip(table.reason, predicted)],
                                          dtype=object))
    return table


def review_report(reasons: pd.Series, correct: np.ndarray, min_confidence: float | None,
                  unfamiliar_checked: bool) -> dict:
    """evaluate's account of the review: how many images went there and why, the share decided (coverage) and
    the accuracy of what was decided (None when nothing was)."""
    decided = (reasons == "").to_numpy()
    return {"min_confidence": min_confidence, "unfamiliar_checked": unfamiliar_checked, "images": int((~decided).sum()),
            "unfamiliar": int(reasons.str.contains(UNFAMILIAR).sum()),
            "low_confidence": int(reasons.str.contains(LOW_CONFIDENCE).sum()), "decided": int(decided.sum()),
            "coverage": float(decided.mean()), "accuracy_on_the_rest": float(correct[decided].mean())
            if decided.any() else None}


def check_score(score, num_classes: int, width: int, source) -> dict | None:
    """A stored score, checked before it is used: None when absent (a model trained before it); UserError
    naming `source` when a field is missing, of the wrong kind or shape, or not finite."""
    if score is None:
        return None
    tensors = {"whiten": (width, width), "centres": (num_classes, width)}
    problems = [key for key, shape in tensors.items() if not (
        isinstance(score, dict) and isinstance(score.get(key), torch.Tensor) and score[key].is_floating_point()
        and tuple(score[key].shape) == shape and torch.isfinite(score[key]).all())]
    if not isinstance(score, dict) or score.get("method") != METHOD:
        problems.append("method")
    else:
        threshold, share = score.get("threshold"), score.get("unfamiliar_share")
        if not isinstance(threshold, float) or not 0 < threshold < math.inf:
            problems.append("threshold")
        if not isinstance(share, float) or not 0 < share < 1:
            problems.append("unfamiliar_share")
        problems += [key for key, kind in (("threshold_from", str), ("held_out_images", int))
                     if not isinstance(score.get(key), kind)]
    if problems:
        raise UserError(f"{source} is damaged or edited: its unfamiliar-input score ({', '.join(problems)}) cannot "
                        f"be used; train the model again")
    return score
