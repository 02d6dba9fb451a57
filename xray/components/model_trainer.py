"""Stage 3: fit every candidate on the cached arrays and keep each one's best checkpoint.

The fast path on CPU is channels-last memory layout plus bf16 autocast where
the processor has native bf16 (fp32 otherwise); CUDA is used when present.
Class-weighted loss handles imbalance; early stopping watches a validation
metric and the best epoch's weights are what gets saved.

Under torchrun every rank runs the same ``fit`` calls in the same order with
the model wrapped in DistributedDataParallel: each rank trains on its shard of
every epoch (a DistributedSampler over the training indices) with
``batch_size / world_size`` images per step, so the global batch, the steps
per epoch and the learning-rate schedule match a single-process run. Only
rank 0 writes anything. With ``trainer.cv_folds >= 2`` each candidate is
cross-validated first (see ``cross_validation``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from xray import distributed
from xray.augment import augment_batch
from xray.capability import capability
from xray.components.training_budget import candidate_deadline, effective_budget, plan_training, training_deadline
from xray.config import parse_duration
from xray.distributed import DistContext
from xray.entity.artifact_entity import (
    CandidateModel,
    CandidateTiming,
    DataTransformationArtifact,
    EpochRecord,
    ModelTrainerArtifact,
    TrainingPlan,
)
from xray.entity.config_entity import AugmentConfig, PipelineConfig, TrainerConfig
from xray.errors import XrayError
from xray.inference import autocast, choose_device, choose_precision, predict_logits, prepare_model
from xray.metrics import roc_auc
from xray.models import build_model, count_parameters
from xray.preprocessing import Preprocessing, resize_batch
from xray.store import RunDir, fingerprint, load_typed, new_header
from xray.typed import from_mapping, to_jsonable

if TYPE_CHECKING:
    from xray.components.cross_validation import CandidateCV, FoldPlan

logger = logging.getLogger(__name__)

STAGE = "model_trainer"
PROBE_BATCH = 16  # images per timed step when planning a time budget
FULL_BATCH_PROBE_S = 2.0  # ... unless a whole batch (estimated from a probe step) takes less than this
ProgressFn = Callable[..., None]


@dataclass(frozen=True)
class TrainingData:
    train_x: np.ndarray  # uint8 N×H×W
    train_y: np.ndarray  # int64 N
    val_x: np.ndarray  # may be empty: then fit() keeps the last epoch (the cross-validation retrain)
    val_y: np.ndarray
    class_names: tuple[str, ...]
    preprocessing: Preprocessing
    augment: AugmentConfig


@dataclass(frozen=True)
class FitResult:
    state_dict: dict[str, torch.Tensor]  # empty on ranks other than 0: only rank 0 saves
    history: tuple[EpochRecord, ...]
    best_epoch: int
    best_score: float
    train_seconds: float
    images_per_second: float
    precision: str
    device: str
    stopped_early: bool
    stopped_by_budget: bool = False


def stage_fingerprint(
    config: PipelineConfig, transformation: DataTransformationArtifact, code: str, world_size: int = 1
) -> str:
    """World size is part of the fingerprint only when > 1, so single-process fingerprints are unchanged."""
    params = to_jsonable(config.trainer)
    if world_size > 1:
        params = {"trainer": params, "world_size": world_size}
    return fingerprint(STAGE, params, [transformation.header.fingerprint], code)


def load_training_data(run_path: Path, transformation: DataTransformationArtifact) -> TrainingData:
    def array(key: str) -> np.ndarray:
        return np.load(run_path / transformation.arrays[key])

    return TrainingData(
        train_x=array("train_x"),
        train_y=array("train_y"),
        val_x=array("val_x"),
        val_y=array("val_y"),
        class_names=transformation.class_names,
        preprocessing=preprocessing_of(transformation),
        augment=from_mapping(AugmentConfig, dict(transformation.augmentation)),
    )


def preprocessing_of(transformation: DataTransformationArtifact, image_size: int = 0) -> Preprocessing:
    """``image_size``: the size the models were trained at when the time budget shrank it (0: the transformation's)."""
    return Preprocessing(
        image_size=image_size or transformation.image_size,
        mean=transformation.normalization["mean"],
        std=transformation.normalization["std"],
        channels=transformation.channels,
        source_crop=transformation.source_crop,
        source_size=transformation.source_size,
        source_filter=transformation.source_filter,
    )


def run(
    config: PipelineConfig,
    run_dir: RunDir,
    transformation: DataTransformationArtifact,
    code: str,
    progress: ProgressFn | None = None,
    dist: DistContext | None = None,
) -> ModelTrainerArtifact:
    """Train every candidate and write the artifact: the single process, or rank 0 of a distributed job."""
    started = time.monotonic()
    cfg = config.trainer
    data = _load_everywhere(lambda: load_training_data(run_dir.path, transformation), run_dir.path, dist)
    out = run_dir.stage_dir(STAGE)
    world_size = dist.world_size if dist else 1
    folds = _fold_plan(data, cfg)
    plan, deadline = make_plan(cfg, data, folds, dist, started)
    data = at_size(data, plan.image_size) if plan else data
    candidates, files = [], []
    cv_results: dict[str, CandidateCV] = {}
    for name, result, cv in _train_each(cfg, data, folds, plan, deadline, progress, dist):
        checkpoint = out / f"{name}.pt"
        torch.save(result.state_dict, checkpoint)
        files.append(checkpoint)
        model = build_model(name, len(data.class_names))
        if cv is not None:
            cv_results[name] = cv
        candidates.append(
            CandidateModel(
                name=name,
                checkpoint=run_dir.relative(checkpoint),
                history=result.history,
                best_epoch=result.best_epoch,
                monitor=cfg.monitor,
                best_score=result.best_score,
                parameters=count_parameters(model),
                train_seconds=round(result.train_seconds, 2),
                images_per_second=round(result.images_per_second, 2),
                precision=result.precision,
                device=result.device,
                stopped_early=result.stopped_early,
                cv_scores=cv.scores if cv else (),
                world_size=world_size,
                cv_fold_metrics=cv.folds if cv else (),
                cv_final_model=cfg.cv_final_model if cv else None,
                cv_retrain_epochs=cv.retrain_epochs if cv else None,
                stopped_by_budget=result.stopped_by_budget,
            )
        )
    cv_files: dict[str, str] = {}
    if folds is not None:
        from xray.components import cross_validation

        written = cross_validation.write_summary(folds, cv_results, cfg, out)
        files += list(written.values())
        cv_files = {key: run_dir.relative(path) for key, path in written.items()}
    return ModelTrainerArtifact(
        header=new_header(
            run_dir, ModelTrainerArtifact, STAGE, stage_fingerprint(config, transformation, code, world_size),
            parents=[transformation.header.artifact_id], files=files,
        ),
        architecture_input={
            "image_size": data.preprocessing.image_size,
            "channels": transformation.channels,
            "num_classes": len(transformation.class_names),
        },
        candidates=tuple(candidates),
        cross_validation=cv_files,
        plan=plan,
    )


def train_worker(config: PipelineConfig, run_path: Path, transformation_json: Path, dist: DistContext) -> None:
    """A rank other than 0: the same fit() calls as rank 0, in the same order; it writes nothing."""

    def load() -> TrainingData:
        return load_training_data(run_path, load_typed(DataTransformationArtifact, transformation_json))

    started = time.monotonic()
    data = _load_everywhere(load, run_path, dist)
    folds = _fold_plan(data, config.trainer)
    plan, deadline = make_plan(config.trainer, data, folds, dist, started)
    data = at_size(data, plan.image_size) if plan else data
    for _ in _train_each(config.trainer, data, folds, plan, deadline, None, dist):
        pass


def _load_everywhere(load: Callable[[], TrainingData], run_path: Path, dist: DistContext | None) -> TrainingData:
    """Every rank reads the cached arrays itself (on several nodes they must sit on a shared filesystem);
    a rank that cannot fails every rank with its reason instead of leaving them waiting in a collective."""
    if dist is None:
        return load()
    data, problem = None, None
    try:
        data = load()
    except (XrayError, OSError, ValueError) as exc:
        problem = f"cannot read the cached arrays under {run_path} ({exc}); artifacts_dir must be on a filesystem every node sees"
    distributed.check_ready(dist, problem)
    assert data is not None
    return data


def _fold_plan(data: TrainingData, cfg: TrainerConfig) -> FoldPlan | None:
    if cfg.cv_folds < 2:
        return None
    from xray.components import cross_validation

    return cross_validation.plan_folds(data, cfg.cv_folds, cfg.seed)


def _train_each(
    cfg: TrainerConfig,
    data: TrainingData,
    folds: FoldPlan | None,
    plan: TrainingPlan | None,
    deadline: float | None,
    progress: ProgressFn | None,
    dist: DistContext | None,
) -> Iterator[tuple[str, FitResult, CandidateCV | None]]:
    """Each candidate's final fit (and its cross-validation), one at a time, so rank 0 saves as it goes."""
    planned = {c.name: c.planned_epochs for c in plan.candidates} if plan else {name: 0 for name in cfg.candidates}
    for name, epochs in planned.items():
        cand_cfg = planned_schedule(cfg, plan.steps_per_epoch, epochs) if plan else cfg
        if folds is None:
            if dist is None or dist.is_lead:
                logger.info("training %s on %d images (%d validation)", name, len(data.train_y), len(data.val_y))
            until = candidate_deadline(plan, name, time.monotonic(), deadline) if plan and deadline else None
            yield name, fit(name, data, cand_cfg, progress=progress, dist=dist, deadline=until), None
        else:
            from xray.components import cross_validation

            cv = cross_validation.cross_validate(name, data, folds, cand_cfg, progress=progress, dist=dist)
            yield name, cv.final, cv


def make_plan(
    cfg: TrainerConfig, data: TrainingData, folds: FoldPlan | None, dist: DistContext | None, started: float
) -> tuple[TrainingPlan | None, float | None]:
    """(plan, training deadline on time.monotonic()) under trainer.time_budget; (None, None) without one.

    Rank 0 measures and plans; under DDP the other ranks receive its plan, so all train the same schedule.
    """
    budget = parse_duration(cfg.time_budget)
    if budget is None:
        return None, None
    budget = effective_budget(budget, cfg.budget_per_image, len(data.train_y))
    deadline = training_deadline(started, budget)
    plan = None
    if dist is None or dist.is_lead:
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        device = dist.device if dist else choose_device()
        precision = choose_precision(device, cfg.precision)
        world_size = dist.world_size if dist else 1
        _, batch_size, batches = batch_plan(len(data.train_y), cfg.batch_size, world_size)
        if cfg.max_batches_per_epoch:
            batches = min(batches, cfg.max_batches_per_epoch)
        repeats = cfg.cv_folds + 1 if folds is not None else 1  # each fold, then the final model

        def measure(name: str, size: int) -> CandidateTiming:
            return time_candidate(name, data, cfg, size, batch_size, batches, device, precision, world_size, repeats)

        plan = plan_training(
            cfg.candidates, stretch_schedule(cfg, batches).epochs, data.preprocessing.image_size, batches, budget,
            measure, remaining_s=lambda: deadline - time.monotonic(),
            capability=capability().describe() if device.type == "cpu" else f"cuda: {torch.cuda.get_device_name(device)}",
        )
        logger.info(
            "time budget %s (%.0f s for %d training images): %s at %d px (measured in %.1f s)%s",
            cfg.time_budget, budget, len(data.train_y),
            ", ".join(f"{c.name} {c.planned_epochs}/{c.wanted_epochs} epochs ~{c.planned_seconds:.0f} s" for c in plan.candidates),
            plan.image_size, plan.planning_seconds, "".join(f"; dropped {d.name}" for d in plan.dropped),
        )
    if dist is not None:
        plan = distributed.broadcast_object(dist, plan, "the training plan", setup=True)
    return plan, deadline


def time_candidate(
    name: str,
    data: TrainingData,
    cfg: TrainerConfig,
    size: int,
    batch_size: int,
    batches: int,
    device: torch.device,
    precision: str,
    world_size: int,
    repeats: int,
) -> CandidateTiming:
    """Seconds per training step and forward images/s, on real images at ``size``.

    Timed on a batch of at most PROBE_BATCH images (after a warm-up step) and scaled to the planned
    batch: per-image cost on CPU only falls with batch, so the estimate errs long, and measuring a
    DenseNet at batch 64 on two busy cores would itself eat minutes of the budget. Where the whole
    batch is cheap (small images), it is timed at the whole batch instead: at 32 px a 16-image probe
    made DenseNet-121 look 2.4x slower than it trains at batch 64 (43 vs 105 img/s on AVX2), and the
    planner dropped it from PneumoniaMNIST.
    """
    torch.manual_seed(cfg.seed)
    model = prepare_model(build_model(name, len(data.class_names)), device, cfg.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    criterion = nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(cfg.seed)
    probe = max(2, min(batch_size, PROBE_BATCH, len(data.train_y)))
    pixels = torch.from_numpy(resize_batch(data.train_x[:probe], size))
    labels = torch.from_numpy(data.train_y[:probe])
    prep = dataclasses.replace(data.preprocessing, image_size=size)
    model.train()
    step = lambda: _train_step(model, criterion, optimizer, prep, data.augment, pixels, labels, generator, device, precision, cfg.channels_last)  # noqa: E731
    step()  # warm-up: allocator, kernel selection
    started = time.perf_counter()
    step()
    if batch_size > probe and (time.perf_counter() - started) * batch_size / probe < FULL_BATCH_PROBE_S:
        probe = min(batch_size, len(data.train_y))
        pixels = torch.from_numpy(resize_batch(data.train_x[:probe], size))
        labels = torch.from_numpy(data.train_y[:probe])
        step()  # warm-up at the whole batch
    steps, started = 0, time.perf_counter()
    while steps < 3 and (steps == 0 or time.perf_counter() - started < 1.0):
        step()
        steps += 1
    step_s = (time.perf_counter() - started) / steps * batch_size / probe
    started = time.perf_counter()
    predict_logits(model, pixels.numpy(), prep, device, "fp32", channels_last=cfg.channels_last)
    eval_ips = probe / max(time.perf_counter() - started, 1e-6)
    forward_images = min(cfg.precise_bn_images, len(data.train_y)) + math.ceil(len(data.val_y) / world_size)
    epoch_s = (batches * step_s + forward_images / eval_ips) * repeats
    return CandidateTiming(name, size, batch_size, round(step_s, 4), round(eval_ips, 1), round(epoch_s, 2))


def planned_schedule(cfg: TrainerConfig, steps_per_epoch: int, epochs: int) -> TrainerConfig:
    """The config a candidate trains with under a plan: ``epochs`` in all, warmup and patience shortened in
    proportion (they keep their share of the schedule), and min_steps spent already (the plan counted it)."""
    stretched = stretch_schedule(cfg, steps_per_epoch)
    factor = epochs / stretched.epochs
    return dataclasses.replace(
        stretched,
        epochs=epochs,
        warmup_epochs=round(stretched.warmup_epochs * factor),
        early_stopping_patience=math.ceil(stretched.early_stopping_patience * factor),
        min_steps=0,
    )


def at_size(data: TrainingData, size: int) -> TrainingData:
    """The training and validation images at ``size`` (the budget shrank the image), resized as ingestion resizes."""
    if size == data.preprocessing.image_size:
        return data
    return dataclasses.replace(
        data,
        train_x=resize_batch(data.train_x, size),
        val_x=resize_batch(data.val_x, size),
        preprocessing=dataclasses.replace(data.preprocessing, image_size=size),
    )


def _train_step(
    trained: nn.Module,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    preprocessing: Preprocessing,
    augment: AugmentConfig,
    pixels: torch.Tensor,
    labels: torch.Tensor,
    generator: torch.Generator,
    device: torch.device,
    precision: str,
    channels_last: bool,
) -> torch.Tensor:
    """One optimizer step on a uint8 batch: augment, normalise, forward, backward. Returns the loss."""
    x = augment_batch(preprocessing.to_unit(pixels), augment, generator)
    x = preprocessing.normalize(x).to(device, non_blocking=True)
    y = labels.to(device, non_blocking=True)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast(device, precision):
        logits = trained(x)
    loss = criterion(logits.float(), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss


def class_weights(labels: np.ndarray, num_classes: int, mode: str = "sqrt") -> torch.Tensor:
    """Loss weights against class imbalance, normalised so a balanced set gets 1 everywhere.

    ``balanced`` is inverse frequency; ``sqrt`` its square root, which on
    PneumoniaMNIST (1:2.9) kept the minority's recall without the full
    weighting's bias (specificity 1.0, sensitivity 0.84 at 0.5).
    """
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    weights = len(labels) / (num_classes * np.maximum(counts, 1))
    if mode == "sqrt":
        weights = np.sqrt(weights)
    return torch.tensor(weights, dtype=torch.float32)


def recalibrate_batchnorm(
    model: nn.Module, data: TrainingData, device: torch.device, precision: str, cfg: TrainerConfig, batch_size: int
) -> None:
    """Recompute BatchNorm statistics on clean training images ("precise BN").

    Running averages with momentum lag far behind the weights when an epoch
    has few steps (a few hundred films make 6 batches), and evaluation then
    sees stale statistics: on covid19-3class the validation loss sat at 5-8
    while the training loss fell. One forward pass over a fixed subset with
    cumulative averaging (torch's ``update_bn``) removes that lag.
    """
    count = min(cfg.precise_bn_images, len(data.train_y))
    order = torch.randperm(len(data.train_y), generator=torch.Generator().manual_seed(cfg.seed))[:count]
    batches = []
    for start in range(0, count, batch_size):
        x = data.preprocessing.to_tensor(data.train_x[order[start : start + batch_size].numpy()])
        batches.append(x.contiguous(memory_format=torch.channels_last) if cfg.channels_last else x)
    with autocast(device, precision):
        torch.optim.swa_utils.update_bn(batches, model, device=device)


def stretch_schedule(cfg: TrainerConfig, steps_per_epoch: int) -> TrainerConfig:
    """A 200-image dataset gets as many optimizer steps as a 5,000-image one, not 25x fewer.

    Epochs are raised to reach ``min_steps``; warmup and early-stopping
    patience grow by the same factor, so they keep their meaning as a share
    of the schedule.
    """
    planned = cfg.epochs * steps_per_epoch
    if cfg.min_steps <= planned:
        return cfg
    factor = cfg.min_steps / planned
    return dataclasses.replace(
        cfg,
        epochs=math.ceil(cfg.min_steps / steps_per_epoch),
        warmup_epochs=round(cfg.warmup_epochs * factor),
        early_stopping_patience=math.ceil(cfg.early_stopping_patience * factor),
    )


def ema_decay(ema_epochs: float, steps_per_epoch: int) -> float:
    """Per-step decay whose averaging window is ``ema_epochs`` epochs, whatever the dataset size."""
    return 1.0 - 1.0 / max(1.0, ema_epochs * steps_per_epoch)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainerConfig, steps_per_epoch: int):
    if cfg.scheduler == "plateau":
        mode = "min" if cfg.monitor == "loss" else "max"
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode=mode, factor=0.5, patience=2)
    total = max(1, cfg.epochs * steps_per_epoch)
    warmup = min(cfg.warmup_epochs * steps_per_epoch, total // 2)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def batch_plan(n: int, batch_size: int, world_size: int) -> tuple[int, int, int]:
    """(images per rank per epoch, per-rank batch, batches per epoch): the global batch stays ``batch_size``."""
    per_rank = math.ceil(n / world_size)
    batch = max(1, min(math.ceil(batch_size / world_size), per_rank))
    batches = per_rank // batch if per_rank % batch == 1 else math.ceil(per_rank / batch)  # no 1-image batch (BatchNorm)
    return per_rank, batch, batches


def fit(
    name: str,
    data: TrainingData,
    cfg: TrainerConfig,
    progress: ProgressFn | None = None,
    device: torch.device | None = None,
    dist: DistContext | None = None,
    deadline: float | None = None,
) -> FitResult:
    """Train one model; with ``dist`` every rank must call this with the same arguments.

    ``deadline`` (time.monotonic()): stop once the next epoch, as long as the last one, would pass it.
    """
    torch.manual_seed(cfg.seed)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    lead = dist is None or dist.is_lead
    device = device or (dist.device if dist else choose_device())
    precision = choose_precision(device, cfg.precision)
    num_classes = len(data.class_names)
    model = prepare_model(build_model(name, num_classes, weights=cfg.weights), device, cfg.channels_last)
    weight = class_weights(data.train_y, num_classes, cfg.class_weighting).to(device) if cfg.class_weighting != "none" else None
    criterion = nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    n = len(data.train_y)
    _, batch_size, batches = batch_plan(n, cfg.batch_size, dist.world_size if dist else 1)
    if cfg.max_batches_per_epoch:
        batches = min(batches, cfg.max_batches_per_epoch)
    planned_epochs = cfg.epochs
    cfg = stretch_schedule(cfg, batches)
    if lead and cfg.epochs != planned_epochs:
        logger.info(
            "%s: %d steps per epoch, so %d epochs (not %d) to reach trainer.min_steps=%d",
            name, batches, cfg.epochs, planned_epochs, cfg.min_steps,
        )
    scheduler = make_scheduler(optimizer, cfg, batches)
    ema = (
        torch.optim.swa_utils.AveragedModel(
            model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(ema_decay(cfg.ema_epochs, batches)),
            use_buffers=True,
        )
        if cfg.ema_epochs > 0
        else None
    )
    scored = ema.module if ema is not None else model
    trained: nn.Module = model
    sampler = None
    if dist is None:
        generator = torch.Generator().manual_seed(cfg.seed)  # shuffles and augments, as it always has
    else:
        from torch.nn.parallel import DistributedDataParallel
        from torch.utils.data import DistributedSampler

        trained = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        sampler = DistributedSampler(range(n), num_replicas=dist.world_size, rank=dist.rank, shuffle=True, seed=cfg.seed)
        generator = torch.Generator().manual_seed(cfg.seed + 7919 * dist.rank)  # each rank augments differently
    train_x = torch.from_numpy(data.train_x)
    train_y = torch.from_numpy(data.train_y)
    validate = len(data.val_y) > 0
    higher_is_better = cfg.monitor != "loss"
    best_score, best_epoch, best_state = -math.inf if higher_is_better else math.inf, 0, None
    best_loss = math.inf
    history: list[EpochRecord] = []
    train_seconds, images_seen, stale, stopped_early, stopped_by_budget = 0.0, 0, 0, False, False

    for epoch in range(1, cfg.epochs + 1):
        model.train()
        if sampler is None:
            order = torch.randperm(n, generator=generator)
        else:
            sampler.set_epoch(epoch)
            order = torch.tensor(list(sampler), dtype=torch.long)
        epoch_started = time.monotonic()
        started, loss_sum, seen = time.perf_counter(), 0.0, 0
        bar = tqdm(range(batches), desc=f"{name} {epoch}/{cfg.epochs}", unit="batch", leave=False, disable=None if lead else True)
        for b in bar:
            index = order[b * batch_size : (b + 1) * batch_size]
            loss = _train_step(
                trained, criterion, optimizer, data.preprocessing, data.augment, train_x[index], train_y[index],
                generator, device, precision, cfg.channels_last,
            )
            if not isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                scheduler.step()
            if ema is not None:
                ema.update_parameters(model)
            loss_sum += float(loss.detach()) * len(index)
            seen += len(index)
        elapsed = time.perf_counter() - started
        if dist is not None:
            loss_sum, seen, elapsed = _reduce_epoch(dist, loss_sum, seen, elapsed)
        train_seconds += elapsed
        images_seen += seen
        if cfg.precise_bn_images:
            recalibrate_batchnorm(scored, data, device, precision, cfg, batch_size)

        if validate:
            # fp32, as evaluation scores: bf16 scoring moved a DenseNet's val AUC by 0.003 at 32 px,
            # enough to keep the wrong epoch. Cheap: validation is a forward pass over a small split.
            val_loss, val_accuracy, val_auc = _validation_metrics(scored, data, device, "fp32", cfg.channels_last, dist)
            score = {"roc_auc": val_auc, "accuracy": val_accuracy, "loss": val_loss}[cfg.monitor]
            improved = (score > best_score) if higher_is_better else (score < best_score)
            # A small validation set saturates (AUC 1.0 for many epochs): a tie goes to the lower loss.
            improved = improved or (score == best_score and val_loss < best_loss)
        else:  # nothing held out: every epoch is "the best so far" and the last one is kept
            val_loss = val_accuracy = val_auc = score = float("nan")
            improved = True
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau) and validate:
            scheduler.step(score)
        record = EpochRecord(
            epoch=epoch,
            train_loss=round(loss_sum / max(seen, 1), 5),
            val_loss=round(val_loss, 5),
            val_accuracy=round(val_accuracy, 5),
            val_roc_auc=round(val_auc, 5) if not math.isnan(val_auc) else float("nan"),
            learning_rate=float(optimizer.param_groups[0]["lr"]),
            seconds=round(elapsed, 2),
            images_per_second=round(seen / elapsed, 2) if elapsed else 0.0,
        )
        history.append(record)
        if improved or best_epoch == 0:
            best_score, best_loss, best_epoch, stale = score, val_loss, epoch, 0
            if lead:
                best_state = {k: v.detach().to("cpu", copy=True) for k, v in scored.state_dict().items()}
        else:
            stale += 1
        stop = bool(cfg.early_stopping_patience and stale >= cfg.early_stopping_patience)
        now = time.monotonic()
        over_budget = deadline is not None and epoch < cfg.epochs and now + (now - epoch_started) > deadline
        if dist is not None:
            stop, over_budget = distributed.broadcast_object(dist, (stop, over_budget), "the early-stopping decision")
        if lead:
            logger.info(
                "%s epoch %d/%d: loss %.4f, val loss %.4f, val acc %.4f, val auc %.4f, %.1f img/s%s",
                name, epoch, cfg.epochs, record.train_loss, val_loss, val_accuracy, val_auc,
                record.images_per_second, " *" if stale == 0 else "",
            )
        if progress is not None:
            progress(candidate=name, epoch=epoch, epochs=cfg.epochs, val_accuracy=val_accuracy, val_roc_auc=val_auc)
        if stop:
            if lead:
                logger.info("%s: no improvement in %d epochs, stopping early", name, stale)
            stopped_early = True
            break
        if over_budget:
            if lead:
                logger.info("%s: stopping after epoch %d of %d: another epoch would pass the time budget", name, epoch, cfg.epochs)
            stopped_by_budget = True
            break

    assert best_state is not None or not lead
    return FitResult(
        state_dict=best_state or {},
        history=tuple(history),
        best_epoch=best_epoch,
        best_score=float(best_score),
        train_seconds=train_seconds,
        images_per_second=images_seen / train_seconds if train_seconds else 0.0,
        precision=precision,
        device=str(device),
        stopped_early=stopped_early,
        stopped_by_budget=stopped_by_budget,
    )


def _reduce_epoch(dist: DistContext, loss_sum: float, seen: int, elapsed: float) -> tuple[float, int, float]:
    """Loss and images summed over ranks; the epoch lasts as long as the slowest rank."""
    reports = distributed.all_gather_object(dist, (loss_sum, seen, elapsed), "the epoch's metrics")
    return sum(r[0] for r in reports), sum(r[1] for r in reports), max(r[2] for r in reports)


def _validation_metrics(
    scored: nn.Module,
    data: TrainingData,
    device: torch.device,
    precision: str,
    channels_last: bool,
    dist: DistContext | None,
) -> tuple[float, float, float]:
    """(loss, accuracy, ROC-AUC) on the validation split; under DDP each rank scores every world_size-th image."""
    if dist is None:
        val_logits = predict_logits(scored, data.val_x, data.preprocessing, device, precision, channels_last=channels_last)
    else:
        distributed.broadcast_buffers(dist, scored)  # ranks' BatchNorm statistics drift apart between DDP forwards
        rows = np.arange(dist.rank, len(data.val_y), dist.world_size)
        mine = predict_logits(scored, data.val_x[rows], data.preprocessing, device, precision, channels_last=channels_last)
        shards = distributed.all_gather_object(dist, (rows, mine.numpy()), "validation")
        merged = np.zeros((len(data.val_y), len(data.class_names)), dtype=np.float32)
        for shard_rows, logits in shards:
            if len(shard_rows):
                merged[shard_rows] = logits
        val_logits = torch.from_numpy(merged)
    val_loss = float(nn.functional.cross_entropy(val_logits, torch.from_numpy(data.val_y)))
    val_probs = torch.softmax(val_logits, 1).numpy()
    val_accuracy = float((val_probs.argmax(1) == data.val_y).mean())
    return val_loss, val_accuracy, roc_auc(data.val_y, val_probs)
