"""The training pipeline: ingestion -> transformation -> trainer -> evaluation -> pusher.

One loop over ``STAGES`` (each of the shape xray/pipeline/stage.py describes): a stage
gets the config and its upstream artifacts and returns a typed artifact. A
cached stage whose fingerprint (its config section, upstream fingerprints and
the code it runs) matches a finished result is reused instead of recomputed,
so a run after a failure resumes cheaply. The run directory, progress and
failure handling live here once, for every stage.

Under torchrun (WORLD_SIZE > 1) rank 0 is the run: it creates the one run
directory, ingests and transforms (or adopts them from the cache), then
sends the other ranks a plan (run directory, config, transformation
artifact). Every rank trains its share under DDP; rank 0 alone saves the
checkpoints, evaluates and pushes, and the other ranks exit 0 when their
share is done. Any rank's failure surfaces on rank 0 as a failed collective
(or torchrun's SIGTERM) and the run is marked failed with the reason.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xray.training import distributed
from xray.components import data_ingestion, data_transformation, model_evaluation, model_pusher, model_trainer
from xray.config import config_to_dict
from xray.training.distributed import DistContext
from xray.entity.artifact_entity import ModelEvaluationArtifact, ModelPusherArtifact
from xray.entity.config_entity import PipelineConfig
from xray.entity.run_summary import RunSummary
from xray.errors import XrayError
from xray.audit.keys import load_signing_key
from xray.audit.seal import finish_run
from xray.pipeline.stage import Inputs, Stage, StageContext
from xray.pipeline.store import RunDir, adopt_cached_stage, cache_lookup, cache_store, load_artifact
from xray.typed import to_jsonable

logger = logging.getLogger(__name__)

# The stages in the order they run; each has the shape xray/pipeline/stage.py describes.
STAGES: tuple[Stage, ...] = (data_ingestion, data_transformation, model_trainer, model_evaluation, model_pusher)


@dataclass(frozen=True)
class RunResult:
    run_id: str
    run_path: Path
    status: str  # succeeded | failed; on torchrun ranks other than 0: trained | skipped | failed
    reason: str | None
    summary: RunSummary | None  # None unless the run succeeded (and on ranks other than 0)
    rank: int = 0  # the torchrun rank that returns it; only rank 0 speaks for the run


@dataclass(frozen=True)
class TrainPlan:
    """Rank 0's one message to the other ranks: what to train, or why there is nothing to do."""

    run_id: str | None
    run_path: str | None  # absolute: ranks on other nodes need the same shared filesystem
    config: PipelineConfig | None
    transformation_artifact: str | None
    train: bool
    reason: str | None = None


class PlanChannel:
    """Sends the plan exactly once, whatever happens on rank 0, so no rank waits for a message that never comes."""

    def __init__(self, ctx: DistContext):
        self._ctx = ctx
        self.sent = False

    def send(self, plan: TrainPlan) -> None:
        if self.sent:
            return
        self.sent = True
        distributed.broadcast_object(self._ctx, plan, "sending the plan", setup=True)

    def announce(self, run: RunDir, config: PipelineConfig, train: bool) -> None:
        """The trainer stage is decided: the other ranks train with rank 0, or go home when it was cached."""
        transformation_json = run.path.resolve() / data_transformation.STAGE / "artifact.json"
        reason = None if train else "the trainer stage was reused from the cache"
        self.send(TrainPlan(run.run_id, str(run.path.resolve()), config, str(transformation_json), train=train, reason=reason))

    def release(self, reason: str, run: RunDir | None = None) -> None:
        run_id, path = (run.run_id, str(run.path.resolve())) if run is not None else (None, None)
        self.send(TrainPlan(run_id, path, None, None, train=False, reason=reason))


class RunInterrupted(Exception):
    """SIGTERM or Ctrl-C: the run is marked failed, never left looking alive."""


def run_pipeline(config: PipelineConfig, run_id: str | None = None) -> RunResult:
    ctx = distributed.from_env()
    if ctx is None:
        return _run(config, run_id)
    return _run_distributed(config, run_id, ctx)


def _run_distributed(config: PipelineConfig, run_id: str | None, ctx: DistContext) -> RunResult:
    ctx = distributed.init(ctx)
    peers = distributed.all_gather_object(ctx, (socket.gethostname(), os.getpid()), "start-up")
    if not ctx.is_lead:
        return _run_worker(ctx)
    channel = PlanChannel(ctx)
    try:
        result = _run(config, run_id, ctx, channel, distributed.describe(ctx, peers))
    finally:
        channel.release("rank 0 stopped before training")  # a no-op once the plan went out
    if result.status == "succeeded":
        distributed.shutdown()
    return result


def _run_worker(ctx: DistContext) -> RunResult:
    """A rank other than 0: wait for the plan, train its share, write nothing."""
    plan: TrainPlan = distributed.broadcast_object(ctx, None, "waiting for rank 0 to prepare the data", setup=True)
    path = Path(plan.run_path or ".")
    if not plan.train:
        logger.info("rank %d: nothing to train (%s)", ctx.rank, plan.reason)
        distributed.shutdown()
        return RunResult(plan.run_id or "", path, "skipped", plan.reason, None, rank=ctx.rank)
    assert plan.config is not None and plan.transformation_artifact is not None and plan.run_id is not None
    try:
        model_trainer.train_worker(plan.config, path, Path(plan.transformation_artifact), ctx)
    except Exception as exc:  # noqa: BLE001 - this rank's share failed: say why and exit non-zero
        reason = str(exc) if isinstance(exc, XrayError) else f"internal error: {type(exc).__name__}: {exc}"
        logger.error("rank %d failed: %s\n%s", ctx.rank, reason, traceback.format_exc())
        return RunResult(plan.run_id, path, "failed", reason, None, rank=ctx.rank)
    distributed.shutdown()
    return RunResult(plan.run_id, path, "trained", None, None, rank=ctx.rank)


def _run(
    config: PipelineConfig,
    run_id: str | None,
    ctx: DistContext | None = None,
    channel: PlanChannel | None = None,
    dist_info: dict[str, Any] | None = None,
) -> RunResult:
    """The run as one process sees it: the single process, or rank 0 of a torchrun job."""
    root = Path(config.artifacts_dir)
    load_signing_key()  # a missing or unreadable key fails now, not when the finished run is sealed
    run = RunDir.create(root, config_to_dict(config), config.data_uri, run_id=run_id)
    if dist_info is not None:
        run.update(environment={**run.manifest.environment, "distributed": dist_info})
    handler = _attach_run_log(run)
    previous_term = signal.signal(signal.SIGTERM, _raise_interrupted) if _in_main_thread() else None
    logger.info("run %s started (data: %s)", run.run_id, config.data_uri)
    reason: str | None = None
    summary: RunSummary | None = None
    try:
        summary = _execute(config, run, ctx, channel)
    except (XrayError, RunInterrupted, KeyboardInterrupt) as exc:
        _shield_from_sigterm(previous_term if ctx is not None else None)
        reason = str(exc) or "interrupted"
        if ctx is not None and isinstance(exc, RunInterrupted):
            reason += " (torchrun stops every rank when one of them fails; see the other ranks' output)"
        logger.error("run %s failed: %s", run.run_id, reason)
    except Exception as exc:  # noqa: BLE001 - an unexpected fault still must not leave a live-looking run
        _shield_from_sigterm(previous_term if ctx is not None else None)
        reason = f"internal error: {type(exc).__name__}: {exc}"
        logger.error("run %s failed: %s\n%s", run.run_id, reason, traceback.format_exc())
    else:
        logger.info("run %s succeeded", run.run_id)
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
    # Sealed after run.log is closed, so nothing is written into the run once it is signed;
    # a SIGTERM arriving during the short seal waits, so no run is left half sealed.
    if previous_term is not None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        if reason is None:
            finish_run(run, "succeeded", summary=to_jsonable(summary))
            return RunResult(run.run_id, run.path, "succeeded", None, summary)
        finish_run(run, "failed", reason=reason)
    finally:
        if previous_term is not None:
            signal.signal(signal.SIGTERM, previous_term)
    if channel is not None:
        channel.release(f"run failed on rank 0: {reason}", run)
    return RunResult(run.run_id, run.path, "failed", reason, None)


def _execute(
    config: PipelineConfig, run: RunDir, ctx: DistContext | None = None, channel: PlanChannel | None = None
) -> RunSummary:
    """The stages in order, each reused from the cache or run, each recorded in the manifest."""
    inputs = Inputs(world_size=ctx.world_size if ctx else 1)
    for stage in STAGES:
        skipped = _skip_reason(stage, config)
        if skipped is not None:
            logger.info("%s: %s; skipping", stage.STAGE, skipped)
            continue
        artifact = _stage(stage, config, run, inputs, ctx, channel)
        if stage is data_ingestion:  # the classes are known: a bad external class map fails now, not after training
            model_evaluation.check_class_maps(config, artifact.class_names)
        inputs = inputs.add(artifact)
    return RunSummary.of(inputs.get(ModelEvaluationArtifact), inputs.artifacts.get(ModelPusherArtifact))


def _skip_reason(stage: Stage, config: PipelineConfig) -> str | None:
    return "push.enabled is false" if stage is model_pusher and not config.push.enabled else None


def _stage(
    stage: Stage, config: PipelineConfig, run: RunDir, inputs: Inputs, dist: DistContext | None, channel: PlanChannel | None
) -> Any:
    """One stage: adopt a finished result with the same fingerprint, or compute it (and offer it to the cache)."""
    fp = stage.fingerprint(config, inputs)
    distributed_here = dist is not None and stage is model_trainer  # the only stage the other ranks share
    run.start_stage(stage.STAGE)
    artifact = _adopt_if_cached(run, stage, fp) if stage.CACHED else None
    if distributed_here:
        assert channel is not None
        channel.announce(run, config, train=artifact is None)
    if artifact is not None:
        return artifact
    ctx = StageContext(config, run, fp, progress=run.set_progress, dist=dist if distributed_here else None)
    try:
        artifact = stage.run(ctx, inputs)
    except RuntimeError as exc:
        if not distributed_here:
            raise
        assert dist is not None
        raise distributed.failure(dist, "training", exc) from exc  # a collective failed: a peer rank died, hung or raised
    run.finish_stage(stage.STAGE, artifact)
    if stage.CACHED:
        cache_store(run.root, stage.STAGE, fp, run.run_id)
    return artifact


def _adopt_if_cached(run: RunDir, stage: Stage, fp: str) -> Any | None:
    hit = cache_lookup(run.root, stage.STAGE, fp)
    if hit is None:
        return None
    source_run, _ = hit
    adopt_cached_stage(run, stage.STAGE, source_run)
    artifact = load_artifact(run.path / stage.STAGE / "artifact.json")
    logger.info("%s: reused from run %s (fingerprint %s), not recomputed", stage.STAGE, source_run, fp[:12])
    run.finish_stage(stage.STAGE, artifact, cached_from=source_run)
    return artifact


def _attach_run_log(run: RunDir) -> logging.Handler:
    handler = logging.FileHandler(run.path / "run.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    root = logging.getLogger()
    root.addHandler(handler)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    return handler


def _shield_from_sigterm(previous: Any) -> None:
    """While a failure is being recorded, a second SIGTERM (torchrun stopping the other ranks) must not cut it short."""
    if previous is not None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _raise_interrupted(signum: int, frame: Any) -> None:
    raise RunInterrupted(f"interrupted by signal {signal.Signals(signum).name}")


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
