"""Stratified k-fold cross-validation on train+val: choose a candidate on K held-out parts, not on one small split.

The pool is the training split followed by the validation split. The test
split is never loaded here, so it stays an honest estimate for whichever
model is chosen. Each fold trains with the usual early stopping on its
held-out part, and the fold's best checkpoint is scored with the metrics
evaluation uses. The candidate's final model is then either retrained on the
whole pool for the mean best-epoch count over the folds (``retrain``: the
schedule is compressed to that many epochs and, with nothing held out, the
last epoch is kept) or the best fold's model (``best_fold``).

Normalisation statistics come from the transformation stage (the training
split), so a fold's held-out images contributed to one global mean and std:
two numbers, a negligible leak next to what the folds protect.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import StratifiedKFold

from xray.training.distributed import DistContext
from xray.entity.artifact_entity import FoldScore
from xray.entity.config_entity import TrainerConfig
from xray.errors import DataError
from xray.serving.inference import predict_proba, prepare_model
from xray.evaluation.metrics import compute_metrics
from xray.models.builders import build_model, ensemble_state_dict
from xray.training.fit import FitResult, ProgressFn, TrainingData, fit
from xray.training.ranks import Ranks
from xray.typed import to_jsonable

logger = logging.getLogger(__name__)

METRICS = ("accuracy", "roc_auc", "macro_f1", "loss")


@dataclass(frozen=True)
class FoldPlan:
    """The pool and its folds, the same on every rank (seeded)."""

    k: int
    seed: int
    x: np.ndarray  # train rows, then val rows
    y: np.ndarray
    origin_split: np.ndarray  # "train" or "val" for each pool row
    origin_row: np.ndarray  # the row in that split
    folds: tuple[tuple[np.ndarray, np.ndarray], ...]  # (training rows, held-out rows) into the pool
    class_names: tuple[str, ...]


@dataclass(frozen=True)
class CandidateCV:
    folds: tuple[FoldScore, ...]  # rank 0 only (empty on other ranks, which write nothing)
    scores: tuple[float, ...]  # the trainer's monitor score at each fold's best epoch
    final: FitResult
    best_fold: int
    retrain_epochs: int | None
    seconds: float
    monitor: str  # the metric each fold's best epoch was chosen on (trainer.monitor, auto resolved)


def check_folds(train_y: np.ndarray, val_y: np.ndarray, class_names: tuple[str, ...], k: int) -> None:
    """A DataError unless every class has at least ``k`` images in train+val."""
    counts = np.bincount(np.concatenate([train_y, val_y]), minlength=len(class_names))
    if counts.min() < k:
        short = int(counts.argmin())
        raise DataError(
            f"trainer.cv_folds={k} needs at least {k} images of every class in train+val; "
            f"{class_names[short]} has {int(counts[short])}"
        )


def plan_folds(data: TrainingData, k: int, seed: int) -> FoldPlan:
    """The k stratified folds over train+val, on the arrays as given (the caller resizes them first)."""
    check_folds(data.train_y, data.val_y, data.class_names, k)
    y = np.concatenate([data.train_y, data.val_y])
    splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    folds = tuple((train, held) for train, held in splitter.split(np.zeros(len(y)), y))
    return FoldPlan(
        k=k,
        seed=seed,
        x=np.concatenate([data.train_x, data.val_x]),
        y=y,
        origin_split=np.array(["train"] * len(data.train_y) + ["val"] * len(data.val_y)),
        origin_row=np.concatenate([np.arange(len(data.train_y)), np.arange(len(data.val_y))]),
        folds=folds,
        class_names=data.class_names,
    )


def fold_of_rows(plan: FoldPlan) -> np.ndarray:
    """For each pool row, the fold (1-based) in which it is held out: exactly one per row."""
    fold = np.zeros(len(plan.y), dtype=np.int64)
    for i, (_, held) in enumerate(plan.folds, start=1):
        fold[held] = i
    return fold


def retrain_epochs(best_epochs: list[int], max_epochs: int) -> int:
    """The mean best epoch over folds, rounded half up, within [1, max_epochs]."""
    return max(1, min(max_epochs, math.floor(float(np.mean(best_epochs)) + 0.5)))


def cross_validate(
    name: str,
    data: TrainingData,
    plan: FoldPlan,
    cfg: TrainerConfig,
    progress: ProgressFn | None = None,
    dist: DistContext | None = None,
) -> CandidateCV:
    """K fits on the folds, then the final model; every rank of a DDP job calls this identically."""
    ranks = Ranks(dist)
    started = time.perf_counter()
    scores: list[float] = []
    best_epochs: list[int] = []
    fold_scores: list[FoldScore] = []
    best: tuple[int, FitResult] | None = None
    kept: list[dict[str, torch.Tensor]] = []  # every fold's weights, for the bag (cv_final_model ensemble)
    for i, (train_rows, held_rows) in enumerate(plan.folds, start=1):
        fold = dataclasses.replace(
            data,
            train_x=plan.x[train_rows], train_y=plan.y[train_rows], val_x=plan.x[held_rows], val_y=plan.y[held_rows],
            train_sources=None,  # folds mix train and val rows: weighted by class alone
        )
        ranks.log("%s fold %d/%d: training on %d images, validating on %d", name, i, plan.k, len(train_rows), len(held_rows))
        report = None if progress is None else functools.partial(progress, fold=i, folds=plan.k)
        result = fit(name, fold, cfg, progress=report, dist=dist)
        scores.append(result.best_score)
        monitor = result.monitor
        best_epochs.append(result.best_epoch)
        if ranks.is_lead:
            fold_scores.append(_score_fold(name, result, fold, i, ranks))
        if cfg.cv_final_model == "ensemble":
            kept.append(result.state_dict)
        if best is None or _better(result.best_score, best[1].best_score, result.monitor != "loss"):
            best = (i, result)
        else:
            del result  # keep one fold's weights in memory, not K (unless they are bagged)
    assert best is not None
    ranks.log(
        "%s: %d-fold %s %.4f ± %.4f (best epochs %s)", name, plan.k, monitor,
        float(np.mean(scores)), float(np.std(scores)), best_epochs,
    )
    epochs, final = None, best[1]
    if cfg.cv_final_model == "retrain":
        epochs = retrain_epochs(best_epochs, max(cfg.epochs, *best_epochs))  # min_steps may have stretched them
        final = _retrain(name, data, plan, cfg, epochs, float(np.mean(scores)), progress, ranks)
    elif cfg.cv_final_model == "ensemble":  # the best fold's history stands for the bag's; nothing is retrained
        final = dataclasses.replace(final, state_dict=ensemble_state_dict(kept) if ranks.is_lead else {},
                                    best_score=float(np.mean(scores)))
    return CandidateCV(
        folds=tuple(fold_scores),
        scores=tuple(round(float(s), 6) for s in scores),
        final=final,
        best_fold=best[0],
        retrain_epochs=epochs,
        seconds=time.perf_counter() - started,
        monitor=monitor,
    )


def _retrain(
    name: str, data: TrainingData, plan: FoldPlan, cfg: TrainerConfig, epochs: int, cv_mean: float,
    progress: ProgressFn | None, ranks: Ranks,
) -> FitResult:
    """The final model on the whole pool for ``epochs``; nothing is held out, so the CV mean stands in as its score."""
    pool = dataclasses.replace(data, train_x=plan.x, train_y=plan.y, val_x=plan.x[:0], val_y=plan.y[:0], train_sources=None)
    ranks.log("%s: retraining on all %d train+val images for %d epochs", name, len(plan.y), epochs)
    report = None if progress is None else functools.partial(progress, fold="final", folds=plan.k)
    schedule = dataclasses.replace(cfg, epochs=epochs, early_stopping_patience=0, min_steps=0)
    final = fit(name, pool, schedule, progress=report, dist=ranks.dist)
    return dataclasses.replace(final, best_score=cv_mean)


def _better(score: float, incumbent: float, higher_is_better: bool) -> bool:
    if math.isnan(score):
        return False
    if math.isnan(incumbent):
        return True
    return score > incumbent if higher_is_better else score < incumbent


def _score_fold(name: str, result: FitResult, fold: TrainingData, index: int, ranks: Ranks) -> FoldScore:
    """The fold's best checkpoint on its held-out part, with evaluation's metrics (fp32, like evaluation)."""
    device = ranks.device()
    model = build_model(name, len(fold.class_names))
    model.load_state_dict(result.state_dict)
    model = prepare_model(model, device)
    probs = predict_proba(model, fold.val_x, fold.preprocessing, device)
    metrics = compute_metrics(fold.val_y, probs, fold.class_names)
    return FoldScore(
        fold=index,
        train_size=len(fold.train_y),
        val_size=len(fold.val_y),
        best_epoch=result.best_epoch,
        epochs_run=len(result.history),
        accuracy=round(metrics.accuracy, 6),
        roc_auc=round(metrics.roc_auc, 6),
        macro_f1=round(metrics.macro_f1, 6),
        loss=round(metrics.loss, 6),
    )


def summarize(folds: tuple[FoldScore, ...]) -> dict[str, dict[str, float]]:
    """Mean and population std (ddof=0) of each metric over the folds."""
    return {
        "mean": {m: float(np.mean([getattr(f, m) for f in folds])) for m in METRICS},
        "std": {m: float(np.std([getattr(f, m) for f in folds])) for m in METRICS},
    }


def write_summary(plan: FoldPlan, results: dict[str, CandidateCV], cfg: TrainerConfig, out: Path) -> dict[str, Path]:
    """folds_summary.csv (K rows per candidate), folds_summary.json (with mean ± std) and fold_assignment.csv."""
    paths = {
        "summary_csv": out / "folds_summary.csv",
        "summary_json": out / "folds_summary.json",
        "assignment_csv": out / "fold_assignment.csv",
    }
    columns = ["candidate", *(f.name for f in dataclasses.fields(FoldScore)), "monitor_score"]
    with open(paths["summary_csv"], "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(columns)
        for name, cv in results.items():
            for fold, score in zip(cv.folds, cv.scores):
                writer.writerow([name, *to_jsonable(fold).values(), score])
    summary = {
        "folds": plan.k,
        "strategy": f"StratifiedKFold(n_splits={plan.k}, shuffle=True, random_state={plan.seed}) on train+val",
        "pool": {"train": int((plan.origin_split == "train").sum()), "val": int((plan.origin_split == "val").sum())},
        "monitor": cfg.monitor,  # the setting; each candidate's entry names the metric it resolved to
        "final_model": cfg.cv_final_model,
        "std": "population (ddof=0)",
        "candidates": {
            name: {
                "folds": to_jsonable(cv.folds),
                "monitor": cv.monitor,
                "monitor_scores": list(cv.scores),
                **summarize(cv.folds),
                "best_fold": cv.best_fold,
                "retrain_epochs": cv.retrain_epochs,
                "seconds": round(cv.seconds, 2),
            }
            for name, cv in results.items()
        },
    }
    paths["summary_json"].write_text(json.dumps(summary, indent=2) + "\n")
    fold = fold_of_rows(plan)
    with open(paths["assignment_csv"], "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["split", "row", "label", "fold"])
        for i in range(len(plan.y)):
            writer.writerow([plan.origin_split[i], int(plan.origin_row[i]), plan.class_names[plan.y[i]], int(fold[i])])
    return paths
