"""DICOM in: the decoding rules (LUTs, window, MONOCHROME1, bit depth), refusals, and a DICOM folder trained end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests import dicom_builders as dcm
from tests.conftest import run_cli, tiny_args
from tests.data_builders import pattern
from tests.serving_fixtures import radiograph
from xray.data.preprocessing import ImageDecodeError, ImageTooLargeError, UnsupportedImageFormat, decode_grayscale, load_pixels

SOURCE = radiograph()

LOSSLESS = {
    "16-bit MONOCHROME2": lambda: dcm.uncompressed(SOURCE, 16),
    "12-bit MONOCHROME2": lambda: dcm.uncompressed(SOURCE, 12),
    "16-bit MONOCHROME1": lambda: dcm.uncompressed(SOURCE, 16, "MONOCHROME1"),
    "12-bit MONOCHROME1": lambda: dcm.uncompressed(SOURCE, 12, "MONOCHROME1"),
    "16-bit windowed": lambda: dcm.uncompressed(SOURCE, 16, window=True),
    "12-bit MONOCHROME1 windowed": lambda: dcm.uncompressed(SOURCE, 12, "MONOCHROME1", window=True),
    "12-bit JPEG 2000 lossless": lambda: dcm.jpeg2000_lossless(SOURCE, 12),
}


@pytest.mark.parametrize("variant", sorted(LOSSLESS))
def test_dicom_variants_decode_to_the_source_pixels(variant: str) -> None:
    pixels, info = decode_grayscale(LOSSLESS[variant]())
    assert pixels.dtype == np.uint8 and pixels.shape == SOURCE.shape
    assert np.array_equal(pixels, SOURCE), f"max difference {np.abs(pixels.astype(int) - SOURCE).max()}"
    assert info is not None and info.modality == "DX"
    assert info.bits_stored == (16 if variant.startswith("16") else 12)
    assert info.photometric_interpretation == ("MONOCHROME1" if "MONOCHROME1" in variant else "MONOCHROME2")
    assert (info.window != "none") == ("windowed" in variant)


def test_window_is_applied_not_ignored() -> None:
    """The windowed film stores values in the middle half only: read without the window it would be grey mush."""
    payload = dcm.uncompressed(SOURCE, 16, window=True)
    pixels, info = decode_grayscale(payload)
    assert info is not None and info.window == "32768/32768.5"
    assert pixels.min() == SOURCE.min() and pixels.max() == SOURCE.max()


def test_jpeg_compressed_dicom_decodes_close_to_the_source() -> None:
    pixels, info = decode_grayscale(dcm.jpeg_baseline(SOURCE))
    assert info is not None and info.transfer_syntax == "1.2.840.10008.1.2.4.50"
    assert np.abs(pixels.astype(int) - SOURCE).mean() < 2.0  # lossy JPEG at quality 95


def test_dicom_and_png_give_the_same_model_input() -> None:
    from tests.serving_fixtures import encode
    from PIL import Image

    png = encode(Image.fromarray(SOURCE))
    for payload in (dcm.uncompressed(SOURCE, 12, "MONOCHROME1"), dcm.jpeg2000_lossless(SOURCE, 12)):
        assert np.array_equal(load_pixels(payload, 32), load_pixels(png, 32))


def test_undecodable_transfer_syntax_is_unsupported_not_damaged() -> None:
    with pytest.raises(UnsupportedImageFormat, match="no decoder installed for DICOM transfer syntax 1.2.840.10008.1.2.4.100"):
        decode_grayscale(dcm.undecodable(SOURCE))


def test_damaged_and_oversize_dicom_are_refused() -> None:
    payload = dcm.uncompressed(SOURCE, 16)
    with pytest.raises(ImageDecodeError, match="DICOM") as caught:
        decode_grayscale(payload[: len(payload) - 500])
    assert not isinstance(caught.value, UnsupportedImageFormat)
    with pytest.raises(ImageTooLargeError, match="80x96"):
        decode_grayscale(payload, max_pixels=1000)


def test_dicom_folder_trains_end_to_end(tmp_path: Path) -> None:
    """Mixed 12/16-bit, MONOCHROME1/2, windowed and compressed films; one undecodable file is recorded, not fatal."""
    root = tmp_path / "data"
    builders = [
        lambda p: dcm.uncompressed(p, 16),
        lambda p: dcm.uncompressed(p, 12, "MONOCHROME1"),
        lambda p: dcm.uncompressed(p, 12, window=True),
        lambda p: dcm.jpeg2000_lossless(p, 12),
        lambda p: dcm.jpeg_baseline(p),
    ]
    for c, name in enumerate(("normal", "pneumonia")):
        for i in range(15):
            dcm.write(root / name / f"{name}_{i:02d}.dcm", builders[i % len(builders)](pattern(c, i)))
    dcm.write(root / "normal" / "mpeg.dcm", dcm.undecodable(pattern(0, 99)))
    result = run_cli("train", "--data", str(root), *tiny_args(tmp_path / "artifacts"), "--set", "push.enabled=false")
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = next((tmp_path / "artifacts").glob("2*"))
    ingestion = json.loads((run_dir / "data_ingestion" / "artifact.json").read_text())
    assert ingestion["dicom_images"] == 30 and ingestion["num_images"] == 30
    assert [u["path"] for u in ingestion["unreadable"]] == ["normal/mpeg.dcm"]
    assert "no decoder installed" in ingestion["unreadable"][0]["reason"]
    items = [json.loads(line) for line in (run_dir / "data_ingestion" / "items.jsonl").read_text().splitlines()]
    windows = {i["dicom"]["window"] for i in items}
    assert "none" in windows and any("/" in w for w in windows)
    assert {i["dicom"]["photometric_interpretation"] for i in items} == {"MONOCHROME1", "MONOCHROME2"}
    assert {i["dicom"]["bits_stored"] for i in items} == {8, 12, 16}
    assert (run_dir / "model_evaluation" / "model_card.json").is_file()
