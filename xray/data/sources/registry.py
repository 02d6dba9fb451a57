"""Every kind of data a run can read, chosen by the URI's form: one entry each.

Adding a source is one module (a ``Source``, xray/data/sources/base.py), one
entry in ``SOURCES`` and its tests: ingestion, the decoders, the service's
data policy and allowlists, the API schema, the CLI's help and the config
check all read this table.

Order matters twice. A URI goes to the first source whose form names it and
that takes it, so ``demo`` comes before the local paths, and among local
paths a source of one kind of file comes before ``npz``, which takes every
other file (to say it is not an ``.npz``). Help and messages list the
sources in this order.

A source made of other sources (a manifest listing several ``{uri,
classes}``) must not import this module (the import graph would have a
cycle): its entry hands it the lookups it needs, e.g.
``ManifestSource(lambda uri: source_for(uri))``, and it names each film's
source in ``Item.metadata["source"]``.
"""

from __future__ import annotations

from xray.data.sources.base import Allowed, Allowlist, Source, either
from xray.data.sources.demo import DemoSource
from xray.data.sources.folder import FolderSource
from xray.data.sources.local import LocalSource, confine_local
from xray.data.sources.manifest import ManifestFileSource
from xray.data.sources.npz import NpzSource
from xray.data.sources.s3_source import S3Source
from xray.errors import DataError

SOURCES: tuple[Source, ...] = (DemoSource(), FolderSource(), ManifestFileSource(), NpzSource(), S3Source())


def source_for(uri: str) -> Source:
    """The source that reads ``uri`` (DataError when none does)."""
    for source in SOURCES:
        if source.names(uri) and source.takes(uri):
            return source
    raise DataError(f"data source not found: {uri}")


def source_named(kind: str) -> Source:
    """The source an ingestion artifact's ``source_kind`` names (its snapshot is read back through it)."""
    for source in SOURCES:
        if source.kind == kind:
            return source
    raise DataError(f"unknown data source kind {kind!r} (known: {', '.join(s.kind for s in SOURCES)})")


def spelled() -> str:
    """The URIs a run may name, for help and errors: 'demo, a folder, …, or s3://bucket/prefix'."""
    return either([s.noun for s in SOURCES])


def allowlists() -> tuple[Allowlist, ...]:
    """The allowlists the training service reads from its environment, once each."""
    return tuple(dict.fromkeys(s.allowlist for s in SOURCES if s.allowlist is not None))


def confine(uri: str, allowed: Allowed) -> str | None:
    """The URI a service run may use (local paths made absolute), None when outside what it may read, or DataError."""
    named = [s for s in SOURCES if s.names(uri)]
    if not named:
        raise DataError(f"unsupported data URI {uri!r}: use {spelled()}")
    if isinstance(named[0], LocalSource):
        return confine_local(uri, allowed, [s for s in SOURCES if isinstance(s, LocalSource)])
    return named[0].confine(uri, allowed)


def outside() -> str:
    """One answer for every refused location, so it never tells an existing path from a missing one."""
    listed = [a.what for a in allowlists()] + [repr(s.noun) for s in SOURCES if s.allowlist is None]
    return f"data is outside the data this service may read ({either(listed)})"


def served() -> str:
    """What a service run may name, grouped by allowlist: the API schema's description."""
    groups: dict[Allowlist | None, list[str]] = {}
    for source in (s for s in SOURCES if s.served):
        groups.setdefault(source.allowlist, []).append(source.noun)
    return either([" or ".join(nouns) + (f" {a.where}" if a else "") for a, nouns in groups.items()])
