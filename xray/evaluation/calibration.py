"""Temperature scaling (Guo et al., ICML 2017): one parameter that makes probabilities mean what they say.

A network trained to low loss is over-confident; dividing its log-probabilities
by one temperature ``T``, fitted on validation by minimising the negative
log-likelihood, repairs most of that without changing any prediction's class
(``xray.serving.inference.apply_temperature``, which serving applies). ``T`` is searched on
``log T`` with SciPy's bounded scalar minimiser.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize_scalar

LOG_T_BOUNDS = (float(np.log(0.05)), float(np.log(20.0)))


def negative_log_likelihood(probs: np.ndarray, labels: np.ndarray) -> float:
    return float(-np.mean(np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, 1.0))))


def fit_temperature(probs: np.ndarray, labels: np.ndarray) -> float:
    """The temperature that minimises validation NLL, within [0.05, 20]; 1.0 for an empty split.

    Also 1.0 when every validation film is already named right: the NLL then falls as ``T`` falls, so
    the fit would sharpen to the bound (a Covid19 model went to T = 0.05) on no evidence at all, and
    answer p = 1.00 on everything, films from elsewhere included.
    """
    if len(labels) == 0 or np.all(np.asarray(probs).argmax(axis=1) == labels):
        return 1.0
    logp = np.log(np.clip(np.asarray(probs, dtype=np.float64), 1e-12, 1.0))

    def nll(log_t: float) -> float:
        scaled = logp / np.exp(log_t)
        scaled -= scaled.max(axis=1, keepdims=True)
        log_norm = np.log(np.exp(scaled).sum(axis=1))
        return float(-np.mean(scaled[np.arange(len(labels)), labels] - log_norm))

    result = minimize_scalar(nll, bounds=LOG_T_BOUNDS, method="bounded", options={"xatol": 1e-4})
    best = float(np.exp(result.x))
    return best if nll(float(result.x)) <= nll(0.0) else 1.0  # never worse than no scaling


@dataclass(frozen=True)
class ReliabilityCurve:
    """Top-label reliability: per confidence bin with images, its mean confidence, accuracy and count."""

    confidence: tuple[float, ...]
    accuracy: tuple[float, ...]
    count: tuple[int, ...]


def reliability_curve(labels: np.ndarray, probs: np.ndarray, bins: int) -> ReliabilityCurve:
    """The same binning as ``xray.evaluation.metrics.expected_calibration_error``."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    rows = [(float(confidence[which == b].mean()), float(correct[which == b].mean()), int((which == b).sum()))
            for b in range(bins) if np.any(which == b)]
    return ReliabilityCurve(*(tuple(column) for column in zip(*rows))) if rows else ReliabilityCurve((), (), ())
