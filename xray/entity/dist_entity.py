"""This process's place in a torchrun job: a plain record the stage context carries.

Here, below every stage, because the stage contract (xray/pipeline/stage.py)
hands it to the trainer; reading it from torchrun's environment and the
collectives stay in xray/training/distributed.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class DistContext:
    """This process's place in a torchrun job, read from torchrun's environment variables."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    backend: str
    device: torch.device
    timeout_s: float
    setup_timeout_s: float
    control_group: Any = None  # set by init(); None means the default group
    setup_group: Any = None

    @property
    def is_lead(self) -> bool:
        return self.rank == 0
