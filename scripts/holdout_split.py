"""Hold back a patient-disjoint part of a source folder, for its own external check.

Given a folder of class folders (``SOURCE/CLASS/film``), writes ``OUT/train/CLASS/film``
and ``OUT/holdout/CLASS/film`` as hard links (copies across file systems): no
patient has films on both sides, and each class keeps its share on each side as
far as whole patients allow (scikit-learn's ``StratifiedGroupKFold``; one fold of
``round(1 / fraction)`` is held back, so the held-back share is about ``fraction``).
Each part gets a ``patients.csv`` (``path,patient``) that ``ingestion.metadata_csv``
or a manifest's ``metadata_csv`` can group by. Prints films and patients per part.

The patient of a film comes from a regex with a named group ``patient`` searched in
its path under SOURCE (``CLASS/name``), or from a CSV column::

    python scripts/holdout_split.py ../shared/datasets/external/nih-cxr8 --out .work/nih-cxr8 \\
        --patient-regex '(?P<patient>\\d+)_\\d+\\.png$' --fraction 0.5 --seed 0
    python scripts/holdout_split.py ../shared/datasets/external/hannover-covid --out .work/hannover-covid \\
        --csv ../shared/datasets/external/hannover-covid/data.csv --patient-column patient_id \\
        --image-column image_id --fraction 0.5 --seed 0

A CSV's image column names each film by relative path, file name or file stem.
Running it again with the same OUT replaces what it wrote there before.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import sys
from collections import Counter
from pathlib import Path, PurePosixPath

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from xray.data.preprocessing import IMAGE_SUFFIXES  # noqa: E402 - after the path is set: the films ingestion takes

RECORD = "holdout_split.json"
PARTS = ("train", "holdout")


def films_of(source: Path) -> list[Path]:
    """Every image under SOURCE/CLASS/, sorted (hidden files and folders left out)."""
    classes = sorted(p for p in source.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise SystemExit(f"{source}: no class folders (expected SOURCE/CLASS/film)")
    films = [p for c in classes for p in sorted(c.rglob("*"))
             if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not any(part.startswith(".") for part in p.relative_to(c).parts)]
    if not films:
        raise SystemExit(f"{source}: no images in {', '.join(c.name for c in classes)}")
    return films


def patients_by_regex(source: Path, films: list[Path], pattern: str) -> list[str]:
    try:
        regex = re.compile(pattern)
    except re.error as exc:
        raise SystemExit(f"--patient-regex {pattern!r} is not a regex: {exc}") from None
    if "patient" not in regex.groupindex:
        raise SystemExit(f"--patient-regex {pattern!r} needs a named group 'patient', e.g. '(?P<patient>\\d+)_'")
    patients = []
    for film in films:
        rel = film.relative_to(source).as_posix()
        match = regex.search(rel)
        if match is None or not match.group("patient"):
            raise SystemExit(f"--patient-regex {pattern!r} does not match {rel!r}: every film needs a patient")
        patients.append(match.group("patient"))
    return patients


def patients_by_csv(source: Path, films: list[Path], table: Path, patient_column: str, image_column: str) -> list[str]:
    try:
        with open(table, newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise SystemExit(f"--csv {table}: not a readable CSV ({exc})") from None
    columns = set(rows[0]) if rows else set()
    for column in (patient_column, image_column):
        if column not in columns:
            raise SystemExit(f"--csv {table} has no column {column!r} (columns: {', '.join(sorted(columns)) or 'none'})")
    patient_of = {row[image_column].strip().replace("\\", "/").lstrip("./"): row[patient_column].strip() for row in rows}
    patients = []
    for film in films:
        rel = PurePosixPath(film.relative_to(source).as_posix())
        patient = patient_of.get(str(rel)) or patient_of.get(rel.name) or patient_of.get(rel.stem)
        if not patient:
            raise SystemExit(f"--csv {table}: no {patient_column!r} for {rel} (by relative path, file name or stem)")
        patients.append(patient)
    return patients


def split(labels: list[str], patients: list[str], fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, holdout rows): one StratifiedGroupKFold fold held back, patients never cut in two."""
    folds = max(2, round(1 / fraction))
    if len(set(patients)) < folds:
        raise SystemExit(f"{len(set(patients))} patient(s) cannot be split {folds} ways (--fraction {fraction})")
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    return next(splitter.split(np.zeros(len(labels)), labels, patients))


def prepare_out(out: Path) -> None:
    """A fresh OUT: what this script wrote there before is replaced; anything else there is refused."""
    if out.exists() and any(out.iterdir()):
        if not (out / RECORD).is_file():
            raise SystemExit(f"--out {out} exists and was not written by holdout_split.py: choose another folder")
        for part in PARTS:
            shutil.rmtree(out / part, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / RECORD).write_text("{}\n")  # marks OUT as this script's before anything else is written


def link(film: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(film, target)
    except OSError:
        shutil.copy2(film, target)


def write_part(source: Path, out: Path, films: list[Path], patients: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "patients.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "patient"])
        for film, patient in zip(films, patients):
            rel = film.relative_to(source)
            link(film, out / rel)
            writer.writerow([rel.as_posix(), patient])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("source", type=Path, help="a folder of class folders: SOURCE/CLASS/film")
    parser.add_argument("--out", type=Path, required=True, help="writes OUT/train/CLASS/… and OUT/holdout/CLASS/…")
    how = parser.add_mutually_exclusive_group(required=True)
    how.add_argument("--patient-regex", help="regex with a named group 'patient', searched in CLASS/name")
    how.add_argument("--csv", type=Path, help="a CSV naming each film's patient (with --patient-column)")
    parser.add_argument("--patient-column", default="patient_id", help="the CSV's patient column (default: patient_id)")
    parser.add_argument("--image-column", default="image_id", help="the CSV's film column: relative path, file name "
                        "or stem (default: image_id)")
    parser.add_argument("--fraction", type=float, default=0.5, help="about this share of the patients is held back")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not 0 < args.fraction < 1:
        parser.error("--fraction must be between 0 and 1")
    if not args.source.is_dir():
        parser.error(f"source folder not found: {args.source}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    source = args.source.resolve()
    films = films_of(source)
    labels = [film.relative_to(source).parts[0] for film in films]
    if args.csv:
        patients = patients_by_csv(source, films, args.csv, args.patient_column, args.image_column)
    else:
        patients = patients_by_regex(source, films, args.patient_regex)
    train, holdout = split(labels, patients, args.fraction, args.seed)
    prepare_out(args.out)
    summary: dict[str, dict] = {}
    for part, rows in zip(PARTS, (train, holdout)):
        write_part(source, args.out / part, [films[i] for i in rows], [patients[i] for i in rows])
        summary[part] = {"films": dict(sorted(Counter(labels[i] for i in rows).items())),
                         "patients": len({patients[i] for i in rows})}
        per_class = ", ".join(f"{c} {n}" for c, n in summary[part]["films"].items())
        print(f"{part}: {len(rows)} films ({per_class}), {summary[part]['patients']} patients -> {args.out / part}")
    shared = {patients[i] for i in train} & {patients[i] for i in holdout}
    print(f"patients on both sides: {len(shared)}")
    record = {"source": str(source), "fraction": args.fraction, "seed": args.seed, "folds": max(2, round(1 / args.fraction)),
              "grouped_by": f"regex {args.patient_regex}" if args.patient_regex else f"{args.csv}:{args.patient_column}",
              **summary}
    (args.out / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    if shared:  # cannot happen with StratifiedGroupKFold; said loudly if it ever did
        sys.exit(f"error: {len(shared)} patient(s) on both sides")


if __name__ == "__main__":
    main()
