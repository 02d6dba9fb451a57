"""What a ``POST /train`` caller may ask for: which overrides, and which data.

The server holds the gate. A train token may tune the run (candidates, epochs,
image size, seeds, folds, time budget) but not what decides or receives a push
(``gate.*``, ``push.*``), where the server sends its credentials
(``ingestion.s3.*``), what it reads (``trainer.weights``) or how much of the
host it takes (threads, batch caps): those need an admin token. Bounds come
from ``xray.config``, which checks every numeric key for every caller.

Data are confined to the configured roots for every role. A path outside them
gets the same answer whether or not it exists, so the service cannot be used to
probe the server's file system; another run's snapshot under the artifacts root
is never training data.
"""

from __future__ import annotations

import os
from pathlib import Path

from xray.api.settings import AppSettings
from xray.errors import DataError, SourceError
from xray.data.sources.s3 import parse_s3_uri

# Overrides a train token may send; everything else needs an admin token.
TRAIN_OVERRIDES = (
    "trainer.candidates",
    "trainer.epochs",
    "trainer.seed",
    "trainer.cv_folds",
    "trainer.time_budget",
    "trainer.budget_per_image",
    "transformation.image_size",
    "transformation.seed",
)
DEMO = "demo"


class Forbidden(Exception):
    """The caller's role may not ask for this: answered with 403."""


def override_key(item: str) -> str:
    """The dotted key an override sets, spelled as ``xray.config.apply_override`` reads it."""
    return ".".join(part for part in item.partition("=")[0].strip().split(".") if part)


def check_overrides(overrides: list[str], admin: bool) -> None:
    """Forbidden naming the first key outside ``TRAIN_OVERRIDES`` unless the caller is an admin."""
    if admin:
        return
    for item in overrides:
        key = override_key(item)
        if key not in TRAIN_OVERRIDES:
            raise Forbidden(
                f"override {key or item!r} needs an admin token; "
                f"a train token may set only {', '.join(TRAIN_OVERRIDES)}"
            )


# One message for every refused location, so an answer never tells an existing path from a missing one.
OUTSIDE = (
    "data is outside the data this service may read "
    "(the folders in XRAY_DATA_ROOTS, the buckets in XRAY_DATA_BUCKETS, or 'demo')"
)


def confine_data_uri(uri: str, settings: AppSettings) -> str:
    """The data URI a run may use (local paths made absolute), Forbidden, or DataError."""
    uri = uri.strip()
    if "\x00" in uri:
        raise DataError("data URI must not contain NUL bytes")
    if uri == DEMO:
        return uri
    if uri.startswith("s3://"):
        try:
            bucket, _ = parse_s3_uri(uri)
        except SourceError as exc:
            raise DataError(str(exc)) from None
        if bucket not in settings.data_buckets:
            raise Forbidden(OUTSIDE)
        return uri
    if "://" in uri:
        raise DataError(f"unsupported data URI {uri!r}: use demo, a server-side path, or s3://bucket/prefix")
    # No '~' expansion: a user's home is not a data root, and '~nosuchuser' would raise.
    path = Path(uri)
    resolved = Path(os.path.realpath(path if path.is_absolute() else settings.workdir / path))
    inside = any(resolved == root or resolved.is_relative_to(root) for root in settings.data_roots)
    if not inside or resolved.is_relative_to(settings.artifacts_dir):
        raise Forbidden(OUTSIDE)
    try:
        exists = resolved.exists()
        usable = resolved.is_dir() or (resolved.suffix == ".npz" and resolved.is_file())
    except OSError:
        exists = usable = False
    if not exists:
        raise DataError(f"data path does not exist on the server: {uri}")
    if not usable:
        raise DataError(f"data path must be a folder or an .npz file: {uri}")
    return str(resolved)
