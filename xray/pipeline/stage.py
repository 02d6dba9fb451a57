"""The one shape every pipeline stage has, and what the orchestrator hands it.

Why: with one shape the orchestrator is a loop (caching, the run directory,
progress and failure handling live there once), and a stage can be read and
changed without reading the others. A stage module (xray/components/) exposes

- ``STAGE``: its name (the run directory's sub-folder and the cache's);
- ``CACHED``: whether a finished result with the same fingerprint may be reused;
- ``fingerprint(config, inputs) -> str``: its config section, its upstream
  artifacts' fingerprints and the code it runs (its module's import closure);
- ``run(ctx, inputs) -> artifact``: the work, writing only under its own folder.

A stage reads its upstream artifacts from ``inputs`` by type, and what it
needs from them through the artifacts' own methods (xray/entity/), never by
importing another stage.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from xray.entity.config_entity import PipelineConfig
from xray.entity.dist_entity import DistContext
from xray.pipeline.store import RunDir

A = TypeVar("A")
ProgressFn = Callable[..., None]


@dataclass(frozen=True)
class Inputs:
    """The artifacts the stages before this one produced, and how many processes share the work."""

    artifacts: Mapping[type, Any] = field(default_factory=dict)
    world_size: int = 1  # torchrun processes; only the trainer's fingerprint depends on it

    def get(self, cls: type[A]) -> A:
        """The upstream artifact of type ``cls``; a stage asking for one that has not run yet is a bug."""
        if cls not in self.artifacts:
            raise LookupError(f"no {cls.__name__} among this stage's inputs (stages run out of order?)")
        return self.artifacts[cls]

    def add(self, artifact: Any) -> Inputs:
        return Inputs({**self.artifacts, type(artifact): artifact}, self.world_size)


@dataclass(frozen=True)
class StageContext:
    """Where and how a stage runs."""

    config: PipelineConfig
    run: RunDir
    fingerprint: str  # this stage's fingerprint, for its artifact's header
    progress: ProgressFn | None = None  # fields for the manifest's live progress (the trainer's epochs)
    dist: DistContext | None = None  # rank 0's torchrun context; None in a single process


class Stage(Protocol):
    """A stage module, as the orchestrator sees it."""

    STAGE: str
    CACHED: bool

    def fingerprint(self, config: PipelineConfig, inputs: Inputs) -> str: ...

    def run(self, ctx: StageContext, inputs: Inputs) -> Any: ...


def run_alone(stage: Stage, config: PipelineConfig, run: RunDir, *upstream: Any) -> Any:
    """One stage outside the orchestrator (benchmarks, tests): no cache, nothing recorded in the manifest."""
    inputs = Inputs()
    for artifact in upstream:
        inputs = inputs.add(artifact)
    return stage.run(StageContext(config, run, stage.fingerprint(config, inputs)), inputs)
