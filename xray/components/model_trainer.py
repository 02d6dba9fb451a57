"""Stage 3: fit every candidate on the cached arrays and keep each one's best checkpoint.

The fast path on CPU is channels-last memory layout plus bf16 autocast where
the processor has native bf16 (fp32 otherwise); CUDA is used when present.
Class-weighted loss handles imbalance; early stopping watches a validation
metric and the best epoch's weights are what gets saved.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from xray.augment import augment_batch
from xray.entity.artifact_entity import CandidateModel, DataTransformationArtifact, EpochRecord, ModelTrainerArtifact
from xray.entity.config_entity import AugmentConfig, PipelineConfig, TrainerConfig
from xray.inference import autocast, choose_device, choose_precision, predict_logits, prepare_model
from xray.metrics import roc_auc
from xray.models import build_model, count_parameters
from xray.preprocessing import Preprocessing
from xray.store import RunDir, fingerprint, new_header
from xray.typed import from_mapping, to_jsonable

logger = logging.getLogger(__name__)

STAGE = "model_trainer"
ProgressFn = Callable[..., None]


@dataclass(frozen=True)
class TrainingData:
    train_x: np.ndarray  # uint8 N×H×W
    train_y: np.ndarray  # int64 N
    val_x: np.ndarray
    val_y: np.ndarray
    class_names: tuple[str, ...]
    preprocessing: Preprocessing
    augment: AugmentConfig


@dataclass(frozen=True)
class FitResult:
    state_dict: dict[str, torch.Tensor]
    history: tuple[EpochRecord, ...]
    best_epoch: int
    best_score: float
    train_seconds: float
    images_per_second: float
    precision: str
    device: str
    stopped_early: bool


def stage_fingerprint(config: PipelineConfig, transformation: DataTransformationArtifact, code: str) -> str:
    return fingerprint(STAGE, to_jsonable(config.trainer), [transformation.header.fingerprint], code)


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


def preprocessing_of(transformation: DataTransformationArtifact) -> Preprocessing:
    return Preprocessing(
        image_size=transformation.image_size,
        mean=transformation.normalization["mean"],
        std=transformation.normalization["std"],
        channels=transformation.channels,
    )


def run(
    config: PipelineConfig,
    run_dir: RunDir,
    transformation: DataTransformationArtifact,
    code: str,
    progress: ProgressFn | None = None,
) -> ModelTrainerArtifact:
    cfg = config.trainer
    data = load_training_data(run_dir.path, transformation)
    out = run_dir.stage_dir(STAGE)
    candidates, files = [], []
    for name in cfg.candidates:
        logger.info("training %s on %d images (%d validation)", name, len(data.train_y), len(data.val_y))
        result = fit(name, data, cfg, progress=progress)
        checkpoint = out / f"{name}.pt"
        torch.save(result.state_dict, checkpoint)
        files.append(checkpoint)
        model = build_model(name, len(data.class_names))
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
            )
        )
    return ModelTrainerArtifact(
        header=new_header(
            run_dir, ModelTrainerArtifact, STAGE, stage_fingerprint(config, transformation, code),
            parents=[transformation.header.artifact_id], files=files,
        ),
        architecture_input={
            "image_size": transformation.image_size,
            "channels": transformation.channels,
            "num_classes": len(transformation.class_names),
        },
        candidates=tuple(candidates),
    )


def class_weights(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """Inverse-frequency weights, normalised so a balanced set gets weight 1 everywhere."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    weights = len(labels) / (num_classes * np.maximum(counts, 1))
    return torch.tensor(weights, dtype=torch.float32)


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


def fit(
    name: str,
    data: TrainingData,
    cfg: TrainerConfig,
    progress: ProgressFn | None = None,
    device: torch.device | None = None,
) -> FitResult:
    torch.manual_seed(cfg.seed)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = device or choose_device()
    precision = choose_precision(device, cfg.precision)
    num_classes = len(data.class_names)
    model = prepare_model(build_model(name, num_classes, weights=cfg.weights), device, cfg.channels_last)
    weight = class_weights(data.train_y, num_classes).to(device) if cfg.class_weighting else None
    criterion = nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    n = len(data.train_y)
    batch_size = min(cfg.batch_size, n)
    batches = n // batch_size if n % batch_size == 1 else math.ceil(n / batch_size)  # no 1-image batch (BatchNorm)
    if cfg.max_batches_per_epoch:
        batches = min(batches, cfg.max_batches_per_epoch)
    scheduler = make_scheduler(optimizer, cfg, batches)
    ema = (
        torch.optim.swa_utils.AveragedModel(
            model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True
        )
        if cfg.ema_decay > 0
        else None
    )
    scored = ema.module if ema is not None else model
    generator = torch.Generator().manual_seed(cfg.seed)
    train_x = torch.from_numpy(data.train_x)
    train_y = torch.from_numpy(data.train_y)
    higher_is_better = cfg.monitor != "loss"
    best_score, best_epoch, best_state = -math.inf if higher_is_better else math.inf, 0, None
    history: list[EpochRecord] = []
    train_seconds, images_seen, stale, stopped_early = 0.0, 0, 0, False

    for epoch in range(1, cfg.epochs + 1):
        model.train()
        order = torch.randperm(n, generator=generator)
        started, loss_sum, seen = time.perf_counter(), 0.0, 0
        bar = tqdm(range(batches), desc=f"{name} {epoch}/{cfg.epochs}", unit="batch", leave=False, disable=None)
        for b in bar:
            index = order[b * batch_size : (b + 1) * batch_size]
            x = augment_batch(data.preprocessing.to_unit(train_x[index]), data.augment, generator)
            x = data.preprocessing.normalize(x).to(device, non_blocking=True)
            y = train_y[index].to(device, non_blocking=True)
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(device, precision):
                logits = model(x)
            loss = criterion(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if not isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                scheduler.step()
            if ema is not None:
                ema.update_parameters(model)
            loss_sum += float(loss.detach()) * len(index)
            seen += len(index)
        elapsed = time.perf_counter() - started
        train_seconds += elapsed
        images_seen += seen

        val_logits = predict_logits(scored, data.val_x, data.preprocessing, device, precision, channels_last=cfg.channels_last)
        val_loss = float(nn.functional.cross_entropy(val_logits, torch.from_numpy(data.val_y)))
        val_probs = torch.softmax(val_logits, 1).numpy()
        val_accuracy = float((val_probs.argmax(1) == data.val_y).mean())
        val_auc = roc_auc(data.val_y, val_probs)
        score = {"roc_auc": val_auc, "accuracy": val_accuracy, "loss": val_loss}[cfg.monitor]
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
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
        improved = (score > best_score) if higher_is_better else (score < best_score)
        if improved or best_state is None:
            best_score, best_epoch, stale = score, epoch, 0
            best_state = {k: v.detach().to("cpu", copy=True) for k, v in scored.state_dict().items()}
        else:
            stale += 1
        logger.info(
            "%s epoch %d/%d: loss %.4f, val loss %.4f, val acc %.4f, val auc %.4f, %.1f img/s%s",
            name, epoch, cfg.epochs, record.train_loss, val_loss, val_accuracy, val_auc,
            record.images_per_second, " *" if stale == 0 else "",
        )
        if progress is not None:
            progress(candidate=name, epoch=epoch, epochs=cfg.epochs, val_accuracy=val_accuracy, val_roc_auc=val_auc)
        if cfg.early_stopping_patience and stale >= cfg.early_stopping_patience:
            logger.info("%s: no improvement in %d epochs, stopping early", name, stale)
            stopped_early = True
            break

    assert best_state is not None
    return FitResult(
        state_dict=best_state,
        history=tuple(history),
        best_epoch=best_epoch,
        best_score=float(best_score),
        train_seconds=train_seconds,
        images_per_second=images_seen / train_seconds if train_seconds else 0.0,
        precision=precision,
        device=str(device),
        stopped_early=stopped_early,
    )
