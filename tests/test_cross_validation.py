"""k-fold cross-validation: fold files, mean ± std, a CV-based choice, and a test split no fold ever sees."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from xray.components.model_pusher import model_spec
from xray.serving.inference import predict_proba
from xray.models.builders import Ensemble, load_candidate
from xray.serving.serving_model import load_model_dir, write_model_dir
from xray.training import cross_validation
from xray.components.model_evaluation import choose_best, cross_validation_stats
from xray.training.fit import TrainingData
from xray.entity.artifact_entity import CandidateEvaluation, ClassMetrics, SplitMetrics
from xray.entity.config_entity import AugmentConfig, TrainerConfig
from xray.errors import DataError
from xray.data.preprocessing import Preprocessing, preprocessing_of
from xray.pipeline.store import load_manifest, load_stage_artifact

from .conftest import run_cli, tiny_args
from .test_pipeline import run_id_of

K = 3


@pytest.fixture(scope="module")
def cv_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    artifacts = tmp_path_factory.mktemp("cv") / "artifacts"
    result = run_cli(
        "train", "--data", "demo",
        *tiny_args(artifacts, f"trainer.cv_folds={K}", "trainer.epochs=2", "trainer.early_stopping_patience=0", "push.enabled=false"),
    )
    assert result.returncode == 0, result.stderr
    return artifacts, run_id_of(result.stdout)


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_fold_summary_has_k_rows_and_consistent_mean_and_std(cv_run: tuple[Path, str]) -> None:
    artifacts, run_id = cv_run
    manifest = load_manifest(artifacts, run_id)
    trainer = load_stage_artifact(artifacts, manifest, "model_trainer")
    run_dir = artifacts / run_id
    rows = read_csv(run_dir / trainer.cross_validation["summary_csv"])
    assert Counter(r["candidate"] for r in rows) == {"simple_cnn": K}
    assert [int(r["fold"]) for r in rows] == list(range(1, K + 1))
    summary = json.loads((run_dir / trainer.cross_validation["summary_json"]).read_text())
    assert summary["folds"] == K and summary["final_model"] == "ensemble"
    stats = summary["candidates"]["simple_cnn"]
    for metric in ("accuracy", "roc_auc", "macro_f1", "loss"):
        values = [float(r[metric]) for r in rows]
        assert stats["mean"][metric] == pytest.approx(np.mean(values), abs=1e-6)
        assert stats["std"][metric] == pytest.approx(np.std(values), abs=1e-6)
    candidate = trainer.candidates[0]
    assert [f.fold for f in candidate.cv_fold_metrics] == list(range(1, K + 1))
    assert len(candidate.cv_scores) == K
    assert candidate.cv_final_model == "ensemble" and candidate.cv_retrain_epochs is None is stats["retrain_epochs"]
    recorded = {f.path for f in trainer.header.files}
    assert set(trainer.cross_validation.values()) <= recorded, "fold files are hashed in the trainer artifact"
    verify = run_cli("runs", "--artifacts", str(artifacts), "verify", run_id)
    assert verify.returncode == 0, verify.stdout


def test_choice_is_recorded_as_cross_validated(cv_run: tuple[Path, str]) -> None:
    artifacts, run_id = cv_run
    manifest = load_manifest(artifacts, run_id)
    trainer = load_stage_artifact(artifacts, manifest, "model_trainer")
    evaluation = load_stage_artifact(artifacts, manifest, "model_evaluation")
    assert evaluation.selection_basis == "cross_validation"
    assert manifest.summary["selection_basis"] == "cross_validation"
    folds = [getattr(f, evaluation.selection_metric) for f in trainer.candidates[0].cv_fold_metrics]
    assert evaluation.cross_validation["simple_cnn"]["mean"] == pytest.approx(np.mean(folds))
    assert evaluation.cross_validation["simple_cnn"]["std"] == pytest.approx(np.std(folds))
    plot = evaluation.plots["cv_folds"]
    assert plot in {f.path for f in evaluation.header.files}
    assert (artifacts / run_id / plot).stat().st_size > 0
    comparison = json.loads((artifacts / run_id / evaluation.comparison_json).read_text())
    assert comparison["selection_metric"].startswith(f"{K}-fold cross-validated")
    assert comparison["candidates"][0]["cv_folds"] == K


def test_folds_cover_exactly_train_and_val_never_test(cv_run: tuple[Path, str]) -> None:
    artifacts, run_id = cv_run
    manifest = load_manifest(artifacts, run_id)
    trainer = load_stage_artifact(artifacts, manifest, "model_trainer")
    transformation = load_stage_artifact(artifacts, manifest, "data_transformation")
    run_dir = artifacts / run_id
    assignment = read_csv(run_dir / trainer.cross_validation["assignment_csv"])
    held = Counter((r["split"], int(r["row"])) for r in assignment)
    sizes = {s: sum(transformation.counts[s].values()) for s in ("train", "val", "test")}
    expected = {("train", i) for i in range(sizes["train"])} | {("val", i) for i in range(sizes["val"])}
    assert set(held) == expected and set(held.values()) == {1}, "every train+val image held out exactly once"
    assert sizes["test"] > 0 and not any(r["split"] == "test" for r in assignment)
    index = [json.loads(line) for line in (run_dir / "data_transformation" / "splits.jsonl").read_text().splitlines()]
    label_of = {(i["split"], i["row"]): i["label"] for i in index}
    assert all(label_of[(r["split"], int(r["row"]))] == r["label"] for r in assignment), "rows name the right images"
    fold_sizes = Counter(int(r["fold"]) for r in assignment)
    summary_rows = read_csv(run_dir / trainer.cross_validation["summary_csv"])
    assert {int(r["fold"]): int(r["val_size"]) for r in summary_rows} == dict(fold_sizes)


def tiny_data(per_class: int = 6, classes: int = 3, size: int = 16) -> TrainingData:
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(classes), per_class)
    x = rng.integers(0, 60, (len(y), size, size)).astype(np.uint8)
    for i, label in enumerate(y):
        x[i, label * size // classes : (label + 1) * size // classes] += 150
    train = np.arange(len(y)) % 3 != 0
    return TrainingData(
        train_x=x[train], train_y=y[train], val_x=x[~train], val_y=y[~train],
        class_names=tuple(f"c{i}" for i in range(classes)),
        preprocessing=Preprocessing(image_size=size, mean=0.3, std=0.3, channels=1),
        augment=AugmentConfig(),
    )


@pytest.mark.parametrize("monitor, pick", [("roc_auc", max), ("auto", min)])  # auto on 6 held-out images: the loss
def test_best_fold_keeps_the_best_folds_model(monitor: str, pick) -> None:
    data = tiny_data()
    cfg = TrainerConfig(
        candidates=("simple_cnn",), epochs=1, batch_size=8, cv_folds=2, cv_final_model="best_fold", precision="fp32",
        monitor=monitor, min_steps=0,
    )
    plan = cross_validation.plan_folds(data, 2, cfg.seed)
    cv = cross_validation.cross_validate("simple_cnn", data, plan, cfg)
    assert cv.monitor == ("roc_auc" if monitor == "roc_auc" else "loss")
    assert cv.retrain_epochs is None
    assert cv.best_fold == cv.scores.index(pick(cv.scores)) + 1
    assert cv.final.best_score == pytest.approx(pick(cv.scores), abs=1e-6)
    assert cv.final.state_dict, "rank 0 keeps the weights it saves"
    assert sorted(np.concatenate([held for _, held in plan.folds]).tolist()) == list(range(len(plan.y)))


def test_too_few_images_per_class_for_k_folds() -> None:
    with pytest.raises(DataError, match="cv_folds=5 needs at least 5 images of every class"):
        cross_validation.plan_folds(tiny_data(per_class=3), 5, 0)


def split(auc: float) -> SplitMetrics:
    return SplitMetrics(
        accuracy=0.5, roc_auc=auc, macro_f1=0.5, loss=1.0, ece=0.1,
        per_class={"a": ClassMetrics(1, 1, 1, 1)}, confusion_matrix=((1,),),
    )


def test_choose_best_uses_the_cv_mean_when_given() -> None:
    evaluations = [CandidateEvaluation("a", split(0.9), split(0.5)), CandidateEvaluation("b", split(0.7), split(0.99))]
    assert choose_best(evaluations, "roc_auc").name == "a"
    assert choose_best(evaluations, "roc_auc", {"a": 0.6, "b": 0.8}).name == "b"  # test AUC plays no part either way
    assert choose_best(evaluations, "roc_auc", {"a": float("nan"), "b": 0.1}).name == "b"


def test_cv_stats_need_every_candidate_cross_validated(cv_run: tuple[Path, str]) -> None:
    artifacts, run_id = cv_run
    trainer = load_stage_artifact(artifacts, load_manifest(artifacts, run_id), "model_trainer")
    assert set(cross_validation_stats(trainer, "roc_auc")) == {"simple_cnn"}
    plain = type(trainer)(header=trainer.header, architecture_input=trainer.architecture_input, candidates=(
        type(trainer.candidates[0])(**{**trainer.candidates[0].__dict__, "cv_fold_metrics": ()}),
    ))
    assert cross_validation_stats(plain, "roc_auc") == {}


def test_the_final_model_is_the_k_fold_bag_and_serves_as_one(cv_run: tuple[Path, str], tmp_path: Path) -> None:
    artifacts, run_id = cv_run
    manifest = load_manifest(artifacts, run_id)
    ingestion = load_stage_artifact(artifacts, manifest, "data_ingestion")
    transformation = load_stage_artifact(artifacts, manifest, "data_transformation")
    trainer = load_stage_artifact(artifacts, manifest, "model_trainer")
    evaluation = load_stage_artifact(artifacts, manifest, "model_evaluation")
    run_dir = artifacts / run_id
    (candidate,) = trainer.candidates
    assert candidate.members == ("simple_cnn",) * K
    bag = load_candidate(candidate, run_dir, len(transformation.class_names))
    assert isinstance(bag, Ensemble) and len(bag.members) == K
    weights = [next(iter(m.state_dict().values())) for m in bag.members]
    assert not torch.equal(weights[0], weights[1]), "each fold trained its own model"
    assert evaluation.chosen().members == ("simple_cnn",) * K
    spec = model_spec(run_id, ingestion, transformation, evaluation, run_dir / evaluation.best_checkpoint)
    (tmp_path / "model").mkdir()
    stats = run_dir / evaluation.ood.file if evaluation.ood else None  # as the pusher hands them on
    write_model_dir(tmp_path / "model", spec, run_dir / evaluation.best_checkpoint, ood_stats=stats)
    served = load_model_dir(tmp_path / "model", "fp32")
    pixels = transformation.load_array(run_dir, "val_x")[:8]
    preprocessing = preprocessing_of(transformation, evaluation.image_size)
    mean_of_folds = np.mean([predict_proba(m, pixels, preprocessing, torch.device("cpu"), tta=spec.tta) for m in bag.members], axis=0)
    assert served.predict_proba(pixels) == pytest.approx(mean_of_folds, abs=1e-5)


def test_retrain_fits_the_whole_pool_for_the_mean_best_epoch() -> None:
    data = tiny_data()
    cfg = TrainerConfig(
        candidates=("simple_cnn",), epochs=3, batch_size=8, cv_folds=2, cv_final_model="retrain", precision="fp32", min_steps=0
    )
    plan = cross_validation.plan_folds(data, 2, cfg.seed)
    cv = cross_validation.cross_validate("simple_cnn", data, plan, cfg)
    best_epochs = [f.best_epoch for f in cv.folds]
    assert cv.retrain_epochs == cross_validation.retrain_epochs(best_epochs, 3)
    assert len(cv.final.history) == cv.retrain_epochs  # retrained for that many epochs, nothing held out
    assert cv.final.best_score == pytest.approx(float(np.mean(cv.scores)), abs=1e-6)
