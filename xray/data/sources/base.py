"""The one shape of a data source: what ingestion, the service's data policy and the decoders ask of it.

A source turns a URI into a snapshot (the films as this run takes them), scans
the snapshot into films with their class (``Item``s), says how the films are
decoded again later (transformation, the pusher) and, for the training
service, whether a URI is inside what the service may read. A film may carry
the name of the source it came from in ``Item.metadata["source"]`` (a source
that gathers several others, such as a manifest, sets it); it travels into
``items.jsonl`` like any metadata column.

Heavy libraries (numpy, torch through the decoders, boto3) are imported where they
are used, so the registry stays cheap to import: the CLI's help and the config
check read it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from xray.entity.artifact_entity import Item, SourceObject, SourceRecord, UnreadableFile
from xray.entity.config_entity import IngestionConfig

if TYPE_CHECKING:
    import numpy as np

Decoder = Callable[[list[Item], str], "np.ndarray"]  # (items, split name) -> uint8 N×size×size


@dataclass(frozen=True)
class Allowlist:
    """What the training service may read of a source: an environment variable listing folders or buckets."""

    env: str  # the variable the service reads, e.g. XRAY_DATA_ROOTS
    what: str  # how a refusal names it: "the folders in XRAY_DATA_ROOTS"
    where: str  # how the API schema names it: "under the server's XRAY_DATA_ROOTS"
    folders: bool = False  # entries are folders (absolute against the service's working dir; ':' also separates)


@dataclass(frozen=True)
class Allowed:
    """The data the training service may read (xray/api/settings.py fills it from the environment)."""

    workdir: Path  # relative data paths are relative to it
    artifacts_dir: Path  # another run's snapshot is never training data
    lists: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # Allowlist.env -> its entries


@dataclass(frozen=True)
class Place:
    """Where a source may write its snapshot: its stage folder in the run, and the artifacts root (mirrors)."""

    stage_dir: Path
    artifacts_root: Path


@dataclass(frozen=True)
class Snapshot:
    """The films as this run takes them."""

    root: Path  # the folder or archive they are read from
    copied: bool  # written into the run (its files are hashed into the artifact), or read where they are
    objects: tuple[SourceObject, ...] = ()  # remote objects as taken (S3), for the auditor
    scanned: Scan | None = None  # a source that reads its films while taking them (a manifest) hands the scan on


@dataclass(frozen=True)
class Scan:
    """What a snapshot holds: films with their class, the files that could not be read, the median film side."""

    items: list[Item]
    class_names: list[str]
    unreadable: list[UnreadableFile]
    median_side: int
    sources: tuple[SourceRecord, ...] = ()  # a manifest's sources (empty for a single source)
    grouping: str | None = None  # how the source grouped its films itself; None: ingestion.group_by applies


class Source(ABC):
    """One kind of data a run can read; registered once in xray/data/sources/registry.py."""

    kind: ClassVar[str]  # recorded as the ingestion artifact's source_kind
    noun: ClassVar[str]  # how help and errors name it: "a folder", "s3://bucket/prefix"
    allowlist: ClassVar[Allowlist | None] = None  # None: the service may always read it
    served: ClassVar[bool] = True  # False: the training service never reads this kind (its API schema leaves it out)

    @abstractmethod
    def names(self, uri: str) -> bool:
        """Whether the URI is written in this source's form (no file system access)."""

    def takes(self, uri: str) -> bool:
        """Whether this source reads the URI (a local source looks at what is there)."""
        return self.names(uri)

    @abstractmethod
    def snapshot(self, uri: str, config: IngestionConfig, place: Place) -> Snapshot:
        """Take the films (DataError or SourceError when they cannot be taken)."""

    @abstractmethod
    def scan(self, snapshot: Snapshot, config: IngestionConfig) -> Scan:
        """The films of a snapshot with their class, validated (DataError for a malformed source)."""

    @abstractmethod
    def decoder(self, root: Path, size: int) -> Decoder:
        """How transformation and the pusher read the snapshot's films back, at any square size."""

    def contract(self, median_side: int) -> dict[str, str | int]:
        """How the source's films were made from full-size films, for serving and the external check ({}: as taken)."""
        return {}

    @abstractmethod
    def confine(self, uri: str, allowed: Allowed) -> str | None:
        """The URI a service run may use, None when it is outside what the service may read, or DataError."""


def either(phrases: Sequence[str]) -> str:
    """'a or b', 'a, b, or c': the phrases once each, in order."""
    unique = list(dict.fromkeys(phrases))
    if len(unique) <= 2:
        return " or ".join(unique)
    return f"{', '.join(unique[:-1])}, or {unique[-1]}"
