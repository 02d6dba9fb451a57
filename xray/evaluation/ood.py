"""Fitting the Mahalanobis OOD score (see ``xray.models.ood`` for the method and why).

The class means come from the training films' features; the shared
covariance from their deviations from their class mean, estimated with
scikit-learn's ``LedoitWolf``: a few hundred films per class cannot fill a
256- or 1024-dimensional covariance, and shrinkage keeps it invertible. The
threshold is the ``acceptance`` quantile of the validation films' scores
(``acceptance_threshold``: the empirical quantile, or a fitted tail where the
validation split is too small for one, taken at an upper confidence bound so a
small split's uncertainty gives headroom), and test says whether it holds.
"""

from __future__ import annotations

import numpy as np
from scipy import stats
from sklearn.covariance import LedoitWolf

from xray.entity.artifact_entity import RefusedFilm
from xray.errors import DataError
from xray.models.ood import MemberStats, OODDetector


BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0


def acceptance_threshold(scores: np.ndarray, acceptance: float, confidence: float = 0.0) -> float:
    """The score at or below which ``acceptance`` of in-distribution films lie, estimated from ``scores``.

    The larger of the empirical quantile and that of a gamma distribution fitted to the scores (SciPy, location
    0; squared distances are gamma-like). Why both: with n validation films the empirical 99 % quantile is the
    largest of them once n < 100, and a new film exceeds the largest of n with probability 1/(n+1), so a
    38-film validation split refuses about 2.6 % of in-distribution films; the fitted tail extrapolates past
    the largest. On hundreds of films the two agree closely.

    ``confidence`` > 0 makes the fitted part an upper tolerance bound: the ``confidence`` quantile, over
    bootstrap resamples of the scores, of the gamma quantile refitted on each (method of moments, so the
    resamples cost little). A fit on 38 films is itself uncertain, and a point estimate of the 99 % quantile
    falls short of it about half the time; the bound does so with probability about ``1 - confidence``. As the
    split grows the bound closes in on the quantile.
    """
    values = np.asarray(scores, dtype=np.float64)
    if len(values) == 0:
        raise DataError("the validation split is empty: no OOD threshold can be set")
    empirical = float(np.quantile(values, acceptance, method="higher"))
    fitted = float("nan")
    if len(values) >= 3 and np.all(values > 0) and np.ptp(values) > 0:
        with np.errstate(all="ignore"):
            shape, _, scale = stats.gamma.fit(values, floc=0)
            fitted = float(stats.gamma.ppf(acceptance, shape, loc=0, scale=scale))
            if confidence > 0:
                fitted = max(fitted, _bootstrap_bound(values, acceptance, confidence))
    return max(empirical, fitted if np.isfinite(fitted) else empirical, 1e-12)


def _bootstrap_bound(values: np.ndarray, acceptance: float, confidence: float) -> float:
    """The ``confidence`` quantile of the gamma ``acceptance`` quantile over bootstrap resamples of ``values``."""
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    resamples = rng.choice(values, size=(BOOTSTRAP_RESAMPLES, len(values)), replace=True)
    mean, var = resamples.mean(axis=1), resamples.var(axis=1)
    keep = var > 0
    quantiles = stats.gamma.ppf(acceptance, mean[keep] ** 2 / var[keep], scale=var[keep] / mean[keep])
    return float(np.quantile(quantiles, confidence)) if quantiles.size else float("nan")


def fit_member(
    train_features: np.ndarray, train_labels: np.ndarray, num_classes: int, val_features: np.ndarray, acceptance: float,
    confidence: float = 0.0,
) -> MemberStats:
    """One single model's class means, shared LedoitWolf precision, and threshold on validation."""
    x = np.asarray(train_features, dtype=np.float64)
    present = [c for c in range(num_classes) if np.any(train_labels == c)]
    if len(present) < num_classes:
        raise DataError(f"the training split lacks classes {sorted(set(range(num_classes)) - set(present))}: no OOD fit")
    means = np.stack([x[train_labels == c].mean(axis=0) for c in range(num_classes)])
    covariance = LedoitWolf(assume_centered=True).fit(x - means[train_labels])
    provisional = MemberStats(means, covariance.precision_, 1.0)
    threshold = acceptance_threshold(provisional.distances(val_features), acceptance, confidence)
    return MemberStats(means.astype(np.float32), covariance.precision_.astype(np.float32), threshold)


def fit_detector(
    train_features: list[np.ndarray],
    train_labels: np.ndarray,
    val_features: list[np.ndarray],
    num_classes: int,
    acceptance: float,
    confidence: float = 0.0,
) -> OODDetector:
    """Every member fitted, then the model's threshold set on the combined validation scores."""
    members = tuple(
        fit_member(train, train_labels, num_classes, val, acceptance, confidence) for train, val in zip(train_features, val_features)
    )
    provisional = OODDetector(members, 1.0)
    return OODDetector(members, acceptance_threshold(provisional.scores(val_features), acceptance, confidence))


def refused_films(scores: np.ndarray, threshold: float, rows: list[dict]) -> tuple[RefusedFilm, ...]:
    """The films not accepted (score above ``threshold``, or NaN), highest first, named by their split rows (array order).

    The test split's refusals are in-distribution films turned away: which ones, not only how many,
    is what tells a tail film from a fault (one source's films, one class, a damaged file).
    """
    if len(scores) != len(rows):
        raise ValueError(f"{len(scores)} scores for {len(rows)} split rows")
    order = np.argsort(-np.nan_to_num(scores, nan=np.inf), kind="stable")
    refused = [i for i in order if not scores[i] <= threshold]  # a NaN score is not accepted either
    return tuple(RefusedFilm(rows[i]["ref"], rows[i]["label"], round(float(scores[i]), 4)) for i in refused)


def refused_text(films: tuple[RefusedFilm, ...] | list[RefusedFilm], limit: int = 5) -> str:
    """``Covid/a.jpg (Covid, score 1.0234), ...``: the run log's line (the model card gives the count only)."""
    shown = ", ".join(f"{f.ref} ({f.label}, score {f.score:.4f})" for f in films[:limit])
    return shown + (f", and {len(films) - limit} more" if len(films) > limit else "")
