"""Bootstrap 95 % intervals for test metrics, and the same per subgroup.

One test split gives one number; a clinician needs to know how far it could
move on another sample of patients. Resampling is vectorised: each resample
is a row of per-image counts, so accuracy, sensitivity and specificity are
matrix products and ROC-AUC is the Mann-Whitney statistic over sorted scores
with those counts as weights (equal to scikit-learn's AUC on the resample).
"""

from __future__ import annotations

import numpy as np

from xray.entity.artifact_entity import Interval, SubgroupMetrics
from xray.evaluation.metrics import roc_auc
from xray.evaluation.operating_point import positive_score, rates_at

MAX_SUBGROUP_LEVELS = 20  # a column with more distinct values is an identifier, not a category


def resample_counts(n: int, resamples: int, seed: int) -> np.ndarray:
    """``resamples×n`` multiplicities of each image in each bootstrap sample (rows sum to ``n``)."""
    rng = np.random.default_rng(seed)
    drawn = rng.integers(0, n, size=(resamples, n)) + np.arange(resamples)[:, None] * n
    return np.bincount(drawn.ravel(), minlength=resamples * n).reshape(resamples, n).astype(np.float64)


def weighted_auc(counts: np.ndarray, is_positive: np.ndarray, score: np.ndarray) -> np.ndarray:
    """Binary ROC-AUC per row of ``counts`` (ties count one half); NaN where a row lacks a class."""
    order = np.argsort(score, kind="stable")
    sorted_score = score[order]
    starts = np.flatnonzero(np.r_[True, sorted_score[1:] != sorted_score[:-1]])
    w = counts[:, order]
    positive = np.add.reduceat(w * is_positive[order], starts, axis=1)
    negative = np.add.reduceat(w * ~is_positive[order], starts, axis=1)
    below = np.cumsum(negative, axis=1) - negative
    pairs = positive.sum(axis=1) * negative.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(pairs > 0, (positive * (below + 0.5 * negative)).sum(axis=1) / pairs, np.nan)


def _interval(point: float, samples: np.ndarray) -> Interval:
    finite = samples[np.isfinite(samples)]
    if not np.isfinite(point) or finite.size == 0:
        return Interval(point=float(point), lower=float("nan"), upper=float("nan"))
    lower, upper = np.percentile(finite, [2.5, 97.5])
    return Interval(point=float(point), lower=float(lower), upper=float(upper))


def bootstrap_intervals(
    y: np.ndarray,
    probs: np.ndarray,
    resamples: int,
    seed: int,
    positive: tuple[int, ...] = (),
    threshold: float | None = None,
) -> dict[str, Interval]:
    """Accuracy, ROC-AUC (binary, or macro one-vs-rest) and, at an operating point, sensitivity and specificity."""
    counts = resample_counts(len(y), resamples, seed)
    correct = (probs.argmax(axis=1) == y).astype(np.float64)
    intervals = {"accuracy": _interval(correct.mean(), counts @ correct / len(y))}
    if probs.shape[1] == 2:
        auc_samples = weighted_auc(counts, y == 1, probs[:, 1])
    else:  # scikit-learn's macro OvR: the unweighted mean of each class against the rest
        auc_samples = np.mean([weighted_auc(counts, y == c, probs[:, c]) for c in range(probs.shape[1])], axis=0)
    intervals["roc_auc"] = _interval(roc_auc(y, probs), auc_samples)
    if positive and threshold is not None:
        is_positive = np.isin(y, positive)
        flagged = positive_score(probs, positive) >= threshold
        sensitivity, specificity = rates_at(is_positive, positive_score(probs, positive), threshold)
        with np.errstate(invalid="ignore", divide="ignore"):
            sens_samples = counts @ (is_positive & flagged) / (counts @ is_positive)
            spec_samples = counts @ (~is_positive & ~flagged) / (counts @ ~is_positive)
        intervals["sensitivity"] = _interval(sensitivity, sens_samples)
        intervals["specificity"] = _interval(specificity, spec_samples)
    return intervals


def subgroup_metrics(
    y: np.ndarray,
    probs: np.ndarray,
    metadata: list[dict[str, str]],
    class_names: tuple[str, ...],
    resamples: int,
    seed: int,
    min_count: int,
    positive: tuple[int, ...] = (),
    threshold: float | None = None,
) -> tuple[SubgroupMetrics, ...]:
    """The same intervals for each value of each categorical metadata column; small groups flagged, never dropped."""
    columns = sorted({k for row in metadata for k in row})
    results = []
    for column in columns:
        values = np.array([row.get(column, "") or "(missing)" for row in metadata])
        levels = sorted(set(values.tolist()))
        if len(levels) > MAX_SUBGROUP_LEVELS:
            continue
        for level in levels:
            mask = values == level
            sub_y = y[mask]
            class_counts = {name: int((sub_y == i).sum()) for i, name in enumerate(class_names)}
            results.append(
                SubgroupMetrics(
                    column=column,
                    value=level,
                    count=int(mask.sum()),
                    class_counts=class_counts,
                    small=bool(mask.sum() < min_count or min(class_counts.values()) == 0),
                    intervals=bootstrap_intervals(sub_y, probs[mask], resamples, seed, positive, threshold),
                )
            )
    return tuple(results)
