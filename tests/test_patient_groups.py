"""Patient-level splits: several films per patient never straddle train/val/test; patients across source splits are leakage."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest

from tests.conftest import run_cli, tiny_args
from tests.data_builders import pattern, save
from xray.components import data_ingestion, data_transformation
from xray.config import load_config
from xray.errors import DataError
from xray.pipeline.stage import run_alone
from xray.pipeline.store import RunDir

PATIENTS, FILMS = 24, 4  # films per patient; the label is the patient's


def kermany_folder(root: Path, split_of=lambda patient: None) -> Path:
    """``CLASS/personP_virus_K.png``: several films per patient, named as in the Kermany pediatric dataset."""
    for patient in range(PATIENTS):
        label = ("normal", "pneumonia")[patient % 2]
        split = split_of(patient)
        for film in range(FILMS):
            folder = root / split / label if split else root / label
            save(pattern(patient % 2, patient * 10 + film), folder / f"person{patient}_virus_{film}.png")
    return root


def ingest_and_split(tmp_path: Path, root: Path, *overrides: str):
    config = load_config(None, ["ingestion.min_images_per_class=3", *overrides], data_uri=str(root))
    run = RunDir.create(tmp_path / "artifacts", {}, str(root))
    ingestion = run_alone(data_ingestion, config, run)
    transformation = run_alone(data_transformation, config, run, ingestion)
    rows = [json.loads(line) for line in (run.path / "data_transformation" / "splits.jsonl").read_text().splitlines()]
    return ingestion, transformation, rows


def splits_per_patient(rows: list[dict]) -> dict[str, set[str]]:
    seen: dict[str, set[str]] = defaultdict(set)
    for row in rows:
        seen[row["group"]].add(row["split"])
    return seen


def test_regex_groups_keep_each_patient_in_one_split(tmp_path: Path) -> None:
    root = kermany_folder(tmp_path / "data")
    ingestion, transformation, rows = ingest_and_split(tmp_path, root, r"ingestion.group_by=person(?P<patient>\d+)_")
    assert ingestion.num_groups == PATIENTS and "regex" in ingestion.grouping
    assert transformation.grouped_by == "patient" and "grouped by patient" in transformation.split_strategy
    seen = splits_per_patient(rows)
    assert len(seen) == PATIENTS
    assert all(len(splits) == 1 for splits in seen.values()), {p: s for p, s in seen.items() if len(s) > 1}
    assert {row["split"] for row in rows} == {"train", "val", "test"}
    for split in ("val", "test"):  # stratified: both classes in each carved split
        assert {row["label"] for row in rows if row["split"] == split} == {"normal", "pneumonia"}


def test_without_grouping_the_same_data_would_leak(tmp_path: Path) -> None:
    """The control: image-level splitting puts some patient on two sides, which is why group_by exists."""
    root = kermany_folder(tmp_path / "data")
    _, transformation, rows = ingest_and_split(tmp_path, root)
    assert transformation.grouped_by == "image"
    by_patient: dict[str, set[str]] = defaultdict(set)
    for row in rows:
        by_patient[row["ref"].split("/")[-1].split("_")[0]].add(row["split"])
    assert any(len(splits) > 1 for splits in by_patient.values())


def test_metadata_csv_column_groups_and_carries_metadata(tmp_path: Path) -> None:
    root = kermany_folder(tmp_path / "data")
    csv = tmp_path / "meta.csv"
    lines = ["path,patient_id,sex,view"]
    for path in sorted(root.rglob("*.png")):
        patient = int(path.name.split("_")[0].removeprefix("person"))
        lines.append(f"{path.name},P{patient // 2},{'FM'[patient % 3 == 0]},{'AP' if patient < 12 else 'PA'}")
    csv.write_text("\n".join(lines) + "\n")
    ingestion, _, rows = ingest_and_split(
        tmp_path, root, "ingestion.group_by=patient_id", f"ingestion.metadata_csv={csv}"
    )
    assert ingestion.num_groups == PATIENTS // 2 and ingestion.metadata_columns == ("sex", "view")
    assert all(len(s) == 1 for s in splits_per_patient(rows).values())
    assert {row["metadata"]["view"] for row in rows} == {"AP", "PA"}
    assert all(set(row["metadata"]) == {"sex", "view"} for row in rows)


def test_patient_across_source_splits_is_leakage(tmp_path: Path) -> None:
    root = kermany_folder(tmp_path / "data", split_of=lambda p: "test" if p >= 20 else "train")
    # one film of patient 3 also sits in test
    save(pattern(1, 999), root / "test" / "pneumonia" / "person3_virus_9.png")
    overrides = (r"ingestion.group_by=person(?P<patient>\d+)_",)
    ingestion, _, rows = ingest_and_split(tmp_path, root, *overrides)
    assert [(g.group, g.splits) for g in ingestion.group_leakage] == [("3", ("test", "train"))]
    with pytest.raises(DataError, match="1 patient.*person|1 patient"):
        ingest_and_split(tmp_path / "again", root, *overrides, "ingestion.leakage=fail")


@pytest.mark.parametrize(
    "override, message",
    [
        (r"ingestion.group_by=nobody(?P<patient>\d+)", "does not match 'normal/person0_virus_0.png'"),
        ("ingestion.metadata_csv=/nonexistent/meta.csv", "file not found"),
    ],
)
def test_grouping_that_does_not_fit_the_data_is_refused(tmp_path: Path, override: str, message: str) -> None:
    with pytest.raises(DataError, match=message):
        ingest_and_split(tmp_path, kermany_folder(tmp_path / "data"), override)


def test_unknown_positive_class_fails_before_training_in_one_line(tmp_path: Path) -> None:
    root = kermany_folder(tmp_path / "data")
    override = "evaluation.operating_point.positive=[covid]"
    result = run_cli("train", "--data", str(root), *tiny_args(tmp_path / "artifacts"), "--set", override)
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert "Traceback" not in result.stderr and last.startswith("xray: error:") and "unknown class 'covid'" in last
    assert "data_transformation" not in result.stderr  # refused right after ingestion, before any training
