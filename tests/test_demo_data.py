"""The embedded synthetic dataset: reproducible, safe to rerun, and learnable."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from xray.data.demo_data import DEMO_CLASSES, generate_demo_dataset, nominal_lung_mask, render_phantom
from xray.errors import ConfigError, DataError

SMALL = {"images_per_class": 4, "size": 64, "seed": 0}


def _tree(root: Path) -> dict[str, bytes]:
    """Every file under root by relative path, so two datasets compare byte for byte."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _load(root: Path, label: str) -> list[np.ndarray]:
    return [np.asarray(Image.open(p), dtype=np.float64) for p in sorted((root / label).glob("*.png"))]


def test_classes_are_the_documented_three() -> None:
    assert DEMO_CLASSES == ("covid", "normal", "pneumonia")


def test_same_arguments_give_byte_identical_files(tmp_path: Path) -> None:
    generate_demo_dataset(tmp_path / "a", **SMALL)
    generate_demo_dataset(tmp_path / "b", **SMALL)
    a, b = _tree(tmp_path / "a"), _tree(tmp_path / "b")
    assert a == b
    assert len(a) == 3 * 4 + 1


def test_other_seed_gives_other_images(tmp_path: Path) -> None:
    generate_demo_dataset(tmp_path / "a", **SMALL)
    generate_demo_dataset(tmp_path / "b", **{**SMALL, "seed": 1})
    a, b = _tree(tmp_path / "a"), _tree(tmp_path / "b")
    assert a["covid/covid_0000.png"] != b["covid/covid_0000.png"]


def test_images_do_not_depend_on_how_many_were_asked_for(tmp_path: Path) -> None:
    generate_demo_dataset(tmp_path / "few", **{**SMALL, "images_per_class": 2})
    generate_demo_dataset(tmp_path / "more", **SMALL)
    few, more = _tree(tmp_path / "few"), _tree(tmp_path / "more")
    pngs = [k for k in few if k.endswith(".png")]
    assert len(pngs) == 6
    assert all(few[k] == more[k] for k in pngs)


def test_layout_counts_and_readme(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    counts = generate_demo_dataset(out, **SMALL)
    assert counts == {c: 4 for c in DEMO_CLASSES}
    assert sorted(p.name for p in out.iterdir()) == ["README.txt", *DEMO_CLASSES]
    for c in DEMO_CLASSES:
        assert sorted(p.name for p in (out / c).iterdir()) == [f"{c}_{i:04d}.png" for i in range(4)]
    readme = (out / "README.txt").read_text()
    assert "SYNTHETIC" in readme
    assert "xray.data.demo_data" in readme
    assert "seed: 0" in readme
    for c in DEMO_CLASSES:
        assert f"{c}: 4" in readme


@pytest.mark.parametrize("size", [64, 96])
def test_pngs_are_8bit_grayscale_of_requested_size(tmp_path: Path, size: int) -> None:
    out = tmp_path / "demo"
    generate_demo_dataset(out, images_per_class=2, size=size, seed=3)
    pngs = sorted(out.rglob("*.png"))
    assert len(pngs) == 6
    for p in pngs:
        with Image.open(p) as im:
            assert im.format == "PNG"
            assert im.mode == "L"
            assert im.size == (size, size)
            pixels = np.asarray(im)
        # Not blank, not saturated: there is a picture in there.
        assert pixels.std() > 10
        assert 20 < pixels.mean() < 235


def test_refuses_a_foreign_non_empty_directory(tmp_path: Path) -> None:
    out = tmp_path / "data"
    out.mkdir()
    (out / "notes.txt").write_text("someone's real data")
    with pytest.raises(DataError, match="already exists and is not empty"):
        generate_demo_dataset(out, **SMALL)
    assert _tree(out) == {"notes.txt": b"someone's real data"}


def test_refuses_a_different_earlier_demo_dataset(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    generate_demo_dataset(out, **SMALL)
    before = _tree(out)
    for other in ({**SMALL, "seed": 1}, {**SMALL, "images_per_class": 5}, {**SMALL, "size": 96}):
        with pytest.raises(DataError, match="already exists and is not empty"):
            generate_demo_dataset(out, **other)
    assert _tree(out) == before


def test_refuses_a_tampered_image(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    generate_demo_dataset(out, **SMALL)
    victim = out / "normal" / "normal_0001.png"
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(victim)
    tampered = victim.read_bytes()
    with pytest.raises(DataError):
        generate_demo_dataset(out, **SMALL)
    assert victim.read_bytes() == tampered


def test_rerun_on_identical_dataset_is_a_no_op(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    first = generate_demo_dataset(out, **SMALL)
    before = _tree(out)
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert generate_demo_dataset(out, **SMALL) == first
    assert _tree(out) == before
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == mtimes


def test_completes_an_interrupted_run(tmp_path: Path) -> None:
    generate_demo_dataset(tmp_path / "ref", **SMALL)
    out = tmp_path / "demo"
    generate_demo_dataset(out, **SMALL)
    (out / "README.txt").unlink()
    (out / "pneumonia" / "pneumonia_0003.png").unlink()
    (out / "covid" / ".covid_0002.png.partial").write_bytes(b"half an image")
    generate_demo_dataset(out, **SMALL)
    assert _tree(out) == _tree(tmp_path / "ref")


def test_empty_existing_directory_is_fine(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    out.mkdir()
    assert generate_demo_dataset(out, **SMALL) == {c: 4 for c in DEMO_CLASSES}


def test_refuses_a_file_in_place_of_the_directory(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    out.write_text("not a directory")
    with pytest.raises(DataError):
        generate_demo_dataset(out, **SMALL)


@pytest.mark.parametrize(
    "kwargs",
    [{"images_per_class": 0}, {"images_per_class": 10_000}, {"size": 16}, {"seed": -1}, {"size": 64.0}],
)
def test_rejects_bad_arguments(tmp_path: Path, kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        generate_demo_dataset(tmp_path / "demo", **{**SMALL, **kwargs})  # type: ignore[arg-type]
    assert not (tmp_path / "demo").exists()


def test_render_phantom_rejects_unknown_class() -> None:
    with pytest.raises(ConfigError):
        render_phantom("tuberculosis", 0)


def test_classes_differ_where_the_disease_is(tmp_path: Path) -> None:
    """Diseased lungs are brighter than clear ones, measured from the written pixels.

    Exposure varies per film, so each image's lung mean is taken relative to
    its own soft-tissue level (the 75th percentile of the image).
    """
    size, n = 128, 20
    generate_demo_dataset(tmp_path / "demo", images_per_class=n, size=size, seed=0)
    lungs = nominal_lung_mask(size)
    left = np.zeros_like(lungs)
    left[:, : size // 2] = True

    def lung_level(img: np.ndarray) -> float:
        return float(img[lungs].mean() / np.percentile(img, 75))

    def asymmetry(img: np.ndarray) -> float:
        return float(abs(img[lungs & left].mean() - img[lungs & ~left].mean()) / np.percentile(img, 75))

    images = {c: _load(tmp_path / "demo", c) for c in DEMO_CLASSES}
    assert all(len(v) == n for v in images.values())
    level = {c: np.mean([lung_level(im) for im in ims]) for c, ims in images.items()}
    assert level["pneumonia"] > level["normal"]
    assert level["covid"] > level["normal"]
    # Pneumonia sits in one lung, so it unbalances left against right.
    asym = {c: np.mean([asymmetry(im) for im in ims]) for c, ims in images.items()}
    assert asym["pneumonia"] > asym["normal"]
