"""Data-parallel training under torchrun: who this process is, its process groups, and the few collectives the trainer uses.

``from_env`` returns None unless torchrun (or an equivalent launcher) started
more than one process; every caller treats None as "not distributed", so a
single-process run never touches ``torch.distributed`` at all.

Three process groups, created identically on every rank right after start-up:

* the default group (``nccl`` on CUDA, ``gloo`` on CPU) carries DDP's gradient
  all-reduce and the buffer broadcasts, with the collective timeout;
* ``control`` (``gloo``, same timeout) carries small Python objects: epoch
  metrics, validation logits, the stop decision. Objects never touch the GPU;
* ``setup`` (``gloo``, a long timeout) carries rank 0's plan to the other ranks,
  which wait there while rank 0 ingests and transforms the data. That can take
  far longer than any training collective, so it gets its own timeout.

A rank that dies closes its sockets, so its peers' next collective fails at
once instead of waiting for the timeout; the timeout is the backstop for a rank
that hangs without dying.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import torch
from torch import nn

from xray.entity.dist_entity import DistContext
from xray.errors import XrayError

logger = logging.getLogger(__name__)

TIMEOUT_ENV = "XRAY_DIST_TIMEOUT_S"  # training collectives (default 900 s)
SETUP_TIMEOUT_ENV = "XRAY_DIST_SETUP_TIMEOUT_S"  # waiting for rank 0's data preparation (default 6 h)
DEFAULT_TIMEOUT_S = 900.0
DEFAULT_SETUP_TIMEOUT_S = 6 * 3600.0


class DistributedFailure(XrayError):
    """A rank died, hung past the timeout or could not do its share: the whole run fails."""


def from_env(environ: dict[str, str] | None = None) -> DistContext | None:
    """The context torchrun describes in the environment, or None for a single process."""
    env = os.environ if environ is None else environ
    world_size = int(env.get("WORLD_SIZE", "1") or 1)
    if world_size <= 1:
        return None
    try:
        rank = int(env["RANK"])
        local_rank = int(env.get("LOCAL_RANK", "0"))
        local_world_size = int(env.get("LOCAL_WORLD_SIZE", str(world_size)))
    except (KeyError, ValueError) as exc:
        raise DistributedFailure(f"WORLD_SIZE={world_size} but RANK/LOCAL_RANK are missing or not integers ({exc})") from None
    cuda = torch.cuda.is_available()
    return DistContext(
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        local_world_size=local_world_size,
        backend="nccl" if cuda else "gloo",
        device=torch.device("cuda", local_rank) if cuda else torch.device("cpu"),
        timeout_s=_seconds(env, TIMEOUT_ENV, DEFAULT_TIMEOUT_S),
        setup_timeout_s=_seconds(env, SETUP_TIMEOUT_ENV, DEFAULT_SETUP_TIMEOUT_S),
    )


def _seconds(env: Any, name: str, default: float) -> float:
    text = env.get(name)
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        raise DistributedFailure(f"{name} must be a number of seconds, got {text!r}") from None
    if value <= 0:
        raise DistributedFailure(f"{name} must be positive, got {text!r}")
    return value


def threads_per_rank(local_world_size: int) -> int:
    """The cores this process may use, split evenly among the ranks on this node."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, local_world_size))


def init(ctx: DistContext) -> DistContext:
    """Join the job (env:// rendezvous from torchrun) and create the control and setup groups."""
    import torch.distributed as dist

    if ctx.device.type == "cuda":
        torch.cuda.set_device(ctx.device)
    torch.set_num_threads(threads_per_rank(ctx.local_world_size))
    timeout = timedelta(seconds=ctx.timeout_s)
    try:
        dist.init_process_group(
            ctx.backend, timeout=timeout, device_id=ctx.device if ctx.device.type == "cuda" else None
        )
        control = None if ctx.backend == "gloo" else dist.new_group(backend="gloo", timeout=timeout)
        setup = dist.new_group(backend="gloo", timeout=timedelta(seconds=ctx.setup_timeout_s))
    except (RuntimeError, ValueError) as exc:
        raise DistributedFailure(f"rank {ctx.rank}: joining the process group failed: {exc}") from None
    logger.info(
        "rank %d/%d (local %d/%d) on %s: backend %s, device %s, %d threads",
        ctx.rank, ctx.world_size, ctx.local_rank, ctx.local_world_size, socket.gethostname(),
        ctx.backend, ctx.device, torch.get_num_threads(),
    )
    return dataclasses.replace(ctx, control_group=control, setup_group=setup)


def shutdown() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def failure(ctx: DistContext, what: str, exc: BaseException) -> DistributedFailure:
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return DistributedFailure(
        f"distributed training failed on rank {ctx.rank} during {what}: {type(exc).__name__}: {first_line} "
        "(a peer rank that died or hung shows up as a connection error or a timeout)"
    )


def broadcast_object(ctx: DistContext, value: Any, what: str, setup: bool = False) -> Any:
    """Rank 0's ``value`` on every rank."""
    import torch.distributed as dist

    box = [value if ctx.is_lead else None]
    try:
        dist.broadcast_object_list(box, src=0, group=ctx.setup_group if setup else ctx.control_group)
    except RuntimeError as exc:
        raise failure(ctx, what, exc) from exc
    return box[0]


def all_gather_object(ctx: DistContext, value: Any, what: str) -> list[Any]:
    """Every rank's ``value``, in rank order, on every rank."""
    import torch.distributed as dist

    out: list[Any] = [None] * ctx.world_size
    try:
        dist.all_gather_object(out, value, group=ctx.control_group)
    except RuntimeError as exc:
        raise failure(ctx, what, exc) from exc
    return out


def broadcast_buffers(ctx: DistContext, module: nn.Module) -> None:
    """Give every rank rank 0's BatchNorm statistics, so all ranks validate the very model rank 0 saves."""
    import torch.distributed as dist

    try:
        for buffer in module.buffers():
            dist.broadcast(buffer.data, src=0)
    except RuntimeError as exc:
        raise failure(ctx, "buffer broadcast", exc) from exc


def check_ready(ctx: DistContext, problem: str | None) -> None:
    """Every rank reports whether it can do its share; any problem fails all ranks with that rank's words."""
    reports = all_gather_object(ctx, (socket.gethostname(), problem), "readiness check")
    failed = [f"rank {r} on {host}: {msg}" for r, (host, msg) in enumerate(reports) if msg]
    if failed:
        raise DistributedFailure("; ".join(failed))


def describe(ctx: DistContext, peers: Sequence[tuple[str, int]]) -> dict[str, Any]:
    """What the manifest records about the job: size, backend and where each rank ran."""
    return {
        "world_size": ctx.world_size,
        "backend": ctx.backend,
        "device_type": ctx.device.type,
        "local_world_size": ctx.local_world_size,
        "threads_per_rank": torch.get_num_threads(),
        "launcher": "torchrun" if os.environ.get("TORCHELASTIC_RUN_ID") else "env",
        "ranks": [{"rank": r, "host": host, "pid": pid} for r, (host, pid) in enumerate(peers)],
    }
