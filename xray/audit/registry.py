"""The production pointer and its audit log, kept next to BentoML's model store.

Which stored model is production is not "the newest one": an operator can
promote an older gated model or roll back. Every change (the gate's push,
``xray models promote``, ``xray models rollback``) is one appended line of
``$BENTOML_HOME/xray/audit.jsonl`` saying when, who, from, to and why; the
pointer is read back from that log, so the log and the pointer cannot
disagree. A store without a log (models pushed before the log existed) falls
back to the newest gated model.
"""

from __future__ import annotations

import fcntl
import getpass
import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from xray.errors import XrayError
from xray.typed import from_mapping, to_jsonable

logger = logging.getLogger(__name__)

AUDIT_DIR = "xray"
AUDIT_LOG = "audit.jsonl"
ACTIONS = ("gate", "promote", "rollback")


@dataclass(frozen=True)
class AuditEntry:
    when: str  # UTC ISO time
    who: str  # token identity, or the OS user
    model: str  # model name, e.g. xray-classifier
    action: str  # gate | promote | rollback
    from_tag: str | None  # production before the change
    to_tag: str  # production after it
    reason: str


@dataclass(frozen=True)
class StoredModel:
    """One version in the store, as ``xray models list`` shows it."""

    tag: str
    created: str
    run_id: str | None
    architecture: str | None
    gate_passed: bool
    test_roc_auc: float | None
    test_accuracy: float | None
    production: bool


def bentoml_home() -> Path:
    """BentoML's own rule: ``$BENTOML_HOME``, else ``~/bentoml``."""
    return Path(os.environ.get("BENTOML_HOME") or Path.home() / "bentoml")


def audit_log_path(home: Path | None = None) -> Path:
    return (home or bentoml_home()) / AUDIT_DIR / AUDIT_LOG


def current_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (some containers)
        return f"uid {os.getuid()}"


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One writer at a time: the pusher and an operator may change production at once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def read_audit_log(home: Path | None = None, model: str | None = None) -> list[AuditEntry]:
    path = audit_log_path(home)
    if not path.is_file():
        return []
    entries = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = from_mapping(AuditEntry, json.loads(line))
        except (ValueError, TypeError) as exc:
            raise XrayError(f"audit log {path} line {number} is damaged: {exc}") from None
        if model is None or entry.model == model:
            entries.append(entry)
    return entries


def production_history(entries: list[AuditEntry]) -> list[str]:
    """The stack of production tags: the gate and promote push one, rollback pops one."""
    stack: list[str] = []
    for entry in entries:
        if entry.action == "rollback":
            if stack:
                stack.pop()
            if not stack or stack[-1] != entry.to_tag:  # a log edited by hand: trust what it says happened
                stack.append(entry.to_tag)
        else:
            stack.append(entry.to_tag)
    return stack


def _store_model(tag: str) -> Any | None:
    import bentoml
    from bentoml.exceptions import BentoMLException, NotFound

    try:
        return bentoml.models.get(tag)
    except (NotFound, BentoMLException, ValueError):
        return None


def is_gated(model: Any) -> bool:
    """Only the pusher, after the gate, writes ``gate_passed``; older pushes carry the production label."""
    info = model.info
    return info.metadata.get("gate_passed") is True or info.labels.get("stage") == "production"


def _stored_models(model_name: str) -> list[Any]:
    """Every version of ``model_name`` in the store, oldest first (none: an empty list, not NotFound)."""
    import bentoml
    from bentoml.exceptions import NotFound

    try:
        models = bentoml.models.list(model_name)
    except NotFound:
        return []
    return sorted(models, key=lambda m: m.info.creation_time)


def _gated_models(model_name: str) -> list[Any]:
    return [m for m in _stored_models(model_name) if is_gated(m)]


def production_tag(model_name: str, home: Path | None = None) -> str | None:
    """The production tag: the pointer from the audit log, else the newest gated model, else None."""
    history = production_history(read_audit_log(home, model_name))
    if history:
        return history[-1]
    gated = _gated_models(model_name)
    return str(gated[-1].tag) if gated else None


def record_change(
    model_name: str, action: str, from_tag: str | None, to_tag: str, reason: str, who: str | None = None,
    home: Path | None = None,
) -> AuditEntry:
    """Append one line to the audit log (fsync'd: an operator's rollback must not vanish in a crash)."""
    if action not in ACTIONS:
        raise ValueError(f"unknown audit action {action!r}")
    entry = AuditEntry(
        when=datetime.now(timezone.utc).isoformat(timespec="milliseconds"), who=who or current_user(), model=model_name, action=action,
        from_tag=from_tag, to_tag=to_tag, reason=reason,
    )
    path = audit_log_path(home)
    with _locked(path):
        with open(path, "a") as fh:
            fh.write(json.dumps(to_jsonable(entry)) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
    logger.info("production %s: %s -> %s (%s by %s: %s)", model_name, from_tag, to_tag, action, entry.who, reason)
    return entry


def promote(tag: str, reason: str, who: str | None = None) -> AuditEntry:
    """Make a stored, gated model production; refuse anything the gate never blessed."""
    if not reason.strip():
        raise XrayError("a promotion needs a --reason")
    model = _store_model(tag)
    if model is None:
        raise XrayError(f"no model {tag!r} in the BentoML store at {bentoml_home()}")
    if not is_gated(model):
        raise XrayError(f"model {model.tag} never passed the gate; only gated models may be promoted")
    name = model.tag.name
    current = production_tag(name)
    if current == str(model.tag):
        raise XrayError(f"model {model.tag} is already production")
    return record_change(name, "promote", current, str(model.tag), reason.strip(), who)


def rollback(model_name: str, reason: str, who: str | None = None) -> AuditEntry:
    """Put back the model that was production before the current one."""
    if not reason.strip():
        raise XrayError("a rollback needs a --reason")
    history = production_history(read_audit_log(None, model_name))
    if len(history) < 2:
        raise XrayError(f"nothing to roll back to: {model_name} has had no earlier production model in the audit log")
    previous = history[-2]
    if _store_model(previous) is None:
        raise XrayError(f"the previous production model {previous} is no longer in the store")
    return record_change(model_name, "rollback", history[-1], previous, reason.strip(), who)


def list_models(model_name: str) -> list[StoredModel]:
    """Every stored version, newest first, with its run, gate scores and whether it is production."""
    production = production_tag(model_name)
    rows = []
    for model in reversed(_stored_models(model_name)):
        meta = model.info.metadata
        rows.append(StoredModel(
            tag=str(model.tag),
            created=model.info.creation_time.isoformat(timespec="seconds"),
            run_id=meta.get("run_id"),
            architecture=meta.get("architecture"),
            gate_passed=is_gated(model),
            test_roc_auc=meta.get("test_roc_auc"),
            test_accuracy=meta.get("test_accuracy"),
            production=str(model.tag) == production,
        ))
    return rows
