"""Stage 1: take a dataset snapshot from a URI, validate it, record exactly what was taken.

The source is chosen from the URI by one registry (xray/data/sources/registry.py):
``demo`` (synthetic phantoms, generated into the run), a local folder
(``CLASS/…`` or ``train|val|test/CLASS/…``), a MedMNIST-style ``.npz``, or
``s3://bucket/prefix`` (mirrored incrementally, then hard-linked into the run
so the snapshot cannot change under it). This stage adds what every source
shares: patient groups, class counts, duplicates and leakage, the artifact.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter, defaultdict
from dataclasses import asdict, replace

from xray.data.grouping import Grouper
from xray.data.sources.base import Place, Scan, Snapshot
from xray.data.sources.registry import source_for
from xray.entity.artifact_entity import DataIngestionArtifact, DuplicateGroup, GroupLeak, Item
from xray.entity.config_entity import PipelineConfig
from xray.errors import DataError
from xray.evaluation.operating_point import positive_indices
from xray.data.quality import profile_dataset
from xray.pipeline.stage import Inputs, StageContext
from xray.pipeline.store import fingerprint as fingerprint_of, new_header, stage_code_hash

logger = logging.getLogger(__name__)

STAGE = "data_ingestion"
CACHED = False  # a URI may hold other data tomorrow: always read it


def fingerprint(config: PipelineConfig, inputs: Inputs) -> str:
    """The code this stage runs: ingestion is never reused by fingerprint, because what a URI holds is only
    known by reading it; its artifact's fingerprint adds what it found (the data and their grouping)."""
    return fingerprint_of(STAGE, {}, [], stage_code_hash(__name__))


def run(ctx: StageContext, inputs: Inputs) -> DataIngestionArtifact:
    config, run_dir = ctx.config, ctx.run
    uri = config.data_uri.strip()
    grouper = Grouper.from_config(config.ingestion.group_by, config.ingestion.metadata_csv)
    out = run_dir.stage_dir(STAGE)
    kind, snapshot, scan = _take(uri, config, Place(out, run_dir.root))
    class_names, unreadable = scan.class_names, scan.unreadable
    dataset_path = run_dir.relative(snapshot.root) if snapshot.copied else str(snapshot.root)
    # a source that groups its own films (a manifest: patients within each source) keeps its grouping
    items = scan.items if scan.grouping is not None else _with_groups(scan.items, grouper)
    items, quality = profile_dataset(snapshot.root, kind, items, config, scan.median_side)  # input checks on every film
    counts = _counts(items)
    _check_classes(counts, class_names, config.ingestion.min_images_per_class, uri)
    # the configured operating point must name classes that exist: a typo fails now, not after training
    positive_indices(config.evaluation.operating_point.positive, tuple(class_names))
    duplicates = _duplicate_groups(items)
    leakage = tuple(g for g in duplicates if len(set(g.splits)) > 1)
    group_leakage = _group_leakage(items)
    _report_leakage(leakage, group_leakage, config.ingestion.leakage)
    if unreadable:
        logger.warning("%d unreadable file(s) excluded, e.g. %s: %s", len(unreadable), unreadable[0].path, unreadable[0].reason)
    index_file = out / "items.jsonl"
    with open(index_file, "w") as fh:
        for item in items:
            fh.write(json.dumps(asdict(item)) + "\n")
    data_fp = hashlib.sha256(
        "\n".join(sorted(f"{i.split}\t{i.label}\t{i.sha256}" for i in items)).encode()
    ).hexdigest()
    files = [index_file]
    if snapshot.copied:
        files += [p for p in snapshot.root.rglob("*") if p.is_file()]
    splits_given = tuple(s for s in ("train", "val", "test") if s in counts)
    logger.info(
        "ingested %d images in %d classes from %s (%s); splits given: %s",
        len(items), len(class_names), uri, kind, ", ".join(splits_given) or "none",
    )
    found_fp = fingerprint_of(STAGE, _found(config, class_names, items), [data_fp], ctx.fingerprint)
    return DataIngestionArtifact(
        header=new_header(run_dir, DataIngestionArtifact, STAGE, found_fp, files=files),
        source_uri=uri, source_kind=kind, dataset_path=dataset_path, class_names=tuple(class_names),
        splits_given=splits_given, counts=counts, num_images=len(items), data_fingerprint=data_fp,
        index_file=run_dir.relative(index_file), median_image_side=scan.median_side, unreadable=tuple(unreadable),
        duplicates=duplicates, leakage=leakage, s3_objects=snapshot.objects,
        grouping=scan.grouping if scan.grouping is not None else grouper.describe(), sources=scan.sources,
        num_groups=len({i.group or i.sha256 for i in items}), group_leakage=group_leakage,
        metadata_columns=tuple(sorted({k for i in items for k in i.metadata})),
        dicom_images=sum(1 for i in items if i.dicom is not None),
        quality=quality,
    )


def _take(uri: str, config: PipelineConfig, place: Place) -> tuple[str, Snapshot, Scan]:
    """(kind, snapshot, scan) from the source the registry chooses for the URI."""
    source = source_for(uri)
    snapshot = source.snapshot(uri, config.ingestion, place)
    return source.kind, snapshot, source.scan(snapshot, config.ingestion)


def _found(config: PipelineConfig, class_names: list[str], items: list[Item]) -> dict[str, object]:
    """What, besides the images' content, makes the ingested data what they are: checks, names and grouping."""
    return {
        "leakage": config.ingestion.leakage,
        "min": config.ingestion.min_images_per_class,
        "names": class_names,
        "groups": hashlib.sha256(
            "\n".join(f"{i.ref}\t{i.group}\t{sorted(i.metadata.items())}" for i in items).encode()
        ).hexdigest(),
    }


def _report_leakage(leakage: tuple[DuplicateGroup, ...], group_leakage: tuple[GroupLeak, ...], policy: str) -> None:
    problems = []
    if leakage:
        problems.append(
            f"{len(leakage)} image(s) appear in more than one split (exact duplicates), e.g. "
            f"{', '.join(leakage[0].items[:2])}"
        )
    if group_leakage:
        problems.append(
            f"{len(group_leakage)} patient(s) have films in more than one source split, e.g. "
            f"{group_leakage[0].group} in {', '.join(group_leakage[0].splits)}"
        )
    for message in problems:
        if policy == "fail":
            raise DataError(f"leakage: {message} (set ingestion.leakage=warn to continue)")
        logger.warning("leakage: %s", message)


# ------------------------------------------------------------------ checks


def _counts(items: list[Item]) -> dict[str, dict[str, int]]:
    counts: dict[str, Counter[str]] = defaultdict(Counter)
    for item in items:
        counts[item.split][item.label] += 1
    return {split: dict(sorted(c.items())) for split, c in sorted(counts.items())}


def _check_classes(counts: dict[str, dict[str, int]], class_names: list[str], minimum: int, uri: str) -> None:
    totals: Counter[str] = Counter()
    for per_class in counts.values():
        totals.update(per_class)
    if not totals:
        raise DataError(f"{uri}: no readable images")
    present = [c for c in class_names if totals[c] > 0]
    if len(present) < 2:
        raise DataError(f"{uri}: only one class ({present[0] if present else '-'}); a classifier needs at least two")
    small = {c: totals[c] for c in class_names if totals[c] < minimum}
    if small:
        listing = ", ".join(f"{c} ({n})" for c, n in small.items())
        raise DataError(f"{uri}: too few images in class {listing}; at least {minimum} needed (ingestion.min_images_per_class)")
    if "train" in counts:
        missing = [c for c in class_names if counts["train"].get(c, 0) == 0]
        if missing:
            raise DataError(f"{uri}: class {', '.join(missing)} has no training images")


def _with_groups(items: list[Item], grouper: Grouper) -> list[Item]:
    grouped = []
    for item in items:
        group, metadata = grouper.assign(item.ref)
        grouped.append(replace(item, group=group, metadata={**item.metadata, **metadata}))  # kept: a source may name the film's source
    return grouped


def _group_leakage(items: list[Item]) -> tuple[GroupLeak, ...]:
    """Patients whose films sit in more than one split the source defines."""
    splits: dict[str, set[str]] = defaultdict(set)
    for item in items:
        if item.group is not None and item.split != "all":
            splits[item.group].add(item.split)
    return tuple(GroupLeak(group=g, splits=tuple(sorted(s))) for g, s in sorted(splits.items()) if len(s) > 1)


def _duplicate_groups(items: list[Item]) -> tuple[DuplicateGroup, ...]:
    by_hash: dict[str, list[Item]] = defaultdict(list)
    for item in items:
        by_hash[item.sha256].append(item)
    return tuple(
        DuplicateGroup(
            sha256=digest,
            items=tuple(f"{i.split}/{i.ref}" for i in group),
            splits=tuple(i.split for i in group),
            labels=tuple(i.label for i in group),
        )
        for digest, group in sorted(by_hash.items())
        if len(group) > 1
    )
