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
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from xray.capability import capability
from xray.config import parse_duration
from xray.errors import ConfigError
from xray.entity.artifact_entity import CandidatePlan, CandidateTiming, DroppedCandidate, TrainingPlan
from xray.entity.config_entity import TrainerConfig
from xray.serving.inference import choose_precision, predict_logits, prepare_model
from xray.models.builders import build_model
from xray.data.preprocessing import resize_batch
from xray.training.fit import TrainingData, batch_plan, stretch_schedule, train_step
from xray.training.ranks import Ranks

logger = logging.getLogger(__name__)

TRAINING_SHARE = 0.85  # of the budget; the rest covers evaluation, checkpoints and estimate error
MEASURE_SHARE = 0.05  # re-measure at a smaller size only while measuring has cost less than this share of the budget
MIN_USEFUL_EPOCHS = 10  # fewer epochs from scratch leave a cosine schedule too short to converge
SMALLER_SIZES = (96, 64)  # full-size data may shrink to these; MedMNIST-size data (<= 64 px) never shrinks

PROBE_BATCH = 16  # images per timed step when planning a time budget
FULL_BATCH_PROBE_S = 2.0  # ... unless a whole batch (estimated from a probe step) takes less than this

MeasureFn = Callable[[str, int], CandidateTiming]
CostRatioFn = Callable[[str, int, int], float]  # (candidate, measured size, new size) -> cost at new / cost at measured


def pixel_ratio(name: str, measured: int, size: int) -> float:
    """Convolution cost goes with the pixel count, for a network whose layers do not depend on the input size."""
    return (size / measured) ** 2


def allocate_epochs(
    available_s: float, epoch_seconds: Mapping[str, float], wanted: Mapping[str, int], floor: int = 0
) -> dict[str, int]:
    """Epochs per candidate so that the sum of epochs x seconds per epoch stays within ``available_s``.

    First every candidate's ``floor`` epochs, where they all fit: an expensive
    candidate keeps a useful schedule instead of a cheap one taking half the
    time for epochs it barely needs (on PneumoniaMNIST, equal shares left
    DenseNet-121 too few epochs and dropped it: docs/benchmarks.md). The rest in equal time shares,
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


@dataclass
class _Planning:
    """The planner's working state: the candidates left, their current timings, and what was cut and why."""

    names: list[str]
    size: int
    smaller: list[int]
    current: dict[str, CandidateTiming]
    measuring_s: float
    cost_ratio: CostRatioFn
    timings: list[CandidateTiming] = field(default_factory=list)
    dropped: list[DroppedCandidate] = field(default_factory=list)
    decisions: list[str] = field(default_factory=list)

    def decide(self, decision: str, level: int = logging.INFO) -> None:
        self.decisions.append(decision)
        logger.log(level, "time budget: %s", decision)


def plan_training(
    candidates: Sequence[str],
    wanted_epochs: int,
    image_size: int,
    steps_per_epoch: int,
    budget_s: float,
    measure: MeasureFn,
    remaining_s: Callable[[], float],
    capability: str = "",
    cost_ratio: CostRatioFn = pixel_ratio,
) -> TrainingPlan:
    """Measure, allocate, and shrink or drop until every candidate gets a useful schedule.

    ``measure(name, size)`` times one candidate; ``remaining_s()`` is the
    training time still left until the deadline (``TRAINING_SHARE`` of the
    budget after the stage started; it shrinks while measuring). Both are injected
    so the arithmetic is testable without a clock or a model.
    """
    started = time.monotonic()
    current = {name: measure(name, image_size) for name in candidates}
    state = _Planning(
        names=list(candidates), size=image_size, current=current, measuring_s=time.monotonic() - started, cost_ratio=cost_ratio,
        smaller=[s for s in SMALLER_SIZES if s < image_size] if image_size > SMALLER_SIZES[-1] else [],
        timings=list(current.values()),
    )
    floor = min(MIN_USEFUL_EPOCHS, wanted_epochs)
    while True:
        available = remaining_s()
        seconds = {name: state.current[name].seconds_per_epoch for name in state.names}
        epochs = allocate_epochs(available, seconds, {name: wanted_epochs for name in state.names}, floor)
        short = [name for name in state.names if epochs[name] < floor]
        if not short:
            break
        worst = short[0]
        why = f"{worst} would get {epochs[worst]} of {wanted_epochs} epochs ({seconds[worst]:.1f} s each) in {available:.0f} s"
        if not _cut(state, seconds, why, measure, budget_s):
            epochs[worst] = max(1, epochs[worst])
            state.decide(f"{worst} trains only {epochs[worst]} epochs: {why}; nothing left to cut", logging.WARNING)
            break
    for name in state.names:
        if epochs[name] < wanted_epochs:
            state.decide(f"{name}: {epochs[name]} of {wanted_epochs} epochs fit the budget")
    return TrainingPlan(
        time_budget_s=budget_s,
        training_target_s=round(available, 1),
        capability=capability,
        source_image_size=image_size,
        image_size=state.size,
        steps_per_epoch=steps_per_epoch,
        timings=tuple(state.timings),
        candidates=tuple(
            CandidatePlan(name, wanted_epochs, epochs[name], round(epochs[name] * seconds[name], 1)) for name in state.names
        ),
        dropped=tuple(state.dropped),
        decisions=tuple(state.decisions),
        planning_seconds=round(time.monotonic() - started, 2),
    )


def _cut(state: _Planning, seconds: Mapping[str, float], why: str, measure: MeasureFn, budget_s: float) -> bool:
    """Shrink the image one step, else drop the most expensive candidate; False when nothing is left to cut."""
    if state.smaller:
        new_size = state.smaller.pop(0)
        state.decide(f"image size {state.size} -> {new_size} px: {why}")
        if state.measuring_s < MEASURE_SHARE * budget_s:
            started = time.monotonic()
            state.current = {name: measure(name, new_size) for name in state.names}
            state.measuring_s += time.monotonic() - started
        else:  # measuring is itself too slow here (a busy machine): scale by the model's cost instead
            state.current = {
                name: scaled(timing, new_size, state.cost_ratio(name, timing.image_size, new_size))
                for name, timing in state.current.items()
            }
        state.size = new_size
        state.timings += state.current.values()
        return True
    if len(state.names) > 1:
        costly = max(state.names, key=lambda name: seconds[name])
        reason = f"the most expensive candidate ({seconds[costly]:.1f} s per epoch at {state.size} px) does not fit: {why}"
        state.dropped.append(DroppedCandidate(costly, reason))
        logger.info("time budget: dropping %s: %s", costly, reason)
        state.names.remove(costly)
        return True
    return False


def scaled(timing: CandidateTiming, size: int, factor: float) -> CandidateTiming:
    """An estimate at ``size`` from a measurement at another size, whose cost is ``factor`` times as much."""
    return dataclasses.replace(
        timing, image_size=size, seconds_per_step=round(timing.seconds_per_step * factor, 4),
        eval_images_per_second=round(timing.eval_images_per_second / factor, 1),
        seconds_per_epoch=round(timing.seconds_per_epoch * factor, 2), measured=False,
    )


MIN_SCALED_BUDGET_S = 60.0  # trainer.budget_per_image never cuts the budget below this


def effective_budget(budget_s: float, per_image_s: float, train_images: int) -> float:
    """``trainer.time_budget``, capped at ``budget_per_image`` seconds per training image (never below a minute).

    On the Covid19 train set the 3-fold CV accuracy did not move with twice the
    epochs or twice the pixels (docs/benchmarks.md): a small dataset stops paying
    for time long before a budget sized for thousands of images runs out.
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


def replayed(
    recorded: TrainingPlan, origin: str, candidates: Sequence[str], source_size: int, steps_per_epoch: int, wanted_epochs: int
) -> TrainingPlan:
    """An earlier run's plan to train again as recorded: its image size and epochs, no measuring, no deadline.

    Why: a plan comes from timings, so two runs of one config on one machine can differ (an epoch
    more, or 96 px instead of 128 near a threshold), and a figure that moved between them cannot say
    whether the plan or the training moved it. Replayed, only the latter can. It must fit this run:
    the same candidates, arrays of the size it was planned on, epochs of the same length, and the
    same wanted schedule (warmup and patience are shortened in proportion to it: ``planned_schedule``).
    What it replays is the plan: a recorded run that its deadline cut short is replayed to the end.
    """
    planned = [c.name for c in recorded.candidates] + [d.name for d in recorded.dropped]
    problems = []
    if sorted(planned) != sorted(candidates):
        problems.append(f"it planned {', '.join(planned)}, this run trains {', '.join(candidates)}")
    if recorded.source_image_size != source_size:
        problems.append(f"it was planned on {recorded.source_image_size} px arrays, these are {source_size} px")
    if recorded.steps_per_epoch != steps_per_epoch:
        problems.append(f"its epochs had {recorded.steps_per_epoch} steps, this run's have {steps_per_epoch}")
    recorded_wanted = sorted({c.wanted_epochs for c in recorded.candidates})
    if recorded_wanted and recorded_wanted != [wanted_epochs]:
        problems.append(f"it was planned for a schedule of {recorded_wanted[0]} epochs (trainer.epochs, stretched by "
                        f"min_steps), this run's is {wanted_epochs}")
    if problems:
        raise ConfigError(f"trainer.replay_plan {origin}: cannot be replayed here: {'; '.join(problems)}")
    decision = f"replayed from {origin}: {recorded.image_size} px, " + ", ".join(
        f"{c.name} {c.planned_epochs} epochs" for c in recorded.candidates
    ) + "; nothing measured, no deadline"
    logger.info("time budget: %s", decision)
    return dataclasses.replace(recorded, decisions=(*recorded.decisions, decision), planning_seconds=0.0)


def make_plan(
    cfg: TrainerConfig, data: TrainingData, cross_validated: bool, ranks: Ranks, started: float,
    replay: tuple[TrainingPlan, str] | None = None,
) -> tuple[TrainingPlan | None, float | None]:
    """(plan, training deadline on time.monotonic()) under trainer.time_budget; (None, None) without one.

    ``replay``: (a recorded plan, where it came from) for trainer.replay_plan, trained with no deadline.
    Rank 0 measures and plans; under DDP the other ranks receive its plan, so all train the same schedule.
    """
    _, batch_size, batches = batch_plan(len(data.train_y), cfg.batch_size, ranks.world_size)
    if cfg.max_batches_per_epoch:
        batches = min(batches, cfg.max_batches_per_epoch)
    if replay is not None:
        return replayed(*replay, cfg.candidates, data.preprocessing.image_size, batches, stretch_schedule(cfg, batches).epochs), None
    budget = parse_duration(cfg.time_budget)
    if budget is None:
        return None, None
    budget = effective_budget(budget, cfg.budget_per_image, len(data.train_y))
    deadline = training_deadline(started, budget)
    plan = None
    if ranks.is_lead:
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        device = ranks.device()
        precision = choose_precision(device, cfg.precision)
        repeats = cfg.cv_folds + (cfg.cv_final_model == "retrain") if cross_validated else 1  # each fold (and a retrain)

        def measure(name: str, size: int) -> CandidateTiming:
            return time_candidate(name, data, cfg, size, batch_size, batches, device, precision, ranks.world_size, repeats)

        plan = plan_training(
            cfg.candidates, stretch_schedule(cfg, batches).epochs, data.preprocessing.image_size, batches, budget,
            measure, remaining_s=lambda: deadline - time.monotonic(),
            capability=capability().describe() if device.type == "cpu" else f"cuda: {torch.cuda.get_device_name(device)}",
            cost_ratio=lambda name, measured, size: forward_flops_ratio(name, len(data.class_names), measured, size),
        )
        logger.info(
            "time budget %s (%.0f s for %d training images): %s at %d px (measured in %.1f s)%s",
            cfg.time_budget, budget, len(data.train_y),
            ", ".join(f"{c.name} {c.planned_epochs}/{c.wanted_epochs} epochs ~{c.planned_seconds:.0f} s" for c in plan.candidates),
            plan.image_size, plan.planning_seconds, "".join(f"; dropped {d.name}" for d in plan.dropped),
        )
    return ranks.share(plan, "the training plan"), deadline


def forward_flops_ratio(name: str, num_classes: int, measured: int, size: int) -> float:
    """The model's forward FLOPs at ``size`` over those at ``measured``, counted by torch on one image.

    Not the pixel ratio: simple_cnn strides its first convolution only above
    64 px (``StemConv``), so going from 96 to 64 px costs it about as much,
    not 2.25x less. Scaled by pixels, it was planned far too cheap on the
    Covid19 films and the budget cut it off early (docs/benchmarks.md).
    """
    model = build_model(name, num_classes).eval()

    def flops(pixels: int) -> int:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, 1, pixels, pixels))
        return counter.get_total_flops()

    return flops(size) / flops(measured)


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
    made DenseNet-121 look much slower than it trains at batch 64, and the planner dropped it from
    PneumoniaMNIST (docs/benchmarks.md).
    """
    torch.manual_seed(cfg.seed)
    model = prepare_model(build_model(name, len(data.class_names)), device, cfg.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    criterion = nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(cfg.seed)
    # training does the intensity step once on its arrays (fit.intensity_once), so the steps timed here skip it too
    prep = dataclasses.replace(data.preprocessing, image_size=size, intensity="none")
    model.train()

    def probe_batch(images: int) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = data.preprocessing.intensity_applied(resize_batch(data.train_x[:images], size))
        return torch.from_numpy(pixels), torch.from_numpy(data.train_y[:images])

    def step(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        train_step(model, criterion, optimizer, prep, data.augment, *batch, generator, device, precision, cfg.channels_last)

    probe = max(2, min(batch_size, PROBE_BATCH, len(data.train_y)))
    batch = probe_batch(probe)
    step(batch)  # warm-up: allocator, kernel selection
    started = time.perf_counter()
    step(batch)
    if batch_size > probe and (time.perf_counter() - started) * batch_size / probe < FULL_BATCH_PROBE_S:
        probe = min(batch_size, len(data.train_y))
        batch = probe_batch(probe)
        step(batch)  # warm-up at the whole batch
    steps, started = 0, time.perf_counter()
    while steps < 3 and (steps == 0 or time.perf_counter() - started < 1.0):
        step(batch)
        steps += 1
    step_s = (time.perf_counter() - started) / steps * batch_size / probe
    started = time.perf_counter()
    predict_logits(model, batch[0].numpy(), prep, device, "fp32", channels_last=cfg.channels_last)
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
