"""The model's own out-of-distribution score: Mahalanobis distance on its penultimate features.

Lee et al., "A Simple Unified Framework for Detecting Out-of-Distribution
Samples and Adversarial Attacks" (NeurIPS 2018): class-conditional Gaussians
with one shared covariance, fitted on the training films' globally pooled
features; an input's score is its smallest squared Mahalanobis distance to a
class mean. Chosen over a softmax or energy score because those read the
logits, and a classifier's logits can be large far from its training data:
the first Covid19 model called a flat grey image Covid with full confidence
(a confident softmax, a low energy), while its features lie far from every
class of films. Distances in feature space see that.

An ensemble scores each member on its own features; its score is the mean of
the members' distances, each divided by that member's own validation
threshold (so no member's feature scale dominates), and the ensemble's
threshold is set again on those combined validation scores. A single model is
the one-member case: its score is its distance over its threshold, so its
shipped threshold sits at about 1.

Only numpy here: the Bento scores with it; the fit (scikit-learn's
``LedoitWolf``) lives in ``xray.evaluation.ood``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

OOD_FILE = "ood_stats.npz"  # in the model directory, beside weights.pt; its sha256 is in model.json


@dataclass(frozen=True)
class MemberStats:
    """One single model's class means (``C×D``), shared precision matrix (``D×D``) and own threshold."""

    means: np.ndarray
    precision: np.ndarray
    threshold: float

    def distances(self, features: np.ndarray) -> np.ndarray:
        """The smallest squared Mahalanobis distance to a class mean, per row of ``N×D`` features."""
        x = np.asarray(features, dtype=np.float64)
        means, precision = self.means.astype(np.float64), self.precision.astype(np.float64)
        xp = x @ precision
        squared = (xp * x).sum(axis=1)[:, None] - 2.0 * xp @ means.T + ((means @ precision) * means).sum(axis=1)[None, :]
        return np.maximum(squared.min(axis=1), 0.0)


@dataclass(frozen=True)
class OODDetector:
    """Every member's statistics and the model's threshold: ``score <= threshold`` is accepted."""

    members: tuple[MemberStats, ...]
    threshold: float

    def scores(self, features: list[np.ndarray]) -> np.ndarray:
        """Mean over members of distance / member threshold; ``features``: one ``N×D`` array per member."""
        if len(features) != len(self.members):
            raise ValueError(f"{len(features)} feature arrays for {len(self.members)} members")
        return np.mean([m.distances(f) / m.threshold for m, f in zip(self.members, features)], axis=0)

    def save(self, path: Path) -> None:
        arrays: dict[str, np.ndarray] = {"threshold": np.array(self.threshold, np.float64)}
        for i, member in enumerate(self.members):
            arrays[f"means_{i}"] = member.means.astype(np.float32)
            arrays[f"precision_{i}"] = member.precision.astype(np.float32)
            arrays[f"threshold_{i}"] = np.array(member.threshold, np.float64)
        with open(path, "wb") as fh:  # a file handle: np.savez would append .npz to a name
            np.savez(fh, **arrays)

    @classmethod
    def load(cls, path: Path) -> OODDetector:
        with np.load(path, allow_pickle=False) as data:
            count = sum(1 for key in data.files if key.startswith("means_"))
            members = tuple(
                MemberStats(data[f"means_{i}"], data[f"precision_{i}"], float(data[f"threshold_{i}"])) for i in range(count)
            )
            return cls(members, float(data["threshold"]))
