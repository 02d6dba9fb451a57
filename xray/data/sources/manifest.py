"""Several sources as one dataset: ``--data sources.yaml``, a manifest of ``{uri, classes}`` entries.

Why: a model trained on one source can learn that source's look instead of
the disease (DeGrave, Janizek and Lee, 2021), and pooling sources blindly only
trades one look for another. So every film keeps the name of its source: the
splits stratify on (class, source), patients are grouped within their source
(``<source>:<patient>``), the metrics are reported per source (the ``source``
metadata value feeds the subgroup analysis) and the model card says which
sources each class came from.

A manifest is a YAML list; each entry is a mapping::

    - uri: ../data/covid19-3class          # a local folder (relative: to the manifest's folder) or s3://bucket/prefix
      classes: {No_findings: Normal}       # the source's folder -> the model's class; absent: every folder as itself
      name: nih                            # default: the folder's name (its parent's when it is called train/holdout/…)
      group_by: '(?P<patient>\\d+)_'       # a regex with a named group 'patient' on the file path, or a metadata_csv column
      metadata_csv: data.csv               # a 'path' or 'image_id' column (relative path, file name or file stem) + columns
      metadata_columns: [sex]              # the CSV columns carried to the subgroup analysis (default: all)

Local folders are read in place, like a single folder source; S3 prefixes are
mirrored and hard-linked into the run, like a single S3 source.
"""

from __future__ import annotations

import logging
import os
import statistics
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from xray.data.grouping import patient_pattern, read_csv_records, rows_by_key
from xray.data.sources.base import Place, Scan, Snapshot
from xray.data.sources.folder import FolderFilms, scan_folder
from xray.data.sources.local import LocalSource
from xray.entity.artifact_entity import Item, SourceObject, SourceRecord, UnreadableFile
from xray.entity.config_entity import IngestionConfig
from xray.errors import DataError

logger = logging.getLogger(__name__)

MANIFEST_SUFFIXES = (".yaml", ".yml")
KEYS = ("uri", "classes", "name", "group_by", "metadata_csv", "metadata_columns")
SOURCE_COLUMN = "source"  # the metadata value that makes each source a subgroup
KEY_COLUMNS = ("path", "image_id")  # how a metadata CSV names its films, in order of preference
SPLIT_FOLDERS = {"train", "val", "valid", "validation", "test"}
PART_FOLDERS = SPLIT_FOLDERS | {"holdout", "held", "all"}  # a folder so named takes its parent's name

# (source root) -> (items, class folder names, unreadable files, median side): the folder scan of data_ingestion
Scanner = Callable[[Path], tuple[list[Item], list[str], list[UnreadableFile], int]]


@dataclass(frozen=True)
class ManifestSource:
    """One entry of a manifest, checked and resolved."""

    index: int  # 1-based position in the manifest, for error messages
    name: str
    uri: str  # the resolved local folder, or s3://bucket/prefix
    classes: dict[str, str]  # the source's folder -> the model's class; empty: every folder is its own class
    group_by: str = ""
    metadata_csv: str = ""  # resolved path, or ""
    metadata_columns: tuple[str, ...] | None = None  # None: every column of the CSV

    @property
    def label(self) -> str:
        return f"manifest entry {self.index} ({self.name})"

    def entry(self) -> dict[str, Any]:
        """The entry as a manifest would write it (absolute paths): what a generated manifest holds."""
        entry: dict[str, Any] = {"uri": self.uri, "name": self.name}
        if self.classes:
            entry["classes"] = dict(self.classes)
        if self.group_by:
            entry["group_by"] = self.group_by
        if self.metadata_csv:
            entry["metadata_csv"] = self.metadata_csv
        if self.metadata_columns is not None:
            entry["metadata_columns"] = list(self.metadata_columns)
        return entry


@dataclass(frozen=True)
class ManifestData:
    """What ingestion needs from a manifest: one root the items' refs are relative to, and the items."""

    root: Path  # the deepest folder holding every source (refs are relative to it)
    items: tuple[Item, ...]
    class_names: tuple[str, ...]
    unreadable: tuple[UnreadableFile, ...]
    median_side: int
    s3_objects: tuple[SourceObject, ...]
    sources: tuple[SourceRecord, ...]
    grouping: str


def is_manifest(uri: str) -> bool:
    """``--data`` names a manifest when it is a local .yaml / .yml file."""
    return not uri.startswith("s3://") and PurePosixPath(uri.strip()).suffix.lower() in MANIFEST_SUFFIXES


# ------------------------------------------------------------------ reading the manifest


def read_manifest(path: str | Path) -> tuple[ManifestSource, ...]:
    """The manifest's entries, each checked; every problem names the entry."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise DataError(f"manifest not found: {path}")
    try:
        raw = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise DataError(f"manifest {path} is not readable YAML: {_one_line(exc)}") from None
    if not isinstance(raw, list) or not raw:
        got = "an empty list" if isinstance(raw, list) else type(raw).__name__
        raise DataError(f"manifest {path} must be a non-empty YAML list of {{uri, classes}} entries, got {got}")
    sources = tuple(_entry(file.parent.resolve(), index, entry) for index, entry in enumerate(raw, 1))
    for key, what in ((lambda s: s.name, "name"), (lambda s: s.uri, "uri")):
        seen: dict[str, ManifestSource] = {}
        for source in sources:
            if key(source) in seen:
                first = seen[key(source)]
                raise DataError(
                    f"manifest {path}: entries {first.index} and {source.index} have the same {what} "
                    f"{key(source)!r}" + ("; give one of them another name:" if what == "name" else "")
                )
            seen[key(source)] = source
    return sources


def _entry(base: Path, index: int, entry: object) -> ManifestSource:
    where = f"manifest entry {index}"
    if not isinstance(entry, dict):
        raise DataError(f"{where}: expected a mapping such as {{uri: FOLDER, classes: {{FOLDER: CLASS}}}}, got {entry!r}")
    unknown = sorted(str(k) for k in entry if k not in KEYS)
    if unknown:
        raise DataError(f"{where}: unknown key(s) {', '.join(unknown)} (allowed: {', '.join(KEYS)})")
    uri = entry.get("uri")
    if not isinstance(uri, str) or not uri.strip():
        raise DataError(f"{where}: 'uri' must name a folder or an s3:// prefix")
    location = _location(base, uri.strip(), where)
    name = entry.get("name", source_name(location))
    if not isinstance(name, str) or not name.strip() or any(c in name for c in "/:\\") or name.strip() in (".", ".."):
        raise DataError(f"{where}: 'name' must be a short name without '/', '\\' or ':', got {name!r}")
    where = f"manifest entry {index} ({name})"
    group_by, csv_path = _text(entry, "group_by", where), _text(entry, "metadata_csv", where)
    if csv_path:
        csv_path = str((base / Path(csv_path).expanduser()).resolve())
    elif group_by and patient_pattern(group_by) is None:
        raise DataError(f"{where}: group_by {group_by!r} must be a regex with a named group 'patient' "
                        "(e.g. '(?P<patient>\\d+)_'), or a column of its metadata_csv")
    columns = entry.get("metadata_columns")
    if columns is not None and not (isinstance(columns, list) and all(isinstance(c, str) for c in columns)):
        raise DataError(f"{where}: 'metadata_columns' must be a list of CSV column names, got {columns!r}")
    if columns is not None and not csv_path:
        raise DataError(f"{where}: 'metadata_columns' needs a metadata_csv")
    return ManifestSource(index, name.strip(), location, _classes(entry.get("classes"), where), group_by, csv_path,
                          tuple(columns) if columns is not None else None)


def _location(base: Path, uri: str, where: str) -> str:
    if uri.startswith("s3://"):
        return uri.rstrip("/")
    try:
        path = (base / Path(uri).expanduser()).resolve()
        exists, is_dir = path.exists(), path.is_dir()
    except (RuntimeError, OSError, ValueError):
        exists = is_dir = False
    if not exists:
        raise DataError(f"{where}: folder not found: {uri}")
    if not is_dir:
        raise DataError(f"{where}: {uri} is a file; only folders (CLASS/… or train|val|test/CLASS/…) and s3:// "
                        "prefixes can be sources in a manifest")
    return str(path)


def source_name(location: str) -> str:
    """A source's default name: its folder's, or its parent's when the folder is a part (train/, holdout/ ...)."""
    parts = [p for p in location.rstrip("/").removeprefix("s3://").split("/") if p]
    if len(parts) > 1 and parts[-1].lower() in PART_FOLDERS:
        return parts[-2]
    return parts[-1] if parts else location


def _text(entry: dict, key: str, where: str) -> str:
    value = entry.get(key) or ""
    if not isinstance(value, str):
        raise DataError(f"{where}: {key!r} must be a string, got {value!r}")
    return value.strip()


def _classes(value: object, where: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not value:
        raise DataError(f"{where}: 'classes' must map the source's folders to the model's classes, "
                        f"e.g. {{No_findings: Normal}}, got {value!r}")
    classes = {}
    for folder, name in value.items():
        if not isinstance(folder, (str, int)) or not isinstance(name, (str, int)) or not str(folder) or not str(name):
            raise DataError(f"{where}: 'classes' maps folder names to class names, got {folder!r}: {name!r}")
        classes[str(folder)] = str(name)
    return classes


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


# ------------------------------------------------------------------ ingesting it


def ingest_manifest(uri: str, ingestion: IngestionConfig, mirror_root: Path, snapshot: Path, scan: Scanner) -> ManifestData:
    """Read every source of the manifest ``uri``: its films, with their source, class, patient and metadata.

    ``scan`` is the folder scan of a single source (decode check, sha256, size); ``mirror_root`` and
    ``snapshot`` are where S3 sources are mirrored and hard-linked into the run.
    """
    if ingestion.group_by or ingestion.metadata_csv:
        raise DataError("ingestion.group_by and ingestion.metadata_csv do not apply to a manifest: "
                        "give each source its own group_by / metadata_csv in the manifest")
    sources = read_manifest(uri)
    roots: dict[str, Path] = {}
    objects: list[SourceObject] = []
    for source in sources:
        if source.uri.startswith("s3://"):
            roots[source.name], taken = _mirror_s3(source, ingestion, mirror_root, snapshot / source.name)
            objects += taken
        else:
            roots[source.name] = Path(source.uri)
    common = Path(os.path.commonpath([str(r) for r in roots.values()]))
    scanned = [_scan_source(source, roots[source.name], common, scan) for source in sources]
    items = [item for part in scanned for item in part[0]]
    if len({item.split == "all" for item in items}) > 1:
        raise DataError("the manifest mixes sources with train/val/test folders and sources without: "
                        "give every source the same layout")
    class_names = tuple(sorted({name for part in scanned for name in part[1]}))
    records = tuple(_record(source, items) for source in sources)
    for record in records:
        logger.info("source %s: %s", record.name, ", ".join(f"{c} {n}" for c, n in record.counts.items()) or "no films")
    sides = [part[3] for part in scanned for _ in range(max(1, len(part[0])))]
    grouping = "; ".join(f"{r.name}: {r.grouping}" for r in records)
    grouping = f"none (no source gives patients: {grouping})" if not any(s.group_by for s in sources) else f"per source ({grouping})"
    return ManifestData(
        root=common, items=tuple(items), class_names=class_names,
        unreadable=tuple(u for part in scanned for u in part[2]), median_side=int(statistics.median(sides)),
        s3_objects=tuple(objects), sources=records, grouping=grouping,
    )


def _scan_source(
    source: ManifestSource, root: Path, common: Path, scan: Scanner
) -> tuple[list[Item], list[str], list[UnreadableFile], int]:
    """One source's films under their model class, refs relative to ``common``; unmapped folders left out."""
    split_layout, folders = _class_folders(root, source)
    classes = source.classes or {folder: folder for folder in folders}
    missing = sorted(set(classes) - set(folders))
    if missing:
        raise DataError(f"{source.label}: no class folder {', '.join(missing)} in {source.uri} "
                        f"(it has: {', '.join(sorted(folders)) or 'none'})")
    skipped = sorted(set(folders) - set(classes))
    if skipped:
        logger.info("%s: folder(s) %s not in its classes: left out", source.label, ", ".join(skipped))
    try:
        items, _, unreadable, side = scan(root)
    except DataError as exc:
        raise DataError(f"{source.label}: {exc}") from None
    prefix = root.relative_to(common).as_posix()
    joined = (lambda ref: f"{prefix}/{ref}") if prefix != "." else (lambda ref: ref)  # noqa: E731
    folder_of = (lambda ref: ref.split("/")[1]) if split_layout else (lambda ref: ref.split("/")[0])  # noqa: E731
    table = _read_table(source) if source.metadata_csv else None
    taken = []
    for item in items:
        if item.label in classes:
            group, metadata = _group_and_metadata(source, table, item.ref)
            taken.append(replace(item, label=classes[item.label], ref=joined(item.ref), group=group,
                                 metadata=metadata, source=source.name))
    kept = [replace(u, path=joined(u.path)) for u in unreadable if folder_of(u.path) in classes]
    if not taken:
        raise DataError(f"{source.label}: no readable films in {', '.join(sorted(classes))}")
    return taken, sorted(set(classes.values())), kept, side


def _class_folders(root: Path, source: ManifestSource) -> tuple[bool, set[str]]:
    """(split layout?, the class folder names): ``CLASS/…`` or ``train|val|test/CLASS/…``."""
    top = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    if not top:
        raise DataError(f"{source.label}: {source.uri} holds no class folders (expected CLASS/… or train/CLASS/…)")
    split_layout = all(p.name.lower() in SPLIT_FOLDERS for p in top)
    if not split_layout:
        return False, {p.name for p in top}
    return True, {c.name for p in top for c in p.iterdir() if c.is_dir() and not c.name.startswith(".")}


def _record(source: ManifestSource, items: list[Item]) -> SourceRecord:
    counts = Counter(item.label for item in items if item.source == source.name)
    if not source.group_by:
        grouping = "none"
    elif source.metadata_csv and patient_pattern(source.group_by) is None:
        grouping = f"column {source.group_by!r} of {Path(source.metadata_csv).name}"
    else:
        grouping = f"regex {source.group_by!r} on the file path"
    return SourceRecord(name=source.name, uri=source.uri, classes=dict(source.classes), grouping=grouping,
                        counts=dict(sorted(counts.items())))


# ------------------------------------------------------------------ patients and metadata


@dataclass(frozen=True)
class _Table:
    columns: tuple[str, ...]  # the CSV's columns, the key column left out
    rows: dict[str, dict[str, str]]  # key (path, file name or stem) -> row


def _read_table(source: ManifestSource) -> _Table:
    where = f"{source.label}: metadata_csv {source.metadata_csv}"
    columns, records = read_csv_records(Path(source.metadata_csv), where)
    key = next((c for c in KEY_COLUMNS if c in columns), None)
    if key is None:
        raise DataError(f"{where} has no {' or '.join(repr(c) for c in KEY_COLUMNS)} column naming its films "
                        f"(columns: {', '.join(columns) or 'none'})")
    rows = rows_by_key(records, key, where)
    kept = tuple(c for c in columns if c != key)
    wanted = source.metadata_columns
    unknown = sorted(set(wanted or ()) - set(kept))
    if unknown:
        raise DataError(f"{where} has no column(s) {', '.join(unknown)} (columns: {', '.join(kept)})")
    if source.group_by and source.group_by not in kept and patient_pattern(source.group_by) is None:
        raise DataError(f"{source.label}: group_by {source.group_by!r} is neither a column of its metadata_csv "
                        f"({', '.join(kept)}) nor a regex with a named group 'patient'")
    carried = set(kept if wanted is None else wanted) - {source.group_by}
    if SOURCE_COLUMN in carried:
        raise DataError(f"{where}: the column {SOURCE_COLUMN!r} is the manifest's own; leave it out (metadata_columns)")
    return _Table(tuple(c for c in kept if c in carried), rows)


def _group_and_metadata(source: ManifestSource, table: _Table | None, ref: str) -> tuple[str | None, dict[str, str]]:
    """(``<source>:<patient>`` or None, metadata with the source) for one film; ``ref`` is relative to the source."""
    row = None
    if table is not None:
        path = PurePosixPath(ref)
        row = table.rows.get(ref) or table.rows.get(path.name) or table.rows.get(path.stem)
        if row is None:
            raise DataError(f"{source.label}: its metadata_csv has no row for {ref!r} "
                            f"(by relative path, file name or file stem)")
    metadata = {SOURCE_COLUMN: source.name}
    if table is not None and row is not None:
        metadata.update({column: row.get(column, "") for column in table.columns})
    if not source.group_by:
        return None, metadata
    if row is not None and source.group_by in row:
        patient = row[source.group_by]
        if not patient:
            raise DataError(f"{source.label}: empty {source.group_by!r} for {ref!r} in its metadata_csv")
        return f"{source.name}:{patient}", metadata
    match = patient_pattern(source.group_by).search(ref)  # type: ignore[union-attr]
    if match is None or not match.group("patient"):
        raise DataError(f"{source.label}: group_by {source.group_by!r} does not match {ref!r}: every film needs a patient")
    return f"{source.name}:{match.group('patient')}", metadata


# ------------------------------------------------------------------ S3 sources


def _mirror_s3(
    source: ManifestSource, ingestion: IngestionConfig, mirror_root: Path, target: Path
) -> tuple[Path, list[SourceObject]]:
    """Mirror the prefix incrementally, then hard-link it into the run so the snapshot cannot change under it."""
    from xray.data.sources.s3 import S3Settings, link_into, mirror_dir_for, sync_prefix

    settings = S3Settings.from_config(ingestion.s3)
    mirror = mirror_dir_for(mirror_root, source.uri, settings)
    records = sync_prefix(source.uri, mirror, settings)
    if not records:
        raise DataError(f"{source.label}: no objects under {source.uri}")
    link_into(mirror, target, records)
    return target, [SourceObject(key=r.key, size=r.size, etag=r.etag, sha256=r.sha256) for r in records]


def _scan_one(root: Path) -> tuple[list[Item], list[str], list[UnreadableFile], int]:
    """One source's folder, scanned as a single folder source is (decode check, sha256, size)."""
    scan = scan_folder(root)
    return scan.items, scan.class_names, scan.unreadable, scan.median_side


class ManifestFileSource(FolderFilms, LocalSource):
    """``--data sources.yaml``: the registry's entry for a manifest. Its films are read back as folder films,
    their refs relative to the deepest folder holding every source."""

    kind = "manifest"
    noun = "a manifest of sources (.yaml)"
    served = False  # an entry could name a folder outside the service's data roots

    def takes_path(self, path: Path) -> bool:
        return path.is_file() and path.suffix.lower() in MANIFEST_SUFFIXES

    def serves_path(self, path: Path) -> bool:
        """The training service does not read manifests: an entry could name a folder outside its data roots."""
        return False

    def snapshot(self, uri: str, config: IngestionConfig, place: Place) -> Snapshot:
        data = ingest_manifest(uri, config, place.artifacts_root / ".s3-mirror", place.stage_dir / "snapshot", _scan_one)
        scanned = Scan(
            items=list(data.items), class_names=list(data.class_names), unreadable=list(data.unreadable),
            median_side=data.median_side, sources=data.sources, grouping=data.grouping,
        )
        return Snapshot(root=data.root, copied=False, objects=data.s3_objects, scanned=scanned)

    def scan(self, snapshot: Snapshot, config: IngestionConfig) -> Scan:
        if snapshot.scanned is None:
            raise DataError("a manifest snapshot carries its scan: take it with ManifestFileSource.snapshot")
        return snapshot.scanned
