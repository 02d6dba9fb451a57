"""Model quality features: the ensemble candidate, the bootstrap "cannot tell" rule, test-time
augmentation through one shared path and the MedMNIST preprocessing contract (the external
checks have their own file, test_external_checks.py)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score

from xray.evaluation import selection
from xray.components import model_evaluation
from xray.components.model_evaluation import _Scorer, tta_helps
from xray.config import load_config
from xray.entity.config_entity import EvaluationConfig
from xray.errors import ConfigError
from xray.serving.inference import apply_temperature, predict_proba, prepare_model
from xray.evaluation.metrics import compute_metrics
from xray.models.builders import Ensemble, build_ensemble, build_model
from xray.data.preprocessing import Preprocessing, center_square, load_for_model, resize_square
from xray.serving.serving_model import ModelSpec, load_model_dir, write_model_dir

from .conftest import run_cli, tiny_args
from .data_builders import class_folder, npz_file
from .test_transformation import transform

CPU = torch.device("cpu")
PRE = Preprocessing(image_size=32, mean=0.5, std=0.25)


def _members(num_classes: int = 3) -> list[torch.nn.Module]:
    torch.manual_seed(0)
    return [prepare_model(build_model(name, num_classes), CPU).eval() for name in ("simple_cnn", "densenet121")]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _pixels(n: int = 6, size: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size), dtype=np.uint8)


def test_ensemble_probabilities_are_the_mean_of_its_members() -> None:
    members = _members()
    ensemble = Ensemble(members, ("simple_cnn", "densenet121"))
    pixels = _pixels()
    expected = np.mean([predict_proba(m, pixels, PRE, CPU) for m in members], axis=0)
    np.testing.assert_allclose(predict_proba(ensemble, pixels, PRE, CPU), expected, atol=1e-5)
    assert not np.allclose(expected, predict_proba(members[0], pixels, PRE, CPU), atol=1e-3)


def test_bootstrap_separates_a_clear_winner_from_a_coin_toss() -> None:
    rng = np.random.default_rng(1)
    y = np.repeat([0, 1], 100)
    good = np.stack([1 - (y * 0.8 + rng.uniform(0, 0.2, 200)), y * 0.8 + rng.uniform(0, 0.2, 200)], 1)  # AUC 1.0
    weak = rng.dirichlet([1, 1], 200)  # AUC ~0.5
    near = np.clip(good + rng.normal(0, 0.01, good.shape), 0, 1)
    near /= near.sum(1, keepdims=True)
    probs = {"good": good, "weak": weak, "near": near}
    clear = selection.compare(y, probs, "good", "weak", "roc_auc", resamples=300)
    assert not clear.cannot_tell and clear.low > 0.3
    tie = selection.compare(y, probs, "good", "near", "roc_auc", resamples=300)
    assert tie.cannot_tell and tie.low <= 0 <= tie.high
    # same seed, same answer
    assert selection.compare(y, probs, "good", "weak", "roc_auc", resamples=300) == clear


def test_vectorised_bootstrap_auc_matches_scikit_learn() -> None:
    rng = np.random.default_rng(2)
    y = rng.integers(0, 3, 50)
    probs = rng.dirichlet([1, 1, 1], 50)
    probs[:10] = [0.2, 0.3, 0.5]  # ties
    rows = selection.stratified_resamples(y, 20)
    fast = selection.resampled_scores("roc_auc", y, probs, rows)
    slow = [roc_auc_score(y[r], probs[r], multi_class="ovr", average="macro") for r in rows]
    np.testing.assert_allclose(fast, slow, atol=1e-12)
    assert all(np.bincount(y[r]).tolist() == np.bincount(y).tolist() for r in rows)  # stratified


def test_ensemble_decision_follows_the_bootstrap(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    y = np.repeat([0, 1], 60)
    clear = np.stack([0.95 - y * 0.9, y * 0.9 + 0.05], 1)
    noisy = rng.dirichlet([1, 1], 120)

    def evaluation(name: str, probs: np.ndarray):
        metrics = compute_metrics(y, probs, ("a", "b"))
        return model_evaluation.CandidateEvaluation(name=name, validation=metrics, test=metrics)

    members = [evaluation("clear", clear), evaluation("noisy", noisy)]
    cfg = EvaluationConfig(bootstrap_resamples=200)
    best = model_evaluation.choose_best(members, "roc_auc")
    decision = model_evaluation.decide_ensemble(members, best, {"clear": clear, "noisy": noisy}, y, cfg)
    assert best.name == "clear" and not decision.chosen and "excludes 0" in decision.reason
    twin = [evaluation("clear", clear), evaluation("twin", clear.copy())]
    decision = model_evaluation.decide_ensemble(twin, twin[0], {"clear": clear, "twin": clear}, y, cfg)
    assert decision.chosen and decision.cannot_tell


def test_tta_is_one_path_for_evaluation_and_serving(tmp_path: Path) -> None:
    model = _members(2)[0]
    pixels = _pixels(8)
    flipped = np.ascontiguousarray(pixels[:, :, ::-1])
    expected = (predict_proba(model, pixels, PRE, CPU) + predict_proba(model, flipped, PRE, CPU)) / 2
    np.testing.assert_allclose(predict_proba(model, pixels, PRE, CPU, tta=("hflip",)), expected, atol=1e-6)

    checkpoint = tmp_path / "w.pt"
    torch.save(model.state_dict(), checkpoint)
    spec = ModelSpec("simple_cnn", ("a", "b"), PRE, "run", "fp", _sha256(checkpoint), {}, tta=("hflip",))
    write_model_dir(tmp_path, spec, checkpoint)
    served = load_model_dir(tmp_path, "fp32")
    np.testing.assert_allclose(served.predict_proba(pixels), expected, atol=1e-5)

    labels = np.arange(8) % 2
    arrays = {"val_x": pixels, "val_y": labels, "test_x": pixels, "test_y": labels}
    scorer = _Scorer(arrays, PRE, CPU, ("a", "b"), EvaluationConfig(tta="on"))
    scorer.add("simple_cnn", model, "w.pt")
    assert scorer.scores["simple_cnn"].tta == ("hflip",)
    np.testing.assert_allclose(scorer.raw_probs["simple_cnn"]["test"], expected, atol=1e-6)
    temperature = scorer.scores["simple_cnn"].calibration.temperature  # calibration comes after TTA, on its output
    np.testing.assert_allclose(scorer.test_probs["simple_cnn"], apply_temperature(expected, temperature), atol=1e-5)


def test_tta_kept_only_where_it_helps_validation() -> None:
    y = np.array([0, 1, 0, 1])
    worse = compute_metrics(y, np.array([[0.4, 0.6], [0.6, 0.4], [0.7, 0.3], [0.3, 0.7]]), ("a", "b"))
    better = compute_metrics(y, np.array([[0.8, 0.2], [0.2, 0.8], [0.7, 0.3], [0.3, 0.7]]), ("a", "b"))
    assert tta_helps(worse, better, "roc_auc")
    assert not tta_helps(better, worse, "roc_auc")
    assert not tta_helps(better, better, "roc_auc")  # no gain, no TTA (it doubles serving cost)


def test_served_ensemble_round_trips_through_the_model_dir(tmp_path: Path) -> None:
    members = _members(2)
    ensemble = Ensemble(members, ("simple_cnn", "densenet121"))
    checkpoint = tmp_path / "ensemble.pt"
    torch.save(ensemble.state_dict(), checkpoint)
    spec = ModelSpec("ensemble", ("a", "b"), PRE, "run", "fp", _sha256(checkpoint), {}, members=("simple_cnn", "densenet121"))
    write_model_dir(tmp_path, spec, checkpoint)
    loaded = load_model_dir(tmp_path, "fp32")
    assert isinstance(loaded.model, Ensemble) and len(loaded.model.members) == 2
    pixels = _pixels(4)
    np.testing.assert_allclose(loaded.predict_proba(pixels), predict_proba(ensemble, pixels, PRE, CPU), atol=1e-5)
    assert isinstance(build_ensemble(("simple_cnn",), 2), Ensemble)


def test_medmnist_contract_crops_the_centre_square_then_shrinks_like_the_source(tmp_path: Path) -> None:
    film = np.random.default_rng(4).integers(0, 256, (300, 500), dtype=np.uint8)
    film[:, :100] = 255  # outside the centre square: must not reach the model
    path = tmp_path / "film.png"
    Image.fromarray(film).save(path)
    contract = Preprocessing(32, 0.5, 0.25, source_crop="center_square", source_size=28, source_filter="bicubic")
    square = center_square(film)
    assert square.shape == (300, 300) and (square == film[:, 100:400]).all()
    made = np.asarray(Image.fromarray(square).resize((28, 28), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(load_for_model(path, contract), resize_square(made, 32))
    plain = load_for_model(path, Preprocessing(32, 0.5, 0.25))
    assert not np.array_equal(plain, load_for_model(path, contract))  # a plain squash keeps the white band


def test_npz_sources_record_the_medmnist_contract_and_folders_do_not(tmp_path: Path) -> None:
    npz, _ = transform(tmp_path / "n", npz_file(tmp_path / "d.npz", n_train=40, n_val=10))
    assert (npz.source_crop, npz.source_size, npz.source_filter) == ("center_square", 28, "bicubic")
    folder, _ = transform(tmp_path / "f", class_folder(tmp_path / "data", {"a": 20, "b": 20}))
    assert (folder.source_crop, folder.source_size) == ("none", 0)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["evaluation.ensemble=sometimes"], "evaluation.ensemble"),
        (["evaluation.bootstrap_resamples=5"], "bootstrap_resamples"),
        (["transformation.augment.gamma=-1"], "augment.gamma"),
    ],
)
def test_bad_quality_settings_are_one_line_errors(tmp_path: Path, overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load_config(None, overrides)
    assert message in str(raised.value)


