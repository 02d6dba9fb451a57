"""trainer.time_budget: time each candidate on this machine, then plan epochs so training fits.

The same config runs on CPUs whose throughput differs several-fold (bf16 on
AVX-512 vs fp32 on AVX2), so a fixed epoch count either wastes the fast kind
or overruns on the slow one. Before training, a few steps of every candidate
are timed at the planned image size and batch (after a warm-up step), plus a
forward pass for precise BatchNorm and validation. The planner then:

1. gives each candidate the epochs it wants (``trainer.epochs`` stretched by
   ``min_steps``) if they all fit in ``TRAINING_SHARE`` of the budget;
2. otherwise gives each candidate ``MIN_USEFUL_EPOCHS`` first (where they all
   fit) and splits the rest equally, a candidate that needs less than its
   share passing the rest on (water-filling), and shortens the schedules;
3. if a candidate would still get fewer than ``MIN_USEFUL_EPOCHS``, shrinks
   the image (full-size data only: 128 -> 96 -> 64 px) and measures again;
   (where measuring already cost more than ``MEASURE_SHARE`` of the budget,
   the smaller size's cost is scaled from the pixel count instead);
4. then drops the most expensive candidate, as long as one is left.

Every cut is logged with its reason and recorded in the ``TrainingPlan``.
The fit loop also stops at the deadline, so a mis-estimate cannot overrun.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence

from xray.entity.artifact_entity import CandidatePlan, CandidateTiming, DroppedCandidate, TrainingPlan

logger = logging.getLogger(__name__)

TRAINING_SHARE = 0.85  # of the budget; the rest covers evaluation, checkpoints and estimate error
MEASURE_SHARE = 0.05  # re-measure at a smaller size only while measuring has cost less than this share of the budget
MIN_USEFUL_EPOCHS = 10  # fewer epochs from scratch leave a cosine schedule too short to converge
SMALLER_SIZES = (96, 64)  # full-size data may shrink to these; MedMNIST-size data (<= 64 px) never shrinks

MeasureFn = Callable[[str, int], CandidateTiming]


def allocate_epochs(
    available_s: float, epoch_seconds: Mapping[str, float], wanted: Mapping[str, int], floor: int = 0
) -> dict[str, int]:
    """Epochs per candidate so that the sum of epochs x seconds per epoch stays within ``available_s``.

    First every candidate's ``floor`` epochs, where they all fit: an expensive
    candidate keeps a useful schedule instead of a cheap one taking half the
    time for epochs it barely needs (on PneumoniaMNIST with AVX2, equal shares
    left DenseNet-121 7 epochs and dropped it). The rest in equal time shares,
    a candidate whose whole schedule costs less than its share taking only
    what it needs and the others splitting the rest.
    """
    base = {name: min(floor, wanted[name]) for name in wanted}
    reserved = sum(base[name] * epoch_seconds[name] for name in wanted)
    if floor and reserved <= available_s:
        extra = allocate_epochs(available_s - reserved, epoch_seconds, {n: wanted[n] - base[n] for n in wanted})
        return {name: base[name] + extra[name] for name in wanted}
    epochs: dict[str, int] = {}
    left = max(0.0, available_s)
    pending = sorted(wanted, key=lambda name: wanted[name] * epoch_seconds[name])
    for index, name in enumerate(pending):
        share = left / (len(pending) - index)
        fits = math.floor(share / epoch_seconds[name]) if epoch_seconds[name] > 0 else wanted[name]
        epochs[name] = min(wanted[name], fits)
        left -= epochs[name] * epoch_seconds[name]
    return {name: epochs[name] for name in wanted}


def plan_training(
    candidates: Sequence[str],
    wanted_epochs: int,
    image_size: int,
    steps_per_epoch: int,
    budget_s: float,
    measure: MeasureFn,
    remaining_s: Callable[[], float],
    capability: str = "",
) -> TrainingPlan:
    """Measure, allocate, and shrink or drop until every candidate gets a useful schedule.

    ``measure(name, size)`` times one candidate; ``remaining_s()`` is the
    training time still left until the deadline (``TRAINING_SHARE`` of the
    budget after the stage started; it shrinks while measuring). Both are injected
    so the arithmetic is testable without a clock or a model.
    """
    started = time.monotonic()
    names = list(candidates)
    size = image_size
    smaller = [s for s in SMALLER_SIZES if s < image_size] if image_size > SMALLER_SIZES[-1] else []
    timings: list[CandidateTiming] = []
    dropped: list[DroppedCandidate] = []
    decisions: list[str] = []
    floor = min(MIN_USEFUL_EPOCHS, wanted_epochs)
    current = {name: measure(name, size) for name in names}
    timings += current.values()
    measuring_s = time.monotonic() - started
    while True:
        available = remaining_s()
        seconds = {name: current[name].seconds_per_epoch for name in names}
        epochs = allocate_epochs(available, seconds, {name: wanted_epochs for name in names}, floor)
        short = [name for name in names if epochs[name] < floor]
        if not short:
            break
        worst = short[0]
        why = f"{worst} would get {epochs[worst]} of {wanted_epochs} epochs ({seconds[worst]:.1f} s each) in {available:.0f} s"
        if smaller:
            new_size = smaller.pop(0)
            decisions.append(f"image size {size} -> {new_size} px: {why}")
            logger.info("time budget: %s", decisions[-1])
            if measuring_s < MEASURE_SHARE * budget_s:
                current = {name: measure(name, new_size) for name in names}
            else:  # measuring is itself too slow here (a busy machine): scale by the pixel count instead
                current = {name: scaled(current[name], new_size) for name in names}
            size = new_size
            timings += current.values()
        elif len(names) > 1:
            costly = max(names, key=lambda name: seconds[name])
            reason = f"the most expensive candidate ({seconds[costly]:.1f} s per epoch at {size} px) does not fit: {why}"
            dropped.append(DroppedCandidate(costly, reason))
            logger.info("time budget: dropping %s: %s", costly, reason)
            names.remove(costly)
        else:
            epochs[worst] = max(1, epochs[worst])
            decisions.append(f"{worst} trains only {epochs[worst]} epochs: {why}; nothing left to cut")
            logger.warning("time budget: %s", decisions[-1])
            break
    for name in names:
        if epochs[name] < wanted_epochs:
            decisions.append(f"{name}: {epochs[name]} of {wanted_epochs} epochs fit the budget")
            logger.info("time budget: %s", decisions[-1])
    return TrainingPlan(
        time_budget_s=budget_s,
        training_target_s=round(available, 1),
        capability=capability,
        source_image_size=image_size,
        image_size=size,
        steps_per_epoch=steps_per_epoch,
        timings=tuple(timings),
        candidates=tuple(
            CandidatePlan(name, wanted_epochs, epochs[name], round(epochs[name] * seconds[name], 1)) for name in names
        ),
        dropped=tuple(dropped),
        decisions=tuple(decisions),
        planning_seconds=round(time.monotonic() - started, 2),
    )


def scaled(timing: CandidateTiming, size: int) -> CandidateTiming:
    """An estimate at ``size`` from a measurement at another size: convolution cost goes with the pixel count."""
    factor = (size / timing.image_size) ** 2
    return dataclasses.replace(
        timing, image_size=size, seconds_per_step=round(timing.seconds_per_step * factor, 4),
        eval_images_per_second=round(timing.eval_images_per_second / factor, 1),
        seconds_per_epoch=round(timing.seconds_per_epoch * factor, 2), measured=False,
    )


MIN_SCALED_BUDGET_S = 60.0  # trainer.budget_per_image never cuts the budget below this


def effective_budget(budget_s: float, per_image_s: float, train_images: int) -> float:
    """``trainer.time_budget``, capped at ``budget_per_image`` seconds per training image (never below a minute).

    On the Covid19 train set a 3-fold CV accuracy of 0.90 was the same after 30
    and 60 epochs (and at 128 and 256 px): a small dataset stops paying for
    time long before a budget sized for thousands of images runs out.
    """
    if per_image_s <= 0:
        return budget_s
    return min(budget_s, max(MIN_SCALED_BUDGET_S, per_image_s * train_images))


def training_deadline(stage_started: float, budget_s: float) -> float:
    """time.monotonic() by which training must end: TRAINING_SHARE of the budget after the stage started."""
    return stage_started + budget_s * TRAINING_SHARE


def candidate_deadline(plan: TrainingPlan, name: str, now: float, stage_deadline: float) -> float:
    """This candidate's wall-clock end: the time left, shared in proportion to the planned seconds of the
    candidates still to train, so one that ran long leaves the next its fair part instead of nothing."""
    order = [c.name for c in plan.candidates]
    todo = plan.candidates[order.index(name) :]
    total = sum(c.planned_seconds for c in todo)
    share = todo[0].planned_seconds / total if total > 0 else 1.0 / len(todo)
    return now + max(0.0, stage_deadline - now) * share
