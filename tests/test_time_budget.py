"""trainer.time_budget: the planner's arithmetic, the wall-clock guard, and a tiny real run that records its plan."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from xray.config import parse_duration
from xray.entity.artifact_entity import CandidatePlan, CandidateTiming, TrainingPlan
from xray.entity.config_entity import AugmentConfig
from xray.errors import ConfigError
from xray.components import model_trainer
from xray.data.preprocessing import Preprocessing, equalize, resize_batch
from xray.training.budget import (
    MIN_SCALED_BUDGET_S,
    MIN_USEFUL_EPOCHS,
    allocate_epochs,
    candidate_deadline,
    effective_budget,
    forward_flops_ratio,
    plan_training,
    planned_schedule,
    replayed,
)
from xray.training.fit import TrainingData, fit
from xray.training.ranks import Ranks

from .conftest import run_cli, tiny_args
from .test_trainer import FAST, separable


@pytest.mark.parametrize(
    "text, seconds",
    [("90s", 90.0), ("10m", 600.0), ("1h", 3600.0), ("1.5h", 5400.0), (120, 120.0), ("none", None), (0, None)],
)
def test_durations_parse(text: str | int, seconds: float | None) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["soon", "10d", "-5m", "0s", "8 days"])
def test_bad_durations_are_config_errors(text: str) -> None:
    with pytest.raises(ConfigError, match="trainer.time_budget"):
        parse_duration(text, "trainer.time_budget")


def test_a_bad_budget_on_the_command_line_is_one_error_line(tmp_path: Path) -> None:
    result = run_cli("train", "--data", "demo", *tiny_args(tmp_path / "artifacts", "trainer.time_budget=soon"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "xray: error: config: trainer.time_budget must look like 90s, 10m, 1h or none, got 'soon'"
    ]


def test_everything_fits_so_everyone_gets_the_schedule_they_want() -> None:
    assert allocate_epochs(100.0, {"a": 1.0, "b": 2.0}, {"a": 30, "b": 30}) == {"a": 30, "b": 30}


def test_a_cheap_candidate_passes_its_unused_share_on() -> None:
    # 120 s: a wants 30 x 1 s (under its 60 s share), so b gets the other 90 s = 30 of its 3 s epochs... at most 30.
    assert allocate_epochs(120.0, {"a": 1.0, "b": 3.0}, {"a": 30, "b": 100}) == {"a": 30, "b": 30}
    # Both over their share: equal time each (50 s), floored to whole epochs.
    assert allocate_epochs(100.0, {"a": 2.0, "b": 3.0}, {"a": 100, "b": 100}) == {"a": 25, "b": 16}
    assert allocate_epochs(-5.0, {"a": 1.0}, {"a": 10}) == {"a": 0}


def timing(name: str, size: int, epoch_s: float) -> CandidateTiming:
    return CandidateTiming(name, size, 64, epoch_s / 3, 50.0, epoch_s)


def fake_measure(per_epoch_at_128: dict[str, float], calls: list[tuple[str, int]]):
    """Epoch seconds that scale with the pixel count, as convolutions do."""

    def measure(name: str, size: int) -> CandidateTiming:
        calls.append((name, size))
        return timing(name, size, per_epoch_at_128[name] * (size / 128) ** 2)

    return measure


def test_every_candidate_gets_its_floor_before_anyone_gets_more() -> None:
    # 700 s: 10 epochs each cost 100 + 500 = 600 s; the other 100 s are shared: a 5 more, b 1 more.
    assert allocate_epochs(700.0, {"a": 10.0, "b": 50.0}, {"a": 30, "b": 30}, floor=10) == {"a": 15, "b": 11}
    # Plain equal shares would have left b below a useful schedule.
    assert allocate_epochs(700.0, {"a": 10.0, "b": 50.0}, {"a": 30, "b": 30}) == {"a": 30, "b": 8}
    # Where the floors do not all fit, equal shares decide (and the planner shrinks or drops).
    assert allocate_epochs(500.0, {"a": 10.0, "b": 50.0}, {"a": 30, "b": 30}, floor=10) == {"a": 25, "b": 5}


def test_the_image_shrinks_before_any_candidate_is_dropped() -> None:
    calls: list[tuple[str, int]] = []
    plan = plan_training(
        ["simple_cnn", "densenet121"], wanted_epochs=100, image_size=128, steps_per_epoch=3, budget_s=300,
        measure=fake_measure({"simple_cnn": 2.0, "densenet121": 32.0}, calls), remaining_s=lambda: 240.0,
    )
    # At 128 px ten epochs each cost 20 + 320 s > 240 s, and equal shares give densenet121 3 epochs < floor.
    # At 96 px (1.125 and 18 s per epoch) the floors cost 191.25 s; the other 48.75 s are shared:
    # simple_cnn 21 more epochs (23.6 s), densenet121 1 more (18 s).
    assert plan.image_size == 96 and plan.source_image_size == 128
    assert [c.planned_epochs for c in plan.candidates] == [31, 11]
    assert calls == [(n, s) for s in (128, 96) for n in ("simple_cnn", "densenet121")]
    assert len(plan.timings) == 4 and plan.dropped == ()
    assert plan.decisions[0].startswith("image size 128 -> 96 px: densenet121 would get")
    assert plan.decisions[1:] == ("simple_cnn: 31 of 100 epochs fit the budget", "densenet121: 11 of 100 epochs fit the budget")


def test_the_most_expensive_candidate_is_dropped_when_shrinking_is_not_enough() -> None:
    calls: list[tuple[str, int]] = []
    plan = plan_training(
        ["simple_cnn", "densenet121"], wanted_epochs=30, image_size=32, steps_per_epoch=74, budget_s=60,
        measure=fake_measure({"simple_cnn": 16.0, "densenet121": 640.0}, calls), remaining_s=lambda: 50.0,
    )
    # 32 px is MedMNIST size: never shrunk. densenet121 (40 s/epoch) cannot get 10 epochs in 25 s: dropped.
    assert plan.image_size == 32 and calls == [("simple_cnn", 32), ("densenet121", 32)]
    assert [d.name for d in plan.dropped] == ["densenet121"]
    assert "most expensive" in plan.dropped[0].reason
    assert [(c.name, c.planned_epochs) for c in plan.candidates] == [("simple_cnn", 30)]


def test_a_lone_candidate_that_cannot_reach_the_floor_still_trains_what_fits() -> None:
    plan = plan_training(
        ["densenet121"], wanted_epochs=50, image_size=64, steps_per_epoch=3, budget_s=60,
        measure=fake_measure({"densenet121": 40.0}, []), remaining_s=lambda: 50.0,
    )
    assert plan.candidates[0].planned_epochs == 5 < MIN_USEFUL_EPOCHS  # 10 s per epoch at 64 px
    assert "nothing left to cut" in plan.decisions[0]


def test_a_short_schedule_keeps_warmup_and_patience_as_a_share() -> None:
    cfg = dataclasses.replace(FAST, epochs=30, min_steps=400, warmup_epochs=1, early_stopping_patience=10)
    planned = planned_schedule(cfg, steps_per_epoch=3, epochs=20)  # min_steps wants 134 epochs
    assert (planned.epochs, planned.warmup_epochs, planned.early_stopping_patience, planned.min_steps) == (20, 1, 7, 0)
    full = planned_schedule(cfg, steps_per_epoch=3, epochs=134)
    assert (full.epochs, full.warmup_epochs, full.early_stopping_patience) == (134, 4, 45)


def test_the_time_left_is_shared_by_the_candidates_still_to_train() -> None:
    plan = TrainingPlan(
        time_budget_s=100, training_target_s=85, capability="", source_image_size=32, image_size=32, steps_per_epoch=1,
        timings=(), candidates=(CandidatePlan("a", 10, 10, 20.0), CandidatePlan("b", 10, 10, 60.0)),
    )
    assert candidate_deadline(plan, "a", now=0.0, stage_deadline=80.0) == pytest.approx(20.0)
    assert candidate_deadline(plan, "b", now=30.0, stage_deadline=80.0) == pytest.approx(80.0)  # a ran long: b gets the rest


def test_fit_stops_at_the_deadline() -> None:
    train_x, train_y = separable(16, 0)
    val_x, val_y = separable(8, 1)
    data = TrainingData(
        train_x, train_y, val_x, val_y, ("left", "right"),
        Preprocessing(image_size=16, mean=0.5, std=0.25), AugmentConfig(hflip=False, rotation_degrees=0),
    )
    result = fit("simple_cnn", data, dataclasses.replace(FAST, epochs=50, precision="fp32"), deadline=time.monotonic())
    assert len(result.history) == 1 and result.stopped_by_budget and not result.stopped_early


def test_a_tiny_budget_is_planned_recorded_and_respected(tmp_path: Path) -> None:
    artifacts = tmp_path / "artifacts"
    result = run_cli(
        "train", "--data", "demo",
        *tiny_args(artifacts, "trainer.epochs=1000", "trainer.time_budget=4s", "trainer.precise_bn_images=16"),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (run_dir,) = [p for p in artifacts.iterdir() if (p / "manifest.json").is_file()]
    trainer = json.loads((run_dir / "model_trainer" / "artifact.json").read_text())
    plan = trainer["plan"]
    assert plan["time_budget_s"] == 4.0 and plan["image_size"] == 32 and "cpu:" in plan["capability"]
    assert [t["name"] for t in plan["timings"]] == ["simple_cnn"] and plan["timings"][0]["seconds_per_step"] > 0
    (planned,) = plan["candidates"]
    assert planned["wanted_epochs"] == 1000 and 1 <= planned["planned_epochs"] < 1000  # 1000 epochs never fit in 4 s
    (candidate,) = trainer["candidates"]
    assert len(candidate["history"]) <= planned["planned_epochs"]
    assert re.search(r"time budget 4s \(4 s for \d+ training images\): simple_cnn", result.stderr)


def test_where_measuring_was_slow_smaller_sizes_are_scaled_not_measured_again() -> None:
    calls: list[tuple[str, int]] = []
    plan = plan_training(
        ["simple_cnn", "densenet121"], wanted_epochs=100, image_size=128, steps_per_epoch=3, budget_s=1e-9,
        measure=fake_measure({"simple_cnn": 2.0, "densenet121": 32.0}, calls), remaining_s=lambda: 240.0,
    )
    assert calls == [("simple_cnn", 128), ("densenet121", 128)]
    assert plan.image_size == 96 and [c.planned_epochs for c in plan.candidates] == [31, 11]
    assert [t.measured for t in plan.timings] == [True, True, False, False]
    assert plan.timings[-1].seconds_per_epoch == 18.0 and plan.timings[-1].image_size == 96


def test_a_small_dataset_gets_a_budget_in_proportion_to_its_images() -> None:
    assert effective_budget(900.0, 1.0, 132) == 132.0  # the Covid19 train split: about two minutes
    assert effective_budget(900.0, 1.0, 4002) == 900.0  # PneumoniaMNIST: the whole time_budget
    assert effective_budget(900.0, 1.0, 20) == MIN_SCALED_BUDGET_S  # never below a minute
    assert effective_budget(30.0, 1.0, 20) == 30.0  # ... unless time_budget itself is shorter
    assert effective_budget(900.0, 0.0, 132) == 900.0  # 0: off


def test_a_scaled_estimate_follows_the_models_own_cost_not_the_pixel_count() -> None:
    # simple_cnn strides its first convolution only above 64 px: at 64 px it costs more than at 96.
    assert forward_flops_ratio("simple_cnn", 3, 96, 64) > 1.5
    assert forward_flops_ratio("densenet121", 3, 96, 64) == pytest.approx((64 / 96) ** 2, rel=0.01)
    plan = plan_training(
        ["simple_cnn"], wanted_epochs=100, image_size=128, steps_per_epoch=3, budget_s=1e-9,
        measure=lambda name, size: timing(name, size, 4.0), remaining_s=lambda: 20.0,
        cost_ratio=lambda name, measured, size: 2.0,  # each smaller size costs twice as much
    )
    # 4 s per epoch gives 5 epochs < floor: shrink to 96 (8 s), then to 64 (16 s), then nothing is left to cut.
    assert [t.seconds_per_epoch for t in plan.timings] == [4.0, 8.0, 16.0]
    assert plan.image_size == 64 and plan.candidates[0].planned_epochs == 1


def test_cross_validation_folds_are_cut_at_the_size_the_budget_trains_at(tmp_path: Path) -> None:
    """The folds come from the arrays after the plan's resize (and the intensity step after it, as serving
    orders them): cut before, they trained at the cached size while the model was recorded at the smaller one."""
    rng = np.random.default_rng(0)
    x = (rng.random((16, 96, 96)) ** 2 * 255).astype(np.uint8)
    y = (np.arange(16) % 2).astype(np.int64)
    data = TrainingData(x[:12], y[:12], x[12:], y[12:], ("a", "b"), Preprocessing(96, 0.5, 0.25, intensity="equalize"),
                        AugmentConfig(hflip=False, rotation_degrees=0))
    cfg = dataclasses.replace(FAST, cv_folds=2, time_budget="1s", budget_per_image=0.0)
    training = model_trainer._prepare(cfg, lambda: data, tmp_path, Ranks())
    assert training.plan is not None and training.plan.image_size == 64  # 1 s fits nothing at 96 px
    assert training.data.train_x.shape[1:] == (64, 64) and training.folds is not None
    assert np.array_equal(training.folds.x, equalize(resize_batch(x, 64)).numpy())
    assert training.data.preprocessing.intensity == "none"  # done once on the arrays, not again per batch


def _plan(candidates: tuple[str, ...] = ("simple_cnn", "densenet121"), size: int = 96, steps: int = 11) -> TrainingPlan:
    return TrainingPlan(
        time_budget_s=260.0, training_target_s=215.0, capability="cpu: test", source_image_size=128, image_size=size,
        steps_per_epoch=steps, timings=(timing("simple_cnn", size, 3.0),),
        candidates=tuple(CandidatePlan(name, 37, 13 + i, 40.0) for i, name in enumerate(candidates)),
        decisions=("image size 128 -> 96 px: ...",), planning_seconds=6.0,
    )


def test_a_replayed_plan_is_the_recorded_one_with_its_origin_said() -> None:
    recorded = _plan()
    again = replayed(recorded, "run-1", ["simple_cnn", "densenet121"], 128, 11, 37)
    assert again.image_size == 96 and again.candidates == recorded.candidates and again.timings == recorded.timings
    assert again.planning_seconds == 0.0 and again.decisions[:-1] == recorded.decisions
    assert again.decisions[-1].startswith("replayed from run-1: 96 px, simple_cnn 13 epochs, densenet121 14 epochs")


def test_a_plan_that_does_not_fit_the_run_is_refused_naming_each_mismatch() -> None:
    with pytest.raises(ConfigError) as refused:
        replayed(_plan(), "run-1", ["simple_cnn"], 64, 9, 1000)
    message = str(refused.value)
    assert "planned for a schedule of 37 epochs (trainer.epochs, stretched by min_steps), this run's is 1000" in message
    assert message.startswith("trainer.replay_plan run-1: cannot be replayed here:")
    assert "it planned simple_cnn, densenet121, this run trains simple_cnn" in message
    assert "planned on 128 px arrays, these are 64 px" in message and "had 11 steps, this run's have 9" in message


def test_a_run_replays_another_runs_plan_and_bad_plans_are_clear_errors(tmp_path: Path) -> None:
    first_dir, second_dir = tmp_path / "first", tmp_path / "second"
    once = ("trainer.epochs=1000", "trainer.precise_bn_images=16", "trainer.early_stopping_patience=0")  # every epoch runs
    first = run_cli("train", "--data", "demo", *tiny_args(first_dir, *once, "trainer.time_budget=4s"))
    assert first.returncode == 0, first.stderr[-2000:]
    (run_one,) = [p for p in first_dir.iterdir() if (p / "manifest.json").is_file()]
    recorded = json.loads((run_one / "model_trainer" / "artifact.json").read_text())["plan"]
    # replayed: the same size and epochs, nothing measured, no deadline (time_budget none does not matter)
    second = run_cli("train", "--data", "demo", *tiny_args(second_dir, *once, "trainer.time_budget=1s",
                                                             f"trainer.replay_plan={run_one}"))
    assert second.returncode == 0, second.stderr[-2000:]
    (run_two,) = [p for p in second_dir.iterdir() if (p / "manifest.json").is_file()]
    trainer = json.loads((run_two / "model_trainer" / "artifact.json").read_text())
    plan = trainer["plan"]
    assert plan["image_size"] == recorded["image_size"] and plan["candidates"] == recorded["candidates"]
    assert plan["decisions"][-1].startswith(f"replayed from {run_one.name}:") and plan["planning_seconds"] == 0.0
    (candidate,) = trainer["candidates"]  # a 1 s budget would cut it: a replay has no deadline
    assert not candidate["stopped_by_budget"]
    assert not candidate["stopped_early"] and len(candidate["history"]) == recorded["candidates"][0]["planned_epochs"]
    # bad input: a path that is not there, a file that is not a trainer artifact, a plan for other candidates
    missing = run_cli("train", "--data", "demo", *tiny_args(tmp_path / "x", f"trainer.replay_plan={tmp_path / 'nope'}"))
    assert missing.returncode == 2 and "trainer.replay_plan" in missing.stderr and "does not exist" in missing.stderr
    assert "Traceback" not in missing.stderr and not (tmp_path / "x").exists()
    not_a_plan, not_a_mapping = tmp_path / "plan.json", tmp_path / "null.json"
    not_a_plan.write_text('{"hello": 1}')
    not_a_mapping.write_text("null")
    for where, expected in ((not_a_plan, "not a run's trainer artifact"), (not_a_mapping, "not a run's trainer artifact"),
                            (run_one, "cannot be replayed here: it planned simple_cnn, this run trains simple_cnn, densenet121")):
        bad = run_cli("train", "--data", "demo",
                      *tiny_args(tmp_path / "bad", "trainer.candidates=[simple_cnn,densenet121]", f"trainer.replay_plan={where}"))
        assert bad.returncode != 0 and expected in bad.stderr and "Traceback" not in bad.stderr, bad.stderr[-2000:]
        failed = [p for p in (tmp_path / "bad").iterdir() if (p / "manifest.json").is_file()]
        assert all(json.loads((p / "manifest.json").read_text())["status"] == "failed" for p in failed) and failed
        shutil.rmtree(tmp_path / "bad")
