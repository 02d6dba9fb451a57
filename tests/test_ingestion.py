"""Ingestion: layouts, image modes, validation findings recorded in the artifact."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from xray.components import data_ingestion
from xray.config import load_config
from xray.errors import DataError
from xray.pipeline.stage import run_alone
from xray.pipeline.store import RunDir

from .data_builders import class_folder, npz_file, pattern, save, split_folder


def ingest(tmp_path: Path, uri: str | Path, *overrides: str):
    config = load_config(None, ["ingestion.min_images_per_class=3", *overrides], data_uri=str(uri))
    run = RunDir.create(tmp_path / "artifacts", {}, str(uri))
    artifact = run_alone(data_ingestion, config, run)
    return artifact, run


def test_class_folder_in_every_mode(tmp_path: Path) -> None:
    root = class_folder(tmp_path / "data", {"normal": 8, "pneumonia": 8}, modes=("L", "RGB", "RGBA", "I;16", "P"))
    class_folder(tmp_path / "data", {"covid": 5}, modes=("RGB",), suffix=".jpg")
    artifact, _ = ingest(tmp_path, root)
    assert artifact.class_names == ("covid", "normal", "pneumonia")
    assert artifact.counts == {"all": {"covid": 5, "normal": 8, "pneumonia": 8}}
    assert artifact.splits_given == ()
    assert artifact.unreadable == ()
    assert artifact.source_kind == "folder"
    assert len(artifact.data_fingerprint) == 64


def test_split_layout_is_detected(tmp_path: Path) -> None:
    root = split_folder(tmp_path / "data", {"train": {"a": 6, "b": 6}, "test": {"a": 3, "b": 3}, "val": {"a": 3, "b": 3}})
    artifact, _ = ingest(tmp_path, root)
    assert artifact.splits_given == ("train", "val", "test")
    assert artifact.counts["test"] == {"a": 3, "b": 3}


def test_unreadable_files_are_listed_and_excluded(tmp_path: Path) -> None:
    root = class_folder(tmp_path / "data", {"a": 5, "b": 5})
    (root / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    good = (root / "b" / "b_000.png").read_bytes()
    (root / "b" / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "a" / "notes.txt").write_text("ignored: not an image suffix")
    artifact, _ = ingest(tmp_path, root)
    assert sorted(u.path for u in artifact.unreadable) == ["a/broken.png", "b/truncated.png"]
    assert artifact.num_images == 10


def test_duplicates_across_splits_are_leakage(tmp_path: Path) -> None:
    root = split_folder(tmp_path / "data", {"train": {"a": 5, "b": 5}, "test": {"a": 3, "b": 3}})
    save(pattern(0, 2), root / "test" / "a" / "copy_of_train.png")  # same pixels as train/a/a_002.png
    artifact, _ = ingest(tmp_path, root)
    assert len(artifact.leakage) == 1
    assert set(artifact.leakage[0].splits) == {"train", "test"}
    with pytest.raises(DataError, match="leakage"):
        ingest(tmp_path / "again", root, "ingestion.leakage=fail")


@pytest.mark.parametrize(
    "classes, message",
    [({"a": 5, "b": 2}, r"too few images in class b \(2\)"), ({"a": 5}, "only one class")],
)
def test_class_count_errors(tmp_path: Path, classes: dict[str, int], message: str) -> None:
    root = class_folder(tmp_path / "data", classes)
    with pytest.raises(DataError, match=message):
        ingest(tmp_path, root)


def test_missing_and_empty_sources(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        ingest(tmp_path, tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        ingest(tmp_path, tmp_path / "empty")
    (tmp_path / "noimg" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="no PNG, JPEG or DICOM images"):
        ingest(tmp_path, tmp_path / "noimg")


def test_npz_grayscale_and_rgb(tmp_path: Path) -> None:
    artifact, _ = ingest(tmp_path, npz_file(tmp_path / "d.npz"), "ingestion.class_names=[normal, pneumonia]")
    assert artifact.class_names == ("normal", "pneumonia")
    assert artifact.counts == {"train": {"normal": 15, "pneumonia": 15}, "val": {"normal": 5, "pneumonia": 5}}
    rgb, _ = ingest(tmp_path / "rgb", npz_file(tmp_path / "rgb.npz", rgb=True))
    assert rgb.class_names == ("class_0", "class_1")


def test_npz_errors(tmp_path: Path) -> None:
    path = tmp_path / "missing.npz"
    np.savez(path, val_images=np.zeros((4, 28, 28), np.uint8), val_labels=np.zeros((4, 1)))
    with pytest.raises(DataError, match="lacks train_images/train_labels"):
        ingest(tmp_path, path)
    path = tmp_path / "mismatch.npz"
    np.savez(path, train_images=np.zeros((5, 28, 28), np.uint8), train_labels=np.zeros((4, 1), np.int64))
    with pytest.raises(DataError, match="5 entries but train_labels has 4"):
        ingest(tmp_path, path)
    path = tmp_path / "corrupt.npz"
    path.write_bytes(b"PK\x03\x04 definitely not a zip")
    with pytest.raises(DataError, match="not a readable .npz"):
        ingest(tmp_path, path)


def test_demo_snapshot_is_hashed_into_the_run(tmp_path: Path) -> None:
    artifact, run = ingest(tmp_path, "demo", "ingestion.demo_images_per_class=4")
    assert artifact.source_kind == "demo"
    assert artifact.num_images == 12
    assert len(artifact.header.files) == 12 + 2  # 12 PNGs, the README, the index
    for record in artifact.header.files:
        assert (run.path / record.path).is_file()


def test_decompression_bomb_header_is_refused_as_too_large() -> None:
    import struct
    import zlib

    from xray.data.preprocessing import ImageTooLargeError, open_image

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0))
    png = b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(b"\0" * 10)) + chunk(b"IEND", b"")
    with pytest.raises(ImageTooLargeError, match="more pixels than allowed"):
        open_image(png)
    small = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 20, 20, 8, 0, 0, 0, 0))
    with pytest.raises(ImageTooLargeError, match="20x20 pixels, above the limit of 100"):
        open_image(small + chunk(b"IDAT", zlib.compress(b"\0" * 420)) + chunk(b"IEND", b""), max_pixels=100)
