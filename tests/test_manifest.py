"""A manifest of sources (``--data sources.yaml``): parsing and its errors, films that keep their source,
splits stratified by class and source with patients grouped per source, the model card's sources per
class, scripts/holdout_split.py, and one short ``xray train`` on a manifest."""

from __future__ import annotations

import csv
import dataclasses
import json
import sys
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from tests.conftest import run_cli, tiny_args
from tests.data_builders import pattern, save
from xray.components import data_ingestion, data_transformation
from xray.config import load_config
from xray.data.sources.manifest import is_manifest, read_manifest
from xray.errors import DataError
from xray.evaluation.model_card import class_sources, source_warnings
from xray.pipeline.stage import run_alone
from xray.pipeline.store import RunDir

NIH_REGEX = r"(?P<patient>\d+)_\d+\.png$"


def nih_folder(root: Path, classes: dict[str, int], films: int = 2, seed: int = 0, shared_every: int = 0) -> Path:
    """``CLASS/PATIENT_FOLLOWUP.png`` as in NIH ChestX-ray8: ``classes`` gives patients per class; with
    ``shared_every`` = k, every k-th patient of the second class is also a patient of the first."""
    for c, (name, patients) in enumerate(classes.items()):
        for p in range(patients):
            patient = p if (c == 1 and shared_every and p % shared_every == 0) else 1000 * c + p
            for film in range(films):
                save(pattern(c, seed * 10_000 + 100 * c + 10 * p + film), root / name / f"{patient:08d}_{film:03d}.png")
    return root


def write_manifest(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def two_sources(tmp_path: Path, patients: int = 14) -> Path:
    """Source ``north`` (Normal, Covid) and source ``south`` (folders No_findings, Covid), the same patient numbers in both."""
    nih_folder(tmp_path / "north" / "train", {"Normal": patients, "Covid": patients}, seed=1)
    nih_folder(tmp_path / "south", {"No_findings": patients, "Covid": patients, "Other": 3}, seed=2)
    return write_manifest(tmp_path / "sources.yaml", f"""
- uri: north/train
  group_by: '{NIH_REGEX}'
- uri: south
  classes: {{No_findings: Normal, Covid: Covid}}
  group_by: '{NIH_REGEX}'
""")


def ingest(tmp_path: Path, uri: Path | str, *overrides: str):
    config = load_config(None, ["ingestion.min_images_per_class=3", *overrides], data_uri=str(uri))
    run = RunDir.create(tmp_path / "artifacts", {}, str(uri))
    return config, run, run_alone(data_ingestion, config, run)


# ------------------------------------------------------------------ parsing


def test_manifest_entries_resolve_against_the_manifest_folder(tmp_path: Path) -> None:
    (tmp_path / "data" / "covid19-3class" / "train" / "Covid").mkdir(parents=True)
    (tmp_path / "data" / "nih" / "No_findings").mkdir(parents=True)
    (tmp_path / "data" / "meta.csv").write_text("image_id,patient_id\n")
    manifest = write_manifest(tmp_path / "data" / "m.yml", """
- uri: covid19-3class/train
- {uri: nih, classes: {No_findings: Normal}, name: adults, group_by: patient_id, metadata_csv: meta.csv}
""")
    first, second = read_manifest(manifest)
    assert first.name == "covid19-3class" and first.classes == {}  # a folder called train takes its parent's name
    assert first.uri == str((tmp_path / "data" / "covid19-3class" / "train").resolve())
    assert second.name == "adults" and second.classes == {"No_findings": "Normal"}
    assert second.metadata_csv == str((tmp_path / "data" / "meta.csv").resolve()) and second.group_by == "patient_id"
    assert is_manifest(str(manifest)) and is_manifest("x.YAML") and not is_manifest("data/") and not is_manifest("a.npz")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("uri: a\nclasses: {A: A}\n", "must be a non-empty YAML list"),
        ("[]\n", "got an empty list"),
        ("- uri: a\n  classes: {A: [\n", "is not readable YAML"),
        ("- a\n", "manifest entry 1: expected a mapping"),
        ("- {uri: a, clases: {A: A}}\n", "manifest entry 1: unknown key(s) clases (allowed: uri, classes"),
        ("- {classes: {A: A}}\n", "manifest entry 1: 'uri' must name a folder"),
        ("- {uri: a}\n- {uri: nowhere}\n", "manifest entry 2: folder not found: nowhere"),
        ("- {uri: a}\n- {uri: file.npz}\n", "manifest entry 2: file.npz is a file; only folders"),
        ("- {uri: a}\n- {uri: b/a}\n", "entries 1 and 2 have the same name 'a'; give one of them another name"),
        ("- {uri: a, name: x}\n- {uri: a, name: y}\n", "entries 1 and 2 have the same uri"),
        ("- {uri: a, classes: [A]}\n", "manifest entry 1 (a): 'classes' must map the source's folders"),
        ("- {uri: a, name: 'x:y'}\n", "manifest entry 1: 'name' must be a short name"),
        ("- {uri: a, group_by: patient_id}\n", "manifest entry 1 (a): group_by 'patient_id' must be a regex"),
        ("- {uri: a, metadata_columns: [sex]}\n", "manifest entry 1 (a): 'metadata_columns' needs a metadata_csv"),
    ],
)
def test_bad_manifests_name_the_entry(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "a" / "A").mkdir(parents=True)
    (tmp_path / "b" / "a" / "A").mkdir(parents=True)
    (tmp_path / "file.npz").write_bytes(b"")
    with pytest.raises(DataError) as caught:
        read_manifest(write_manifest(tmp_path / "m.yaml", text))
    assert message in str(caught.value)


def test_a_missing_manifest_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="manifest not found"):
        read_manifest(tmp_path / "none.yaml")


@pytest.mark.parametrize(
    ("entry", "csv_text", "message"),
    [
        ("classes: {Nope: Normal, Covid: Covid}", None, "manifest entry 1 (src): no class folder Nope in"),
        ("metadata_csv: meta.csv\n  group_by: patient", "file,patient\n", "has no 'path' or 'image_id' column"),
        ("metadata_csv: meta.csv\n  group_by: patient", "image_id,patient\n00000000_000,7\n", "has no row for"),
        ("metadata_csv: meta.csv\n  metadata_columns: [sex]", "path,age\n", "has no column(s) sex"),
        ("metadata_csv: meta.csv\n  group_by: pid", "path,patient\n", "group_by 'pid' is neither a column"),
    ],
)
def test_bad_sources_name_the_entry_at_ingestion(tmp_path: Path, entry: str, csv_text: str | None, message: str) -> None:
    nih_folder(tmp_path / "src", {"Normal": 3, "Covid": 3})
    if csv_text is not None:
        (tmp_path / "meta.csv").write_text(csv_text)
    manifest = write_manifest(tmp_path / "m.yaml", f"- uri: src\n  {entry}\n")
    with pytest.raises(DataError) as caught:
        ingest(tmp_path, manifest)
    assert message in str(caught.value)


def test_global_grouping_and_mixed_layouts_are_refused(tmp_path: Path) -> None:
    manifest = two_sources(tmp_path)
    with pytest.raises(DataError, match="give each source its own group_by"):
        ingest(tmp_path, manifest, f"ingestion.group_by={NIH_REGEX}")
    nih_folder(tmp_path / "flat", {"Normal": 3, "Covid": 3}, seed=3)
    nih_folder(tmp_path / "split" / "train", {"Normal": 3, "Covid": 3}, seed=4)
    mixed = write_manifest(tmp_path / "mixed.yaml", "- {uri: flat}\n- {uri: split}\n")
    with pytest.raises(DataError, match="mixes sources with train/val/test folders and sources without"):
        ingest(tmp_path, mixed)


# ------------------------------------------------------------------ ingestion and splits


@pytest.fixture(scope="module")
def two_source_run(tmp_path_factory: pytest.TempPathFactory):
    tmp_path = tmp_path_factory.mktemp("two-sources")
    config, run, ingestion = ingest(tmp_path, two_sources(tmp_path))
    transformation = run_alone(data_transformation, config, run, ingestion)
    rows = [json.loads(line) for line in (run.path / "data_transformation" / "splits.jsonl").read_text().splitlines()]
    return run, ingestion, transformation, rows


def test_every_film_records_its_source(two_source_run) -> None:
    run, ingestion, _, _ = two_source_run
    assert ingestion.source_kind == "manifest" and ingestion.class_names == ("Covid", "Normal")
    items = ingestion.read_items(run.path)
    assert Counter(i.source for i in items) == {"north": 56, "south": 56}  # south's Other folder is not in its classes
    assert all(i.metadata["source"] == i.source for i in items) and "source" in ingestion.metadata_columns
    lines = [json.loads(line) for line in (run.path / ingestion.index_file).read_text().splitlines()]
    assert {line["source"] for line in lines} == {"north", "south"}
    south = [i for i in items if i.source == "south"]
    assert {i.label for i in south} == {"Normal", "Covid"} and all(i.ref.startswith("south/") for i in south)
    assert {(s.name, tuple(s.counts.items())) for s in ingestion.sources} == {
        ("north", (("Covid", 28), ("Normal", 28))), ("south", (("Covid", 28), ("Normal", 28)))}
    assert "per source" in ingestion.grouping
    # the same patient number in two sources is two patients
    assert ingestion.num_groups == 4 * 14 and {i.group.split(":")[0] for i in items} == {"north", "south"}


def test_splits_stratify_by_class_and_source_and_keep_patients_whole(two_source_run) -> None:
    _, _, transformation, rows = two_source_run
    assert "stratified by class and source" in transformation.split_strategy
    cells = Counter((row["split"], row["source"], row["label"]) for row in rows)
    for split in ("train", "val", "test"):
        for source in ("north", "south"):
            for label in ("Normal", "Covid"):
                assert cells[(split, source, label)] >= 2, (split, source, label, cells)
    splits_of: dict[str, set[str]] = defaultdict(set)
    for row in rows:
        splits_of[row["group"]].add(row["split"])
        assert row["group"].startswith(row["source"] + ":")
    assert all(len(s) == 1 for s in splits_of.values()), {g: s for g, s in splits_of.items() if len(s) > 1}


def test_the_decoded_films_are_the_sources_films(two_source_run) -> None:
    """Refs are relative to one root over every source: the arrays hold the right pixels."""
    run, ingestion, transformation, rows = two_source_run
    from xray.data.snapshot import decoder

    test_rows = [r for r in rows if r["split"] == "test"]
    items = [i for i in ingestion.read_items(run.path) if i.ref in {r["ref"] for r in test_rows}]
    assert (ingestion.dataset_root(run.path) / items[0].ref).is_file()
    decoded = decoder(ingestion, run.path, transformation.image_size)(items, "test")
    assert decoded.shape == (len(test_rows), transformation.image_size, transformation.image_size)


def test_the_card_names_each_class_sources_and_warns_on_one_source(two_source_run) -> None:
    _, ingestion, _, _ = two_source_run
    assert class_sources(ingestion) == {"Covid": {"north": 28, "south": 28}, "Normal": {"north": 28, "south": 28}}
    assert source_warnings(ingestion) == []
    north, south = ingestion.sources
    lopsided = dataclasses.replace(ingestion, sources=(north, dataclasses.replace(south, counts={"Normal": 28}, grouping="none")))
    warnings = source_warnings(lopsided)
    assert warnings[0].startswith("Every Covid film came from north: the model may have learned that source's look")
    assert "No patient grouping for source(s) south" in warnings[1] and len(warnings) == 2
    assert source_warnings(dataclasses.replace(ingestion, sources=(north,))) == []  # one source: nothing to compare


def test_a_metadata_csv_by_image_id_groups_a_source(tmp_path: Path) -> None:
    """Hannover-style data.csv: patient_id and image_id (the file's stem); the chosen columns travel, the rest not."""
    root = tmp_path / "hannover"
    for i in range(12):
        save(pattern(0, i), root / "Covid" / f"img{i:02d}.png")
    with open(tmp_path / "data.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["patient_id", "image_id", "sex", "crp_val"])
        writer.writerows([f"p{i // 3}", f"img{i:02d}", "mf"[i % 2], str(i)] for i in range(12))
    nih_folder(tmp_path / "nih", {"No_findings": 6}, seed=5)
    manifest = write_manifest(tmp_path / "m.yaml", f"""
- {{uri: hannover, metadata_csv: data.csv, group_by: patient_id, metadata_columns: [sex]}}
- {{uri: nih, classes: {{No_findings: Normal}}, group_by: '{NIH_REGEX}'}}
""")
    _, run, ingestion = ingest(tmp_path, manifest)
    items = ingestion.read_items(run.path)
    hannover = [i for i in items if i.source == "hannover"]
    assert {i.group for i in hannover} == {f"hannover:p{k}" for k in range(4)}
    assert all(set(i.metadata) == {"source", "sex"} for i in hannover)
    assert all(i.metadata == {"source": "nih"} for i in items if i.source == "nih")
    assert ingestion.metadata_columns == ("sex", "source")


# ------------------------------------------------------------------ scripts/holdout_split.py


def holdout_split(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of the script's main, run in this process (its imports are slow to repeat)."""
    from scripts import holdout_split as script

    status = 0
    try:
        script.main(list(args))
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else 1
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_holdout_split_is_patient_disjoint_and_stratified(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = nih_folder(tmp_path / "nih", {"No_findings": 20, "Pneumonia": 20}, films=3, shared_every=4)
    out = tmp_path / "out"
    args = (str(source), "--out", str(out), "--patient-regex", NIH_REGEX, "--fraction", "0.3", "--seed", "1")
    status, stdout, stderr = holdout_split(capsys, *args)
    assert status == 0, stderr
    assert "patients on both sides: 0" in stdout and "holdout:" in stdout
    patients: dict[str, set[str]] = {}
    for part in ("train", "holdout"):
        films = sorted((out / part).glob("*/*.png"))
        patients[part] = {f.name.split("_")[0] for f in films}
        assert {f.parent.name for f in films} == {"No_findings", "Pneumonia"}
        with open(out / part / "patients.csv") as fh:
            listed = {row["path"]: row["patient"] for row in csv.DictReader(fh)}
        assert listed == {f"{f.parent.name}/{f.name}": f.name.split("_")[0] for f in films}
    assert not patients["train"] & patients["holdout"]
    shared = {f"{p:08d}" for p in range(0, 20, 4)}  # patients with films in both classes stay whole
    assert shared <= patients["train"] | patients["holdout"]
    held = sum(1 for _ in (out / "holdout").glob("*/*.png"))
    assert 0.2 <= held / (3 * 40) <= 0.45
    assert sum(1 for _ in (out / "train").glob("*/*.png")) + held == 3 * 40
    assert holdout_split(capsys, *args) == (0, stdout, "")  # the same seed, the same parts, rewritten
    foreign = tmp_path / "mine"
    (foreign / "keep").mkdir(parents=True)
    status, _, stderr = holdout_split(capsys, str(source), "--out", str(foreign), "--patient-regex", NIH_REGEX)
    assert status != 0 and "not written by holdout_split.py" in stderr


def test_holdout_split_by_csv_and_its_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "hannover"
    for i in range(16):
        save(pattern(0, i), source / "Covid" / f"img{i:02d}.png")
    (tmp_path / "data.csv").write_text("patient_id,image_id\n" + "".join(f"p{i // 2},img{i:02d}\n" for i in range(16)))
    out = tmp_path / "out"
    status, _, stderr = holdout_split(capsys, str(source), "--out", str(out), "--csv", str(tmp_path / "data.csv"))
    assert status == 0, stderr
    held = {f.stem for f in (out / "holdout" / "Covid").iterdir()}
    kept = {f.stem for f in (out / "train" / "Covid").iterdir()}
    assert held and kept and not {int(s[3:]) // 2 for s in held} & {int(s[3:]) // 2 for s in kept}
    status, _, stderr = holdout_split(capsys, str(source), "--out", str(tmp_path / "o2"), "--patient-regex", r"img\d+")
    assert status != 0 and "named group 'patient'" in stderr
    status, _, stderr = holdout_split(capsys, str(source), "--out", str(tmp_path / "o3"), "--csv", str(tmp_path / "data.csv"),
                                      "--patient-column", "pid")
    assert status != 0 and "has no column 'pid'" in stderr


# ------------------------------------------------------------------ end to end


def test_train_on_a_manifest_reports_metrics_per_source(tmp_path: Path) -> None:
    manifest = two_sources(tmp_path, patients=10)
    artifacts = tmp_path / "artifacts"
    result = run_cli("train", "--data", str(manifest), *tiny_args(artifacts), "--set", "evaluation.subgroup_min_count=5")
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = [p for p in artifacts.iterdir() if (p / "manifest.json").is_file()]
    evaluation = json.loads((run_dir / "model_evaluation" / "artifact.json").read_text())
    per_source = {g["value"]: g for g in evaluation["subgroups"] if g["column"] == "source"}
    assert set(per_source) == {"north", "south"}
    assert sum(g["count"] for g in per_source.values()) == sum(
        1 for line in (run_dir / "data_transformation" / "splits.jsonl").read_text().splitlines() if '"split": "test"' in line)
    card = (run_dir / "model_evaluation" / "model_card.md").read_text()
    assert "- Covid films came from: north 20, south 20" in card and "source=south" in card
