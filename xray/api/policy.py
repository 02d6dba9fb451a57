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

from xray.api.settings import AppSettings
from xray.data.sources import registry
from xray.data.sources.base import Allowed
from xray.errors import DataError

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
OUTSIDE = registry.outside()


def confine_data_uri(uri: str, settings: AppSettings) -> str:
    """The data URI a run may use (local paths made absolute), Forbidden, or DataError."""
    uri = uri.strip()
    if "\x00" in uri:
        raise DataError("data URI must not contain NUL bytes")
    confined = registry.confine(uri, Allowed(settings.workdir, settings.artifacts_dir, settings.data_allowed))
    if confined is None:
        raise Forbidden(OUTSIDE)
    return confined
