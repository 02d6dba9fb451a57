"""The trainer's schedule rules: small datasets are stretched to min_steps, ties go to the lower loss."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from xray.training.fit import TrainingData, ema_decay, fit, stretch_schedule
from xray.entity.config_entity import AugmentConfig, TrainerConfig
from xray.preprocessing import Preprocessing

FAST = TrainerConfig(
    candidates=("simple_cnn",), batch_size=8, learning_rate=3e-3, warmup_epochs=0,
    precise_bn_images=0, early_stopping_patience=0, max_batches_per_epoch=0, seed=0,
)


def test_a_small_dataset_is_stretched_to_min_steps_with_warmup_and_patience() -> None:
    cfg = dataclasses.replace(FAST, epochs=30, min_steps=400, warmup_epochs=1, early_stopping_patience=10)
    covid_sized = stretch_schedule(cfg, steps_per_epoch=3)  # ~175 films at batch 64
    assert covid_sized.epochs == 134  # ceil(400 / 3)
    assert covid_sized.warmup_epochs == 4  # 1 x 400/90, rounded
    assert covid_sized.early_stopping_patience == 45  # ceil(10 x 400/90)
    assert stretch_schedule(cfg, steps_per_epoch=63) == cfg  # PneumoniaMNIST: 1,890 steps already
    assert stretch_schedule(dataclasses.replace(cfg, min_steps=0), steps_per_epoch=1) == dataclasses.replace(cfg, min_steps=0)


def test_ema_window_is_counted_in_epochs() -> None:
    assert ema_decay(1.0, 100) == pytest.approx(0.99)
    assert ema_decay(2.0, 5) == pytest.approx(0.9)
    assert ema_decay(0.1, 1) == 0.0  # a window under one step: no averaging, never a negative decay


def separable(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Bright-left vs bright-right 16 px images: every epoch reaches validation AUC 1.0."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    x = rng.integers(0, 60, size=(n, 16, 16)).astype(np.uint8)
    for i, label in enumerate(y):
        x[i, :, :8] += 180 if label == 0 else 0
        x[i, :, 8:] += 180 if label == 1 else 0
    return x, y.astype(np.int64)


def test_fit_runs_the_stretched_schedule_and_breaks_auc_ties_by_loss() -> None:
    train_x, train_y = separable(16, 0)
    val_x, val_y = separable(12, 1)
    data = TrainingData(
        train_x, train_y, val_x, val_y, ("left", "right"),
        Preprocessing(image_size=16, mean=0.5, std=0.25), AugmentConfig(hflip=False, rotation_degrees=0),
    )
    cfg = dataclasses.replace(FAST, epochs=2, min_steps=10, precision="fp32")
    result = fit("simple_cnn", data, cfg)
    assert len(result.history) == 5, "2 steps per epoch: 5 epochs reach min_steps=10"
    aucs = [h.val_roc_auc for h in result.history]
    top = max(aucs)
    tied = [h for h in result.history if h.val_roc_auc == top]
    assert len(tied) >= 2, f"the rule under test needs a tie: {aucs}"
    assert result.best_epoch == min(tied, key=lambda h: h.val_loss).epoch
