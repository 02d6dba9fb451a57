"""Sealed runs: a signed list of every file in a run directory, and the check that names each change.

When a run ends (succeeded, failed, cancelled, or found orphaned) its
directory is walked without following links, every regular file is hashed
(sha256 + size) and the list is signed with Ed25519 over canonical JSON into
``<run>/seal.json``; the seal's digest goes into the ledger
(``xray/audit/ledger.py``). A run that pushes a model is sealed once before, too:
``model_pusher/evidence_seal.json`` covers the evidence the gate decided on,
its digest travels in the model's metadata, and the final seal lists that
file and names its digest, so the pushed model can be traced to the run.

Why not OpenSSF ``model-signing``: tried (v1.1.1, elliptic key signer): it
skips ``.git*`` paths unless told, aborts on the first symlink instead of
naming it, reports changes as one string, records no sizes and has no room
in the signed statement for the run id or the pre-push link. The seal here
is one signed JSON document an auditor can read.
"""

from __future__ import annotations

import base64
import binascii
import errno
import hashlib
import json
import os
import logging
import stat
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from xray.audit import ledger
from xray.entity.artifact_entity import FileRecord
from xray.errors import RunError
from xray.audit.keys import SigningKey, VerifyKey, load_public_key, load_signing_key
from xray.audit.ledger import canonical
from xray.pipeline.run_ids import check_run_id
from xray.pipeline.store import RunDir, RunManifest, load_manifest, recorded_hash_problems, utc_now

SEAL = "seal.json"
EVIDENCE_SEAL = "model_pusher/evidence_seal.json"
FORMAT = "xray-seal/1"
# Written after the evidence seal by design (status, log lines): the final seal covers them.
LIVE_FILES = frozenset({"manifest.json", "run.log", "worker.log"})
UNSEALED_STATUSES = ("queued", "running")

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Scan:
    """A run directory as it is on disk: its regular files, and what may not be there."""

    files: dict[str, FileRecord]
    problems: tuple[str, ...]


@dataclass(frozen=True)
class Verification:
    run_id: str
    sealed: bool
    checked: int
    problems: tuple[str, ...]
    message: str
    seal_digest: str | None = None
    evidence_digest: str | None = None  # the pre-push seal a pushed model names in its metadata

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass(frozen=True)
class SealDocument:
    body: dict[str, Any]
    signature: bytes
    digest: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "digest", hashlib.sha256(canonical(self.body)).hexdigest())


# ---------------------------------------------------------------- reading a run without following links


def _hash_nofollow(path: Path, rel: str) -> FileRecord:
    """Hash a regular file; O_NOFOLLOW so a symlink swapped in after the scan is refused, not followed."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        digest = hashlib.sha256()
        size = 0
        while block := fh.read(1 << 20):
            digest.update(block)
            size += len(block)
    return FileRecord(rel, digest.hexdigest(), size)


def scan(run_path: Path, skip: frozenset[str] = frozenset()) -> Scan:
    """Every regular file under the run (relative POSIX path -> state); links and special files are problems."""
    files: dict[str, FileRecord] = {}
    problems: list[str] = []

    def walk(directory: Path, prefix: str) -> None:
        with os.scandir(directory) as entries:
            for entry in sorted(entries, key=lambda e: e.name):
                rel = f"{prefix}{entry.name}"
                if entry.is_symlink():
                    target = os.readlink(entry.path)
                    escapes = not _inside(run_path, Path(entry.path).parent, target)
                    problems.append(f"symlink: {rel} -> {target}" + (" (points outside the run)" if escapes else ""))
                elif entry.is_dir(follow_symlinks=False):
                    walk(Path(entry.path), f"{rel}/")
                elif not entry.is_file(follow_symlinks=False):
                    problems.append(f"not a regular file: {rel}")
                elif rel not in skip:
                    try:
                        files[rel] = _hash_nofollow(Path(entry.path), rel)
                    except OSError as exc:
                        problems.append(f"unreadable: {rel} ({exc.strerror or exc})")

    walk(run_path, "")
    return Scan(files, tuple(problems))


def _inside(run_path: Path, base: Path, target: str) -> bool:
    resolved = os.path.normpath(os.path.join(base, target))
    return os.path.commonpath([os.path.abspath(run_path), os.path.abspath(resolved)]) == os.path.abspath(run_path)


def _safe_relative(path: str) -> bool:
    pure = PurePosixPath(path)
    return bool(path) and not pure.is_absolute() and ".." not in pure.parts and "\\" not in path and "\x00" not in path


def _read_json_nofollow(path: Path) -> Any:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        return json.loads(fh.read())


def _load_seal(path: Path) -> SealDocument:
    raw = _read_json_nofollow(path)
    if not isinstance(raw, dict) or not isinstance(raw.get("body"), dict) or not isinstance(raw.get("signature"), str):
        raise ValueError("not a seal document")
    return SealDocument(raw["body"], base64.b64decode(raw["signature"], validate=True))


def seal_digest_of(run_path: Path) -> str | None:
    """The digest of the run's final seal as recorded (None: not sealed, or not a seal); not a verification."""
    try:
        return _load_seal(run_path / SEAL).digest
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------- sealing


def _write_seal(path: Path, body: dict[str, Any], key: SigningKey) -> SealDocument:
    document = SealDocument(body, key.sign(canonical(body)))
    text = json.dumps({"body": body, "signature": base64.b64encode(document.signature).decode()}, indent=1)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o444)
    with os.fdopen(fd, "w") as fh:
        fh.write(text + "\n")
    return document


def _body(run_path: Path, run_id: str, kind: str, sealed_at: str, skip: frozenset[str], key: SigningKey,
          **extra: Any) -> dict[str, Any]:
    found = scan(run_path, skip)
    return {
        "format": FORMAT,
        "run_id": run_id,
        "kind": kind,
        "sealed_at": sealed_at,
        "key_id": key.public.key_id,
        "files": [{"path": p, "sha256": s.sha256, "size": s.size} for p, s in sorted(found.files.items())],
        "problems_at_seal": list(found.problems) + list(extra.pop("problems", ())),
        **extra,
    }


def seal_evidence(root: Path, run_id: str, sealed_at: str) -> str:
    """The pre-push seal over every file so far; returns its digest, which the pushed model carries."""
    key = load_signing_key()
    run_path = root / run_id
    body = _body(run_path, run_id, "pre-push", sealed_at, frozenset(), key)
    document = _write_seal(run_path / EVIDENCE_SEAL, body, key)
    ledger.append(root, key, run_id, "pre-push", document.digest, sealed_at)
    return document.digest


def finish_run(run: RunDir, status: str, reason: str | None = None, summary: dict[str, Any] | None = None) -> str:
    """End a run: record its end in the store (read-only from now on), then seal it; returns the seal's digest."""
    run.close(status, reason, summary)
    problems = recorded_hash_problems(run.root, run.run_id)
    return seal_run(run.root, run.run_id, run.manifest.status, utc_now(), problems)


def mark_orphaned(root: Path, run_id: str, reason: str) -> RunManifest:
    """Mark a queued or running run failed because its process is gone (killed, crashed, host rebooted).

    Only the caller can know the process is gone; a finished run is returned unchanged.
    """
    manifest = load_manifest(root, run_id)
    if manifest.status not in ("queued", "running"):
        return manifest
    run = RunDir(root, manifest)
    finish_run(run, "failed", reason=reason)
    logger.warning("run %s marked failed: %s", run_id, reason)
    return run.manifest


def seal_run(root: Path, run_id: str, status: str, sealed_at: str, recorded_problems: list[str]) -> str:
    """The final seal, once the run has ended: ``recorded_problems`` are mismatches the run found in itself."""
    key = load_signing_key()
    run_path = root / run_id
    if (run_path / SEAL).exists() or (run_path / SEAL).is_symlink():
        raise RunError(f"run {run_id} is already sealed")
    evidence = None
    if (run_path / EVIDENCE_SEAL).is_file():
        evidence = _load_seal(run_path / EVIDENCE_SEAL).digest
    body = _body(run_path, run_id, "final", sealed_at, frozenset({SEAL}), key, status=status,
                 evidence_seal=evidence, problems=recorded_problems)
    document = _write_seal(run_path / SEAL, body, key)
    ledger.append(root, key, run_id, "final", document.digest, sealed_at)
    return document.digest


# ---------------------------------------------------------------- verifying


def _evidence_digest(document: SealDocument, problems: list[str]) -> str | None:
    """The pre-push evidence seal the final seal names, if any (a malformed one is a problem)."""
    digest = document.body.get("evidence_seal")
    if digest is not None and not isinstance(digest, str):
        problems.append("seal: malformed evidence_seal")
        return None
    return digest


def _file_problems(found: Scan, sealed_files: dict[str, FileRecord]) -> list[str]:
    """What the scan found against what the seal lists: missing, modified and added files."""
    problems = []
    for path, state in sorted(sealed_files.items()):
        current = found.files.get(path)
        if current is None:
            if not any(p.startswith(f"symlink: {path} ") for p in found.problems):
                problems.append(f"missing: {path}")
        elif current != state:
            problems.append(f"modified: {path} (sha256 differs from the seal)")
    problems += [f"added: {path} (not in the seal)" for path in sorted(set(found.files) - set(sealed_files))]
    return problems


def verify_run(root: Path, run_id: str, public_key: Path | None = None) -> Verification:
    """Check the seal's signature, its ledger entry and every file; name each problem, follow no link."""
    check_run_id(run_id)
    key = load_public_key(public_key)
    chain = ledger.check(root, key)
    entries = chain.for_run(run_id)
    finals = [e for e in entries if e.kind == "final"]
    problems = list(chain.problems)
    run_path = root / run_id

    if run_path.is_symlink():
        problems.append(f"the run directory {run_id} is a symlink (-> {os.readlink(run_path)}); not followed")
        return Verification(run_id, True, 0, tuple(problems), "not verified")
    if not run_path.is_dir():
        if not entries:
            raise RunError(f"no run {run_id!r} under {root}")
        problems.append(f"the run directory is missing; the ledger records its seal (entry {entries[-1].seq})")
        return Verification(run_id, True, 0, tuple(problems), "run deleted")

    seal_path = run_path / SEAL
    if not seal_path.exists() and not seal_path.is_symlink():
        if finals:
            problems.append(f"missing: {SEAL} (the ledger records a final seal of this run, entry {finals[-1].seq})")
        else:
            status = _status(run_path)
            if status in UNSEALED_STATUSES:
                return Verification(run_id, False, 0, tuple(problems), f"run {run_id} is {status}: not sealed yet "
                                    "(a run is sealed when it ends)")
            problems.append(f"not sealed: the run is {status or 'of unknown status'} but has no {SEAL} "
                            "and no ledger entry")
        return Verification(run_id, bool(finals), 0, tuple(problems), "not verified")

    try:
        document = _load_seal(seal_path)
    except (OSError, ValueError, binascii.Error) as exc:
        problems.append(f"unreadable: {SEAL} ({exc})")
        return Verification(run_id, True, 0, tuple(problems), "not verified")
    problems += _check_document(document, key, run_id, "final", "seal")
    if not finals:
        problems.append("ledger: no final seal of this run (the ledger was truncated, replaced or deleted)")
    elif document.digest not in {e.seal_digest for e in finals}:
        problems.append(f"ledger: {SEAL} is not the seal the ledger records (digest {document.digest[:16]}…)")

    found = scan(run_path, frozenset({SEAL}))
    problems += found.problems
    sealed_files = _sealed_files(document, problems)
    problems += _file_problems(found, sealed_files)
    at_seal = document.body.get("problems_at_seal")
    if at_seal:
        problems += [f"at seal time: {p}" for p in (at_seal if isinstance(at_seal, list) else [at_seal])]

    evidence_digest = _evidence_digest(document, problems)
    if evidence_digest:
        problems += _check_evidence(run_path, key, run_id, evidence_digest, sealed_files, entries)
    message = (f"run {run_id}: sealed {document.body.get('sealed_at')}, signature and ledger entry valid, "
               f"all {len(found.files)} files match their sha256"
               + (f"; evidence sealed before the push: {evidence_digest}" if evidence_digest else ""))
    return Verification(run_id, True, len(found.files), tuple(dict.fromkeys(problems)), message, document.digest, evidence_digest)


def _status(run_path: Path) -> str | None:
    try:
        status = _read_json_nofollow(run_path / "manifest.json").get("status")
    except (OSError, ValueError, AttributeError):
        return None
    return status if isinstance(status, str) else None


def _check_document(document: SealDocument, key: VerifyKey, run_id: str, kind: str, name: str) -> list[str]:
    body = document.body
    if body.get("key_id") != key.key_id:
        return [f"{name}: signed by another key (key id {str(body.get('key_id'))[:16]}…), not by this public key"]
    if not key.valid(document.signature, canonical(body)):
        return [f"{name}: invalid signature (the seal was edited, or forged without the key)"]
    problems = []
    if body.get("run_id") != run_id:
        problems.append(f"{name}: made for run {body.get('run_id')!r}, not for {run_id} (a run directory was replaced)")
    if body.get("kind") != kind or body.get("format") != FORMAT:
        problems.append(f"{name}: not a {kind} seal in format {FORMAT}")
    return problems


def _sealed_files(document: SealDocument, problems: list[str]) -> dict[str, FileRecord]:
    files: dict[str, FileRecord] = {}
    entries = document.body.get("files")
    for item in entries if isinstance(entries, list) else ():
        if not isinstance(item, dict) or not isinstance(item.get("size"), int):
            problems.append(f"seal: malformed file entry {str(item)[:80]!r}")
            continue
        path = str(item.get("path", ""))
        if not _safe_relative(path):
            problems.append(f"seal: lists a path that leaves the run: {path!r}; not followed")
            continue
        files[path] = FileRecord(path, str(item.get("sha256")), item["size"])
    return files


def _check_evidence(
    run_path: Path, key: VerifyKey, run_id: str, digest: str, final_files: dict[str, FileRecord],
    entries: list[ledger.LedgerEntry],
) -> list[str]:
    """The pre-push seal: signed, in the ledger, and nothing it covered (but the live files) changed after it."""
    if EVIDENCE_SEAL not in final_files:
        return [f"evidence seal: {EVIDENCE_SEAL} is not among the sealed files"]
    try:
        evidence = _load_seal(run_path / EVIDENCE_SEAL)
    except (OSError, ValueError, binascii.Error) as exc:
        return [f"evidence seal: unreadable ({exc})"]
    problems = _check_document(evidence, key, run_id, "pre-push", "evidence seal")
    if evidence.digest != digest:
        problems.append("evidence seal: its digest differs from the one the final seal names")
    if digest not in {e.seal_digest for e in entries if e.kind == "pre-push"}:
        problems.append("ledger: no pre-push entry with the evidence seal's digest")
    entries = evidence.body.get("files")
    for item in entries if isinstance(entries, list) else ():
        path = str(item.get("path", "")) if isinstance(item, dict) else ""
        if path in LIVE_FILES:
            continue
        later = final_files.get(path)
        if later is None or not isinstance(item, dict) or later.sha256 != item.get("sha256"):
            problems.append(f"evidence seal: {path} changed between the push and the end of the run")
    return problems
