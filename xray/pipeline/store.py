"""Runs on disk: one immutable directory per run, artifacts as JSON, a stage cache.

Layout under the artifacts root::

    <run_id>/manifest.json            status, config, code and package versions, stages
    <run_id>/run.log                  the run's full log (tracebacks of failures go here)
    <run_id>/<stage>/artifact.json    the stage's typed artifact
    <run_id>/<stage>/...              the files it names, each with a sha256
    .cache/<stage>/<fingerprint>.json where a finished stage with that fingerprint lives

Nothing under a finished run is written again: files are made read-only when
the run ends, and a cached stage is hard-linked (or copied) into the new run
instead of being recomputed or referenced across runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import platform
import secrets
import shutil
import socket
import stat
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, TypeVar

from xray.codegraph import PACKAGE_DIR, module_closure, module_file
from xray.entity.artifact_entity import ARTIFACT_TYPES, ArtifactHeader, FileRecord
from xray.errors import RunError
from xray.pipeline.run_ids import RUN_ID_RE, check_run_id  # noqa: F401 - check_run_id: part of the store's interface
from xray.typed import SchemaError, from_mapping, to_jsonable

logger = logging.getLogger(__name__)

T = TypeVar("T")
MANIFEST = "manifest.json"
ARTIFACT_JSON = "artifact.json"
STAGES = ("data_ingestion", "data_transformation", "model_trainer", "model_evaluation", "model_pusher")
_TRACKED_PACKAGES = ("torch", "torchvision", "numpy", "scikit-learn", "pillow", "grad-cam", "bentoml", "boto3")


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def new_run_id() -> str:
    """Sortable by creation time, unique without coordination."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")[:-4] + "-" + secrets.token_hex(3)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_json(value: Any) -> str:
    return hashlib.sha256(json.dumps(to_jsonable(value), sort_keys=True).encode()).hexdigest()


def write_json_atomic(path: Path, value: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(to_jsonable(value), indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise RunError(f"missing file: {path}") from None
    except json.JSONDecodeError as exc:
        raise RunError(f"{path} is not valid JSON: {exc}") from None


def code_hash(modules: Iterable[str] | None = None, package_dir: Path = PACKAGE_DIR) -> str:
    """Hash of the package's source (or of the named ``xray`` modules only): changed code is recomputed."""
    if modules is None:
        paths = sorted(package_dir.rglob("*.py"))
    else:
        paths = sorted({_source_of(name, package_dir) for name in modules})
    digest = hashlib.sha256()
    for path in paths:
        digest.update(str(path.relative_to(package_dir)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def stage_code_hash(stage_module: str, package_dir: Path = PACKAGE_DIR) -> str:
    """The code a stage runs, for its fingerprint: its module and the ``xray`` modules it imports, transitively.

    Editing what the stage does not import (the app, its pages, serving) keeps the stage's cache.
    """
    return code_hash(module_closure(stage_module, package_dir), package_dir)


def _source_of(module: str, package_dir: Path) -> Path:
    path = module_file(module, package_dir)
    if path is None:
        raise ValueError(f"{module} is not a module under {package_dir}")
    return path


def code_version() -> dict[str, Any]:
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(
                ["git", *args], cwd=PACKAGE_DIR, capture_output=True, text=True, timeout=10, check=True
            )
            return out.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"git_commit": commit, "git_dirty": bool(status) if commit else None, "code_hash": code_hash()}


def environment() -> dict[str, Any]:
    packages = {}
    for name in _TRACKED_PACKAGES:
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            packages[name] = None
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
        "host": socket.gethostname(),
        "cpu_count": os.cpu_count(),
        "packages": packages,
    }


def fingerprint(stage: str, params: Any, upstream: Iterable[str], code: str) -> str:
    return sha256_json({"stage": stage, "params": params, "upstream": list(upstream), "code": code})


@dataclass(frozen=True)
class StageRecord:
    status: str  # running | succeeded | failed | skipped
    started_at: str
    finished_at: str | None = None
    seconds: float | None = None
    artifact_id: str | None = None
    artifact: str | None = None  # run-relative path of artifact.json
    artifact_sha256: str | None = None
    cached_from: str | None = None  # run id the result was reused from


@dataclass(frozen=True)
class RunManifest:
    run_id: str
    status: str  # queued | running | succeeded | failed
    created_at: str
    data_uri: str
    config: dict[str, Any]
    code: dict[str, Any]
    environment: dict[str, Any]
    reason: str | None = None
    finished_at: str | None = None
    current_stage: str | None = None
    progress: dict[str, Any] = field(default_factory=dict)
    stages: dict[str, StageRecord] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    pid: int | None = None
    host: str | None = None


class RunDir:
    """Write access to one run while it is in progress."""

    def __init__(self, root: Path, manifest: RunManifest):
        self.root = root
        self.path = root / manifest.run_id
        self.manifest = manifest

    @property
    def run_id(self) -> str:
        return self.manifest.run_id

    @classmethod
    def create(cls, root: Path, config: dict[str, Any], data_uri: str, run_id: str | None = None) -> RunDir:
        """Start a run; a run id already ``queued`` (by the app) is taken over, any other is refused."""
        return cls._new(root, config, data_uri, run_id, status="running", pid=os.getpid(), adopt_queued=True)

    @classmethod
    def queue(
        cls, root: Path, config: dict[str, Any], data_uri: str, run_id: str | None = None, pid: int | None = None
    ) -> RunDir:
        """A run that is accepted but not started yet (status ``queued``): ``create`` with its id adopts it.

        ``pid`` names the process answerable for it until the worker takes over, so a
        reader can tell a queued run whose owner died from one that is about to start.
        """
        return cls._new(root, config, data_uri, run_id, status="queued", pid=os.getpid() if pid is None else pid)

    @classmethod
    def _new(
        cls, root: Path, config: dict[str, Any], data_uri: str, run_id: str | None, status: str, pid: int,
        adopt_queued: bool = False,
    ) -> RunDir:
        root.mkdir(parents=True, exist_ok=True)
        run_id = run_id or new_run_id()
        path = root / run_id
        try:
            path.mkdir()
        except FileExistsError:
            if not (adopt_queued and _is_queued(root, run_id)):
                raise RunError(f"run {run_id} already exists; runs are never overwritten") from None
        manifest = RunManifest(
            run_id=run_id,
            status=status,
            created_at=utc_now(),
            data_uri=data_uri,
            config=config,
            code=code_version(),
            environment=environment(),
            pid=pid,
            host=socket.gethostname(),
        )
        run = cls(root, manifest)
        run.save()
        return run

    def save(self) -> None:
        write_json_atomic(self.path / MANIFEST, self.manifest)

    def update(self, **changes: Any) -> None:
        self.manifest = dataclasses.replace(self.manifest, **changes)
        self.save()

    def stage_dir(self, stage: str) -> Path:
        path = self.path / stage
        path.mkdir(exist_ok=True)
        return path

    def relative(self, path: Path) -> str:
        return path.resolve().relative_to(self.path.resolve()).as_posix()

    def file_records(self, paths: Iterable[Path]) -> tuple[FileRecord, ...]:
        return tuple(
            FileRecord(path=self.relative(p), sha256=sha256_file(p), size=p.stat().st_size)
            for p in sorted(set(paths))
        )

    def set_progress(self, **progress: Any) -> None:
        self.update(progress=progress)

    def start_stage(self, stage: str) -> None:
        stages = dict(self.manifest.stages)
        stages[stage] = StageRecord(status="running", started_at=utc_now())
        self.update(stages=stages, current_stage=stage, progress={})

    def finish_stage(self, stage: str, artifact: Any, cached_from: str | None = None) -> None:
        """Save the artifact and mark the stage done; the artifact's hash goes into the manifest."""
        path = self.stage_dir(stage) / ARTIFACT_JSON
        if not path.exists():
            write_json_atomic(path, {"artifact_type": type(artifact).__name__, **to_jsonable(artifact)})
        started = self.manifest.stages[stage].started_at
        seconds = (datetime.fromisoformat(utc_now()) - datetime.fromisoformat(started)).total_seconds()
        stages = dict(self.manifest.stages)
        stages[stage] = StageRecord(
            status="succeeded",
            started_at=started,
            finished_at=utc_now(),
            seconds=round(seconds, 3),
            artifact_id=artifact.header.artifact_id,
            artifact=self.relative(path),
            artifact_sha256=sha256_file(path),
            cached_from=cached_from,
        )
        self.update(stages=stages, current_stage=None, progress={})

    def close(self, status: str, reason: str | None = None, summary: dict[str, Any] | None = None) -> None:
        """Record the end of the run and make it read-only. Sealing it is the audit layer's:
        end a run through ``xray.audit.seal.finish_run``, which closes it here and then seals it."""
        stages = {
            name: dataclasses.replace(rec, status="failed", finished_at=utc_now())
            if rec.status == "running"
            else rec
            for name, rec in self.manifest.stages.items()
        }
        self.update(
            status=status,
            reason=reason,
            finished_at=utc_now(),
            current_stage=None,
            progress={},
            stages=stages,
            summary=summary or self.manifest.summary,
        )
        make_read_only(self.path)


def _is_queued(root: Path, run_id: str) -> bool:
    try:
        return load_manifest(root, run_id).status == "queued"
    except RunError:
        return False


def make_read_only(path: Path) -> None:
    for item in path.rglob("*"):
        if item.is_file() and not item.is_symlink():
            item.chmod(item.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


# ---------------------------------------------------------------- reading runs


def load_artifact(path: Path) -> Any:
    raw = read_json(path)
    type_name = raw.pop("artifact_type", None)
    cls = ARTIFACT_TYPES.get(type_name or "")
    if cls is None:
        raise RunError(f"{path}: unknown artifact type {type_name!r}")
    try:
        return from_mapping(cls, raw)
    except SchemaError as exc:
        raise RunError(f"{path}: {exc}") from None


def load_manifest(root: Path, run_id: str) -> RunManifest:
    """The run's manifest, or RunError whose message names no server path (it may reach an HTTP client)."""
    check_run_id(run_id)
    path = root / run_id / MANIFEST
    if not path.is_file():
        raise RunError(f"no run {run_id!r}")
    try:
        return from_mapping(RunManifest, json.loads(path.read_bytes()))
    except (SchemaError, ValueError, TypeError, AttributeError) as exc:  # not JSON, not UTF-8, not a mapping
        raise RunError(f"run {run_id}: damaged {MANIFEST}: {exc}") from None
    except OSError as exc:
        raise RunError(f"run {run_id}: cannot read {MANIFEST}: {exc.strerror}") from None


def run_ids(root: Path) -> list[str]:
    """Every directory under ``root`` that holds a manifest, damaged or not, oldest first."""
    if not root.is_dir():
        return []
    return [
        p.name
        for p in sorted(root.iterdir())
        if p.is_dir() and not p.name.startswith(".") and RUN_ID_RE.fullmatch(p.name) and (p / MANIFEST).is_file()
    ]


def list_runs(root: Path) -> list[RunManifest]:
    runs = []
    for run_id in run_ids(root):
        try:
            runs.append(load_manifest(root, run_id))
        except RunError as exc:
            logger.warning("skipping damaged run %s: %s", run_id, exc)
    return runs


def load_stage_artifact(root: Path, manifest: RunManifest, stage: str) -> Any | None:
    record = manifest.stages.get(stage)
    if record is None or record.artifact is None:
        return None
    return load_artifact(root / manifest.run_id / record.artifact)


def recorded_hash_problems(root: Path, run_id: str) -> list[str]:
    """Files that differ from the sha256 the run's own manifest and artifacts record.

    Checked when the run is sealed, so a change made while it ran is named in the
    seal. Paths that leave the run or pass through a symlink are reported, never followed.
    """
    manifest = load_manifest(root, run_id)
    run_path = root / run_id
    problems: list[str] = []
    for stage, record in manifest.stages.items():
        if record.artifact is None:
            continue
        artifact_path = _confined(run_path, record.artifact, problems)
        if artifact_path is None:
            continue
        if not artifact_path.is_file():
            problems.append(f"missing: {record.artifact}")
            continue
        if record.artifact_sha256 and sha256_file(artifact_path) != record.artifact_sha256:
            problems.append(f"modified: {record.artifact} (sha256 differs from the manifest)")
        try:
            artifact = load_artifact(artifact_path)
        except RunError as exc:
            problems.append(f"unreadable: {record.artifact}: {exc}")
            continue
        for item in artifact.header.files:
            path = _confined(run_path, item.path, problems)
            if path is None:
                continue
            if not path.is_file():
                problems.append(f"missing: {item.path}")
            elif path.stat().st_size != item.size or sha256_file(path) != item.sha256:
                problems.append(f"modified: {item.path} (sha256 differs from {stage} artifact)")
    return problems


def _confined(run_path: Path, relative: str, problems: list[str]) -> Path | None:
    """``run_path / relative`` when it stays inside the run through no symlink; else a named problem."""
    parts = PurePosixPath(relative).parts
    if not relative or PurePosixPath(relative).is_absolute() or ".." in parts or "\x00" in relative:
        problems.append(f"path leaves the run: {relative!r}; not followed")
        return None
    path = run_path
    for part in parts:
        path = path / part
        if path.is_symlink():
            problems.append(f"symlink: {relative}; not followed")
            return None
    return path


# ---------------------------------------------------------------- stage cache


def cache_lookup(root: Path, stage: str, fp: str) -> tuple[str, Path] | None:
    """A finished, intact stage result with this fingerprint: (run id, artifact.json path)."""
    index = root / ".cache" / stage / f"{fp}.json"
    if not index.is_file():
        return None
    try:
        entry = json.loads(index.read_text())
        source_run = entry["run_id"]
        artifact_path = root / source_run / stage / ARTIFACT_JSON
        artifact = load_artifact(artifact_path)
    except (OSError, KeyError, ValueError, RunError) as exc:
        logger.info("cache entry for %s %s is unusable (%s); recomputing", stage, fp[:12], exc)
        return None
    for item in artifact.header.files:
        path = root / source_run / item.path
        if not path.is_file() or path.stat().st_size != item.size or sha256_file(path) != item.sha256:
            logger.warning("cached %s from run %s fails its hash check; recomputing", stage, source_run)
            return None
    return source_run, artifact_path


def cache_store(root: Path, stage: str, fp: str, run_id: str) -> None:
    index_dir = root / ".cache" / stage
    index_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(index_dir / f"{fp}.json", {"run_id": run_id, "stored_at": utc_now()})


def adopt_cached_stage(run: RunDir, stage: str, source_run: str) -> None:
    """Bring a cached stage's files into this run: hard links where possible, copies otherwise."""
    source = run.root / source_run / stage
    target = run.path / stage
    for item in source.rglob("*"):
        dest = target / item.relative_to(source)
        if item.is_dir():
            dest.mkdir(parents=True, exist_ok=True)
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(item, dest)
        except OSError:
            shutil.copy2(item, dest)


def load_typed(cls: type[T], path: Path) -> T:
    artifact = load_artifact(path)
    if not isinstance(artifact, cls):
        raise RunError(f"{path} holds a {type(artifact).__name__}, expected {cls.__name__}")
    return artifact


def new_header(
    run: RunDir,
    artifact_type: type,
    stage: str,
    fp: str,
    parents: Iterable[str] = (),
    files: Iterable[Path] = (),
) -> ArtifactHeader:
    return ArtifactHeader(
        artifact_type=artifact_type.__name__,
        artifact_id=f"{stage}-{secrets.token_hex(6)}",
        producer=stage,
        run_id=run.run_id,
        created_at=utc_now(),
        fingerprint=fp,
        parents=tuple(parents),
        files=run.file_records(files),
    )
