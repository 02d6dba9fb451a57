"""External checks as evidence (per source and class, pooled, gated) and the shortcut probes.

One tiny run on demo data with two external sources, one covering only some classes and
pneumonia covered by none, and a gate it cannot pass, is shared by the end-to-end tests:
the CLI's table, the artifacts, the model card, the refusal and the run page.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from tests.app_helpers import READ_TOKEN, new_server
from xray.components.model_pusher import generalization_reasons, model_spec
from xray.config import load_config
from xray.data.preprocessing import Preprocessing, load_pixels
from xray.entity.artifact_entity import DataIngestionArtifact, DataTransformationArtifact, RefusedFilm
from xray.entity.config_entity import ExternalSource, GateConfig
from xray.errors import ConfigError
from xray.serving.inference import predict_proba
from xray.evaluation import external, model_card, shortcut
from xray.pipeline.store import load_artifact, load_typed

from .conftest import run_cli, tiny_args
from .data_builders import acquisition_folder, class_folder

PRE = Preprocessing(image_size=32, mean=0.25, std=0.15)
CLASSES = ("covid", "normal", "pneumonia")


# ---------------------------------------------------------------- per source, per class, pooled


def _two_sources(root: Path) -> tuple[ExternalSource, ...]:
    first = class_folder(root / "site-a", {"Covid-like": 3, "Normal films": 4, "Unused": 2})
    second = class_folder(root / "site-b", {"normal": 5, "elsewhere": 2})
    return (
        ExternalSource(uri=str(first), classes={"Covid-like": "covid", "Normal films": "normal"}),
        ExternalSource(uri=str(second)),  # no map: the folders named like model classes
    )


def test_partial_maps_give_per_source_recall_misses_auc_and_pooled_figures(tmp_path: Path) -> None:
    films = external.load_external(_two_sources(tmp_path), CLASSES, PRE)
    assert [s.classes for s in films.sources] == [{"Covid-like": "covid", "Normal films": "normal"}, {"normal": "normal"}]
    assert films.pixels.shape == (12, 32, 32) and list(np.bincount(films.source)) == [7, 5]
    # a fixed answer per film: site-a covid 2 of 3 right, normal 1 of 4 (3 called covid); site-b normal 2 of 5
    answers = np.array([0, 0, 2, 1, 0, 0, 0, 1, 1, 0, 2, 2])
    probs = np.full((12, 3), 0.1)
    probs[np.arange(12), answers] = 0.8
    probs[:, 0] += np.linspace(0, 0.05, 12)  # distinct scores, so the AUC is not all ties
    check = external.score_external(films, probs, CLASSES)
    site_a, site_b = check.sources
    covid, normal = site_a.per_class
    assert (covid.films, covid.correct, covid.misses) == (3, 2, {"pneumonia": 1})
    assert (normal.films, normal.correct, normal.recall, normal.misses) == (4, 1, 0.25, {"covid": 3})
    y_a = films.labels[films.source == 0]
    assert covid.roc_auc == pytest.approx(roc_auc_score(y_a == 0, probs[films.source == 0, 0]))
    assert site_a.roc_auc == pytest.approx((covid.roc_auc + normal.roc_auc) / 2)
    (only,) = site_b.per_class
    assert (only.model_class, only.films, only.recall, only.roc_auc) == ("normal", 5, 0.4, None)  # one class: no AUC
    assert site_b.roc_auc is None
    pooled = {r.model_class: r for r in check.pooled}
    assert (pooled["normal"].films, pooled["normal"].correct) == (9, 3)
    assert pooled["normal"].misses == {"covid": 4, "pneumonia": 2}
    assert pooled["normal"].folders == ("site-a/Normal films", "site-b/normal")
    assert pooled["pneumonia"].films == 0 and pooled["pneumonia"].recall is None
    assert check.no_external_films == ("pneumonia",)
    assert check.worst() == ("site-a", normal)
    table = "\n".join(external.external_markdown(check, "m"))
    # Wilson, 1 of 4 at 95 %: (p + z²/2n ± z·sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n)
    z, n, p = 1.959964, 4, 0.25
    centre, half = (p + z * z / (2 * n)) / (1 + z * z / n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert normal.recall_interval == pytest.approx((centre - half, centre + half), abs=1e-4)
    assert normal.recall_interval[0] < 0.25 < normal.recall_interval[1]
    lo, hi = normal.recall_interval
    assert "| all sources | pneumonia | 0 | no external films |" in table
    assert f"| site-a | normal | 4 | 0.2500 | [{lo:.3f}, {hi:.3f}] | covid 3 |" in table
    assert pooled["pneumonia"].recall_interval is None


def test_held_back_parts_are_named_after_their_source(tmp_path: Path) -> None:
    nih = class_folder(tmp_path / "nih-cxr8" / "holdout", {"normal": 2})
    hannover = class_folder(tmp_path / "hannover-covid" / "holdout", {"covid": 2})
    again = class_folder(tmp_path / "elsewhere" / "nih-cxr8", {"normal": 2})
    sources = (ExternalSource(uri=str(nih)), ExternalSource(uri=str(hannover)), ExternalSource(uri=str(again)))
    names = [s.name for s in external.resolve_sources(sources, CLASSES)]
    assert names == ["nih-cxr8", "hannover-covid", "nih-cxr8 (2)"]  # holdout/ takes its parent's name; (2): evaluation.external[2]


@pytest.mark.parametrize(
    "override, message",
    [
        ("evaluation.external=[{classes: {a: b}}]", "evaluation.external[0]: missing key uri"),
        ("evaluation.external=[{uri: {root}/nowhere}]", "evaluation.external[0].uri must be a local folder"),
        ("evaluation.external=[{uri: {root}/site-a/Unused/Unused_000.png}]", "evaluation.external[0].uri must be a local folder"),
        ("evaluation.external=[{uri: {root}/site-a, classes: {Missing: covid}}]", "evaluation.external[0].classes.Missing"),
        ("evaluation.external={root}/site-a", "evaluation.external is a list of sources"),
        ("evaluation.external_classes={a: b}", "evaluation.external is a list of sources"),
        ("gate.min_external_recall=1.5", "gate.min_external_recall must be between 0 and 1"),
        ("gate.min_external_recall={normal: -0.1}", "gate.min_external_recall.normal must be between 0 and 1"),
        ("gate.max_shortcut_score=-0.2", "gate.max_shortcut_score must be between 0 and 1"),
        ("evaluation.shortcut_warn=2", "evaluation.shortcut_warn must be between 0 and 1"),
    ],
)
def test_bad_external_and_gate_settings_name_the_key(tmp_path: Path, override: str, message: str) -> None:
    _two_sources(tmp_path)
    with pytest.raises(ConfigError) as raised:
        load_config(None, [override.replace("{root}", str(tmp_path))])
    assert message in str(raised.value)


def test_unknown_classes_are_refused_once_the_data_are_known(tmp_path: Path) -> None:
    sources = _two_sources(tmp_path)
    config = load_config(None, [f"evaluation.external=[{{uri: {sources[0].uri}, classes: {{Covid-like: Covid19}}}}]"])
    with pytest.raises(ConfigError, match=r"evaluation.external\[0\].classes.Covid-like maps to unknown class 'Covid19'"):
        external.check_class_maps(config.evaluation, config.gate, CLASSES)
    gated = load_config(None, ["gate.min_external_recall={Normal: 0.8}"])
    with pytest.raises(ConfigError, match="gate.min_external_recall.Normal: unknown class"):
        external.check_class_maps(gated.evaluation, gated.gate, CLASSES)
    nothing = load_config(None, [f"evaluation.external=[{{uri: {tmp_path / 'site-a'}}}]"])  # no folder named like a class
    with pytest.raises(ConfigError, match=r"evaluation.external\[0\]: no folder .* is named like a model class"):
        external.check_class_maps(nothing.evaluation, nothing.gate, CLASSES)


def test_a_bad_class_map_fails_before_training(tmp_path: Path) -> None:
    source = class_folder(tmp_path / "ext", {"Normal films": 3})
    result = run_cli(
        "train", *tiny_args(tmp_path / "artifacts", f"evaluation.external=[{{uri: {source}, classes: {{Normal films: Normal}}}}]"),
        env={"BENTOML_HOME": str(tmp_path / "bentoml")},
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "evaluation.external[0].classes.Normal films maps to unknown class 'Normal'" in result.stderr
    assert "training simple_cnn" not in result.stderr  # refused after ingestion, before any training


# ---------------------------------------------------------------- shortcut probe (a): acquisition features


def _films(root: Path) -> tuple[list[Path], np.ndarray, np.ndarray]:
    paths = sorted(p for p in root.rglob("*") if p.is_file())
    labels = np.array([0 if p.parent.name == "a" else 1 for p in paths])
    return paths, np.stack([load_pixels(p, 32) for p in paths]), labels


def test_acquisition_probe_finds_a_file_format_that_names_the_class(tmp_path: Path) -> None:
    paths, pixels, labels = _films(acquisition_folder(tmp_path / "formats", suffixes=(".png", ".jpg")))
    probe = shortcut.acquisition_probe(paths, pixels, labels, 2)
    assert probe is not None and probe.score > 0.8, probe
    assert probe.groups["file format"] > 0.8 and probe.groups["stored size"] == 0.0
    assert probe.note == ""


def test_acquisition_probe_finds_a_corner_marker_and_stays_near_chance_when_balanced(tmp_path: Path) -> None:
    paths, pixels, labels = _films(acquisition_folder(tmp_path / "marker", marker=True))
    marked = shortcut.acquisition_probe(paths, pixels, labels, 2)
    assert marked.score > 0.8 and marked.groups["border and corners"] > 0.8 and marked.groups["file format"] == 0.0
    paths, pixels, labels = _films(acquisition_folder(tmp_path / "alike"))
    balanced = shortcut.acquisition_probe(paths, pixels, labels, 2)
    assert abs(balanced.score) < 0.3, balanced
    check = shortcut.shortcut_check([marked], 0.5)
    assert "names the class" in check.warning and check.score == marked.score
    assert shortcut.shortcut_check([balanced], 0.5).warning == ""


def test_acquisition_probe_on_an_npz_uses_the_pixels_only(tmp_path: Path) -> None:
    _, pixels, labels = _films(acquisition_folder(tmp_path / "marker", marker=True))
    probe = shortcut.acquisition_probe([None] * len(labels), pixels, labels, 2)
    assert set(probe.groups) == {"intensity histogram", "border and corners"} and "only the pixel features" in probe.note
    assert probe.score > 0.8


# ---------------------------------------------------------------- shortcut probe (b): lungs masked


class RegionReader(nn.Module):
    """A real (hand-set) model that calls a film class b when one region is bright, and looks nowhere else."""

    def __init__(self, rows: slice, cols: slice) -> None:
        super().__init__()
        self.rows, self.cols = rows, cols
        self.scale = nn.Parameter(torch.tensor(4.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        brightness = x[:, 0, self.rows, self.cols].mean(dim=(1, 2)) - 2.0
        return torch.stack([-brightness, brightness], dim=1) * self.scale


def served(model: nn.Module):
    """The model's probabilities for a batch of films, as the evaluation stage hands them to the probe."""
    return lambda films: predict_proba(model, films, PRE, torch.device("cpu"))


def test_mask_hides_the_central_box_with_the_mean_outside_it() -> None:
    pixels = np.random.default_rng(0).integers(0, 200, (2, 20, 10), dtype=np.uint8)
    masked = shortcut.mask_center(pixels)
    box = np.zeros((20, 10), dtype=bool)
    box[3:17, 2:8] = True  # 70 % of 20 rows, 60 % of 10 columns, centred
    assert (masked[:, ~box] == pixels[:, ~box]).all()
    for i in range(2):
        assert (masked[i, box] == round(pixels[i, ~box].mean())).all()


def test_masked_probe_sees_a_model_that_reads_outside_the_lungs(tmp_path: Path) -> None:
    _, pixels, labels = _films(acquisition_folder(tmp_path / "marker", marker=True))
    corner = shortcut.masked_probe(served(RegionReader(slice(0, 4), slice(0, 4))), pixels, labels, 2)
    assert corner.score > 0.8, corner
    _, pixels, labels = _films(acquisition_folder(tmp_path / "centre", centre_patch=True))
    centre = RegionReader(slice(12, 20), slice(12, 20))
    with torch.no_grad():
        unmasked = centre(PRE.to_tensor(pixels)).argmax(1).numpy()
    assert (unmasked == labels).mean() > 0.95  # it does read the centre patch
    lungs = shortcut.masked_probe(served(centre), pixels, labels, 2)
    assert abs(lungs.score) < 0.3, lungs


# ---------------------------------------------------------------- end to end: a refused run, its evidence, its page


@pytest.fixture(scope="module")
def refused(tmp_path_factory: pytest.TempPathFactory) -> dict:
    home = tmp_path_factory.mktemp("external-run")
    first = class_folder(home / "site-a", {"Covid-like": 3, "Normal films": 4})
    second = class_folder(home / "site-b", {"normal": 5})
    sources = f"[{{uri: {first}, classes: {{Covid-like: covid, Normal films: normal}}}}, {{uri: {second}}}]"
    result = run_cli(
        "train", *tiny_args(home / "artifacts", f"evaluation.external={sources}", "gate.min_external_recall=1.0"),
        env={"BENTOML_HOME": str(home / "bentoml")},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # the OOD suite decodes pydicom's damaged test files and is refused on purpose: none of that reaches the console
    assert "Traceback" not in result.stderr and ": refused: " not in result.stderr, result.stderr[-3000:]
    run_dir = next(p for p in (home / "artifacts").iterdir() if (p / "manifest.json").is_file())
    return {"home": home, "stdout": result.stdout, "run_dir": run_dir,
            "evaluation": load_artifact(run_dir / "model_evaluation" / "artifact.json"),
            "pusher": load_artifact(run_dir / "model_pusher" / "artifact.json")}


def test_the_gate_refuses_naming_source_class_and_figure(refused: dict) -> None:
    pusher, check = refused["pusher"], refused["evaluation"].external_check()
    failing = [(s.name, r) for s in check.sources for r in s.per_class if r.recall < 1.0]
    assert failing and not pusher.pushed and pusher.model_tag is None
    for source, r in failing:
        assert any(f"external recall of {r.model_class} on {source} {r.recall:.4f}" in x and "gate.min_external_recall 1.0" in x
                   for x in pusher.reasons), pusher.reasons
    assert "note: no external films of pneumonia, so not gated on external recall" in pusher.reasons
    assert not (refused["home"] / "bentoml" / "models" / "xray-classifier").exists()  # the store is unchanged
    out = refused["stdout"]
    assert "model: not pushed (external recall of" in out
    assert "external checks (simple_cnn, serving path):" in out
    assert "pneumonia" in out and "no external films (not gated)" in out and "shortcut check (0 chance" in out
    low, high = refused["evaluation"].external_check().sources[0].per_class[0].recall_interval
    assert "95% interval" in out and f"[{low:.3f}, {high:.3f}]" in out  # the CLI prints the recall's interval


def test_the_shortcut_gate_names_the_probe_and_figure(refused: dict) -> None:
    evaluation = refused["evaluation"]
    probe = evaluation.shortcut.probes[0]
    reasons = generalization_reasons(evaluation, GateConfig(min_external_recall=0.0, max_shortcut_score=max(0.0, probe.score - 0.01)))
    assert reasons == [r for r in reasons if r.startswith("shortcut score")] and reasons
    assert f"shortcut score of the {probe.name} probe {probe.score:.4f} is above gate.max_shortcut_score" in reasons[0]
    assert generalization_reasons(evaluation, GateConfig(min_external_recall=0.0)) == []  # 1.0: off
    per_class = GateConfig(min_external_recall={"covid": 0.0})
    assert not [r for r in generalization_reasons(evaluation, per_class) if "normal" in r]  # a map gates only its classes


def test_comparison_and_model_card_carry_the_checks(refused: dict) -> None:
    out = refused["run_dir"] / "model_evaluation"
    table = json.loads((out / "comparison.json").read_text())
    assert [s["name"] for s in table["external"]["sources"]] == ["site-a", "site-b"]
    assert [r["films"] for r in table["external"]["sources"][0]["per_class"]] == [3, 4]
    assert table["external"]["no_external_films"] == ["pneumonia"]
    assert {p["name"] for p in table["shortcut"]["probes"]} == {"acquisition", "masked_lungs"}
    assert "external_worst_recall" in table["candidates"][0]
    assert "ext worst recall" in (out / "comparison.md").read_text()
    card = json.loads((out / "model_card.json").read_text())
    analysis = card["quantitative_analysis"]
    assert analysis["external_checks"]["pooled"][1]["films"] == 9 and analysis["shortcut_check"]["probes"]
    limits = [x["description"] for x in card["considerations"]["limitations"]]
    assert any(x.startswith("Checked on films from 2 other source(s) (site-a, site-b)") for x in limits)
    assert not any("unknown until measured there" in x for x in limits)
    markdown = (out / "model_card.md").read_text()
    assert "## External checks" in markdown and "## Shortcut check" in markdown
    assert "| all sources | pneumonia | 0 | no external films |" in markdown


def test_the_ood_gate_reports_what_it_accepts_of_each_external_source(refused: dict) -> None:
    gate = refused["evaluation"].ood
    assert gate is not None and set(gate.external_accepted) == {"site-a", "site-b"}
    assert all(0.0 <= share <= 1.0 for share in gate.external_accepted.values())
    out = refused["run_dir"] / "model_evaluation"
    card = json.loads((out / "model_card.json").read_text())
    assert card["quantitative_analysis"]["ood_gate"]["external_accepted"].keys() == {"site-a", "site-b"}
    assert f"{gate.external_accepted['site-b']:.3f} of external site-b" in (out / "comparison.md").read_text()
    # the test films behind test_accepted are named, each a film of the test split above the threshold
    test_rows = [json.loads(line) for line in (refused["run_dir"] / "data_transformation" / "splits.jsonl").open()]
    test_refs = {row["ref"]: row["label"] for row in test_rows if row["split"] == "test"}
    assert len(gate.test_refused) == round((1 - gate.test_accepted) * len(test_refs))
    assert all(test_refs[f.ref] == f.label and f.score > gate.threshold for f in gate.test_refused)
    assert card["quantitative_analysis"]["ood_gate"]["test_refused"] == len(gate.test_refused)


def test_the_refused_test_films_stay_in_the_run_not_in_what_callers_read(refused: dict) -> None:
    """model.json (and through it /metadata and the MLflow export) and the model card travel with the pushed
    model and are served to any caller; the films' names stay in the run's evaluation artifact."""
    run_dir, evaluation = refused["run_dir"], refused["evaluation"]
    films = (RefusedFilm("normal/patient-0042.png", "normal", 3.5), RefusedFilm("covid/x.png", "covid", 1.25))
    named = dataclasses.replace(evaluation, ood=dataclasses.replace(evaluation.ood, test_refused=films))
    ingestion = load_typed(DataIngestionArtifact, run_dir / "data_ingestion" / "artifact.json")
    transformation = load_typed(DataTransformationArtifact, run_dir / "data_transformation" / "artifact.json")
    spec = model_spec(run_dir.name, ingestion, transformation, named, run_dir / named.best_checkpoint)
    assert spec.ood is not None and spec.ood.test_refused == () and spec.ood.threshold == evaluation.ood.threshold
    section = model_card._ood_gate(named.ood, named.ood_suite)  # the card's OOD section for this evaluation
    assert section is not None and section["test_refused"] == 2 and "patient-0042" not in json.dumps(section)
    assert "patient-0042" not in "\n".join(model_card._ood_lines(section))


def test_the_run_page_shows_the_external_table(refused: dict) -> None:
    server = new_server(refused["home"]).start()
    try:
        run_id = refused["run_dir"].name
        with httpx.Client(base_url=server.url, timeout=30, headers={"Authorization": f"Bearer {READ_TOKEN}"}) as client:
            page = client.get(f"/ui/runs/{run_id}")
    finally:
        server.stop()
    assert page.status_code == 200
    html = page.text
    assert 'id="external-table"' in html and "<td>site-a</td><td>normal</td>" in html
    (first, *_), = [s.per_class for s in refused["evaluation"].external_check().sources[:1]]
    low, high = first.recall_interval
    assert "95 % interval" in html and f'<td class="num">[{low:.3f}, {high:.3f}]</td>' in html
    assert "no external films (not gated)" in html and 'id="shortcut"' in html
    assert "not pushed" in html and "external recall of" in html


def test_changed_external_films_change_the_cache_key(tmp_path: Path) -> None:
    """The evaluation's cache key includes the external films, so a changed folder is not served from the cache."""
    source = class_folder(tmp_path / "ext", {"normal": 2})
    before = external.listing((ExternalSource(uri=str(source)),))
    class_folder(tmp_path / "ext", {"normal": 3})
    assert external.listing((ExternalSource(uri=str(source)),)) != before
