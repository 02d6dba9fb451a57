"""The model card: what an auditor reads before trusting the model, written with the evaluation.

Field names follow the Model Card Toolkit schema (model_details,
model_parameters, quantitative_analysis, considerations) so tools that read
those cards can read this one; ``model_card.md`` is the same content for people.
The card travels with the pushed model and the Bento's ``/metadata`` returns it.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from xray.entity.artifact_entity import (
    Calibration,
    DataIngestionArtifact,
    DataTransformationArtifact,
    ExternalCheck,
    Interval,
    OODGate,
    OODSuiteKind,
    OperatingPoint,
    ShortcutCheck,
    SubgroupMetrics,
)
from xray.evaluation.external import external_markdown
from xray.evaluation.shortcut import shortcut_markdown
from xray.typed import from_mapping, to_jsonable

CARD_JSON, CARD_MARKDOWN = "model_card.json", "model_card.md"
SYNTHETIC_NOTE = (
    "The data are SYNTHETIC demo phantoms drawn by `xray data demo`, not patient images: "
    "these numbers say nothing about clinical performance."
)
ONE_SNAPSHOT = (
    "Trained and tested on one dataset snapshot; performance on other scanners, sites or populations is unknown until "
    "measured there."
)
METRIC_NAMES = {"accuracy": "accuracy", "roc_auc": "ROC-AUC", "sensitivity": "sensitivity", "specificity": "specificity"}


def _number(value: float) -> float | None:
    return round(float(value), 4) if value is not None and math.isfinite(value) else None


def _metric(name: str, interval: Interval, slice_name: str = "test", threshold: float | None = None) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "type": name,
        "value": _number(interval.point),
        "slice": slice_name,
        "confidence_interval": {"lower_bound": _number(interval.lower), "upper_bound": _number(interval.upper)},
    }
    if threshold is not None:
        entry["threshold"] = round(threshold, 6)
    return entry


def build_card(
    run_id: str,
    architecture: str,
    ingestion: DataIngestionArtifact,
    transformation: DataTransformationArtifact,
    intervals: dict[str, Interval],
    bootstrap: dict[str, int],
    point: OperatingPoint | None,
    subgroups: tuple[SubgroupMetrics, ...],
    selection: str,
    calibration: Calibration | None = None,
    ood: OODGate | None = None,
    ood_suite: tuple[OODSuiteKind, ...] = (),
) -> dict[str, Any]:
    classes = list(transformation.class_names)
    threshold = point.threshold if point else None
    metrics = [_metric(k, v, threshold=threshold if k in ("sensitivity", "specificity") else None) for k, v in intervals.items()]
    for group in subgroups:
        slice_name = f"test, {group.column}={group.value} (n={group.count}{', small' if group.small else ''})"
        metrics += [_metric(k, v, slice_name, threshold if k in ("sensitivity", "specificity") else None) for k, v in group.intervals.items()]
    limitations = _limitations(ingestion, transformation, subgroups) + source_warnings(ingestion)
    overview = (
        f"{architecture} classifying chest radiographs into {', '.join(classes)}; chosen by {selection}."
        + (f" Flags {' or '.join(point.positive)} when P(positive) >= {point.threshold:.4f}." if point else "")
    )
    return {
        "schema": "Model Card Toolkit field names (model_details, model_parameters, quantitative_analysis, considerations)",
        "model_details": {
            "name": f"xray {architecture}",
            "overview": overview,
            "version": {"name": run_id, "date": datetime.now(timezone.utc).date().isoformat()},
            "documentation": "Produced by the xray pipeline; the run directory holds every artifact with its sha256.",
        },
        "model_parameters": {
            "model_architecture": architecture,
            "input_format": f"one grayscale radiograph (PNG, JPEG or DICOM), resized to {transformation.image_size} px",
            "output_format": "probability per class" + ("; positive flag at the operating point" if point else ""),
            "data": [{"name": "training and evaluation data", **_data_entry(ingestion, transformation)}],
        },
        "quantitative_analysis": {
            "performance_metrics": metrics,
            "bootstrap": bootstrap,
            "operating_point": _operating_point(point),
            "calibration": _calibration(calibration),
            "ood_gate": _ood_gate(ood, ood_suite),
        },
        "considerations": {
            "users": [{"description": "radiologists and clinical ML engineers evaluating the model; auditors"}],
            "use_cases": [{"description": "research and evaluation; triage support under a radiologist's review, never a diagnosis on its own"}],
            "limitations": [{"description": text} for text in limitations],
            "tradeoffs": [{"description": (
                f"The threshold favours sensitivity (target {point.target_sensitivity:.2f} on validation) over specificity."
                if point else "No operating point configured: the label is the most probable class."
            )}],
            "ethical_considerations": [{
                "name": "Performance may differ between patient groups (sex, age, view, site).",
                "mitigation_strategy": "Subgroup metrics with intervals are reported where the metadata CSV provides the columns.",
            }],
        },
    }


def _operating_point(point: OperatingPoint | None) -> dict[str, Any] | None:
    if point is None:
        return None
    return {
        "positive": list(point.positive),
        "target_sensitivity": point.target_sensitivity,
        "threshold": point.threshold,
        "chosen_on": "validation",
        "validation_sensitivity": _number(point.validation_sensitivity),
        "validation_specificity": _number(point.validation_specificity),
    }


def _calibration(calibration: Calibration | None) -> dict[str, Any] | None:
    if calibration is None:
        return None
    return {
        "method": calibration.method,
        "temperature": round(calibration.temperature, 6),
        "fitted_on": "validation",
        "ece": {
            "validation": {"before": _number(calibration.val_ece_before), "after": _number(calibration.val_ece_after)},
            "test": {"before": _number(calibration.test_ece_before), "after": _number(calibration.test_ece_after)},
        },
        "served": "calibrated probabilities; the operating point is chosen on them",
    }


def _ood_gate(ood: OODGate | None, suite: tuple[OODSuiteKind, ...]) -> dict[str, Any] | None:
    if ood is None:
        return None
    return {
        "method": ood.method,
        "description": "smallest class-conditional Mahalanobis distance on penultimate features, shared Ledoit-Wolf "
        "covariance fitted on training films (Lee et al. 2018); an ensemble averages its members' distances, "
        "each over its own threshold",
        "threshold": ood.threshold,
        "acceptance": ood.acceptance,
        "chosen_on": "validation",
        "validation_accepted": _number(ood.validation_accepted),
        "test_accepted": _number(ood.test_accepted),
        "external_accepted": {name: _number(share) for name, share in ood.external_accepted.items()},
        # how many only: the card travels with the pushed model and /metadata serves it to any caller
        "test_refused": len(ood.test_refused),
        "suite": [{"kind": k.kind, "inputs": k.count, "refused": k.refused, "refusal_rate": _number(k.refusal_rate),
                   "refused_by_ood_score": k.refused_by_ood_score} for k in suite],
    }


def _limitations(
    ingestion: DataIngestionArtifact, transformation: DataTransformationArtifact, subgroups: tuple[SubgroupMetrics, ...]
) -> list[str]:
    limitations = [
        ONE_SNAPSHOT,
        f"Input is reduced to {transformation.image_size}x{transformation.image_size} grayscale; findings smaller than a few pixels at that size cannot be seen.",
        "Intervals are bootstrap percentiles over test images, not patients: where one patient has several test films, they are too narrow.",
    ]
    if ingestion.source_kind == "demo":
        limitations.insert(0, SYNTHETIC_NOTE)
    if ingestion.grouping.startswith("none"):
        limitations.append("No patient grouping was given (ingestion.group_by): one patient's films may sit in both training and test.")
    small = [f"{g.column}={g.value} (n={g.count})" for g in subgroups if g.small]
    if small:
        limitations.append(f"Small subgroups, read their intervals with care: {', '.join(small)}.")
    return limitations


def _data_entry(ingestion: DataIngestionArtifact, transformation: DataTransformationArtifact) -> dict[str, Any]:
    """Where the data came from and how they were split: the card's provenance."""
    return {
        "source": ingestion.source_uri,
        "source_kind": ingestion.source_kind,
        "synthetic": ingestion.source_kind == "demo",
        "fingerprint": ingestion.data_fingerprint,
        "counts": transformation.counts,
        "grouping": ingestion.grouping,
        "patient_groups": ingestion.num_groups,
        "split_strategy": transformation.split_strategy,
        "dicom_images": ingestion.dicom_images,
        "unreadable_files": len(ingestion.unreadable),
        "patients_across_source_splits": len(ingestion.group_leakage),
        "duplicates_across_source_splits": len(ingestion.leakage),
        "quality_profile": quality_section(ingestion),
        "sources_per_class": class_sources(ingestion),
    }


def class_sources(ingestion: DataIngestionArtifact) -> dict[str, dict[str, int]]:
    """Per class, the films each source of a manifest gave it (empty for a single source)."""
    return {
        name: {s.name: s.counts[name] for s in ingestion.sources if s.counts.get(name)}
        for name in ingestion.class_names
        if any(s.counts.get(name) for s in ingestion.sources)
    }


def source_warnings(ingestion: DataIngestionArtifact) -> list[str]:
    """A class whose films all came from one of several sources may be recognised by that source's look
    (scanner, hospital, age group) instead of its disease: said in plain words, per class; and a source
    that names no patients may have one patient's films on both sides of the split."""
    if len(ingestion.sources) < 2:
        return []
    warnings = [
        f"Every {name} film came from {next(iter(per_source))}: the model may have learned that source's look "
        f"rather than the disease. Check it on {name} films from another source before trusting it there."
        for name, per_source in class_sources(ingestion).items()
        if len(per_source) == 1
    ]
    ungrouped = [s.name for s in ingestion.sources if s.grouping == "none"]
    if ungrouped and len(ungrouped) < len(ingestion.sources):
        warnings.append(f"No patient grouping for source(s) {', '.join(ungrouped)} (group_by in the manifest): "
                        "one patient's films from there may sit in both training and test.")
    return warnings


def render_markdown(card: dict[str, Any]) -> str:
    details, params = card["model_details"], card["model_parameters"]
    analysis, considerations = card["quantitative_analysis"], card["considerations"]
    data = params["data"][0]
    lines = [f"# Model card: {details['name']}", "", details["overview"], ""]
    if data["synthetic"]:
        lines += [f"> **{SYNTHETIC_NOTE}**", ""]
    lines += [
        f"Version `{details['version']['name']}` ({details['version']['date']}).", "",
        "## Data", "",
        f"- source: `{data['source']}` ({data['source_kind']}); fingerprint `{data['fingerprint'][:16]}…`",
        "- images per split: " + "; ".join(f"{s}: {sum(c.values())} ({', '.join(f'{k} {v}' for k, v in c.items())})" for s, c in data["counts"].items()),
        *[f"- {name} films came from: " + ", ".join(f"{s} {n}" for s, n in per_source.items())
          for name, per_source in data.get("sources_per_class", {}).items()],
        f"- grouping: {data['grouping']}; {data['patient_groups']} groups; split: {data['split_strategy']}",
        f"- DICOM images: {data['dicom_images']}; unreadable files excluded: {data['unreadable_files']}; "
        f"patients across source splits: {data['patients_across_source_splits']}",
        "",
    ]
    lines += quality_markdown(data.get("quality_profile"))
    point = analysis["operating_point"]
    if point:
        lines += [
            "## Operating point", "",
            f"Positive: {', '.join(point['positive'])}; threshold {point['threshold']:.4f} on P(positive), chosen on validation "
            f"for sensitivity ≥ {point['target_sensitivity']} (validation: sensitivity {point['validation_sensitivity']}, "
            f"specificity {point['validation_specificity']}).", "",
        ]
    lines += _calibration_lines(analysis.get("calibration")) + _ood_lines(analysis.get("ood_gate"))
    lines += [
        f"## Metrics (bootstrap 95 % intervals, {analysis['bootstrap'].get('resamples')} resamples, seed {analysis['bootstrap'].get('seed')})",
        "", "| slice | metric | value | 95 % interval |", "|---|---|---|---|",
    ]
    for m in analysis["performance_metrics"]:
        ci = m["confidence_interval"]
        interval = "–" if ci["lower_bound"] is None else f"{ci['lower_bound']:.4f} – {ci['upper_bound']:.4f}"
        value = "–" if m["value"] is None else f"{m['value']:.4f}"
        lines.append(f"| {m['slice']} | {METRIC_NAMES.get(m['type'], m['type'])} | {value} | {interval} |")
    lines += _generalization_markdown(card)
    lines += ["", "## Intended use", ""] + [f"- {u['description']}" for u in considerations["use_cases"]]
    lines += ["", "## Limitations", ""] + [f"- {x['description']}" for x in considerations["limitations"]]
    lines += ["", "## Trade-offs", ""] + [f"- {x['description']}" for x in considerations["tradeoffs"]]
    return "\n".join(lines) + "\n"


def _calibration_lines(calibration: dict[str, Any] | None) -> list[str]:
    if not calibration:
        return []
    ece = calibration["ece"]
    return [
        "## Calibration", "",
        f"{calibration['method']} scaling, T = {calibration['temperature']:.4f}, fitted on validation; served probabilities "
        f"are calibrated. Top-label ECE before → after: validation {ece['validation']['before']} → {ece['validation']['after']}, "
        f"test {ece['test']['before']} → {ece['test']['after']} (reliability curves: `reliability.png`).", "",
    ]


def _ood_lines(ood: dict[str, Any] | None) -> list[str]:
    if not ood:
        return []
    lines = [
        "## Out-of-distribution gate", "",
        f"{ood['description']}. Accepted when the score is ≤ {ood['threshold']:.4f}, set on validation to accept "
        f"{ood['acceptance']:.0%} of its films; accepted: validation {ood['validation_accepted']}, test {ood['test_accepted']}"
        + "".join(f", external {name} {share}" for name, share in ood.get("external_accepted", {}).items()) + ".", "",
    ]
    if ood.get("test_refused"):
        lines += [f"Test films refused by the score: {ood['test_refused']}, named in the run's evaluation artifact "
                  "(`ood.test_refused`).", ""]
    if ood["suite"]:
        lines += ["| OOD suite kind | inputs | refused | rate |", "|---|---|---|---|"]
        lines += [f"| {k['kind']} | {k['inputs']} | {k['refused']} | {k['refusal_rate']} |" for k in ood["suite"]] + [""]
    return lines
def quality_section(ingestion: DataIngestionArtifact) -> dict[str, Any] | None:
    """The ingested films' quality profile (xray/data/quality.py): what a degraded copy of a dataset shows."""
    profile = ingestion.quality
    if profile is None:
        return None
    return {
        "films": profile.films,
        "short_side_px": asdict(profile.short_side),
        "bit_depth": profile.bit_depth,
        "grey_levels": asdict(profile.grey_levels),
        "top_16_levels_share": asdict(profile.top_levels_share),
        "sharpness_laplacian_variance": asdict(profile.sharpness),
        "check_share": profile.check_share,
        "flagged_films": len(profile.flagged),
        "policy": profile.policy,
        "excluded": profile.excluded,
        "warnings": list(profile.warnings),
    }


def quality_markdown(section: dict[str, Any] | None) -> list[str]:
    """The card's "Data quality" lines; a card from before the profile existed says so."""
    if section is None:
        return ["## Data quality", "", "No quality profile: the data were ingested before the input checks existed.", ""]

    def spread(entry: dict[str, float], digits: int = 0) -> str:
        return f"{entry['min']:.{digits}f} / {entry['median']:.{digits}f} / {entry['max']:.{digits}f}"

    shares = ", ".join(f"{code} {share:.1%}" for code, share in section["check_share"].items())
    lines = [
        "## Data quality", "",
        f"- {section['films']} films; short side (min / median / max) {spread(section['short_side_px'])} px; "
        f"bits per sample: " + ", ".join(f"{bits}: {n}" for bits, n in section["bit_depth"].items()),
        f"- distinct grey levels {spread(section['grey_levels'])}; share of pixels in 16 levels "
        f"{spread(section['top_16_levels_share'], 2)}; sharpness (variance of the Laplacian) {spread(section['sharpness_laplacian_variance'])}",
        f"- share each input check would refuse: {shares}",
        f"- films flagged: {section['flagged_films']}; policy `{section['policy']}`, excluded: {section['excluded']}",
    ]
    lines += [f"- **warning:** {text}" for text in section["warnings"]]
    return lines + [""]


def with_generalization(card: dict[str, Any], external: ExternalCheck | None, shortcut: ShortcutCheck | None) -> dict[str, Any]:
    """The card with the external checks and the shortcut probes: in quantitative_analysis, and what they mean in limitations."""
    card = copy.deepcopy(card)
    analysis = card["quantitative_analysis"]
    analysis["external_checks"] = to_jsonable(external) if external is not None else None
    analysis["shortcut_check"] = to_jsonable(shortcut) if shortcut is not None else None
    limitations = card["considerations"]["limitations"]
    notes = _generalization_limitations(external, shortcut)
    at = next((i for i, x in enumerate(limitations) if x["description"] == ONE_SNAPSHOT), len(limitations))
    if external is not None and at < len(limitations):
        limitations.pop(at)
    limitations[at:at] = [{"description": text} for text in notes]
    return card


def _generalization_limitations(external: ExternalCheck | None, shortcut: ShortcutCheck | None) -> list[str]:
    notes = []
    if shortcut is not None and shortcut.warning:
        notes.append(shortcut.warning)
    if external is None:
        return notes
    names = ", ".join(s.name for s in external.sources)
    notes.append(f"Checked on films from {len(external.sources)} other source(s) ({names}); on any other source, performance is unknown.")
    for source in external.sources:
        for r in source.per_class:
            if r.recall is not None and r.recall < 0.5:
                called = r.misses_text()
                notes.append(
                    f"On {source.name}, only {r.correct} of {r.films} {r.model_class} films were called {r.model_class} "
                    f"(recall {r.recall:.4f}); the others were called {called}."
                )
    if external.no_external_films:
        notes.append(f"No external films of {', '.join(external.no_external_films)}: how the model does on them elsewhere is unknown.")
    return notes


def _generalization_markdown(card: dict[str, Any]) -> list[str]:
    """The card's external checks and shortcut probes as markdown (empty when neither was measured)."""
    analysis, lines = card["quantitative_analysis"], []
    if analysis.get("external_checks"):
        check = from_mapping(ExternalCheck, analysis["external_checks"])
        lines += ["", "## External checks", "", *external_markdown(check, card["model_parameters"]["model_architecture"])]
    if analysis.get("shortcut_check"):
        lines += ["", "## Shortcut check", "", *shortcut_markdown(from_mapping(ShortcutCheck, analysis["shortcut_check"]))]
    return lines


def write_card(card: dict[str, Any], out: Path) -> tuple[Path, Path]:
    json_path, md_path = out / CARD_JSON, out / CARD_MARKDOWN
    json_path.write_text(json.dumps(card, indent=2) + "\n")
    md_path.write_text(render_markdown(card))
    return json_path, md_path
