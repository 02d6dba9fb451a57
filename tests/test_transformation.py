"""Transformation: split policy, decode-once arrays, duplicate-aware splitting, augmentation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from xray.training.augment import augment_batch
from xray.components import data_ingestion, data_transformation
from xray.components.data_transformation import assign_splits
from xray.config import load_config
from xray.entity.artifact_entity import Item
from xray.entity.config_entity import AugmentConfig
from xray.pipeline.stage import run_alone
from xray.pipeline.store import RunDir

from .data_builders import class_folder, npz_file, pattern, save, split_folder


def transform(tmp_path: Path, uri: Path, *overrides: str):
    config = load_config(None, ["ingestion.min_images_per_class=3", "transformation.image_size=32", *overrides], data_uri=str(uri))
    run = RunDir.create(tmp_path / "artifacts", {}, str(uri))
    ingestion = run_alone(data_ingestion, config, run)
    return run_alone(data_transformation, config, run, ingestion), run


def test_stratified_split_without_source_splits(tmp_path: Path) -> None:
    root = class_folder(tmp_path / "data", {"a": 40, "b": 20})
    artifact, run = transform(tmp_path, root, "transformation.val_fraction=0.2", "transformation.test_fraction=0.2")
    counts = artifact.counts
    assert sum(sum(c.values()) for c in counts.values()) == 60
    assert counts["test"] == {"a": 8, "b": 4}  # stratified: class ratio kept
    assert counts["val"] == {"a": 8, "b": 4}
    x = np.load(run.path / artifact.arrays["train_x"])
    assert x.dtype == np.uint8 and x.shape == (36, 32, 32)
    assert artifact.split_strategy.startswith("stratified")
    assert artifact.augmentation["hflip"] is True
    assert 0 < artifact.normalization["mean"] < 1


def test_source_splits_are_honoured_and_missing_val_is_carved_from_train(tmp_path: Path) -> None:
    root = split_folder(tmp_path / "data", {"train": {"a": 20, "b": 20}, "test": {"a": 4, "b": 4}})
    artifact, _ = transform(tmp_path, root, "transformation.val_fraction=0.25")
    assert artifact.counts["test"] == {"a": 4, "b": 4}
    assert artifact.counts["val"] == {"a": 5, "b": 5}
    assert artifact.counts["train"] == {"a": 15, "b": 15}
    assert "val=0.25" in artifact.split_strategy


def test_npz_is_resized_and_test_carved(tmp_path: Path) -> None:
    artifact, run = transform(tmp_path, npz_file(tmp_path / "d.npz", n_train=40, n_val=10))
    assert artifact.counts["val"] == {"class_0": 5, "class_1": 5}
    assert sum(artifact.counts["test"].values()) == 6  # 15% of 40 train
    assert np.load(run.path / artifact.arrays["test_x"]).shape[1:] == (32, 32)


def test_exact_duplicates_never_straddle_splits(tmp_path: Path) -> None:
    root = class_folder(tmp_path / "data", {"a": 30, "b": 30})
    for copy in range(4):  # a_000 appears five times
        save(pattern(0, 0), root / "a" / f"dup_{copy}.png")
    artifact, run = transform(tmp_path, root)
    rows = [json.loads(line) for line in (run.path / "data_transformation" / "splits.jsonl").read_text().splitlines()]
    dup_hash = next(r["sha256"] for r in rows if r["ref"] == "a/dup_0.png")
    assert len({r["split"] for r in rows if r["sha256"] == dup_hash}) == 1
    assert sum(r["sha256"] == dup_hash for r in rows) == 5


def test_assign_splits_is_deterministic() -> None:
    items = [Item("all", "ab"[i % 2], f"x{i}", f"{i:064x}") for i in range(50)]
    first, _ = assign_splits(items, (), 0.2, 0.2, seed=7)
    second, _ = assign_splits(items, (), 0.2, 0.2, seed=7)
    other, _ = assign_splits(items, (), 0.2, 0.2, seed=8)
    assert first == second
    assert first != other


def test_augmentation_changes_pixels_but_keeps_shape_and_range() -> None:
    x = torch.rand(8, 1, 32, 32)
    cfg = AugmentConfig()
    out = augment_batch(x, cfg, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    assert float(out.min()) >= 0 and float(out.max()) <= 1
    assert not torch.allclose(out, x)
    again = augment_batch(x, cfg, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    off = AugmentConfig(hflip=False, rotation_degrees=0, translate=0, scale=0, brightness=0, contrast=0)
    assert torch.allclose(augment_batch(x, off, torch.Generator().manual_seed(0)), x, atol=1e-5)


def test_auto_image_size_follows_native_resolution(tmp_path: Path) -> None:
    from xray.components.data_transformation import resolve_image_size

    assert resolve_image_size("auto", 28) == 32  # MedMNIST: up to DenseNet's 32x downsampling
    assert resolve_image_size("auto", 70) == 64
    assert resolve_image_size("auto", 128) == 128
    assert resolve_image_size("auto", 2000) == 128
    assert resolve_image_size(96, 2000) == 96
    root = class_folder(tmp_path / "data", {"a": 10, "b": 10})  # 40 px images
    artifact, _ = transform(tmp_path, root, "transformation.image_size=auto")
    assert artifact.image_size == 32


def test_equalize_maps_a_tone_curve_away_and_is_off_by_default() -> None:
    """Two copies of a film that differ by a monotone tone curve become (nearly) one film once equalised."""
    from xray.data.preprocessing import Preprocessing

    film = np.random.default_rng(0).integers(30, 200, (1, 48, 48)).astype(np.uint8)
    curved = (255.0 * (film / 255.0) ** 0.5).round().astype(np.uint8)  # another scanner's gamma
    plain, flat = Preprocessing(48, 0.5, 0.29), Preprocessing(48, 0.5, 0.29, intensity="equalize")
    assert float((plain.to_unit(film) - plain.to_unit(curved)).abs().mean()) > 0.1
    assert float((flat.to_unit(film) - flat.to_unit(curved)).abs().mean()) < 0.02
    unit = flat.to_unit(film)
    assert unit.shape == (1, 1, 48, 48) and float(unit.min()) == 0.0 and float(unit.max()) == 1.0


def test_intensity_equalize_reaches_the_contract_and_the_normalisation(tmp_path: Path) -> None:
    from xray.data.preprocessing import preprocessing_of

    root = class_folder(tmp_path / "data", {"a": 12, "b": 12})
    plain, plain_run = transform(tmp_path / "plain", root)
    flat, flat_run = transform(tmp_path / "flat", root, "transformation.intensity=equalize")
    assert plain.intensity == "none" and preprocessing_of(plain).intensity == "none"
    assert flat.intensity == "equalize" and preprocessing_of(flat).intensity == "equalize"
    # the cache holds the films as decoded; the statistics are those of what the models see
    np.testing.assert_array_equal(np.load(plain_run.path / plain.arrays["train_x"]), np.load(flat_run.path / flat.arrays["train_x"]))
    assert abs(flat.normalization["mean"] - 0.5) < 0.05
    assert flat.normalization != plain.normalization
