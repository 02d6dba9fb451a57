"""``xray runs export RUN --mlflow URI``: one xray run as one MLflow run, found again by its ``xray.run_id`` tag.

Exporting twice updates the same MLflow run: params are re-logged with the
same values, only metric steps MLflow does not have yet are logged,
artifacts overwrite themselves, and the model is logged and registered once
per MLflow run. The model is a pyfunc over the very model directory serving
uses (``xray.tracking.pyfunc_model``), so ``mlflow.pyfunc.load_model`` answers
like the Bento.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from xray.config import flatten
from xray.errors import XrayError
from xray.audit.seal import seal_digest_of
from xray.pipeline.store import load_manifest, load_stage_artifact

logger = logging.getLogger(__name__)

RUN_TAG = "xray.run_id"
MODEL_ARTIFACT = "model"
CHAMPION = "champion"
_ALLOW_FILE_STORE = "MLFLOW_ALLOW_FILE_STORE"
_MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value
_EPOCH_METRICS = ("train_loss", "val_loss", "val_accuracy", "val_roc_auc", "learning_rate")
_SPLIT_METRICS = ("accuracy", "roc_auc", "macro_f1", "loss", "ece", "sensitivity", "specificity")


@dataclass(frozen=True)
class ExportResult:
    mlflow_run_id: str
    created: bool  # False: an earlier export of this run was updated
    model_name: str | None
    model_version: str | None
    aliases: tuple[str, ...]


def _millis(iso: str | None) -> int | None:
    return int(datetime.fromisoformat(iso).timestamp() * 1000) if iso else None


def seal_digest(run_path: Path) -> str:
    """The run seal's digest if the run is sealed, else ``unsealed`` (``xray runs verify`` checks it)."""
    return seal_digest_of(run_path) or "unsealed"


@contextmanager
def _tracking(uri: str) -> Iterator[Any]:
    """MLflow's fluent API reads a process-wide URI: set it for the export only, then put it back."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow

    previous_tracking, previous_registry = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    previous_allow = os.environ.get(_ALLOW_FILE_STORE)
    if uri.startswith("file:"):  # MLflow 3 refuses a file store unless asked for one, and the user did
        os.environ[_ALLOW_FILE_STORE] = "true"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield mlflow
    finally:
        mlflow.set_tracking_uri(previous_tracking)
        mlflow.set_registry_uri(previous_registry)
        if previous_allow is None:
            os.environ.pop(_ALLOW_FILE_STORE, None)
        else:
            os.environ[_ALLOW_FILE_STORE] = previous_allow


def _check_uri(uri: str) -> str:
    if uri.startswith(("sqlite:///", "http://", "https://", "file:")):
        return uri
    if "://" in uri:
        raise XrayError(f"--mlflow {uri!r}: use sqlite:///path.db, http(s)://host:port or a folder")
    return Path(uri).resolve().as_uri()  # a file store folder


def _artifact_location(uri: str, experiment: str) -> str | None:
    """A sqlite store keeps artifacts next to its database, not in ``./mlruns`` of whatever folder we run in."""
    if not uri.startswith("sqlite:///"):
        return None  # a server or file store knows its own artifact root
    return (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts" / experiment).as_uri()


def export_run(root: Path, run_id: str, uri: str, experiment: str = "xray") -> ExportResult:
    manifest = load_manifest(root, run_id)
    if manifest.status not in ("succeeded", "failed"):
        raise XrayError(f"run {run_id} is {manifest.status}; export it once it has finished")
    uri = _check_uri(uri)
    with _tracking(uri) as mlflow:
        from mlflow.exceptions import MlflowException

        try:
            return _export(mlflow, root, manifest, experiment)
        except MlflowException as exc:
            raise XrayError(f"MLflow at {uri}: {exc.message.splitlines()[0] if exc.message else exc}") from None


def _export(mlflow: Any, root: Path, manifest: Any, experiment: str) -> ExportResult:
    from mlflow import MlflowClient

    client = MlflowClient()
    run_path = root / manifest.run_id
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else client.create_experiment(
        experiment, artifact_location=_artifact_location(mlflow.get_tracking_uri(), experiment)
    )
    existing = client.search_runs([experiment_id], filter_string=f"tags.`{RUN_TAG}` = '{manifest.run_id}'")
    if len(existing) > 1:
        logger.warning("%d MLflow runs carry %s=%s; updating the oldest", len(existing), RUN_TAG, manifest.run_id)
    if existing:
        mlflow_run_id = sorted(existing, key=lambda r: r.info.start_time)[0].info.run_id
    else:
        mlflow_run_id = client.create_run(
            experiment_id, start_time=_millis(manifest.created_at), run_name=manifest.run_id,
            tags={RUN_TAG: manifest.run_id},
        ).info.run_id

    code = manifest.code
    tags = {
        RUN_TAG: manifest.run_id,
        "xray.status": manifest.status,
        "xray.reason": (manifest.reason or "")[:5000],
        "xray.data_uri": manifest.data_uri,
        "xray.code_hash": code.get("code_hash") or "",
        "xray.git_dirty": str(code.get("git_dirty")),
        "xray.audit.seal": seal_digest(run_path),
        "mlflow.source.git.commit": code.get("git_commit") or "",
    }
    for key, value in tags.items():
        client.set_tag(mlflow_run_id, key, value)
    for key, value in flatten(manifest.config).items():
        text = value if isinstance(value, str) else json.dumps(value)
        client.log_param(mlflow_run_id, key, text[:_MAX_PARAM_CHARS])

    timestamp = _millis(manifest.finished_at or manifest.created_at)
    _log_metrics(client, mlflow_run_id, _run_metrics(root, manifest), timestamp)
    ingestion = load_stage_artifact(root, manifest, "data_ingestion")
    model_name, version, aliases = None, None, ()
    with mlflow.start_run(run_id=mlflow_run_id):
        if ingestion is not None:
            _log_dataset(mlflow, ingestion)
        client.log_artifacts(mlflow_run_id, str(run_path))
        if manifest.status == "succeeded":
            model_name, version, aliases = _log_model(mlflow, client, root, manifest, mlflow_run_id)
    status = "FINISHED" if manifest.status == "succeeded" else "FAILED"
    client.set_terminated(mlflow_run_id, status=status, end_time=_millis(manifest.finished_at))
    logger.info("exported run %s as MLflow run %s", manifest.run_id, mlflow_run_id)
    return ExportResult(mlflow_run_id, not existing, model_name, version, aliases)


def _run_metrics(root: Path, manifest: Any) -> dict[str, list[tuple[int, float]]]:
    """metric key -> [(step, value)]: per-epoch history per candidate, then val/test metrics at step 0."""
    series: dict[str, list[tuple[int, float]]] = {}
    trainer = load_stage_artifact(root, manifest, "model_trainer")
    for candidate in trainer.candidates if trainer else ():
        for record in candidate.history:
            for name in _EPOCH_METRICS:
                series.setdefault(f"{candidate.name}/{name}", []).append((record.epoch, float(getattr(record, name))))
    evaluation = load_stage_artifact(root, manifest, "model_evaluation")
    for candidate in evaluation.candidates if evaluation else ():
        for split in ("validation", "test"):
            scores = getattr(candidate, split)
            for name in _SPLIT_METRICS:
                value = getattr(scores, name)
                if value is not None:
                    series[f"{candidate.name}/{split}/{name}"] = [(0, float(value))]
    return series


def _log_metrics(client: Any, mlflow_run_id: str, series: dict[str, list[tuple[int, float]]], timestamp: int) -> None:
    """Log only the (key, step) pairs MLflow lacks, so a second export adds nothing twice."""
    from mlflow.entities import Metric

    batch = []
    for key, points in series.items():
        have = {m.step for m in client.get_metric_history(mlflow_run_id, key)}
        batch.extend(Metric(key, value, timestamp, step) for step, value in points if step not in have)
    for start in range(0, len(batch), 1000):  # MLflow's batch limit
        client.log_batch(mlflow_run_id, metrics=batch[start:start + 1000])


def _log_dataset(mlflow: Any, ingestion: Any) -> None:
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    try:
        with warnings.catch_warnings():  # "can be interpreted in multiple ways": it picks a local path, as meant
            warnings.simplefilter("ignore", UserWarning)
            source = resolve_dataset_source(ingestion.source_uri)
    except Exception:  # noqa: BLE001 - "demo" and the like name no location MLflow knows
        source = CodeDatasetSource(tags={"xray.data_uri": ingestion.source_uri})
    name = Path(ingestion.source_uri.rstrip("/")).name or ingestion.source_uri
    dataset = MetaDataset(source=source, name=name, digest=ingestion.data_fingerprint[:36])
    tags = {"fingerprint": ingestion.data_fingerprint, "images": str(ingestion.num_images),
            "classes": ",".join(ingestion.class_names)}
    mlflow.log_input(dataset, context="training", tags=tags)


def _log_model(
    mlflow: Any, client: Any, root: Path, manifest: Any, mlflow_run_id: str
) -> tuple[str, str, tuple[str, ...]]:
    """Log and register the chosen model once per MLflow run; alias ``champion`` when the run pushed it."""
    pusher = load_stage_artifact(root, manifest, "model_pusher")
    model_name = manifest.config.get("push", {}).get("model_name") or "xray-classifier"
    versions = client.search_model_versions(f"name='{model_name}' and run_id='{mlflow_run_id}'")
    if versions:
        version = str(max(int(v.version) for v in versions))
    else:
        with tempfile.TemporaryDirectory(prefix="xray-mlflow-") as tmp:
            model_dir = _model_dir(root, manifest, pusher, Path(tmp))
            version = _log_pyfunc(mlflow, model_dir, model_name)
    aliases: tuple[str, ...] = ()
    if pusher is not None and pusher.pushed:
        client.set_registered_model_alias(model_name, CHAMPION, version)
        aliases = (CHAMPION,)
    return model_name, version, aliases


def _model_dir(root: Path, manifest: Any, pusher: Any, scratch: Path) -> Path:
    """The pushed model's own directory in the BentoML store when it is there, else one built from the run."""
    if pusher is not None and pusher.model_tag:
        import bentoml
        from bentoml.exceptions import NotFound

        try:
            return Path(bentoml.models.get(pusher.model_tag).path)
        except NotFound:
            logger.info("pushed model %s is not in this BentoML store; exporting the run's checkpoint", pusher.model_tag)
    from xray.components.model_pusher import model_spec
    from xray.serving.serving_model import write_model_dir

    ingestion = load_stage_artifact(root, manifest, "data_ingestion")
    transformation = load_stage_artifact(root, manifest, "data_transformation")
    evaluation = load_stage_artifact(root, manifest, "model_evaluation")
    checkpoint = root / manifest.run_id / evaluation.best_checkpoint
    stats = root / manifest.run_id / evaluation.ood.file if evaluation.ood else None
    write_model_dir(scratch, model_spec(manifest.run_id, ingestion, transformation, evaluation, checkpoint), checkpoint, None, stats)
    return scratch


def _example_image(model_dir: Path) -> bytes:
    """A PNG of the model's input size: the signature's and the input example's image."""
    import numpy as np
    from PIL import Image

    from xray.serving.serving_model import read_spec

    size = read_spec(model_dir).preprocessing.image_size
    ramp = np.linspace(0, 255, size * size).reshape(size, size).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(ramp, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def _log_pyfunc(mlflow: Any, model_dir: Path, model_name: str) -> str:
    import pandas as pd
    from mlflow.models import infer_signature

    from xray.tracking.pyfunc_model import IMAGE_COLUMN, XrayPyfunc, output_columns
    from xray.serving.serving_model import read_spec

    spec = read_spec(model_dir)
    example = pd.DataFrame({IMAGE_COLUMN: [_example_image(model_dir)]})
    values = [spec.class_names[0], False, "[]", "[]", 0.5, 1.0] + [0.5] * len(spec.class_names)
    output = pd.DataFrame([values], columns=output_columns(spec.class_names))
    package = Path(__file__).resolve().parents[1]
    requirements = [f"{name}=={metadata.version(name)}" for name in ("torch", "torchvision", "numpy", "pillow", "pandas")]
    info = mlflow.pyfunc.log_model(
        name=MODEL_ARTIFACT,
        python_model=XrayPyfunc(),
        artifacts={"model_dir": str(model_dir)},
        code_paths=[str(package)],
        signature=infer_signature(example, output),
        input_example=example,
        pip_requirements=requirements,
        registered_model_name=model_name,
        metadata={"xray_run_id": spec.run_id, "weights_sha256": spec.weights_sha256},
    )
    return str(info.registered_model_version)
