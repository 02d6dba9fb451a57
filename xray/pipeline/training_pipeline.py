"""The training pipeline: ingestion -> transformation -> trainer -> evaluation -> pusher.

Each stage takes the config and its upstream artifacts and returns a typed
artifact. A stage whose fingerprint (its config section, upstream
fingerprints and the code) matches a finished result is reused from the
cache instead of recomputed, so a run after a failure resumes cheaply.
"""

from __future__ import annotations

import logging
import signal
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from xray.components import data_ingestion, data_transformation, model_evaluation, model_trainer
from xray.config import config_to_dict
from xray.entity.artifact_entity import (
    DataIngestionArtifact,
    DataTransformationArtifact,
    ModelEvaluationArtifact,
    ModelPusherArtifact,
    ModelTrainerArtifact,
)
from xray.entity.config_entity import PipelineConfig
from xray.errors import XrayError
from xray.store import (
    RunDir,
    adopt_cached_stage,
    cache_lookup,
    cache_store,
    code_hash,
    load_typed,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunResult:
    run_id: str
    run_path: Path
    status: str
    reason: str | None
    summary: dict[str, Any]


class RunInterrupted(Exception):
    """SIGTERM or Ctrl-C: the run is marked failed, never left looking alive."""


def run_pipeline(config: PipelineConfig, run_id: str | None = None) -> RunResult:
    root = Path(config.artifacts_dir)
    run = RunDir.create(root, config_to_dict(config), config.data_uri, run_id=run_id)
    handler = _attach_run_log(run)
    previous_term = signal.signal(signal.SIGTERM, _raise_interrupted) if _in_main_thread() else None
    logger.info("run %s started (data: %s)", run.run_id, config.data_uri)
    try:
        summary = _execute(config, run)
    except (XrayError, RunInterrupted, KeyboardInterrupt) as exc:
        reason = str(exc) or "interrupted"
        logger.error("run %s failed: %s", run.run_id, reason)
        run.finish("failed", reason=reason)
        return RunResult(run.run_id, run.path, "failed", reason, {})
    except Exception as exc:  # noqa: BLE001 - an unexpected fault still must not leave a live-looking run
        reason = f"internal error: {type(exc).__name__}: {exc}"
        logger.error("run %s failed: %s\n%s", run.run_id, reason, traceback.format_exc())
        run.finish("failed", reason=reason)
        return RunResult(run.run_id, run.path, "failed", reason, {})
    finally:
        if previous_term is not None:
            signal.signal(signal.SIGTERM, previous_term)
        logging.getLogger().removeHandler(handler)
        handler.close()
    run.finish("succeeded", summary=summary)
    logger.info("run %s succeeded", run.run_id)
    return RunResult(run.run_id, run.path, "succeeded", None, summary)


def _execute(config: PipelineConfig, run: RunDir) -> dict[str, Any]:
    code = code_hash()

    def progress(**fields: Any) -> None:
        run.set_progress(**fields)

    run.start_stage(data_ingestion.STAGE)
    ingestion = data_ingestion.run(config, run, code)
    run.finish_stage(data_ingestion.STAGE, ingestion)

    transformation = _cached_or_run(
        run, data_transformation.STAGE, DataTransformationArtifact,
        data_transformation.stage_fingerprint(config, ingestion, code),
        lambda: data_transformation.run(config, run, ingestion, code),
    )
    trainer = _cached_or_run(
        run, model_trainer.STAGE, ModelTrainerArtifact,
        model_trainer.stage_fingerprint(config, transformation, code),
        lambda: model_trainer.run(config, run, transformation, code, progress=progress),
    )
    evaluation = _cached_or_run(
        run, model_evaluation.STAGE, ModelEvaluationArtifact,
        model_evaluation.stage_fingerprint(config, transformation, trainer, code),
        lambda: model_evaluation.run(config, run, transformation, trainer, code),
    )
    pusher = _push(config, run, ingestion, transformation, evaluation)
    return summarize(evaluation, pusher)


def _cached_or_run(run: RunDir, stage: str, cls: type, fp: str, compute: Callable[[], Any]) -> Any:
    run.start_stage(stage)
    hit = cache_lookup(run.root, stage, fp)
    if hit is not None:
        source_run, _ = hit
        adopt_cached_stage(run, stage, source_run)
        artifact = load_typed(cls, run.path / stage / "artifact.json")
        logger.info("%s: reused from run %s (fingerprint %s), not recomputed", stage, source_run, fp[:12])
        run.finish_stage(stage, artifact, cached_from=source_run)
        return artifact
    artifact = compute()
    run.finish_stage(stage, artifact)
    cache_store(run.root, stage, fp, run.run_id)
    return artifact


def _push(
    config: PipelineConfig,
    run: RunDir,
    ingestion: DataIngestionArtifact,
    transformation: DataTransformationArtifact,
    evaluation: ModelEvaluationArtifact,
) -> ModelPusherArtifact | None:
    if not config.push.enabled:
        logger.info("model_pusher: push.enabled is false; skipping")
        return None
    from xray.components import model_pusher

    run.start_stage(model_pusher.STAGE)
    artifact = model_pusher.run(config, run, ingestion, transformation, evaluation)
    run.finish_stage(model_pusher.STAGE, artifact)
    return artifact


def summarize(evaluation: ModelEvaluationArtifact, pusher: ModelPusherArtifact | None) -> dict[str, Any]:
    return {
        "best_candidate": evaluation.best_candidate,
        "selection_metric": evaluation.selection_metric,
        "candidates": {
            c.name: {
                "validation": {"accuracy": c.validation.accuracy, "roc_auc": c.validation.roc_auc},
                "test": {"accuracy": c.test.accuracy, "roc_auc": c.test.roc_auc},
            }
            for c in evaluation.candidates
        },
        "pushed": None if pusher is None else pusher.pushed,
        "model_tag": None if pusher is None else pusher.model_tag,
        "push_reasons": [] if pusher is None else list(pusher.reasons),
    }


def _attach_run_log(run: RunDir) -> logging.Handler:
    handler = logging.FileHandler(run.path / "run.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    root = logging.getLogger()
    root.addHandler(handler)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    return handler


def _raise_interrupted(signum: int, frame: Any) -> None:
    raise RunInterrupted(f"interrupted by signal {signal.Signals(signum).name}")


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
