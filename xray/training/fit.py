"""The fit engine: train one model on in-memory uint8 arrays and keep its best epoch.

Why one module: the trainer stage and cross-validation both fit models, and
the epoch loop, precision, EMA, precise BatchNorm, early stopping, the
wall-clock guard and best-state keeping must behave the same in both.
The fast path on CPU is channels-last memory layout plus bf16 autocast where
the processor measured bf16 faster (fp32 otherwise); CUDA is used when present.
Under torchrun every rank calls ``fit`` with the same arguments; what differs
per rank lives in ``Ranks`` (xray/training/ranks.py).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from xray.training.augment import augment_batch
from xray.training.distributed import DistContext
from xray.entity.artifact_entity import EpochRecord
from xray.entity.config_entity import AugmentConfig, TrainerConfig
from xray.serving.inference import autocast, choose_precision, predict_logits, prepare_model
from xray.evaluation.metrics import roc_auc
from xray.models.builders import build_model
from xray.data.preprocessing import Preprocessing
from xray.training.ranks import Ranks

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
    # each training image's source, by index, when the training set pools sources (trainer.balance_by);
    # None: one source, or not known (cross-validation folds), and the loss is weighted by class alone
    train_sources: np.ndarray | None = None


def intensity_once(data: TrainingData) -> TrainingData:
    """The arrays with ``transformation.intensity`` applied once, and a preprocessing that skips it.

    The intensity step works on each film alone, before augmentation (``Preprocessing.to_unit``),
    so doing it once here gives every batch exactly the pixels doing it per batch would: the
    same epochs, cheaper. Per batch, equalising cost enough that the time budget planned fewer
    epochs and a smaller image. Apply it at the size trained at: serving equalises after its resize.
    The model's contract keeps the step (``preprocessing_of`` reads it from the transformation).
    """
    prep = data.preprocessing
    if prep.intensity == "none":
        return data
    return dataclasses.replace(
        data,
        train_x=prep.intensity_applied(data.train_x),
        val_x=prep.intensity_applied(data.val_x),
        preprocessing=dataclasses.replace(prep, intensity="none"),
    )


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
    monitor: str = "roc_auc"  # the metric that chose best_epoch (trainer.monitor, with auto resolved)


@dataclass
class _Session:
    """One fit's moving parts, built once by ``_start``."""

    name: str
    cfg: TrainerConfig  # stretched to min_steps
    device: torch.device
    precision: str
    model: nn.Module
    trained: nn.Module  # the model, or its DDP wrapper
    scored: nn.Module  # what is validated and kept: the EMA average when on, else the model
    criterion: nn.Module
    sample_weights: torch.Tensor | None  # per training image (by row), when the loss is weighted by (class, source)
    optimizer: torch.optim.Optimizer
    scheduler: Any
    ema: torch.optim.swa_utils.AveragedModel | None
    batch_size: int
    batches: int
    generator: torch.Generator
    order: Callable[[int], torch.Tensor]
    ranks: Ranks

    @property
    def plateau(self) -> bool:
        return isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)


@dataclass
class _Best:
    """The best epoch so far: a higher score (lower for loss), a tie going to the lower validation loss."""

    higher_is_better: bool
    keep_weights: bool  # rank 0 only: the others never save
    score: float = math.nan
    loss: float = math.inf
    epoch: int = 0
    state: dict[str, torch.Tensor] | None = None
    stale: int = 0

    def __post_init__(self) -> None:
        self.score = -math.inf if self.higher_is_better else math.inf

    def offer(self, epoch: int, score: float, val_loss: float, validated: bool, model: nn.Module) -> None:
        if validated:
            improved = (score > self.score) if self.higher_is_better else (score < self.score)
            # A small validation set saturates (AUC 1.0 for many epochs): a tie goes to the lower loss.
            improved = improved or (score == self.score and val_loss < self.loss)
        else:  # nothing held out: every epoch is "the best so far" and the last one is kept
            improved = True
        if not (improved or self.epoch == 0):
            self.stale += 1
            return
        self.score, self.loss, self.epoch, self.stale = score, val_loss, epoch, 0
        if self.keep_weights:
            self.state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


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
    ranks = Ranks(dist)
    cfg = dataclasses.replace(cfg, monitor=resolve_monitor(cfg.monitor, data.val_y, len(data.class_names)))
    torch.manual_seed(cfg.seed)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    s = _start(name, data, cfg, device or ranks.device(), ranks)
    best = _Best(higher_is_better=s.cfg.monitor != "loss", keep_weights=ranks.is_lead)
    history: list[EpochRecord] = []
    train_seconds, images_seen, stopped_early, stopped_by_budget = 0.0, 0, False, False
    for epoch in range(1, s.cfg.epochs + 1):
        epoch_started = time.monotonic()
        result = _epoch(s, data, epoch)
        history.append(result.record)
        train_seconds += result.elapsed
        images_seen += result.seen
        best.offer(epoch, result.score, result.val_loss, len(data.val_y) > 0, s.scored)
        stop = bool(s.cfg.early_stopping_patience and best.stale >= s.cfg.early_stopping_patience)
        now = time.monotonic()
        over_budget = deadline is not None and epoch < s.cfg.epochs and now + (now - epoch_started) > deadline
        stop, over_budget = ranks.agree((stop, over_budget), "the early-stopping decision")
        _report(s, result, best.stale == 0, progress)
        if stop:
            ranks.log("%s: no improvement in %d epochs, stopping early", name, best.stale)
            stopped_early = True
            break
        if over_budget:
            ranks.log("%s: stopping after epoch %d of %d: another epoch would pass the time budget", name, epoch, s.cfg.epochs)
            stopped_by_budget = True
            break
    assert best.state is not None or not ranks.is_lead
    return FitResult(
        state_dict=best.state or {}, history=tuple(history), best_epoch=best.epoch, best_score=float(best.score),
        train_seconds=train_seconds, images_per_second=images_seen / train_seconds if train_seconds else 0.0,
        precision=s.precision, device=str(s.device), stopped_early=stopped_early, stopped_by_budget=stopped_by_budget,
        monitor=s.cfg.monitor,
    )


AUC_MONITOR_MIN_PER_CLASS = 50  # monitor=auto watches roc_auc only where every class has this many validation images


def resolve_monitor(setting: str, val_y: np.ndarray, num_classes: int) -> str:
    """``auto``: roc_auc, or the validation loss where some class has fewer than AUC_MONITOR_MIN_PER_CLASS images.

    On a few dozen films AUC reaches 1.0 within two or three epochs and then
    cannot move, so early stopping ran out of patience and kept epoch 2 or 3;
    the loss keeps moving. In 3-fold CV on the Covid19 train set watching the
    loss scored more films right than watching AUC (docs/benchmarks.md).
    """
    if setting != "auto":
        return setting
    counts = np.bincount(val_y, minlength=num_classes)
    return "roc_auc" if len(val_y) and counts.min() >= AUC_MONITOR_MIN_PER_CLASS else "loss"


def _start(name: str, data: TrainingData, cfg: TrainerConfig, device: torch.device, ranks: Ranks) -> _Session:
    """Model, loss, optimizer, schedule, EMA and this rank's shuffling, in the order the seeds expect."""
    precision = choose_precision(device, cfg.precision)
    num_classes = len(data.class_names)
    model = prepare_model(build_model(name, num_classes, weights=cfg.weights), device, cfg.channels_last)
    sample_weights = cell_weights(data, cfg)
    if sample_weights is not None:
        criterion = nn.CrossEntropyLoss(reduction="none", label_smoothing=cfg.label_smoothing)
        ranks.log("%s: loss weighted by (class, source) cells (trainer.balance_by)", name)
    else:
        weight = class_weights(data.train_y, num_classes, cfg.class_weighting).to(device) if cfg.class_weighting != "none" else None
        criterion = nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    n = len(data.train_y)
    _, batch_size, batches = batch_plan(n, cfg.batch_size, ranks.world_size)
    if cfg.max_batches_per_epoch:
        batches = min(batches, cfg.max_batches_per_epoch)
    stretched = stretch_schedule(cfg, batches)
    if stretched.epochs != cfg.epochs:
        ranks.log(
            "%s: %d steps per epoch, so %d epochs (not %d) to reach trainer.min_steps=%d",
            name, batches, stretched.epochs, cfg.epochs, stretched.min_steps,
        )
    scheduler = make_scheduler(optimizer, stretched, batches)
    ema = None
    if stretched.ema_epochs > 0:
        decay = ema_decay(stretched.ema_epochs, batches)
        ema = torch.optim.swa_utils.AveragedModel(
            model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(decay), use_buffers=True
        )
    trained, generator, order = ranks.distribute(model, device, n, stretched.seed)
    return _Session(
        name, stretched, device, precision, model, trained, ema.module if ema is not None else model, criterion,
        sample_weights, optimizer, scheduler, ema, batch_size, batches, generator, order, ranks,
    )


@dataclass(frozen=True)
class _EpochResult:
    record: EpochRecord  # rounded, as the artifact keeps it
    score: float  # the monitored metric, unrounded (ties are decided on it)
    val_loss: float
    val_accuracy: float
    val_auc: float
    seen: int  # images over every rank
    elapsed: float


def _epoch(s: _Session, data: TrainingData, epoch: int) -> _EpochResult:
    """One pass over the training split, precise BN, then validation."""
    loss_sum, seen, elapsed = _train_epoch(s, data, epoch)
    if s.cfg.precise_bn_images:
        recalibrate_batchnorm(s.scored, data, s.device, s.precision, s.cfg, s.batch_size)
    if len(data.val_y):
        val_loss, val_accuracy, val_auc = _validation_metrics(s, data)
        score = {"roc_auc": val_auc, "accuracy": val_accuracy, "loss": val_loss}[s.cfg.monitor]
        if s.plateau:
            s.scheduler.step(score)
    else:
        val_loss = val_accuracy = val_auc = score = float("nan")
    record = EpochRecord(
        epoch=epoch,
        train_loss=round(loss_sum / max(seen, 1), 5),
        val_loss=round(val_loss, 5),
        val_accuracy=round(val_accuracy, 5),
        val_roc_auc=round(val_auc, 5) if not math.isnan(val_auc) else float("nan"),
        learning_rate=float(s.optimizer.param_groups[0]["lr"]),
        seconds=round(elapsed, 2),
        images_per_second=round(seen / elapsed, 2) if elapsed else 0.0,
    )
    return _EpochResult(record, score, val_loss, val_accuracy, val_auc, seen, elapsed)


def _train_epoch(s: _Session, data: TrainingData, epoch: int) -> tuple[float, int, float]:
    """(summed loss, images, seconds) over every rank for one epoch of optimizer steps."""
    s.model.train()
    order = s.order(epoch)
    train_x, train_y = torch.from_numpy(data.train_x), torch.from_numpy(data.train_y)
    started, loss_sum, seen = time.perf_counter(), 0.0, 0
    bar = tqdm(range(s.batches), desc=f"{s.name} {epoch}/{s.cfg.epochs}", unit="batch", leave=False, disable=None if s.ranks.is_lead else True)
    for b in bar:
        index = order[b * s.batch_size : (b + 1) * s.batch_size]
        loss = train_step(
            s.trained, s.criterion, s.optimizer, data.preprocessing, data.augment, train_x[index], train_y[index],
            s.generator, s.device, s.precision, s.cfg.channels_last,
            None if s.sample_weights is None else s.sample_weights[index],
        )
        if not s.plateau:
            s.scheduler.step()
        if s.ema is not None:
            s.ema.update_parameters(s.model)
        loss_sum += float(loss.detach()) * len(index)
        seen += len(index)
    return s.ranks.reduce_epoch(loss_sum, seen, time.perf_counter() - started)


def _report(s: _Session, result: _EpochResult, improved: bool, progress: ProgressFn | None) -> None:
    record = result.record
    s.ranks.log(
        "%s epoch %d/%d: loss %.4f, val loss %.4f, val acc %.4f, val auc %.4f, %.1f img/s%s",
        s.name, record.epoch, s.cfg.epochs, record.train_loss, result.val_loss, result.val_accuracy,
        result.val_auc, record.images_per_second, " *" if improved else "",
    )
    if progress is not None:
        progress(candidate=s.name, epoch=record.epoch, epochs=s.cfg.epochs, val_accuracy=result.val_accuracy, val_roc_auc=result.val_auc)


def _validation_metrics(s: _Session, data: TrainingData) -> tuple[float, float, float]:
    """(loss, accuracy, ROC-AUC) on the validation split.

    fp32, as evaluation scores: bf16 scoring moved a DenseNet's val AUC enough to keep the
    wrong epoch (docs/benchmarks.md). Cheap: validation is a forward pass over a small split.
    """

    def predict(images: np.ndarray) -> torch.Tensor:
        return predict_logits(s.scored, images, data.preprocessing, s.device, "fp32", channels_last=s.cfg.channels_last)

    val_logits = s.ranks.logits(s.scored, data.val_x, len(data.class_names), predict)
    val_loss = float(nn.functional.cross_entropy(val_logits, torch.from_numpy(data.val_y)))
    val_probs = torch.softmax(val_logits, 1).numpy()
    val_accuracy = float((val_probs.argmax(1) == data.val_y).mean())
    return val_loss, val_accuracy, roc_auc(data.val_y, val_probs)


def train_step(
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
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """One optimizer step on a uint8 batch: augment, normalise, forward, backward. Returns the loss.

    ``weights`` (one per image) go with a criterion that does not reduce: the loss is their weighted
    mean, as ``CrossEntropyLoss(weight=...)`` takes it over class weights.
    """
    x = augment_batch(preprocessing.to_unit(pixels), augment, generator)
    x = preprocessing.normalize(x).to(device, non_blocking=True)
    y = labels.to(device, non_blocking=True)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast(device, precision):
        logits = trained(x)
    loss = criterion(logits.float(), y)
    if weights is not None:
        weights = weights.to(device, non_blocking=True)
        loss = (loss * weights).sum() / weights.sum()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss


def class_weights(labels: np.ndarray, num_classes: int, mode: str = "sqrt") -> torch.Tensor:
    """Loss weights against class imbalance, normalised so a balanced set gets 1 everywhere.

    ``balanced`` is inverse frequency; ``sqrt`` its square root, which on
    PneumoniaMNIST (1:2.9) kept the minority's recall without the full
    weighting's bias toward the minority (docs/benchmarks.md).
    """
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    weights = len(labels) / (num_classes * np.maximum(counts, 1))
    if mode == "sqrt":
        weights = np.sqrt(weights)
    return torch.tensor(weights, dtype=torch.float32)


def cell_weights(data: TrainingData, cfg: TrainerConfig) -> torch.Tensor | None:
    """Per-image loss weights over (class, source) cells, or None where class weights alone apply.

    Pooled sources differ in size: Hannover's Covid films outnumber Covid19's, so with class weights
    alone the model learns mostly the larger source's look of a class. Weighting each (class, source)
    cell by its inverse frequency (``class_weighting``: ``balanced``, or its square root for ``sqrt``)
    makes each source's films of a class weigh alike, the group balancing of Idrissi et al. (2022),
    "Simple data balancing achieves competitive worst-group-accuracy". Normalised to mean 1.
    """
    sources = data.train_sources
    if cfg.balance_by != "class_source" or cfg.class_weighting == "none" or sources is None:
        return None
    if len(sources) != len(data.train_y):  # a subset of the rows that kept the whole set's sources: a bug upstream
        raise ValueError(f"train_sources has {len(sources)} entries for {len(data.train_y)} training images")
    if len(np.unique(sources)) < 2:
        return None
    _, cell, counts = np.unique(np.stack([data.train_y, sources], 1), axis=0, return_inverse=True, return_counts=True)
    cell = cell.reshape(-1)
    weights = len(cell) / (len(counts) * counts.astype(np.float64))
    if cfg.class_weighting == "sqrt":
        weights = np.sqrt(weights)
    per_image = weights[cell]
    return torch.tensor(per_image / per_image.mean(), dtype=torch.float32)


def recalibrate_batchnorm(
    model: nn.Module, data: TrainingData, device: torch.device, precision: str, cfg: TrainerConfig, batch_size: int
) -> None:
    """Recompute BatchNorm statistics on clean training images ("precise BN").

    Running averages with momentum lag far behind the weights when an epoch
    has few steps (a few hundred films make 6 batches), and evaluation then
    sees stale statistics: on covid19-3class the validation loss stayed high
    while the training loss fell (docs/benchmarks.md). One forward pass over a fixed subset with
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


SMALLEST_BATCH = 16  # min_steps_per_epoch never halves the batch below this (BatchNorm needs a batch)


def small_data_batch(cfg: TrainerConfig, train_images: int) -> TrainerConfig:
    """Halve the batch until an epoch has ``min_steps_per_epoch`` steps; the learning rate follows by sqrt.

    Under a time budget a small dataset gets few epochs, and at batch 64 the
    132 Covid19 training films make 3 optimizer steps an epoch, a fraction of
    the seed recipe's (batch 16). In 3-fold CV on the Covid19 train set, batch
    16 at learning rate 1e-3 (2e-3 x sqrt(16/64)) scored better than batch 64
    (docs/benchmarks.md).
    """
    batch = cfg.batch_size
    while cfg.min_steps_per_epoch and batch // 2 >= SMALLEST_BATCH and train_images / batch < cfg.min_steps_per_epoch:
        batch //= 2
    if batch == cfg.batch_size:
        return cfg
    return dataclasses.replace(cfg, batch_size=batch, learning_rate=cfg.learning_rate * math.sqrt(batch / cfg.batch_size))


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
