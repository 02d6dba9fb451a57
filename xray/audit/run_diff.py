"""Two runs side by side: what changed in the config, data and code, and what it did to the metrics.

Used by ``xray runs diff A B`` and the app's ``/ui/diff`` page, so both say the same.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xray.config import flatten
from xray.audit.reports import run_report
from xray.pipeline.store import load_manifest, load_stage_artifact

# The scalar metrics compared per candidate and split (SplitMetrics fields).
METRICS = ("accuracy", "roc_auc", "macro_f1", "loss", "ece")


@dataclass(frozen=True)
class ConfigChange:
    """A resolved config key whose value differs between run A and run B."""

    key: str
    a: Any
    b: Any


@dataclass(frozen=True)
class MetricDelta:
    candidate: str
    split: str  # validation | test
    metric: str
    a: float | None
    b: float | None
    delta: float | None  # b - a, when both exist


@dataclass(frozen=True)
class PushSide:
    status: str
    chosen_model: str | None
    pushed: bool | None
    model_tag: str | None
    reasons: tuple[str, ...]


@dataclass(frozen=True)
class RunDiff:
    run_a: str
    run_b: str
    config_changes: tuple[ConfigChange, ...]
    data_fingerprint_a: str | None
    data_fingerprint_b: str | None
    same_data: bool
    code_a: dict[str, Any]
    code_b: dict[str, Any]
    same_code: bool
    metrics: tuple[MetricDelta, ...]
    push_a: PushSide
    push_b: PushSide


def _data_fingerprint(root: Path, run_id: str) -> str | None:
    ingestion = load_stage_artifact(root, load_manifest(root, run_id), "data_ingestion")
    return ingestion.data_fingerprint if ingestion is not None else None


def _push_side(report: dict[str, Any]) -> PushSide:
    return PushSide(
        status=report["status"], chosen_model=report["chosen_model"], pushed=report["pushed"],
        model_tag=report["model_tag"], reasons=tuple(report["push_reasons"]),
    )


def _number(value: Any) -> float | None:
    """NaN (an AUC undefined on a one-class split) -> None: no delta, and strict JSON stays valid."""
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def diff_runs(root: Path, run_a: str, run_b: str) -> RunDiff:
    a, b = run_report(root, run_a), run_report(root, run_b)
    flat_a, flat_b = flatten(a["config"]), flatten(b["config"])
    changes = tuple(
        ConfigChange(key, flat_a.get(key), flat_b.get(key))
        for key in sorted(set(flat_a) | set(flat_b))
        if flat_a.get(key) != flat_b.get(key)
    )
    deltas = []
    for candidate in sorted(set(a["candidates"]) | set(b["candidates"])):
        for split in ("validation", "test"):
            for metric in METRICS:
                va = _number(a["candidates"].get(candidate, {}).get(split, {}).get(metric))
                vb = _number(b["candidates"].get(candidate, {}).get(split, {}).get(metric))
                delta = vb - va if va is not None and vb is not None else None
                deltas.append(MetricDelta(candidate, split, metric, va, vb, delta))
    fp_a, fp_b = _data_fingerprint(root, run_a), _data_fingerprint(root, run_b)
    code_keys = ("git_commit", "git_dirty", "code_hash")
    code_a = {k: a["code"].get(k) for k in code_keys}
    code_b = {k: b["code"].get(k) for k in code_keys}
    return RunDiff(
        run_a=a["run_id"], run_b=b["run_id"], config_changes=changes,
        data_fingerprint_a=fp_a, data_fingerprint_b=fp_b, same_data=fp_a is not None and fp_a == fp_b,
        code_a=code_a, code_b=code_b, same_code=code_a == code_b,
        metrics=tuple(deltas), push_a=_push_side(a), push_b=_push_side(b),
    )


def _show(value: Any) -> str:
    return "-" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def format_diff(diff: RunDiff) -> str:
    lines = [f"A: {diff.run_a}", f"B: {diff.run_b}", ""]
    lines.append(f"config: {len(diff.config_changes)} key(s) differ" if diff.config_changes else "config: identical")
    for change in diff.config_changes:
        lines.append(f"  {change.key}: {change.a!r} -> {change.b!r}")
    data = "same" if diff.same_data else f"DIFFERENT ({diff.data_fingerprint_a} vs {diff.data_fingerprint_b})"
    lines.append(f"data fingerprint: {data}")
    code = "same" if diff.same_code else f"DIFFERENT ({diff.code_a} vs {diff.code_b})"
    lines.append(f"code version: {code}")
    lines.append("")
    lines.append(f"{'candidate':<14} {'split':<11} {'metric':<9} {'A':>8} {'B':>8} {'B-A':>9}")
    for m in diff.metrics:
        delta = "-" if m.delta is None else f"{m.delta:+.4f}"
        lines.append(f"{m.candidate:<14} {m.split:<11} {m.metric:<9} {_show(m.a):>8} {_show(m.b):>8} {delta:>9}")
    lines.append("")
    for name, side in (("A", diff.push_a), ("B", diff.push_b)):
        verdict = "pushed " + str(side.model_tag) if side.pushed else "not pushed" if side.pushed is False else "no push stage"
        lines.append(f"push {name}: {side.status}, chose {side.chosen_model or '-'}, {verdict}")
        lines.extend(f"  {reason}" for reason in side.reasons)
    return "\n".join(lines)
