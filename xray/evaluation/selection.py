"""Can validation tell two candidates apart? A paired, stratified bootstrap over the validation set.

A fixed epsilon ("within 0.002 AUC is a tie") means different things on 38
films and on 524; resampling the validation set says how much the difference
between two candidates moves with the luck of which images were held out.
When the interval of the difference reaches zero, picking the leader is a coin
toss, and averaging the candidates (an ensemble) is the safer choice.
"""

from __future__ import annotations


import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import accuracy_score, f1_score

from xray.entity.artifact_entity import BootstrapComparison
from xray.evaluation.metrics import roc_auc

BOOTSTRAP_SEED = 20240601


def score(metric: str, y_true: np.ndarray, probs: np.ndarray) -> float:
    """One selection metric, higher is better (NaN when undefined, e.g. AUC with one class)."""
    predicted = probs.argmax(axis=1)
    if metric == "roc_auc":
        return roc_auc(y_true, probs)
    if metric == "accuracy":
        return float(accuracy_score(y_true, predicted))
    if metric == "macro_f1":
        labels = np.arange(probs.shape[1])
        return float(f1_score(y_true, predicted, labels=labels, average="macro", zero_division=0))
    raise ValueError(f"unknown selection metric {metric!r}")


def stratified_resamples(y_true: np.ndarray, resamples: int, seed: int = BOOTSTRAP_SEED) -> np.ndarray:
    """``resamples × N`` row indices, drawn with replacement within each class, so every resample keeps
    the class counts (and a per-class metric such as AUC stays defined)."""
    rng = np.random.default_rng(seed)
    rows = np.empty((resamples, len(y_true)), dtype=np.int64)
    start = 0
    for label in np.unique(y_true):
        members = np.flatnonzero(y_true == label)
        rows[:, start : start + len(members)] = rng.choice(members, size=(resamples, len(members)), replace=True)
        start += len(members)
    return rows


def resampled_scores(metric: str, y_true: np.ndarray, probs: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``metric`` on every resample at once (``rows``: ``B × N``).

    AUC is the Mann-Whitney statistic on average ranks (what scikit-learn's
    ``roc_auc_score`` computes, ties included), vectorised over resamples:
    a thousand scikit-learn calls on a 3-class set take tens of seconds on a
    small CPU, this a fraction of one (docs/benchmarks.md). Other metrics go
    through ``score``.
    """
    if metric == "accuracy":
        return (probs.argmax(axis=1)[rows] == y_true[rows]).mean(axis=1)
    if metric != "roc_auc":
        return np.array([score(metric, y_true[r], probs[r]) for r in rows])
    y = y_true[rows]
    positives = [1] if probs.shape[1] == 2 else range(probs.shape[1])
    aucs = []
    for c in positives:
        is_pos = y == c
        n_pos = is_pos.sum(axis=1)
        n_neg = is_pos.shape[1] - n_pos
        ranks = rankdata(probs[rows, c], axis=1)
        u = (ranks * is_pos).sum(axis=1) - n_pos * (n_pos + 1) / 2
        with np.errstate(invalid="ignore", divide="ignore"):
            aucs.append(u / (n_pos * n_neg))
    return np.mean(aucs, axis=0)


def compare(
    y_true: np.ndarray,
    probs: dict[str, np.ndarray],
    leader: str,
    runner_up: str,
    metric: str,
    resamples: int = 1000,
    level: float = 0.95,
    seed: int = BOOTSTRAP_SEED,
) -> BootstrapComparison:
    """Percentile interval of the paired difference ``metric(leader) - metric(runner_up)``."""
    a, b = probs[leader], probs[runner_up]
    rows = stratified_resamples(y_true, resamples, seed)
    differences = resampled_scores(metric, y_true, a, rows) - resampled_scores(metric, y_true, b, rows)
    differences = differences[~np.isnan(differences)]
    tail = (1 - level) / 2 * 100
    low, high = (np.percentile(differences, [tail, 100 - tail]) if len(differences) else (np.nan, np.nan))
    return BootstrapComparison(
        leader=leader,
        runner_up=runner_up,
        metric=metric,
        difference=float(score(metric, y_true, a) - score(metric, y_true, b)),
        low=float(low),
        high=float(high),
        level=level,
        resamples=resamples,
        cannot_tell=bool(not len(differences) or low <= 0.0 <= high),
    )
