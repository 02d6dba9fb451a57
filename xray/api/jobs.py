"""Training jobs: one worker process per run, state in the run manifests, orphans detected.

The app never trains in its own process. ``POST /train`` validates the config,
writes a ``queued`` manifest, starts ``python -m xray.api.worker`` (the
``xray train`` CLI behind a start handshake) in its own session, records the
worker's pid in the manifest and only then lets it start. Everything a reader
sees comes from the manifests, so a restarted app shows the same runs.

A run can only look alive while a process answers for it. A thread per
worker waits for it to exit and marks the run failed if the manifest is still
queued/running then (SIGKILL, a crash during imports, out of memory). Runs the
app did not start itself, or started before a restart, are checked by the
manifest's ``pid`` and ``host``: the pid must exist, not be a zombie, and have
started before the manifest was last written (so a recycled pid is not taken
for the worker).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from xray.api.policy import check_overrides, confine_data_uri, override_key
from xray.api.settings import AppSettings
from xray.api.worker import START
from xray.config import config_to_dict, load_config
from xray.entity.config_entity import PipelineConfig
from xray.errors import ConfigError, RunError
from xray.audit.seal import mark_orphaned
from xray.pipeline.store import MANIFEST, RunDir, RunManifest, list_runs, load_manifest

logger = logging.getLogger(__name__)

ACTIVE = ("queued", "running")
WORKER_LOG = "worker.log"
LOCK_FILE = ".train.lock"
_START_SLACK_S = 2.0  # /proc start times are derived from a boot time with 1 s resolution
_SECRET_ENV = ("XRAY_TRAIN_TOKENS", "XRAY_READ_TOKENS", "XRAY_ADMIN_TOKENS", "XRAY_TOKENS_FILE")


class TrainingConflict(Exception):
    """Another run is queued or running: one training at a time."""

    def __init__(self, active: RunManifest) -> None:
        stage = f", stage {active.current_stage}" if active.current_stage else ""
        super().__init__(f"run {active.run_id} is {active.status}{stage}; one training at a time")
        self.active = active


class WorkerStartError(Exception):
    """The worker process could not be started (the run is recorded as failed)."""


class NotActive(Exception):
    """The run has already finished; nothing to cancel."""


# ---------------------------------------------------------------- process liveness


def _boot_time() -> float | None:
    try:
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith("btime "):
                return float(line.split()[1])
    except OSError:
        pass
    return None


def _proc_state(pid: int) -> tuple[str, float | None] | None:
    """(state letter, start time as epoch seconds) from /proc, or None where /proc cannot tell."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return ("X", None)
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()  # the command name may hold spaces and parentheses
    state = fields[0]
    boot = _boot_time()
    if boot is None:
        return state, None
    start_ticks = int(fields[19])  # field 22 of stat(5); fields[0] is field 3
    return state, boot + start_ticks / os.sysconf("SC_CLK_TCK")


def process_alive(pid: int | None, not_started_after: float | None = None) -> bool:
    """Whether ``pid`` is a live process that could be the one that wrote a file at ``not_started_after``."""
    if pid is None or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    state = _proc_state(pid)
    if state is None:
        return True
    letter, started = state
    if letter in ("Z", "X", "x"):
        return False
    # A process that started after the run's last write has a recycled pid: not the run's worker.
    return started is None or not_started_after is None or started <= not_started_after + _START_SLACK_S


# ---------------------------------------------------------------- the job manager


class JobManager:
    """Starts, watches, cancels and reconciles training workers for one artifacts root."""

    def __init__(self, settings: AppSettings) -> None:
        self.settings = settings
        self.root = settings.artifacts_dir
        self.host = socket.gethostname()
        self._children: dict[str, subprocess.Popen[bytes]] = {}
        self._cancelled: set[str] = set()
        self._lock = threading.Lock()

    # -- validation

    def validate(self, data: str | None, overrides: list[str], admin: bool = False) -> PipelineConfig:
        """The config a run would use, or Forbidden (override or data not allowed for this caller),
        ConfigError (bad override) / DataError (missing data)."""
        check_overrides(overrides, admin)
        for item in overrides:
            if override_key(item) == "artifacts_dir":
                raise ConfigError("artifacts_dir is set by the service (XRAY_ARTIFACTS_DIR), not per run")
        config = load_config(
            self.settings.config_path,
            [*overrides, f"artifacts_dir={json.dumps(str(self.root))}"],
            data_uri=data,
        )
        return dataclasses.replace(config, data_uri=confine_data_uri(config.data_uri, self.settings))

    # -- starting

    def start(self, config: PipelineConfig, overrides: list[str]) -> RunManifest:
        """Queue a run and start its worker; TrainingConflict if one is already queued or running."""
        with self._train_lock():
            active = self.active_run()
            if active is not None:
                raise TrainingConflict(active)
            run = RunDir.queue(self.root, config_to_dict(config), config.data_uri, pid=os.getpid())
            command = self._command(run.run_id, config, overrides)
            try:
                with open(run.path / WORKER_LOG, "ab") as log:
                    process = subprocess.Popen(
                        command,
                        stdin=subprocess.PIPE,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        cwd=self.settings.workdir,
                        env=self._worker_env(),
                        start_new_session=True,  # an app restart (or Ctrl-C in its terminal) leaves training alone
                    )
            except OSError as exc:
                mark_orphaned(self.root, run.run_id, f"could not start the training worker: {exc}")
                raise WorkerStartError(f"could not start the training worker: {exc}") from exc
            try:
                run.update(pid=process.pid)  # before the start line: the worker is answerable from here on
            except OSError as exc:
                process.kill()
                process.wait()
                mark_orphaned(self.root, run.run_id, f"could not record the training worker: {exc}")
                raise WorkerStartError(f"could not record the training worker: {exc}") from exc
            with self._lock:
                self._children[run.run_id] = process
            threading.Thread(
                target=self._watch, args=(run.run_id, process), name=f"watch-{run.run_id}", daemon=True
            ).start()
            try:
                assert process.stdin is not None
                process.stdin.write(f"{START}\n".encode())
                process.stdin.close()
            except OSError:
                logger.warning("worker for run %s exited before it could be started", run.run_id)
            logger.info("run %s queued, worker pid %d", run.run_id, process.pid)
            return run.manifest

    def _command(self, run_id: str, config: PipelineConfig, overrides: list[str]) -> list[str]:
        command = [sys.executable, "-m", "xray.api.worker", "-q", "train", "--run-id", run_id]
        if self.settings.config_path is not None:
            command += ["--config", str(self.settings.config_path)]
        command += ["--data", config.data_uri]
        for item in [*overrides, f"artifacts_dir={json.dumps(str(self.root))}"]:
            command += ["--set", item]
        return command

    def _worker_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in _SECRET_ENV}
        env["BENTOML_DO_NOT_TRACK"] = "true"
        env["PYTHONUNBUFFERED"] = "1"
        return env

    @contextlib.contextmanager
    def _train_lock(self) -> Iterator[None]:
        """Across threads and app processes sharing the root: check-then-start is one step."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / LOCK_FILE, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    # -- watching

    def _watch(self, run_id: str, process: subprocess.Popen[bytes]) -> None:
        code = process.wait()
        try:
            with self._lock:
                cancelled = run_id in self._cancelled
            manifest = load_manifest(self.root, run_id)
            if manifest.status in ACTIVE:
                mark_orphaned(self.root, run_id, self._exit_reason(run_id, process.pid, code, cancelled, manifest))
            else:
                logger.info("run %s worker exited (%s): %s", run_id, code, manifest.status)
        except RunError as exc:
            logger.error("run %s: cannot read its manifest after the worker exited: %s", run_id, exc)
        finally:
            with self._lock:
                self._children.pop(run_id, None)
                self._cancelled.discard(run_id)

    def _exit_reason(self, run_id: str, pid: int, code: int, cancelled: bool, manifest: RunManifest) -> str:
        where = f" during {manifest.current_stage}" if manifest.current_stage else " before the pipeline started"
        if code < 0:
            how = f"was killed by {signal.Signals(-code).name}"
        else:
            how = f"exited with code {code}"
        reason = f"worker process {pid} {how}{where}"
        if cancelled:
            reason = f"cancelled: {reason}"
        last = _last_line(self.root / run_id / WORKER_LOG)
        return f"{reason}: {last}" if last and code > 0 else reason

    # -- reading

    def reconcile(self, manifest: RunManifest) -> RunManifest:
        """A queued/running manifest whose process is gone is marked failed, with why, and returned so."""
        if manifest.status not in ACTIVE:
            return manifest
        with self._lock:
            if manifest.run_id in self._children:
                return manifest  # our own worker: its watcher thread settles it
        foreign = manifest.host != self.host
        if foreign and not self.settings.exclusive_artifacts:
            return manifest  # another machine's process: cannot be checked from here
        path = self.root / manifest.run_id / MANIFEST
        try:
            written = path.stat().st_mtime
        except OSError:
            written = None
        if not foreign and process_alive(manifest.pid, written):
            return manifest
        if foreign:
            reason = f"its worker ran on host {manifest.host}, which no longer uses this artifacts root"
        else:
            stage = f" during {manifest.current_stage}" if manifest.current_stage else ""
            reason = f"worker process {manifest.pid} is gone (killed or crashed){stage}; see run.log"
        try:
            return mark_orphaned(self.root, manifest.run_id, reason)
        except RunError as exc:
            logger.error("run %s: could not mark it failed: %s", manifest.run_id, exc)
            return manifest

    def runs(self) -> list[RunManifest]:
        return [self.reconcile(m) for m in list_runs(self.root)]

    def get(self, run_id: str) -> RunManifest:
        return self.reconcile(load_manifest(self.root, run_id))

    def active_run(self) -> RunManifest | None:
        return next((m for m in self.runs() if m.status in ACTIVE), None)

    def reconcile_all(self) -> None:
        """At startup: nothing stays 'running' from before a crash or a reboot."""
        failed = [m.run_id for m in list_runs(self.root) if m.status in ACTIVE and self.reconcile(m).status == "failed"]
        if failed:
            logger.warning("marked %d orphaned run(s) failed: %s", len(failed), ", ".join(failed))

    # -- cancelling

    def cancel(self, run_id: str) -> RunManifest:
        """SIGTERM the run's worker; the pipeline records 'interrupted by signal SIGTERM'."""
        with self._train_lock():  # never races a start that is still writing the worker's pid
            manifest = self.get(run_id)
            if manifest.status not in ACTIVE:
                raise NotActive(f"run {run_id} has already {manifest.status}")
            if manifest.host != self.host or manifest.pid is None:
                raise NotActive(f"run {run_id} runs on host {manifest.host}; it cannot be signalled from here")
            with self._lock:
                self._cancelled.add(run_id)
            try:
                os.kill(manifest.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            logger.info("run %s: sent SIGTERM to worker %d", run_id, manifest.pid)
            return manifest

    def wait_idle(self, timeout_s: float) -> bool:
        """Test and shutdown helper: True once no worker of ours is left."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                if not self._children:
                    return True
            time.sleep(0.1)
        return False

    def children(self) -> dict[str, int]:
        with self._lock:
            return {run_id: p.pid for run_id, p in self._children.items()}


def _last_line(path: Path, max_bytes: int = 4096) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - max_bytes))
            lines = [ln.strip() for ln in fh.read().decode(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1][:500] if lines else ""


def tail_lines(path: Path, lines: int, block: int = 64 * 1024, max_bytes: int = 16 * 1024 * 1024) -> str:
    """The last ``lines`` lines of a file without reading all of it."""
    with open(path, "rb") as fh:
        fh.seek(0, os.SEEK_END)
        end = fh.tell()
        data = b""
        position = end
        while position > 0 and data.count(b"\n") <= lines and end - position < max_bytes:
            step = min(block, position)
            position -= step
            fh.seek(position)
            data = fh.read(step) + data
    text = data.decode(errors="replace")
    return "\n".join(text.splitlines()[-lines:]) + ("\n" if text else "")
