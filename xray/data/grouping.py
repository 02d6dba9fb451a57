"""Patient groups and per-image metadata: which films belong to one person, and who that person is.

One patient's films on both sides of a split let a model recognise the
patient instead of the disease, so the split stage keeps each group whole.
A group comes from ``ingestion.group_by``: a column of ``ingestion.metadata_csv``
or, otherwise, a regex whose named group ``patient`` is matched against the
image's path. The CSV's other columns (sex, view, site...) travel with each
image to the subgroup analysis.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from xray.errors import DataError

PATH_COLUMN = "path"


@dataclass(frozen=True)
class MetadataTable:
    """The metadata CSV, keyed by the ``path`` column (a relative path or a bare file name)."""

    columns: tuple[str, ...]
    rows: dict[str, dict[str, str]]

    def row_for(self, ref: str) -> dict[str, str] | None:
        return self.rows.get(ref) or self.rows.get(PurePosixPath(ref).name)


def read_metadata_csv(path: str) -> MetadataTable:
    file = Path(path).expanduser()
    if not file.is_file():
        raise DataError(f"ingestion.metadata_csv: file not found: {path}")
    where = f"ingestion.metadata_csv {path}"
    columns, records = read_csv_records(file, where)
    if PATH_COLUMN not in columns:
        raise DataError(f"{where} has no '{PATH_COLUMN}' column (columns: {', '.join(columns) or 'none'})")
    rows = rows_by_key(records, PATH_COLUMN, where)
    return MetadataTable(columns=tuple(c for c in columns if c != PATH_COLUMN), rows=rows)


def read_csv_records(file: Path, where: str) -> tuple[tuple[str, ...], list[dict[str, str]]]:
    """A CSV's columns and rows, cells stripped (a BOM tolerated); ``DataError`` naming ``where`` when unreadable."""
    try:
        with open(file, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            columns = tuple(c.strip() for c in (reader.fieldnames or ()))
            records = [{k.strip(): (v or "").strip() for k, v in row.items() if k is not None} for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{where} is not a readable CSV: {' '.join(str(exc).split())}") from None
    return columns, records


def rows_by_key(records: list[dict[str, str]], key: str, where: str) -> dict[str, dict[str, str]]:
    """Rows by their ``key`` cell (a path, slashes normalised), the key column left out; a key listed twice is an error."""
    rows: dict[str, dict[str, str]] = {}
    for record in records:
        name = record[key].replace("\\", "/").lstrip("./")
        if name in rows:
            raise DataError(f"{where} lists {name!r} twice")
        rows[name] = {k: v for k, v in record.items() if k != key}
    return rows


def patient_pattern(group_by: str) -> re.Pattern[str] | None:
    """The compiled ``group_by`` regex, or None when it is not a regex with a ``patient`` group."""
    try:
        pattern = re.compile(group_by)
    except re.error:
        return None
    return pattern if "patient" in pattern.groupindex else None


@dataclass(frozen=True)
class Grouper:
    """Assigns each image its patient group and metadata; built once per ingestion."""

    group_by: str
    table: MetadataTable | None

    @classmethod
    def from_config(cls, group_by: str, metadata_csv: str) -> Grouper:
        table = read_metadata_csv(metadata_csv) if metadata_csv else None
        if group_by and not (table is not None and group_by in table.columns) and patient_pattern(group_by) is None:
            known = f" or a column of ingestion.metadata_csv ({', '.join(table.columns)})" if table else ""
            raise DataError(f"ingestion.group_by {group_by!r} is neither a regex with a named group 'patient'{known}")
        return cls(group_by, table)

    @property
    def column(self) -> str | None:
        return self.group_by if self.table is not None and self.group_by in self.table.columns else None

    def describe(self) -> str:
        if not self.group_by:
            return "none (each image is its own group; exact duplicates kept together)"
        return f"column {self.column!r} of the metadata CSV" if self.column else f"regex {self.group_by!r} on the file path"

    def assign(self, ref: str) -> tuple[str | None, dict[str, str]]:
        """(patient group or None, metadata columns) for one image; missing data is an error, never a guess."""
        row = self.table.row_for(ref) if self.table is not None else None
        if self.table is not None and row is None:
            raise DataError(f"ingestion.metadata_csv has no row for {ref!r} (its 'path' column must hold the relative path or file name)")
        metadata = {k: v for k, v in (row or {}).items() if k != self.column}
        if not self.group_by:
            return None, metadata
        if self.column:
            group = (row or {}).get(self.column, "")
            if not group:
                raise DataError(f"ingestion.metadata_csv: empty {self.column!r} for {ref!r}")
            return group, metadata
        match = patient_pattern(self.group_by).search(ref)  # type: ignore[union-attr]
        if match is None or not match.group("patient"):
            raise DataError(f"ingestion.group_by {self.group_by!r} does not match {ref!r}: every image needs a patient")
        return match.group("patient"), metadata
