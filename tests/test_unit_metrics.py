"""xray/evaluation/metrics.py against hand-computed small cases and independent computations."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from xray.evaluation.metrics import compute_metrics, expected_calibration_error, roc_auc


def pairwise_auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """AUC as the probability that a positive outscores a negative (ties count half): the definition."""
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(positive, negative))
    return wins / (len(positive) * len(negative))


def test_binary_auc_by_hand() -> None:
    y = np.array([0, 0, 1, 1])
    p1 = np.array([0.1, 0.4, 0.35, 0.8])
    probs = np.stack([1 - p1, p1], axis=1)
    assert roc_auc(y, probs) == pytest.approx(0.75)  # 3 of the 4 positive/negative pairs are ordered right


def test_multiclass_auc_is_the_macro_one_vs_rest_mean() -> None:
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], 7)
    probs = rng.dirichlet(np.ones(3), size=len(y))
    expected = np.mean([pairwise_auc(probs[y == c, c], probs[y != c, c]) for c in range(3)])
    assert roc_auc(y, probs) == pytest.approx(expected)


def test_auc_is_nan_when_one_class_is_absent() -> None:
    probs = np.array([[0.3, 0.7], [0.6, 0.4]])
    assert math.isnan(roc_auc(np.array([1, 1]), probs))


def test_ece_by_hand() -> None:
    # bin (0, 0.5]: one right answer at confidence 0.4 -> |1 - 0.4| = 0.6, weight 1/2
    # bin (0.5, 1]: one wrong answer at confidence 0.9 -> |0 - 0.9| = 0.9, weight 1/2
    probs = np.array([[0.4, 0.3, 0.3], [0.05, 0.9, 0.05]])
    y = np.array([0, 2])
    assert expected_calibration_error(y, probs, bins=2) == pytest.approx(0.5 * 0.6 + 0.5 * 0.9)


def test_ece_is_zero_for_confident_right_answers_and_one_for_confident_wrong_ones() -> None:
    probs = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert expected_calibration_error(np.array([0, 1]), probs) == pytest.approx(0.0)
    assert expected_calibration_error(np.array([1, 0]), probs) == pytest.approx(1.0)


def test_binary_metrics_by_hand() -> None:
    y = np.array([0, 0, 1, 1, 1])
    probs = np.array([[0.8, 0.2], [0.4, 0.6], [0.1, 0.9], [0.3, 0.7], [0.6, 0.4]])  # predicts 0, 1, 1, 1, 0
    m = compute_metrics(y, probs, ("normal", "pneumonia"))
    assert m.confusion_matrix == ((1, 1), (1, 2))  # rows: true class, columns: predicted
    assert m.accuracy == pytest.approx(3 / 5)
    assert m.sensitivity == pytest.approx(2 / 3)  # TP 2 of 3 positives
    assert m.specificity == pytest.approx(1 / 2)  # TN 1 of 2 negatives
    assert m.per_class["pneumonia"].precision == pytest.approx(2 / 3)
    assert m.per_class["pneumonia"].recall == pytest.approx(2 / 3)
    assert m.per_class["normal"].precision == pytest.approx(1 / 2)
    assert m.per_class["normal"].support == 2 and m.per_class["pneumonia"].support == 3
    f1_normal, f1_pneumonia = 0.5, 2 / 3  # precision == recall for both, so F1 equals them
    assert m.per_class["normal"].f1 == pytest.approx(f1_normal)
    assert m.macro_f1 == pytest.approx((f1_normal + f1_pneumonia) / 2)
    assert m.loss == pytest.approx(-np.mean(np.log([0.8, 0.4, 0.9, 0.7, 0.4])))
    assert m.roc_auc == pytest.approx(pairwise_auc(probs[y == 1, 1], probs[y == 0, 1]))


def test_multiclass_metrics_leave_sensitivity_out_and_count_an_unpredicted_class_as_zero() -> None:
    y = np.array([0, 1, 2, 2])
    probs = np.array([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.1, 0.1, 0.8], [0.2, 0.2, 0.6]])  # never predicts 1
    m = compute_metrics(y, probs, ("covid", "normal", "viral"))
    assert m.sensitivity is None and m.specificity is None
    assert m.confusion_matrix == ((1, 0, 0), (1, 0, 0), (0, 0, 2))
    assert m.per_class["normal"].precision == 0.0 and m.per_class["normal"].recall == 0.0
    assert m.per_class["covid"].precision == pytest.approx(1 / 2)
    assert m.accuracy == pytest.approx(3 / 4)
