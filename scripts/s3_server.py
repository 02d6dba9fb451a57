#!/usr/bin/env python3
"""Run a local SeaweedFS S3 server for `make demo` and development.

    python scripts/s3_server.py start [--dir .demo/s3] [--port 8333] [--bucket xray-data]
    python scripts/s3_server.py status|stop [--dir .demo/s3] [--port 8333]

Why: the S3 data source needs a real S3 endpoint to demo and develop against without
cloud accounts. The server is started in its own session so it outlives this script;
its pid is kept in DIR/weed.pid and its log in DIR/weed.log. Credentials default to
xray-demo / xray-demo-secret; override with XRAY_S3_ACCESS_KEY / XRAY_S3_SECRET_KEY.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from xray.errors import XrayError  # noqa: E402
from scripts import seaweedfs  # noqa: E402

logger = logging.getLogger("s3_server")

PID_NAME = "weed.pid"
DEFAULT_ACCESS_KEY = "xray-demo"
DEFAULT_SECRET_KEY = "xray-demo-secret"


def _credentials() -> tuple[str, str]:
    return (
        os.environ.get("XRAY_S3_ACCESS_KEY", DEFAULT_ACCESS_KEY),
        os.environ.get("XRAY_S3_SECRET_KEY", DEFAULT_SECRET_KEY),
    )


def _read_pid(pid_file: Path) -> int | None:
    try:
        return int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return None


def _is_weed(pid: int) -> bool:
    """Guard against a recycled pid: only signal a live process that is `weed`."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return bool(cmdline) and Path(cmdline[0].decode(errors="replace")).name == "weed"


def _exports(endpoint_url: str) -> str:
    access_key, secret_key = _credentials()
    return (
        f"export AWS_ENDPOINT_URL={endpoint_url} "
        f"AWS_ACCESS_KEY_ID={access_key} AWS_SECRET_ACCESS_KEY={secret_key}"
    )


def cmd_start(data_dir: Path, port: int, buckets: tuple[str, ...]) -> int:
    pid_file = data_dir / PID_NAME
    pid = _read_pid(pid_file)
    endpoint_url = f"http://{seaweedfs.LOOPBACK}:{port}"
    if pid is not None and _is_weed(pid):
        print(f"S3 server already running (pid {pid}) at {endpoint_url}")
        print(_exports(endpoint_url))
        return 0
    access_key, secret_key = _credentials()
    server = seaweedfs.start(
        data_dir, port=port, access_key=access_key, secret_key=secret_key, buckets=buckets, detach=True
    )
    pid_file.write_text(f"{server.pid}\n")
    print(f"S3 server started (pid {server.pid}) at {server.endpoint_url}; log {server.log_path}")
    print(_exports(server.endpoint_url))
    return 0


def cmd_stop(data_dir: Path, port: int) -> int:
    pid_file = data_dir / PID_NAME
    pid = _read_pid(pid_file)
    if pid is None or not _is_weed(pid):
        print(f"no S3 server running for {data_dir}")
        pid_file.unlink(missing_ok=True)
        return 0
    ports = seaweedfs.ports_of(pid) or (port,)
    seaweedfs.terminate_process_group(pid, timeout_s=15.0)
    seaweedfs.remove_stale_sockets(ports + tuple(p + seaweedfs.GRPC_PORT_OFFSET for p in ports))
    pid_file.unlink(missing_ok=True)
    print(f"S3 server stopped (pid {pid})")
    return 0


def cmd_status(data_dir: Path, port: int) -> int:
    pid = _read_pid(data_dir / PID_NAME)
    endpoint_url = f"http://{seaweedfs.LOOPBACK}:{port}"
    if pid is None or not _is_weed(pid):
        print(f"S3 server not running (dir {data_dir})")
        return 1
    access_key, secret_key = _credentials()
    problem = seaweedfs.s3_problem(endpoint_url, access_key, secret_key)
    if problem is not None:
        print(f"S3 server pid {pid} is running but {endpoint_url} does not answer: {problem}")
        return 1
    print(f"S3 server running (pid {pid}) at {endpoint_url}")
    print(_exports(endpoint_url))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("start", "stop", "status"))
    parser.add_argument("--dir", type=Path, default=Path(".demo/s3"), help="data, log and pid dir")
    parser.add_argument("--port", type=int, default=8333, help="S3 port (port+10000 must be free too)")
    parser.add_argument(
        "--bucket", action="append", default=None, help="bucket to create on start (repeatable; default xray-data)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    data_dir = args.dir.resolve()
    try:
        if args.action == "start":
            return cmd_start(data_dir, args.port, tuple(args.bucket or ["xray-data"]))
        if args.action == "stop":
            return cmd_stop(data_dir, args.port)
        return cmd_status(data_dir, args.port)
    except XrayError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
