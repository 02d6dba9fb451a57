"""Stage 1: take a dataset snapshot from a URI, validate it, record exactly what was taken.

Sources: ``demo`` (synthetic phantoms, generated into the run), a local folder
(``CLASS/…`` or ``train|val|test/CLASS/…``), a MedMNIST-style ``.npz``, or
``s3://bucket/prefix`` (mirrored incrementally, then hard-linked into the run
so the snapshot cannot change under it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import zipfile
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from xray.entity.artifact_entity import DataIngestionArtifact, DuplicateGroup, GroupLeak, Item, SourceObject, UnreadableFile
from xray.entity.config_entity import PipelineConfig
from xray.errors import DataError
from xray.data.grouping import Grouper
from xray.evaluation.operating_point import positive_indices
from xray.data.preprocessing import DICOM_SUFFIXES, IMAGE_SUFFIXES, ImageDecodeError, decode_grayscale, open_image
from xray.data.snapshot import load_npz_split
from xray.data.sources.manifest import ingest_manifest, is_manifest
from xray.pipeline.stage import Inputs, StageContext
from xray.pipeline.store import RunDir, fingerprint as fingerprint_of, new_header, sha256_file, stage_code_hash

logger = logging.getLogger(__name__)

STAGE = "data_ingestion"
CACHED = False  # a URI may hold other data tomorrow: always read it
SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
NPZ_SPLITS = ("train", "val", "test")


def fingerprint(config: PipelineConfig, inputs: Inputs) -> str:
    """The code this stage runs: ingestion is never reused by fingerprint, because what a URI holds is only
    known by reading it; its artifact's fingerprint adds what it found (the data and their grouping)."""
    return fingerprint_of(STAGE, {}, [], stage_code_hash(__name__))


def run(ctx: StageContext, inputs: Inputs) -> DataIngestionArtifact:
    config, run_dir = ctx.config, ctx.run
    uri = config.data_uri.strip()
    grouper = Grouper.from_config(config.ingestion.group_by, config.ingestion.metadata_csv)
    out = run_dir.stage_dir(STAGE)
    # a manifest of sources (--data sources.yaml): each film keeps its source, patients grouped within it
    manifest = (
        ingest_manifest(uri, config.ingestion, run_dir.root / ".s3-mirror", out / "snapshot", _scan_folder)
        if is_manifest(uri) else None
    )
    root, kind, dataset_path, s3_objects = manifest.snapshot(run_dir.path) if manifest else _snapshot(uri, config, run_dir, out)
    if manifest:
        items, class_names, unreadable, median_side = manifest.scanned()
    elif kind == "npz":
        items, class_names, unreadable, median_side = _scan_npz(root, config.ingestion.class_names)
    else:
        items, class_names, unreadable, median_side = _scan_folder(root)
    items = items if manifest else _with_groups(items, grouper)
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
    if kind in ("demo", "s3") or s3_objects:
        files += [p for p in (out / "snapshot" if manifest else run_dir.path / dataset_path).rglob("*") if p.is_file()]
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
        index_file=run_dir.relative(index_file), median_image_side=median_side, unreadable=tuple(unreadable),
        duplicates=duplicates, leakage=leakage, s3_objects=s3_objects,
        grouping=manifest.grouping if manifest else grouper.describe(), sources=manifest.sources if manifest else (),
        num_groups=len({i.group or i.sha256 for i in items}), group_leakage=group_leakage,
        metadata_columns=tuple(sorted({k for i in items for k in i.metadata})),
        dicom_images=sum(1 for i in items if i.dicom is not None),
    )


def _snapshot(uri: str, config: PipelineConfig, run_dir: RunDir, out: Path) -> tuple[Path, str, str, tuple[SourceObject, ...]]:
    """(dataset root, kind, the artifact's dataset_path, S3 objects): demo and S3 data are copied into the run."""
    if uri == "demo":
        from xray.data.demo_data import generate_demo_dataset

        root = out / "snapshot"
        generate_demo_dataset(root, images_per_class=config.ingestion.demo_images_per_class)
        return root, "demo", run_dir.relative(root), ()
    if uri.startswith("s3://"):
        root, s3_objects = _snapshot_s3(uri, config, run_dir, out)
        return root, "s3", run_dir.relative(root), s3_objects
    try:  # '~nosuchuser' raises RuntimeError, a 300-character name OSError: both are just not there
        root = Path(uri).expanduser()
        found = root.exists()
    except (RuntimeError, OSError, ValueError):
        found = False
    if not found:
        raise DataError(f"data source not found: {uri}")
    root = root.resolve()
    kind = "npz" if root.is_file() else "folder"
    if kind == "npz" and root.suffix != ".npz":
        raise DataError(f"{uri} is a file but not an .npz archive")
    return root, kind, str(root), ()


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


# ------------------------------------------------------------------ folders


def _scan_folder(root: Path) -> tuple[list[Item], list[str], list[UnreadableFile], int]:
    top = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not top:
        raise DataError(f"{root} holds no class folders (expected CLASS/… or train/CLASS/…)")
    split_layout = all(p.name.lower() in SPLIT_NAMES for p in top)
    if split_layout and not any(SPLIT_NAMES[p.name.lower()] == "train" for p in top):
        raise DataError(f"{root} has split folders but no train/ folder")
    candidates: list[tuple[str, str, Path]] = []  # split, label, path
    for split_dir in top if split_layout else [root]:
        split = SPLIT_NAMES[split_dir.name.lower()] if split_layout else "all"
        for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
            for path in sorted(class_dir.rglob("*")):
                if path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_SUFFIXES:
                    candidates.append((split, class_dir.name, path))
    if not candidates:
        raise DataError(f"{root} holds no PNG, JPEG or DICOM images")

    sides: dict[str, int] = {}

    def check(entry: tuple[str, str, Path]) -> Item | UnreadableFile:
        split, label, path = entry
        ref = path.relative_to(root).as_posix()
        dicom = None
        try:
            if path.suffix.lower() in DICOM_SUFFIXES:  # decoded in full: a syntax without a decoder shows here
                pixels, info = decode_grayscale(path)
                sides[ref] = min(pixels.shape)
                dicom = asdict(info) if info is not None else None
            else:
                image = open_image(path, draft_size=64, keep_size=True)
                sides[ref] = min(image.info["xray_original_size"])
        except ImageDecodeError as exc:
            return UnreadableFile(path=ref, reason=str(exc))
        return Item(split=split, label=label, ref=ref, sha256=sha256_file(path), dicom=dicom)

    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) * 2)) as pool:
        results = list(tqdm(pool.map(check, candidates), total=len(candidates), desc="validate", unit="img", leave=False, disable=None))
    items = [r for r in results if isinstance(r, Item)]
    unreadable = [r for r in results if isinstance(r, UnreadableFile)]
    class_names = sorted({i.label for i in items} | {label for _, label, _ in candidates})
    median_side = int(np.median(list(sides.values()))) if sides else 0
    return items, class_names, unreadable, median_side


# ------------------------------------------------------------------ .npz


def _scan_npz(path: Path, names: tuple[str, ...]) -> tuple[list[Item], list[str], list[UnreadableFile], int]:
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path} is not a readable .npz archive: {exc}") from None
    with archive:
        keys = set(archive.files)
        if "train_images" not in keys or "train_labels" not in keys:
            raise DataError(f"{path} lacks train_images/train_labels (has: {', '.join(sorted(keys)) or 'nothing'})")
        label_values: set[int] = set()
        per_split: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for split in NPZ_SPLITS:
            if f"{split}_images" not in keys and f"{split}_labels" not in keys:
                continue
            if f"{split}_images" not in keys or f"{split}_labels" not in keys:
                raise DataError(f"{path}: {split}_images and {split}_labels must come together")
            try:
                images, labels = load_npz_split(archive, split)
            except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
                raise DataError(f"{path}: cannot read {split} arrays: {exc}") from None
            if len(images) != len(labels):
                raise DataError(f"{path}: {split}_images has {len(images)} entries but {split}_labels has {len(labels)}")
            per_split[split] = (images, labels)
            label_values |= set(labels.tolist())
        stored_names = tuple(str(n) for n in archive["class_names"].tolist()) if "class_names" in keys else ()
    if min(label_values) < 0:
        raise DataError(f"{path}: labels must be non-negative integers")
    count = max(label_values) + 1
    class_names = list(names or stored_names or tuple(f"class_{i}" for i in range(count)))
    if len(class_names) < count:
        raise DataError(f"{path}: labels go up to {count - 1} but only {len(class_names)} class names are given")
    items = []
    median_side = min(per_split["train"][0].shape[1:3])
    for split, (images, labels) in per_split.items():
        for index in range(len(images)):
            digest = hashlib.sha256(np.ascontiguousarray(images[index]).tobytes()).hexdigest()
            items.append(Item(split=split, label=class_names[int(labels[index])], ref=f"{split}:{index}", sha256=digest))
    return items, class_names, [], median_side


# ------------------------------------------------------------------ S3


def _snapshot_s3(uri: str, config: PipelineConfig, run_dir: RunDir, out: Path) -> tuple[Path, tuple[SourceObject, ...]]:
    from xray.data.sources.s3 import S3Settings, mirror_dir_for, sync_prefix

    settings = S3Settings.from_config(config.ingestion.s3)
    mirror = mirror_dir_for(run_dir.root / ".s3-mirror", uri, settings)
    records = sync_prefix(uri, mirror, settings)
    snapshot = out / "snapshot"
    for record in records:
        dest = snapshot / record.relative_path
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(mirror / record.relative_path, dest)
        except OSError:
            shutil.copy2(mirror / record.relative_path, dest)
    objects = tuple(SourceObject(key=r.key, size=r.size, etag=r.etag, sha256=r.sha256) for r in records)
    return snapshot, objects


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
        grouped.append(replace(item, group=group, metadata=metadata))
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
