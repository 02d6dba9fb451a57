"""Stage 3: fit every candidate on the cached arrays and keep each one's best checkpoint.

The fitting itself is the fit engine (xray/training/fit.py), planned under
``trainer.time_budget`` (xray/training/budget.py) and, with
``trainer.cv_folds >= 2``, cross-validated first (xray/training/cross_validation.py).
Under torchrun every rank runs the same ``fit`` calls in the same order with
the model wrapped in DistributedDataParallel: each rank trains on its shard of
every epoch with ``batch_size / world_size`` images per step, so the global
batch, the steps per epoch and the learning-rate schedule match a
single-process run. Rank 0 runs this stage; the other ranks run
``train_worker`` and write nothing.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from xray.training.distributed import DistContext
from xray.data.preprocessing import preprocessing_of
from xray.data.snapshot import split_rows
from xray.entity.artifact_entity import CandidateModel, DataTransformationArtifact, ModelTrainerArtifact, TrainingPlan
from xray.entity.config_entity import AugmentConfig, PipelineConfig, TrainerConfig
from xray.errors import ConfigError, XrayError
from xray.models.builders import build_model, count_parameters
from xray.pipeline.stage import Inputs, ProgressFn, StageContext
from xray.pipeline.store import fingerprint as fingerprint_of, load_typed, new_header, stage_code_hash
from xray.training import cross_validation
from xray.training.budget import at_size, candidate_deadline, make_plan, planned_schedule
from xray.training.cross_validation import CandidateCV, FoldPlan
from xray.training.fit import FitResult, TrainingData, batch_plan, fit, intensity_once, small_data_batch
from xray.training.ranks import Ranks
from xray.typed import from_mapping, to_jsonable

logger = logging.getLogger(__name__)

STAGE = "model_trainer"
CACHED = True


@dataclass(frozen=True)
class _Training:
    """What every rank prepares before fitting: the config for this data, the arrays (at the planned size),
    the folds and the plan."""

    cfg: TrainerConfig  # trainer.* with the batch fitted to the dataset (small_data_batch)
    data: TrainingData
    folds: FoldPlan | None
    plan: TrainingPlan | None
    deadline: float | None


def fingerprint(config: PipelineConfig, inputs: Inputs) -> str:
    """World size is part of the fingerprint only when > 1, so single-process fingerprints are unchanged."""
    params = to_jsonable(config.trainer)
    replay = recorded_plan(config.trainer.replay_plan)
    if replay is not None:  # keyed on the plan itself, not on the path that named it
        params = {"trainer": params, "replayed_plan": to_jsonable(replay[0])}
    if inputs.world_size > 1:
        params = {"trainer": params, "world_size": inputs.world_size}
    upstream = [inputs.get(DataTransformationArtifact).header.fingerprint]
    return fingerprint_of(STAGE, params, upstream, stage_code_hash(__name__))


def load_training_data(run_path: Path, transformation: DataTransformationArtifact) -> TrainingData:
    """The cached arrays, with each training image's source where the run pools several."""
    return TrainingData(
        train_x=transformation.load_array(run_path, "train_x"),
        train_y=transformation.load_array(run_path, "train_y"),
        val_x=transformation.load_array(run_path, "val_x"),
        val_y=transformation.load_array(run_path, "val_y"),
        class_names=transformation.class_names,
        preprocessing=preprocessing_of(transformation),
        augment=from_mapping(AugmentConfig, dict(transformation.augmentation)),
        train_sources=train_sources(run_path, transformation),
    )


def train_sources(run_path: Path, transformation: DataTransformationArtifact) -> np.ndarray | None:
    """Each training image's source as an index (splits.jsonl, by row), or None when there is only one."""
    sources = [row.get("source", "") for row in split_rows(run_path, transformation, "train")]
    names = sorted(set(sources))
    if len(names) < 2:
        return None
    return np.array([names.index(source) for source in sources], dtype=np.int64)


def run(ctx: StageContext, inputs: Inputs) -> ModelTrainerArtifact:
    """Train every candidate and write the artifact: the single process, or rank 0 of a distributed job."""
    run_dir = ctx.run
    transformation = inputs.get(DataTransformationArtifact)
    ranks = Ranks(ctx.dist)
    training = _prepare(ctx.config.trainer, lambda: load_training_data(run_dir.path, transformation), run_dir.path, ranks)
    cfg = training.cfg
    out = run_dir.stage_dir(STAGE)
    candidates, files = [], []
    cv_results: dict[str, CandidateCV] = {}
    for name, result, cv in _train_each(training, ctx.progress, ranks):
        checkpoint = out / f"{name}.pt"
        torch.save(result.state_dict, checkpoint)
        files.append(checkpoint)
        if cv is not None:
            cv_results[name] = cv
        candidates.append(_record(name, result, cv, cfg, run_dir.relative(checkpoint), len(training.data.class_names), ranks))
    cv_files: dict[str, str] = {}
    if training.folds is not None:
        written = cross_validation.write_summary(training.folds, cv_results, cfg, out)
        files += list(written.values())
        cv_files = {key: run_dir.relative(path) for key, path in written.items()}
    return ModelTrainerArtifact(
        header=new_header(run_dir, ModelTrainerArtifact, STAGE, ctx.fingerprint, parents=[transformation.header.artifact_id], files=files),
        architecture_input={
            "image_size": training.data.preprocessing.image_size,
            "channels": transformation.channels,
            "num_classes": len(transformation.class_names),
        },
        candidates=tuple(candidates),
        cross_validation=cv_files,
        plan=training.plan,
    )


def train_worker(config: PipelineConfig, run_path: Path, transformation_json: Path, dist: DistContext) -> None:
    """A rank other than 0: the same fit() calls as rank 0, in the same order; it writes nothing."""

    def load() -> TrainingData:
        return load_training_data(run_path, load_typed(DataTransformationArtifact, transformation_json))

    ranks = Ranks(dist)
    for _ in _train_each(_prepare(config.trainer, load, run_path, ranks), None, ranks):
        pass


def _prepare(cfg: TrainerConfig, load, run_path: Path, ranks: Ranks) -> _Training:
    started, config_batch = time.monotonic(), cfg.batch_size
    data = ranks.load_everywhere(load, run_path)
    cfg = small_data_batch(cfg, len(data.train_y))
    if cfg.batch_size != config_batch:
        ranks.log(
            "%d training images: batch %d (not %d) at learning rate %.2g, %d steps an epoch",
            len(data.train_y), cfg.batch_size, config_batch, cfg.learning_rate,
            batch_plan(len(data.train_y), cfg.batch_size, ranks.world_size)[2],
        )
    cross_validated = cfg.cv_folds >= 2
    if cross_validated:
        cross_validation.check_folds(data.train_y, data.val_y, data.class_names, cfg.cv_folds)  # before minutes of measuring
    plan, deadline = make_plan(cfg, data, cross_validated, ranks, started, recorded_plan(cfg.replay_plan))
    data = intensity_once(at_size(data, plan.image_size) if plan else data)  # resized first, as serving does
    folds = cross_validation.plan_folds(data, cfg.cv_folds, cfg.seed) if cross_validated else None  # at the trained size
    return _Training(cfg, data, folds, plan, deadline)


def recorded_plan(where: str) -> tuple[TrainingPlan, str] | None:
    """trainer.replay_plan: (the TrainingPlan an earlier run recorded, where it came from), or None when unset."""
    if not where:
        return None
    path = Path(where)
    path = path / STAGE / "artifact.json" if path.is_dir() else path
    try:
        artifact = load_typed(ModelTrainerArtifact, path)
    except (XrayError, OSError, ValueError, TypeError, KeyError, AttributeError) as exc:  # any JSON that is not one
        raise ConfigError(f"trainer.replay_plan {where}: not a run's trainer artifact ({exc})") from None
    if artifact.plan is None:
        raise ConfigError(f"trainer.replay_plan {where}: that run trained without a time budget, so it recorded no plan")
    return artifact.plan, artifact.header.run_id


def _train_each(
    training: _Training, progress: ProgressFn | None, ranks: Ranks
) -> Iterator[tuple[str, FitResult, CandidateCV | None]]:
    """Each candidate's final fit (and its cross-validation), one at a time, so rank 0 saves as it goes."""
    cfg, data, plan = training.cfg, training.data, training.plan
    planned = {c.name: c.planned_epochs for c in plan.candidates} if plan else {name: 0 for name in cfg.candidates}
    for name, epochs in planned.items():
        cand_cfg = planned_schedule(cfg, plan.steps_per_epoch, epochs) if plan else cfg
        if training.folds is None:
            ranks.log("training %s on %d images (%d validation)", name, len(data.train_y), len(data.val_y))
            deadline = training.deadline
            until = candidate_deadline(plan, name, time.monotonic(), deadline) if plan and deadline else None
            yield name, fit(name, data, cand_cfg, progress=progress, dist=ranks.dist, deadline=until), None
        else:
            cv = cross_validation.cross_validate(name, data, training.folds, cand_cfg, progress=progress, dist=ranks.dist)
            yield name, cv.final, cv


def _record(
    name: str, result: FitResult, cv: CandidateCV | None, cfg: TrainerConfig, checkpoint: str, num_classes: int, ranks: Ranks
) -> CandidateModel:
    return CandidateModel(
        name=name,
        checkpoint=checkpoint,
        history=result.history,
        best_epoch=result.best_epoch,
        monitor=result.monitor,
        best_score=result.best_score,
        parameters=count_parameters(build_model(name, num_classes)),
        train_seconds=round(result.train_seconds, 2),
        images_per_second=round(result.images_per_second, 2),
        precision=result.precision,
        device=result.device,
        stopped_early=result.stopped_early,
        cv_scores=cv.scores if cv else (),
        world_size=ranks.world_size,
        cv_fold_metrics=cv.folds if cv else (),
        cv_final_model=cfg.cv_final_model if cv else None,
        members=(name,) * len(cv.scores) if cv and cfg.cv_final_model == "ensemble" else (),
        cv_retrain_epochs=cv.retrain_epochs if cv else None,
        stopped_by_budget=result.stopped_by_budget,
        batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate,
    )
