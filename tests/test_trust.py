"""Issue 25, decisions a back office can trust: cross-validation folds and scoring, temperature scaling,
calibration error, coverage, review decisions and balanced class weights. Pure functions: no images, no backbone.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from MLPipeline.extras import Calibration, CrossValidation, Familiarity
from MLPipeline.extras.Common import UserError

LABELS = np.array([0] * 13 + [1] * 7 + [2] * 10 + [3] * 5)  # unequal classes, none a multiple of k


# ------------------------------------------------------------------------------------------------ folds

def test_folds_partition_the_images_each_exactly_once():
    folds = CrossValidation.stratified_folds(LABELS, 5, seed=3)
    assert len(folds) == 5
    assert sorted(np.concatenate(folds).tolist()) == list(range(len(LABELS)))


def test_folds_are_stratified_and_of_near_equal_size():
    folds = CrossValidation.stratified_folds(LABELS, 4, seed=0)
    for label in np.unique(LABELS):
        per_fold = [int((LABELS[fold] == label).sum()) for fold in folds]
        assert max(per_fold) - min(per_fold) <= 1, (label, per_fold)
    sizes = [len(fold) for fold in folds]
    assert max(sizes) - min(sizes) <= 1


def test_folds_are_stable_for_a_seed_and_differ_across_seeds():
    first, again = (CrossValidation.stratified_folds(LABELS, 5, seed=7) for _ in range(2))
    other = CrossValidation.stratified_folds(LABELS, 5, seed=8)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))


def test_folds_of_string_labels_follow_each_class_name():
    names = np.array(["invoice"] * 6 + ["letter"] * 6)
    folds = CrossValidation.stratified_folds(names, 3, seed=1)
    assert [sorted(names[fold]) for fold in folds] == [["invoice"] * 2 + ["letter"] * 2] * 3


def test_a_class_smaller_than_k_is_a_user_error_naming_it():
    with pytest.raises(UserError, match=r"class '3' has 5 images.*lower --folds"):
        CrossValidation.stratified_folds(LABELS, 6, seed=0)
    with pytest.raises(UserError, match="at least 2 folds"):
        CrossValidation.stratified_folds(LABELS, 1, seed=0)


# --------------------------------------------------------------------------------------- cross_validate

def unique_features(labels: np.ndarray) -> torch.Tensor:
    """Row i is (i, label_i): a head can tell which images it trained on, and predict perfectly if it cheats."""
    return torch.tensor(np.stack([np.arange(len(labels)), labels], 1), dtype=torch.float32)


def test_each_image_is_scored_once_by_a_head_that_did_not_train_on_it():
    features, labels, classes = unique_features(LABELS), torch.from_numpy(LABELS), ["a", "b", "c", "d"]
    calls = []

    def train_head(train_features, train_labels):
        calls.append(len(train_labels))
        seen, call = set(train_features[:, 0].tolist()), len(calls)

        def head(x):  # column 0: which head scored the row; column 1: 1 if that head trained on it
            logits = torch.zeros(len(x), len(classes))
            logits[:, 0] = call
            logits[:, 1] = torch.tensor([float(i in seen) for i in x[:, 0].tolist()])
            return logits
        return head

    result = CrossValidation.cross_validate(features, labels, classes, 5, seed=0, train_head=train_head)
    logits = result["out_of_fold_logits"]
    assert len(calls) == 5 and sum(calls) == 4 * len(LABELS)  # each head trains on the other 4 folds
    assert logits.shape == (len(LABELS), 4)
    assert (logits[:, 1] == 0).all()  # no image was scored by a head that had trained on it
    folds = CrossValidation.stratified_folds(LABELS, 5, seed=0)
    for number, fold in enumerate(folds, start=1):
        assert (logits[fold, 0] == number).all()  # scored by the head of its own fold, once


def test_cross_validate_reports_folds_spread_and_pooled_confusion():
    labels = torch.from_numpy(LABELS)
    features = unique_features(LABELS)
    wrong = {0, 13, 20}  # one image each of classes 0, 1 and 2 is predicted as class 3

    def train_head(train_features, train_labels):
        def head(x):
            predicted = x[:, 1].long().clone()
            predicted[torch.tensor([int(i) in wrong for i in x[:, 0].tolist()])] = 3
            return F.one_hot(predicted, 4).float()
        return head

    classes = ["a", "b", "c", "d"]
    result = CrossValidation.cross_validate(features, labels, classes, 5, seed=2, train_head=train_head)
    accuracies = np.array([fold["accuracy"] for fold in result["folds"]])
    assert [fold["images"] for fold in result["folds"]] == [len(f) for f in
                                                            CrossValidation.stratified_folds(LABELS, 5, 2)]
    assert result["mean_accuracy"] == pytest.approx(accuracies.mean())
    assert result["std_accuracy"] == pytest.approx(accuracies.std(ddof=1))
    assert result["pooled_accuracy"] == pytest.approx(1 - 3 / len(LABELS))
    recall_a = np.array([fold["recall"]["a"] for fold in result["folds"]])
    assert result["recall_mean"]["a"] == pytest.approx(recall_a.mean())
    assert result["recall_std"]["a"] == pytest.approx(recall_a.std(ddof=1))
    assert result["recall_mean"]["d"] == 1.0 and result["recall_std"]["d"] == 0.0
    confusion = np.array(result["confusion_matrix"])
    expected = np.diag(np.bincount(LABELS)) - np.diag([1, 1, 1, 0])
    expected[[0, 1, 2], 3] = 1
    assert np.array_equal(confusion, expected)

    table = CrossValidation.folds_table(result)
    assert table.fold.tolist() == ["1", "2", "3", "4", "5", "mean", "std"]
    assert table.columns.tolist() == ["fold", "images", "accuracy", "recall_a", "recall_b", "recall_c", "recall_d"]
    assert table.accuracy.iloc[-2] == pytest.approx(result["mean_accuracy"])
    assert table.images.iloc[:5].sum() == len(LABELS) and table.images.iloc[5:].isna().all()
    lines = table.to_csv(index=False).splitlines()  # counts read as counts in folds.csv: 7, not 7.0
    assert lines[1].split(",")[1] == str(result["folds"][0]["images"]) and lines[-1].split(",")[1] == ""
    assert "out_of_fold_logits" not in CrossValidation.json_ready(result)


def test_summary_line_reads_mean_std_min_and_max_in_percent():
    result = {"k": 5, "mean_accuracy": 0.9823, "std_accuracy": 0.0091, "min_accuracy": 0.97, "max_accuracy": 0.992}
    assert (CrossValidation.summary_line(result)
            == "5-fold cross-validation: accuracy 98.2% ± 0.9 (min 97.0, max 99.2)")


# ---------------------------------------------------------------------------------------------- calibration

@pytest.fixture
def one_thread():
    """Tensors this small train in a blink on one thread; two threads' pool waits cost seconds on a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def overfit_head(seed: int = 0):
    """A linear head trained with Adam far past the point of fitting 60 noisy images: over-confident.
    Returns the logits and labels of two separate held-out sets (one to fit T on, one to judge it)."""
    generator = torch.Generator().manual_seed(seed)
    means = 0.35 * torch.randn(3, 40, generator=generator)

    def sample(n):
        labels = torch.randint(0, 3, (n,), generator=generator)
        return means[labels] + torch.randn(n, 40, generator=generator), labels

    train_x, train_y = sample(60)
    torch.manual_seed(seed)
    head = torch.nn.Linear(40, 3)
    optimizer = torch.optim.Adam(head.parameters(), lr=0.2)
    for _ in range(60):
        loss = F.cross_entropy(head(train_x), train_y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return [(head(x), y) for x, y in (sample(400), sample(400))]


def test_an_over_confident_head_gets_a_temperature_above_1_that_lowers_ece_on_other_data(one_thread):
    (val_logits, val_labels), (test_logits, test_labels) = overfit_head()
    temperature = Calibration.fit_temperature(val_logits, val_labels)
    assert temperature > 1.5
    before = Calibration.expected_calibration_error(test_logits.softmax(1).numpy(), test_labels.numpy())
    after = Calibration.expected_calibration_error(
        Calibration.calibrated_probabilities(test_logits, temperature).numpy(), test_labels.numpy())
    assert after < before / 2


def test_fitted_temperature_recovers_a_known_scale_and_minimises_the_loss():
    generator = torch.Generator().manual_seed(1)
    true_logits = 2 * torch.randn(4000, 4, generator=generator)
    labels = torch.multinomial(true_logits.softmax(1), 1, generator=generator).squeeze(1)  # calibrated labels
    temperature = Calibration.fit_temperature(5 * true_logits, labels)
    assert temperature == pytest.approx(5, rel=0.1)
    loss = lambda t: F.cross_entropy(5 * true_logits / t, labels).item()  # noqa: E731
    assert loss(temperature) <= min(loss(temperature * 0.98), loss(temperature * 1.02))
    assert Calibration.fit_temperature(5 * true_logits, labels) == temperature  # deterministic


def calibrated_set(n: int, seed: int, accuracy_of=lambda confidence: confidence):
    """Two-class probabilities whose top confidence is uniform in [0.5, 1]; each is right with probability
    accuracy_of(confidence) (the identity: perfectly calibrated)."""
    rng = np.random.default_rng(seed)
    confidence = rng.uniform(0.5, 1, n)
    right = rng.uniform(size=n) < accuracy_of(confidence)
    return np.stack([confidence, 1 - confidence], 1), np.where(right, 0, 1)


def test_ece_is_near_0_when_calibrated_and_large_when_over_confident():
    probabilities, labels = calibrated_set(100_000, seed=0)
    assert Calibration.expected_calibration_error(probabilities, labels) < 0.01
    probabilities, labels = calibrated_set(100_000, seed=0, accuracy_of=lambda c: c ** 4)
    assert Calibration.expected_calibration_error(probabilities, labels) > 0.15


def test_ece_and_reliability_bins_by_hand():
    probabilities = np.array([[0.95, 0.05], [0.92, 0.08], [0.35, 0.65], [0.6, 0.4]])
    labels = np.array([0, 1, 1, 1])  # bins of 0.1: (0.9, 1] holds 2 (1 right), (0.6, 0.7] 1 right, (0.5, 0.6] 1 wrong
    table = Calibration.reliability_bins(probabilities, labels, bins=10)
    assert table["count"].tolist() == [0, 0, 0, 0, 0, 1, 1, 0, 0, 2]
    assert table.accuracy.iloc[9] == 0.5 and table.mean_confidence.iloc[9] == pytest.approx(0.935)
    assert table.accuracy.iloc[:5].isna().all()
    expected = (2 * abs(0.5 - 0.935) + abs(1 - 0.65) + abs(0 - 0.6)) / 4
    assert Calibration.expected_calibration_error(probabilities, labels, bins=10) == pytest.approx(expected)


def test_reliability_plot_is_a_png(tmp_path):
    probabilities, labels = calibrated_set(500, seed=2)
    table = Calibration.reliability_bins(probabilities, labels, 15)
    Calibration.plot_reliability(table, Calibration.expected_calibration_error(probabilities, labels),
                                 tmp_path / "calibration.png", "resnet50, test split")
    assert (tmp_path / "calibration.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_coverage_accuracy_rises_with_the_threshold_when_the_unsure_predictions_are_the_wrong_ones():
    probabilities, labels = calibrated_set(5000, seed=3, accuracy_of=lambda c: 2 * c - 1)  # at 0.5 all wrong
    table = Calibration.coverage_table(probabilities, labels)
    assert table.threshold.tolist() == list(Calibration.THRESHOLDS)
    assert np.all(np.diff(table.kept) < 0) and np.all(np.diff(table.accuracy_on_kept) > 0)
    confidence = probabilities.max(1)
    assert table.kept.tolist() == [int((confidence >= t).sum()) for t in Calibration.THRESHOLDS]
    assert table.kept_share.tolist() == pytest.approx((table.kept / len(labels)).tolist())
    lines = Calibration.coverage_lines(table, len(labels))
    assert len(lines) == 6 and lines[0].startswith("confidence >= 0.5: 5000/5000 images kept (100.0%), accuracy")


def test_coverage_keeps_a_confidence_equal_to_the_threshold_and_is_nan_when_it_keeps_nothing():
    probabilities = np.array([[0.6, 0.4], [0.3, 0.7], [0.9, 0.1]])
    table = Calibration.coverage_table(probabilities, np.array([0, 1, 1]), thresholds=(0.5, 0.9, 0.95))
    assert table.kept.tolist() == [3, 1, 0]  # 0.9 is kept at 0.9, as the review keeps it
    assert table.accuracy_on_kept.iloc[1] == 0.0 and math.isnan(table.accuracy_on_kept.iloc[2])
    assert Calibration.coverage_lines(table, 3)[2].endswith("none to score")


def decisions(probabilities, classes, min_confidence) -> list[str]:
    """The decisions of a model without an unfamiliar-input score: confidence alone."""
    return Familiarity.review_table(None, probabilities, None, classes, min_confidence).decision.tolist()


def test_decisions_review_below_the_threshold_everything_at_1_and_nothing_at_0_or_none():
    probabilities = np.array([[0.2, 0.8], [0.55, 0.45], [1.0, 0.0]], dtype=np.float32)
    probabilities[2] = torch.tensor([30.0, 0.0]).softmax(0).numpy()  # rounds to exactly 1.0 in float32
    assert probabilities[2, 0] == 1.0
    classes = ["letter", "invoice"]
    assert decisions(probabilities, classes, None) == ["invoice", "letter", "letter"]
    assert decisions(probabilities, classes, 0.0) == ["invoice", "letter", "letter"]
    assert decisions(probabilities, classes, 0.7) == ["invoice", "review", "letter"]
    assert decisions(probabilities, classes, 0.8) == ["invoice", "review", "letter"]  # 0.8 is kept
    assert decisions(probabilities, classes, 1.0) == ["review"] * 3


def test_a_class_named_review_cannot_take_review_decisions():
    with pytest.raises(UserError, match="named 'review'"):
        decisions(np.array([[0.9, 0.1]]), ["review", "invoice"], 0.5)
    assert decisions(np.array([[0.9, 0.1]]), ["review", "invoice"], None) == ["review"]


def test_balanced_weights_are_n_over_c_times_n_c():
    labels = torch.tensor([0] * 6 + [1] * 3 + [2] * 1)
    weights = Calibration.balanced_class_weights(labels, 4)  # class 3 has no training image
    torch.testing.assert_close(weights, torch.tensor([10 / (4 * 6), 10 / (4 * 3), 10 / (4 * 1), 0.0]))
    every_class = torch.tensor([0] * 6 + [1] * 3 + [2] * 1 + [3] * 2)
    weights_of_each = Calibration.balanced_class_weights(every_class, 4)[every_class]
    assert weights_of_each.mean().item() == pytest.approx(1.0)  # the loss keeps its scale
    logits = torch.randn(10, 4)
    assert torch.isfinite(F.cross_entropy(logits, F.one_hot(labels, 4).float(), weight=weights))


@pytest.mark.parametrize("value", [-0.01, 1.5, math.nan, math.inf, "high"])
def test_check_probability_refuses_what_is_not_a_probability(value):
    with pytest.raises(UserError, match="--min-confidence must be a probability between 0 and 1"):
        Calibration.check_probability(value, "--min-confidence")


def test_check_probability_accepts_the_ends():
    assert [Calibration.check_probability(v, "--min-confidence") for v in (0, 0.9, 1)] == [0.0, 0.9, 1.0]
