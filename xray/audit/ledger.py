"""The seal ledger: an append-only, hash-chained, signed list of every seal, in the artifacts root.

Each line of ``<artifacts>/ledger.jsonl`` is one entry: its sequence number,
run id, kind (``pre-push`` or ``final``), seal digest, the previous entry's
hash, the time and the signing key's id, then ``hash`` (sha256 of those
fields as canonical JSON) and ``signature`` (Ed25519 over the same bytes).
A seal alone proves what a run held when it was sealed; the ledger is what
notices a run that was deleted or replaced by another sealed directory,
because its entry and digest stay behind and every later entry chains to it.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xray.audit.keys import SigningKey, VerifyKey

LEDGER = "ledger.jsonl"
GENESIS = "0" * 64
_ENTRY_FIELDS = ("seq", "run_id", "kind", "seal_digest", "prev", "time", "key_id")


def canonical(value: Any) -> bytes:
    """The one byte form that hashes and signatures cover."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


@dataclass(frozen=True)
class LedgerEntry:
    seq: int
    run_id: str
    kind: str  # pre-push | final
    seal_digest: str
    prev: str
    time: str
    key_id: str
    hash: str
    signature: str

    def body(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _ENTRY_FIELDS}


@dataclass(frozen=True)
class LedgerCheck:
    """What a verifier learns from the ledger: the entries, and every break in the chain."""

    entries: tuple[LedgerEntry, ...]
    problems: tuple[str, ...]

    def for_run(self, run_id: str) -> list[LedgerEntry]:
        return [e for e in self.entries if e.run_id == run_id]


def append(root: Path, key: SigningKey, run_id: str, kind: str, seal_digest: str, time: str) -> LedgerEntry:
    """Add one signed entry chained to the last; serialised across processes by a lock on the file."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / LEDGER, "a+b") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            fh.seek(0)
            lines = [line for line in fh.read().splitlines() if line.strip()]
            prev, seq = GENESIS, 0
            if lines:
                last = json.loads(lines[-1])
                prev, seq = last["hash"], int(last["seq"]) + 1
            body = {"seq": seq, "run_id": run_id, "kind": kind, "seal_digest": seal_digest, "prev": prev,
                    "time": time, "key_id": key.public.key_id}
            message = canonical(body)
            entry = LedgerEntry(**body, hash=hashlib.sha256(message).hexdigest(),
                                signature=base64.b64encode(key.sign(message)).decode())
            fh.seek(0, os.SEEK_END)
            fh.write(canonical({**body, "hash": entry.hash, "signature": entry.signature}) + b"\n")
            fh.flush()
            os.fsync(fh.fileno())
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
    return entry


def check(root: Path, key: VerifyKey) -> LedgerCheck:
    """Read the ledger and name each break: bad lines, broken links, wrong hashes, bad signatures."""
    path = root / LEDGER
    if path.is_symlink() or (path.exists() and not path.is_file()):
        return LedgerCheck((), (f"ledger: {LEDGER} is not a regular file",))
    try:
        raw_lines = path.read_bytes().splitlines()
    except FileNotFoundError:
        return LedgerCheck((), ())
    entries: list[LedgerEntry] = []
    problems: list[str] = []
    prev = GENESIS
    for number, line in enumerate(raw_lines, start=1):
        if not line.strip():
            continue
        try:
            entry = LedgerEntry(**json.loads(line))
            message = canonical(entry.body())
            signature = base64.b64decode(entry.signature, validate=True)
        except (ValueError, TypeError) as exc:
            problems.append(f"ledger: line {number} is not a ledger entry ({exc})")
            prev = None
            continue
        where = f"ledger: entry {entry.seq} (line {number}, run {entry.run_id})"
        if hashlib.sha256(message).hexdigest() != entry.hash:
            problems.append(f"{where} was edited: its hash does not match its fields")
        if prev is not None and entry.prev != prev:
            problems.append(f"{where} does not chain to the entry before it (entries removed, inserted or reordered)")
        if entry.seq != len(entries):
            problems.append(f"{where} has sequence number {entry.seq}, expected {len(entries)}")
        if entry.key_id != key.key_id:
            problems.append(f"{where} is signed by another key ({entry.key_id[:16]}…)")
        elif not key.valid(signature, message):
            problems.append(f"{where} has an invalid signature")
        entries.append(entry)
        prev = entry.hash
    return LedgerCheck(tuple(entries), tuple(problems))
