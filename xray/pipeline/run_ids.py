"""What a run id looks like: the store names run folders with it, the seal and the API check it."""

from __future__ import annotations

import re

from xray.errors import RunError

RUN_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_run_id(run_id: str) -> str:
    """A run id is one short, plain path segment: never '..', a slash, a NUL or a 300-character name."""
    if not RUN_ID_RE.fullmatch(run_id or ""):
        shown = run_id if len(run_id or "") <= 80 else f"{run_id[:80]}..."
        raise RunError(f"not a run id: {shown!r}")
    return run_id
