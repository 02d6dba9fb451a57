"""Everything the fit engine needs to know about torchrun ranks, in one object.

Why: a fit is the same loop on one process and on every rank of a DDP job;
only a handful of points differ (who logs and keeps weights, how the epoch is
shuffled, how losses and validation logits are combined, who decides to stop).
``Ranks(None)`` is the single process, and every method is then the plain
local operation, so the loop itself never asks which case it is in.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn

from xray.training import distributed
from xray.training.distributed import DistContext
from xray.errors import XrayError
from xray.serving.inference import choose_device

logger = logging.getLogger(__name__)

T = TypeVar("T")
RANK_SEED_STRIDE = 7919  # each rank augments with its own stream: seed + stride x rank


class Ranks:
    """This process's part in a fit: the whole job (``dist`` None) or one rank of it."""

    def __init__(self, dist: DistContext | None = None):
        self.dist = dist

    @property
    def is_lead(self) -> bool:
        """Rank 0 (or the single process): the one that logs, keeps weights and writes."""
        return self.dist is None or self.dist.is_lead

    @property
    def world_size(self) -> int:
        return self.dist.world_size if self.dist else 1

    def device(self) -> torch.device:
        return self.dist.device if self.dist else choose_device()

    def log(self, message: str, *args: Any) -> None:
        if self.is_lead:
            logger.info(message, *args)

    def share(self, value: T, what: str) -> T:
        """Rank 0's ``value`` (a plan, a stop decision) on every rank."""
        return value if self.dist is None else distributed.broadcast_object(self.dist, value, what, setup=True)

    def agree(self, value: T, what: str) -> T:
        """Rank 0's decision on every rank, on the training control group."""
        return value if self.dist is None else distributed.broadcast_object(self.dist, value, what)

    def load_everywhere(self, load: Callable[[], T], run_path: Path) -> T:
        """Every rank reads the cached arrays itself (on several nodes they must sit on a shared filesystem);
        a rank that cannot fails every rank with its reason instead of leaving them waiting in a collective."""
        if self.dist is None:
            return load()
        data, problem = None, None
        try:
            data = load()
        except (XrayError, OSError, ValueError) as exc:
            problem = f"cannot read the cached arrays under {run_path} ({exc}); artifacts_dir must be on a filesystem every node sees"
        distributed.check_ready(self.dist, problem)
        assert data is not None
        return data

    def distribute(
        self, model: nn.Module, device: torch.device, n: int, seed: int
    ) -> tuple[nn.Module, torch.Generator, Callable[[int], torch.Tensor]]:
        """(the module to train, the augmentation generator, epoch -> this rank's shuffled row order)."""
        if self.dist is None:
            generator = torch.Generator().manual_seed(seed)  # shuffles and augments, as it always has
            return model, generator, lambda epoch: torch.randperm(n, generator=generator)
        from torch.nn.parallel import DistributedDataParallel
        from torch.utils.data import DistributedSampler

        dist = self.dist
        trained = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        sampler = DistributedSampler(range(n), num_replicas=dist.world_size, rank=dist.rank, shuffle=True, seed=seed)

        def order(epoch: int) -> torch.Tensor:
            sampler.set_epoch(epoch)
            return torch.tensor(list(sampler), dtype=torch.long)

        return trained, torch.Generator().manual_seed(seed + RANK_SEED_STRIDE * dist.rank), order

    def reduce_epoch(self, loss_sum: float, seen: int, elapsed: float) -> tuple[float, int, float]:
        """Loss and images summed over ranks; the epoch lasts as long as the slowest rank."""
        if self.dist is None:
            return loss_sum, seen, elapsed
        reports = distributed.all_gather_object(self.dist, (loss_sum, seen, elapsed), "the epoch's metrics")
        return sum(r[0] for r in reports), sum(r[1] for r in reports), max(r[2] for r in reports)

    def logits(self, model: nn.Module, images: np.ndarray, num_classes: int, predict: Callable[[np.ndarray], torch.Tensor]) -> torch.Tensor:
        """``predict`` over ``images``; under DDP each rank scores every world_size-th image and all see the whole."""
        if self.dist is None:
            return predict(images)
        distributed.broadcast_buffers(self.dist, model)  # ranks' BatchNorm statistics drift apart between DDP forwards
        rows = np.arange(self.dist.rank, len(images), self.dist.world_size)
        shards = distributed.all_gather_object(self.dist, (rows, predict(images[rows]).numpy()), "validation")
        merged = np.zeros((len(images), num_classes), dtype=np.float32)
        for shard_rows, logits in shards:
            if len(shard_rows):
                merged[shard_rows] = logits
        return torch.from_numpy(merged)
