"""Operating point, bootstrap intervals, subgroups and the model card, on scores with known answers."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from xray.evaluation.bootstrap import bootstrap_intervals, resample_counts, subgroup_metrics, weighted_auc
from xray.entity.config_entity import OperatingPointConfig
from xray.errors import ConfigError, DataError
from xray.evaluation.operating_point import choose_threshold, operating_point, positive_indices, rates_at

CLASSES = ("covid", "normal", "pneumonia")


def scored(n: int, seed: int, classes: int = 3, signal: float = 1.5) -> tuple[np.ndarray, np.ndarray]:
    """Labels and softmax probabilities that carry some signal (AUC well above 0.5, below 1)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    logits = rng.normal(0, 1, (n, classes))
    logits[np.arange(n), y] += signal
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return y, probs.astype(np.float32)


def test_threshold_is_the_highest_that_reaches_the_target_sensitivity() -> None:
    y, probs = scored(400, 0)
    is_positive, score = y != 1, probs[:, [0, 2]].sum(axis=1)
    threshold = choose_threshold(is_positive, score, 0.95)
    sensitivity, specificity = rates_at(is_positive, score, threshold)
    assert sensitivity >= 0.95
    above = np.sort(np.unique(score[score > threshold]))[0]  # the next threshold up misses the target
    assert rates_at(is_positive, score, above)[0] < 0.95
    assert 0 < specificity < 1


def test_operating_point_chosen_on_validation_and_measured_on_test() -> None:
    val, test = scored(300, 1), scored(300, 2)
    point = operating_point(OperatingPointConfig(("covid", "pneumonia"), 0.9), CLASSES, val, test)
    assert point is not None and point.positive == ("covid", "pneumonia")
    assert point.validation_sensitivity >= 0.9
    test_score = test[1][:, [0, 2]].sum(axis=1)
    assert (point.test_sensitivity, point.test_specificity) == rates_at(test[0] != 1, test_score, point.threshold)
    assert operating_point(OperatingPointConfig(), CLASSES, val, test) is None


def test_operating_point_refusals() -> None:
    with pytest.raises(ConfigError, match="unknown class 'flu'"):
        positive_indices(("flu",), CLASSES)
    with pytest.raises(ConfigError, match="every class"):
        positive_indices(CLASSES, CLASSES)
    with pytest.raises(DataError, match="both positive and negative"):
        choose_threshold(np.ones(5, bool), np.linspace(0, 1, 5), 0.9)


def test_vectorised_auc_equals_scikit_learn_on_each_resample() -> None:
    y, probs = scored(200, 3, classes=2)
    score = np.round(probs[:, 1], 2)  # ties on purpose
    counts = resample_counts(len(y), 20, seed=7)
    assert np.all(counts.sum(axis=1) == len(y))
    ours = weighted_auc(counts, y == 1, score)
    for row in range(len(counts)):
        index = np.repeat(np.arange(len(y)), counts[row].astype(int))
        assert ours[row] == pytest.approx(roc_auc_score(y[index], score[index]), abs=1e-12)


@pytest.mark.parametrize("classes", [2, 3])
def test_intervals_contain_the_point_estimates_and_are_reproducible(classes: int) -> None:
    y, probs = scored(300, 4, classes=classes)
    positive = (1,) if classes == 2 else (0, 2)
    first = bootstrap_intervals(y, probs, 1000, 0, positive, 0.5)
    assert set(first) == {"accuracy", "roc_auc", "sensitivity", "specificity"}
    for name, interval in first.items():
        assert interval.lower <= interval.point <= interval.upper, name
        assert interval.upper - interval.lower < 0.25, name  # 300 images: a real interval, not [0, 1]
    assert first["accuracy"].point == pytest.approx(float((probs.argmax(1) == y).mean()))
    assert bootstrap_intervals(y, probs, 1000, 0, positive, 0.5) == first
    assert bootstrap_intervals(y, probs, 1000, 1, positive, 0.5) != first


def test_subgroups_report_every_value_and_flag_small_ones() -> None:
    y, probs = scored(240, 5, classes=2)
    metadata = [{"sex": "F" if i % 2 else "M", "site": "B" if i < 12 else "A", "id": str(i)} for i in range(240)]
    groups = subgroup_metrics(y, probs, metadata, ("normal", "pneumonia"), 1000, 0, 30, (1,), 0.5)
    keys = {(g.column, g.value): g for g in groups}
    assert set(keys) == {("sex", "F"), ("sex", "M"), ("site", "A"), ("site", "B")}  # "id": an identifier, skipped
    assert keys[("site", "B")].count == 12 and keys[("site", "B")].small
    assert not keys[("sex", "F")].small and keys[("sex", "F")].count == 120
    assert sum(keys[("sex", "F")].class_counts.values()) == 120
    assert set(keys[("site", "A")].intervals) == {"accuracy", "roc_auc", "sensitivity", "specificity"}
