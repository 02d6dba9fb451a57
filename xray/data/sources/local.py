"""What every source on the local file system shares: finding the path, and confining it for the service."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from xray.data.sources.base import Allowed, Allowlist, Source
from xray.errors import DataError

ROOTS = Allowlist(
    env="XRAY_DATA_ROOTS", what="the folders in XRAY_DATA_ROOTS", where="under the server's XRAY_DATA_ROOTS", folders=True
)


def local_path(uri: str) -> Path | None:
    """The path a URI names on this machine, or None when nothing is there."""
    try:  # '~nosuchuser' raises RuntimeError, a 300-character name OSError: both are just not there
        root = Path(uri).expanduser()
        found = root.exists()
    except (RuntimeError, OSError, ValueError):
        found = False
    return root if found else None


class LocalSource(Source):
    """A source read from a path on this machine (no URI scheme)."""

    allowlist = ROOTS

    def names(self, uri: str) -> bool:
        return "://" not in uri

    def takes(self, uri: str) -> bool:
        path = local_path(uri)
        return path is not None and self.takes_path(path)

    def takes_path(self, path: Path) -> bool:
        """Whether ingestion reads what is at ``path`` with this source."""
        raise NotImplementedError

    def serves_path(self, path: Path) -> bool:
        """Whether the service lets a run read ``path`` (already confined) with this source."""
        return self.takes_path(path)

    def confine(self, uri: str, allowed: Allowed) -> str | None:
        return confine_local(uri, allowed, (self,))


def confine_local(uri: str, allowed: Allowed, sources: Sequence[LocalSource]) -> str | None:
    """The absolute path a service run may read with one of ``sources``, None outside the roots, or DataError."""
    # No '~' expansion: a user's home is not a data root, and '~nosuchuser' would raise.
    path = Path(uri)
    resolved = Path(os.path.realpath(path if path.is_absolute() else allowed.workdir / path))
    roots = [Path(root) for root in allowed.lists.get(ROOTS.env, ())]
    inside = any(resolved == root or resolved.is_relative_to(root) for root in roots)
    if not inside or resolved.is_relative_to(allowed.artifacts_dir):
        return None
    try:
        exists = resolved.exists()
        usable = any(source.serves_path(resolved) for source in sources)
    except OSError:
        exists = usable = False
    if not exists:
        raise DataError(f"data path does not exist on the server: {uri}")
    if not usable:
        raise DataError(f"data path must be {' or '.join(s.noun for s in sources if s.served)}: {uri}")
    return str(resolved)
