"""Clinical classification metrics, computed with scikit-learn."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    log_loss,
    precision_recall_fscore_support,
    roc_auc_score,
)

from xray.entity.artifact_entity import ClassMetrics, SplitMetrics


def roc_auc(y_true: np.ndarray, probs: np.ndarray) -> float:
    """Binary AUC of the positive class, or macro one-vs-rest AUC; NaN when a class is absent."""
    labels = np.arange(probs.shape[1])
    if len(np.unique(y_true)) < 2:
        return float("nan")
    try:
        if probs.shape[1] == 2:
            return float(roc_auc_score(y_true, probs[:, 1]))
        return float(roc_auc_score(y_true, probs, multi_class="ovr", average="macro", labels=labels))
    except ValueError:
        return float("nan")


def expected_calibration_error(y_true: np.ndarray, probs: np.ndarray, bins: int = 15) -> float:
    """Top-label ECE (Guo et al. 2017); scikit-learn's calibration_curve covers only the binary case."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y_true
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        mask = which == b
        if mask.any():
            ece += mask.mean() * abs(correct[mask].mean() - confidence[mask].mean())
    return float(ece)


def compute_metrics(y_true: np.ndarray, probs: np.ndarray, class_names: tuple[str, ...], bins: int = 15) -> SplitMetrics:
    labels = np.arange(len(class_names))
    predicted = probs.argmax(axis=1)
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, predicted, labels=labels, zero_division=0
    )
    matrix = confusion_matrix(y_true, predicted, labels=labels)
    sensitivity = specificity = None
    if len(class_names) == 2:
        tn, fp, fn, tp = matrix.ravel()
        sensitivity = float(tp / (tp + fn)) if tp + fn else 0.0
        specificity = float(tn / (tn + fp)) if tn + fp else 0.0
    return SplitMetrics(
        accuracy=float(accuracy_score(y_true, predicted)),
        roc_auc=roc_auc(y_true, probs),
        macro_f1=float(f1_score(y_true, predicted, labels=labels, average="macro", zero_division=0)),
        loss=float(log_loss(y_true, np.clip(probs, 1e-7, 1.0), labels=labels)),
        ece=expected_calibration_error(y_true, probs, bins),
        per_class={
            name: ClassMetrics(
                precision=float(precision[i]), recall=float(recall[i]), f1=float(f1[i]), support=int(support[i])
            )
            for i, name in enumerate(class_names)
        },
        confusion_matrix=tuple(tuple(int(v) for v in row) for row in matrix),
        sensitivity=sensitivity,
        specificity=specificity,
    )
