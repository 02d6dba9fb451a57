"""The operating point: the threshold on P(disease) that a clinician can hold the model to.

Argmax answers "which class is likeliest"; a screening tool instead promises
to miss at most a stated share of disease. The threshold is chosen on the
validation split to reach ``target_sensitivity`` and only then measured on
test, so the reported test sensitivity is an honest estimate of the promise.
"""

from __future__ import annotations

import numpy as np

from xray.entity.artifact_entity import OperatingPoint
from xray.entity.config_entity import OperatingPointConfig
from xray.errors import ConfigError, DataError


def positive_indices(positive: tuple[str, ...], class_names: tuple[str, ...]) -> tuple[int, ...]:
    """Column indices of the positive classes; unknown names or no negative class left is a config error."""
    unknown = [name for name in positive if name not in class_names]
    if unknown:
        raise ConfigError(
            f"config: evaluation.operating_point.positive names unknown class {unknown[0]!r} (classes: {', '.join(class_names)})"
        )
    if len(positive) >= len(class_names):
        raise ConfigError("config: evaluation.operating_point.positive lists every class; leave at least one negative")
    return tuple(class_names.index(name) for name in positive)


def positive_score(probs: np.ndarray, indices: tuple[int, ...]) -> np.ndarray:
    return probs[:, list(indices)].sum(axis=1)


def choose_threshold(is_positive: np.ndarray, score: np.ndarray, target: float) -> float:
    """The highest threshold whose sensitivity (``score >= threshold``) reaches ``target``."""
    from sklearn.metrics import roc_curve  # imported here: the Bento imports this module and needs no sklearn

    if is_positive.all() or not is_positive.any():
        raise DataError("the validation split needs both positive and negative images to choose an operating point")
    fpr, tpr, thresholds = roc_curve(is_positive, score, drop_intermediate=False)
    index = int(np.argmax(tpr >= target - 1e-12))
    return float(min(thresholds[index], 1.0))


def rates_at(is_positive: np.ndarray, score: np.ndarray, threshold: float) -> tuple[float, float]:
    """(sensitivity, specificity) of ``score >= threshold``; NaN where a side has no images."""
    from sklearn.metrics import confusion_matrix

    tn, fp, fn, tp = confusion_matrix(is_positive, score >= threshold, labels=[False, True]).ravel()
    sensitivity = tp / (tp + fn) if tp + fn else float("nan")
    specificity = tn / (tn + fp) if tn + fp else float("nan")
    return float(sensitivity), float(specificity)


def operating_point(
    config: OperatingPointConfig,
    class_names: tuple[str, ...],
    val: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
) -> OperatingPoint | None:
    """``val``/``test``: (labels, probabilities). None when no positive classes are configured."""
    if not config.positive:
        return None
    indices = positive_indices(config.positive, class_names)
    val_positive, val_score = np.isin(val[0], indices), positive_score(val[1], indices)
    threshold = choose_threshold(val_positive, val_score, config.target_sensitivity)
    val_rates = rates_at(val_positive, val_score, threshold)
    test_rates = rates_at(np.isin(test[0], indices), positive_score(test[1], indices), threshold)
    return OperatingPoint(
        positive=tuple(config.positive),
        target_sensitivity=config.target_sensitivity,
        threshold=threshold,
        validation_sensitivity=val_rates[0],
        validation_specificity=val_rates[1],
        test_sensitivity=test_rates[0],
        test_specificity=test_rates[1],
    )
