"""External checks: score models on full-size films from other sources, through serving's path.

Validation and test come from the training source; a model can look perfect
there and still fail on another hospital's films (a Covid19 model that learned
"adult chest -> Covid" calls 149 of 150 healthy NIH adults Covid). Each entry of
``evaluation.external`` names a folder of class subfolders from one other source
and maps its folders to model classes; a source may cover only some classes, and
a class no source covers is reported as having no external films. Every film goes
through ``load_for_model``, the exact path ``/predict`` uses (including the
MedMNIST crop-and-shrink contract), so the figures measure what a service would
do with such films: per source and class the recall, what the misses were
called, and ROC-AUC where the source holds two or more classes; and the same pooled.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from xray.entity.artifact_entity import ExternalCheck, ExternalClassResult, ExternalSourceResult
from xray.entity.config_entity import EvaluationConfig, ExternalSource, GateConfig
from xray.errors import ConfigError, DataError
from xray.data.preprocessing import IMAGE_SUFFIXES, ImageDecodeError, Preprocessing, load_for_model
from xray.data.sources.manifest import source_name

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResolvedSource:
    """An external source with its folders resolved to model classes."""

    uri: str
    name: str  # the folder's name (its parent's for a train/ or holdout/ part), made unique: how tables and the gate call it
    classes: dict[str, str]  # folder -> model class


@dataclass(frozen=True)
class ExternalFilms:
    """Every external source's films decoded for the model, in one array: one inference pass scores them all."""

    sources: tuple[ResolvedSource, ...]
    pixels: np.ndarray  # uint8 N×S×S, at the model's input size
    labels: np.ndarray  # int64 N: indices into the model's classes
    source: np.ndarray  # int64 N: index into ``sources``
    unreadable: tuple[tuple[str, ...], ...]  # per source, the images that could not be decoded


def resolve_sources(sources: tuple[ExternalSource, ...], class_names: tuple[str, ...]) -> tuple[ResolvedSource, ...]:
    """Each source's folder -> model class map, checked against the model's classes (ConfigError naming the key)."""
    resolved, seen = [], set()
    for index, source in enumerate(sources):
        key = f"evaluation.external[{index}]"
        root = Path(source.uri)
        if not root.is_dir():
            raise ConfigError(f"config: {key}.uri must be a local folder of CLASS/ subfolders, got {source.uri!r}")
        classes = dict(source.classes) or {p.name: p.name for p in sorted(root.iterdir()) if p.is_dir() and p.name in class_names}
        if not classes:
            raise ConfigError(
                f"config: {key}: no folder of {source.uri} is named like a model class ({', '.join(class_names)}); "
                "map its folders with classes: {FOLDER: MODEL_CLASS}"
            )
        for folder, name in classes.items():
            if name not in class_names:
                raise ConfigError(
                    f"config: {key}.classes.{folder} maps to unknown class {name!r} (classes: {', '.join(class_names)})"
                )
        name = source_name(str(root.resolve())) or source.uri  # named as a manifest names it: holdout/ takes its parent's
        unique = name if name not in seen else f"{name} ({index})"
        seen.add(unique)
        resolved.append(ResolvedSource(uri=source.uri, name=unique, classes=classes))
    return tuple(resolved)


def check_class_maps(evaluation: EvaluationConfig, gate: GateConfig, class_names: tuple[str, ...]) -> None:
    """Once the data are known (before training): every mapped class and every gated class is a model class."""
    resolve_sources(evaluation.external, class_names)
    if isinstance(gate.min_external_recall, dict):
        for name in gate.min_external_recall:
            if name not in class_names:
                raise ConfigError(
                    f"config: gate.min_external_recall.{name}: unknown class {name!r} (classes: {', '.join(class_names)})"
                )


def external_files(source: ResolvedSource, class_names: tuple[str, ...]) -> list[tuple[Path, int]]:
    """(film, model-class index) for every image under the source's mapped folders, in a fixed order."""
    files = []
    for folder, name in source.classes.items():
        path = Path(source.uri) / folder
        if not path.is_dir():
            raise DataError(f"evaluation.external: no folder {folder!r} in {source.uri} (for class {name!r})")
        images = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise DataError(f"evaluation.external: {path} holds no PNG, JPEG or DICOM images")
        files += [(p, class_names.index(name)) for p in images]
    return files


def listing(sources: tuple[ExternalSource, ...]) -> list[tuple[str, int]]:
    """(path, size) of every file under the sources: in the evaluation's fingerprint, so changed films are re-scored."""
    return [
        (str(p), p.stat().st_size)
        for source in sources if Path(source.uri).is_dir()
        for p in sorted(Path(source.uri).rglob("*")) if p.is_file()
    ]


def load_external(sources: tuple[ExternalSource, ...], class_names: tuple[str, ...], contract: Preprocessing) -> ExternalFilms:
    """Decode every source's films through ``load_for_model``; unreadable ones are skipped and listed."""
    resolved = resolve_sources(sources, class_names)
    pixels, labels, origin, unreadable = [], [], [], []
    for index, source in enumerate(resolved):
        files = external_files(source, class_names)
        decoded = _decode_all([p for p, _ in files], contract)
        kept = [(image, label) for image, (_, label) in zip(decoded, files) if image is not None]
        if not kept:
            raise DataError(f"evaluation.external: none of the {len(files)} images under {source.uri} could be read")
        pixels += [image for image, _ in kept]
        labels += [label for _, label in kept]
        origin += [index] * len(kept)
        unreadable.append(tuple(str(p) for image, (p, _) in zip(decoded, files) if image is None))
    return ExternalFilms(
        sources=resolved, pixels=np.stack(pixels), labels=np.array(labels, dtype=np.int64),
        source=np.array(origin, dtype=np.int64), unreadable=tuple(unreadable),
    )


def _decode_all(paths: list[Path], contract: Preprocessing) -> list[np.ndarray | None]:
    def decode(path: Path) -> np.ndarray | None:
        try:
            return load_for_model(path, contract)
        except ImageDecodeError as exc:
            logger.warning("external check: skipping %s: %s", path, exc)
            return None

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        return list(pool.map(decode, paths))


def score_external(films: ExternalFilms, probs: np.ndarray, class_names: tuple[str, ...]) -> ExternalCheck:
    """One model's probabilities on ``films`` -> per source and class, pooled per class, and the uncovered classes."""
    sources = []
    for index, source in enumerate(films.sources):
        mask = films.source == index
        folders = {c: tuple(f for f, name in source.classes.items() if name == c) for c in class_names}
        per_class = _class_results(films.labels[mask], probs[mask], class_names, folders)
        sources.append(ExternalSourceResult(
            uri=source.uri, name=source.name, classes=dict(source.classes), films=int(mask.sum()),
            per_class=tuple(r for r in per_class if r.films), roc_auc=_macro_auc(per_class),
            unreadable=films.unreadable[index],
        ))
    folders = {
        c: tuple(f"{s.name}/{f}" for s in films.sources for f, name in s.classes.items() if name == c) for c in class_names
    }
    pooled = _class_results(films.labels, probs, class_names, folders)
    return ExternalCheck(
        sources=tuple(sources), pooled=tuple(pooled),
        no_external_films=tuple(r.model_class for r in pooled if not r.films), roc_auc=_macro_auc(pooled),
    )


def _class_results(
    labels: np.ndarray, probs: np.ndarray, class_names: tuple[str, ...], folders: dict[str, tuple[str, ...]]
) -> list[ExternalClassResult]:
    """Every model class: films, recall, misses by predicted class, one-vs-rest AUC among the classes present."""
    from sklearn.metrics import roc_auc_score

    predicted = probs.argmax(axis=1)
    present = [c for c in range(len(class_names)) if (labels == c).any()]
    among = np.isin(labels, present)
    results = []
    for c, name in enumerate(class_names):
        own = labels == c
        films, correct = int(own.sum()), int((predicted[own] == c).sum())
        misses = {class_names[p]: int((predicted[own] == p).sum()) for p in range(len(class_names)) if p != c}
        auc = None
        if films and len(present) >= 2:
            auc = float(roc_auc_score(own[among], probs[among, c]))
        results.append(ExternalClassResult(
            model_class=name, films=films, correct=correct, recall=correct / films if films else None,
            misses={k: v for k, v in misses.items() if v}, roc_auc=auc, folders=folders.get(name, ()),
            recall_interval=tuple(round(bound, 4) for bound in wilson_interval(correct, films)) if films else None,
        ))
    return results


def wilson_interval(correct: int, films: int, level: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval on ``correct / films`` (scipy): honest at 0 or all right, unlike the normal one.

    Also what ``scripts/bench_time_to_accuracy.py`` puts on held-out accuracies.
    """
    from scipy.stats import binomtest

    interval = binomtest(correct, films).proportion_ci(confidence_level=level, method="wilson")
    return float(interval.low), float(interval.high)


def _macro_auc(results: list[ExternalClassResult]) -> float | None:
    values = [r.roc_auc for r in results if r.roc_auc is not None]
    return float(np.mean(values)) if values else None


def _figure(value: float | None) -> str:
    return "–" if value is None else f"{value:.4f}"


def _misses(result: ExternalClassResult) -> str:
    return result.misses_text() or "–"


def external_markdown(check: ExternalCheck, model: str) -> list[str]:
    """The external checks as a markdown table: each source's classes, then every class pooled over sources."""
    lines = [
        f"External checks: {model} on films from other sources, through the serving path (`load_for_model`, its TTA).",
        "", "| source | class | films | recall | 95 % interval (Wilson) | misses called | ROC-AUC (one-vs-rest) |",
        "|---|---|---|---|---|---|---|",
    ]
    for source in check.sources:
        lines += [
            f"| {source.name} | {r.model_class} | {r.films} | {_figure(r.recall)} | {r.interval_text()} | {_misses(r)} | {_figure(r.roc_auc)} |"
            for r in source.per_class
        ]
    for r in check.pooled:
        if r.films:
            lines.append(
                f"| all sources | {r.model_class} | {r.films} | {_figure(r.recall)} | {r.interval_text()} | {_misses(r)} | {_figure(r.roc_auc)} |"
            )
        else:
            lines.append(f"| all sources | {r.model_class} | 0 | no external films | – | – | – |")
    lines.append("")
    for source in check.sources:
        auc = f"; ROC-AUC {source.roc_auc:.4f} (macro one-vs-rest over its classes)" if source.roc_auc is not None else (
            "; one class only, no ROC-AUC")
        skipped = f"; {len(source.unreadable)} unreadable, skipped" if source.unreadable else ""
        lines.append(f"- {source.name}: `{source.uri}`, {source.films} films{auc}{skipped}")
    if check.no_external_films:
        lines.append(
            f"- no external films: {', '.join(check.no_external_films)}; how the model does on such films from other sources is unknown "
            "(not gated by gate.min_external_recall)"
        )
    return lines
