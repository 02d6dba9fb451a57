"""The trainer's schedule rules: small datasets are stretched to min_steps, ties go to the lower loss."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from xray.training.fit import (
    AUC_MONITOR_MIN_PER_CLASS,
    TrainingData,
    cell_weights,
    ema_decay,
    fit,
    intensity_once,
    resolve_monitor,
    small_data_batch,
    stretch_schedule,
)
from xray.entity.config_entity import AugmentConfig, TrainerConfig
from xray.data.preprocessing import Preprocessing

FAST = TrainerConfig(balance_by="class_source",
    candidates=("simple_cnn",), batch_size=8, learning_rate=3e-3, warmup_epochs=0,
    precise_bn_images=0, early_stopping_patience=0, max_batches_per_epoch=0, seed=0,
    min_steps=0, min_steps_per_epoch=0, time_budget="none",  # each test sets the schedule rule it tests
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
    cfg = dataclasses.replace(FAST, epochs=2, min_steps=10, precision="fp32", monitor="roc_auc")
    result = fit("simple_cnn", data, cfg)
    assert result.monitor == "roc_auc"
    assert len(result.history) == 5, "2 steps per epoch: 5 epochs reach min_steps=10"
    aucs = [h.val_roc_auc for h in result.history]
    top = max(aucs)
    tied = [h for h in result.history if h.val_roc_auc == top]
    assert len(tied) >= 2, f"the rule under test needs a tie: {aucs}"
    assert result.best_epoch == min(tied, key=lambda h: h.val_loss).epoch


def test_auto_monitor_watches_the_loss_where_validation_is_too_small_for_auc() -> None:
    enough = np.repeat([0, 1, 2], AUC_MONITOR_MIN_PER_CLASS)
    assert resolve_monitor("auto", enough, 3) == "roc_auc"
    assert resolve_monitor("auto", enough[1:], 3) == "loss"  # one class one short
    assert resolve_monitor("auto", np.repeat([0, 1], 400), 3) == "loss"  # a class missing from validation
    assert resolve_monitor("accuracy", enough[:3], 3) == "accuracy"  # an explicit setting is kept
    train_x, train_y = separable(16, 0)
    val_x, val_y = separable(12, 1)
    data = TrainingData(
        train_x, train_y, val_x, val_y, ("left", "right"),
        Preprocessing(image_size=16, mean=0.5, std=0.25), AugmentConfig(hflip=False, rotation_degrees=0),
    )
    result = fit("simple_cnn", data, dataclasses.replace(FAST, epochs=4, precision="fp32", monitor="auto"))
    assert result.monitor == "loss"
    assert result.best_epoch == min(result.history, key=lambda h: h.val_loss).epoch
    assert result.best_score == pytest.approx(min(h.val_loss for h in result.history), abs=1e-5)


def test_a_small_dataset_trains_at_a_smaller_batch_with_a_scaled_learning_rate() -> None:
    cfg = dataclasses.replace(FAST, batch_size=64, learning_rate=2e-3, min_steps_per_epoch=8)
    covid = small_data_batch(cfg, 132)  # 132 / 64 = 2 steps; / 32 = 4; / 16 = 8.25 >= 8
    assert (covid.batch_size, covid.learning_rate) == (16, pytest.approx(1e-3))
    assert small_data_batch(cfg, 4001) == cfg  # PneumoniaMNIST: 62 steps an epoch already
    assert small_data_batch(cfg, 300).batch_size == 32  # 300 / 32 = 9.4 steps
    assert small_data_batch(cfg, 40).batch_size == 16  # never below the smallest batch, however few images
    off = dataclasses.replace(cfg, min_steps_per_epoch=0)
    assert small_data_batch(off, 132) == off  # 0: off


def _pooled(cells: dict[tuple[int, int], int]) -> TrainingData:
    """Blank images whose (class, source) counts are ``cells``: only the labels and sources matter here."""
    y = np.concatenate([np.full(n, c, dtype=np.int64) for (c, _), n in cells.items()])
    sources = np.concatenate([np.full(n, s, dtype=np.int64) for (_, s), n in cells.items()])
    x = np.zeros((len(y), 8, 8), dtype=np.uint8)
    return TrainingData(x, y, x[:0], y[:0], ("Covid", "Normal"), Preprocessing(image_size=8, mean=0.5, std=0.25), AugmentConfig(),
                        train_sources=sources)


def test_pooled_sources_weigh_each_class_and_source_cell_alike() -> None:
    # Covid from a large source (60) and a small one (20); Normal from the large source (40)
    data = _pooled({(0, 0): 60, (0, 1): 20, (1, 0): 40})
    balanced = cell_weights(data, dataclasses.replace(FAST, class_weighting="balanced"))
    assert balanced is not None and balanced.shape == (120,)
    assert balanced.mean().item() == pytest.approx(1.0)
    totals = [balanced[:60].sum().item(), balanced[60:80].sum().item(), balanced[80:].sum().item()]
    assert totals == pytest.approx([40.0, 40.0, 40.0])  # each cell's films weigh the same in all
    softened = cell_weights(data, dataclasses.replace(FAST, class_weighting="sqrt"))
    assert softened is not None
    ratio = softened[60].item() / softened[0].item()  # a small-source film against a large-source one
    assert ratio == pytest.approx(np.sqrt(3.0))


def test_cell_weights_apply_only_to_pooled_sources_and_when_asked() -> None:
    data = _pooled({(0, 0): 60, (0, 1): 20, (1, 0): 40})
    assert cell_weights(data, dataclasses.replace(FAST, balance_by="class")) is None  # the default
    assert cell_weights(data, dataclasses.replace(FAST, class_weighting="none")) is None
    one_source = dataclasses.replace(data, train_sources=np.zeros(120, dtype=np.int64))
    assert cell_weights(one_source, FAST) is None  # one source: the class weights, exactly as before
    assert cell_weights(dataclasses.replace(data, train_sources=None), FAST) is None


def test_a_weighted_fit_runs_and_learns() -> None:
    """A weighted fit runs end to end and its loss is a weighted mean (finite, positive)."""
    train_x, train_y = separable(24, 0)
    val_x, val_y = separable(12, 1)
    sources = (np.arange(24) % 3 == 0).astype(np.int64)
    data = TrainingData(train_x, train_y, val_x, val_y, ("left", "right"), Preprocessing(image_size=16, mean=0.5, std=0.25),
                        AugmentConfig(hflip=False, rotation_degrees=0, translate=0, scale=0, brightness=0, contrast=0),
                        train_sources=sources)
    result = fit("simple_cnn", data, dataclasses.replace(FAST, epochs=3))
    assert all(np.isfinite(r.train_loss) and r.train_loss > 0 for r in result.history)
    assert result.history[-1].val_accuracy == 1.0


def test_intensity_done_once_gives_every_batch_the_same_pixels_as_per_batch() -> None:
    rng = np.random.default_rng(3)
    train_x = (rng.random((12, 24, 24)) ** 3 * 200).astype(np.uint8)  # dark, skewed histograms: equalising moves them
    val_x = (rng.random((4, 24, 24)) ** 2 * 255).astype(np.uint8)
    y = np.arange(12) % 2
    per_batch = TrainingData(train_x, y, val_x, y[:4], ("a", "b"), Preprocessing(24, 0.5, 0.25, intensity="equalize"),
                             AugmentConfig())
    once = intensity_once(per_batch)
    assert once.preprocessing.intensity == "none" and per_batch.preprocessing.intensity == "equalize"
    assert not np.array_equal(once.train_x, train_x)  # the step was done on the arrays ...
    assert once.train_x.dtype == np.uint8 and once.train_x.shape == train_x.shape
    for a, b in ((once.train_x, train_x), (once.val_x, val_x)):  # ... and the model sees exactly what it saw per batch
        assert torch.equal(once.preprocessing.to_tensor(a), per_batch.preprocessing.to_tensor(b))
    plain = dataclasses.replace(per_batch, preprocessing=Preprocessing(24, 0.5, 0.25))
    assert intensity_once(plain) is plain
