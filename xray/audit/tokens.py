"""Bearer-token comparison shared by the training service and the Bento (which packs only what serving imports)."""

from __future__ import annotations

import hmac


def matches_any(candidate: bytes, known: tuple[str, ...]) -> bool:
    """Compared with ``hmac.compare_digest`` against every token, no early exit: the time taken says
    nothing about which one nearly matched."""
    found = False
    for token in known:
        found |= hmac.compare_digest(candidate, token.encode())
    return found
