"""DICOM films -> the pipeline's 8-bit grayscale, the same way in training and serving.

Hospitals export radiographs as DICOM: stored values (12 or 16 bits) pass
through the modality LUT (rescale slope/intercept) and then the VOI LUT or
window the modality chose for display. Only after that is the full output
range scaled down to 8 bits, once, and MONOCHROME1 (white = low values)
inverted, so a film reads like the PNG it would have been exported as.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from xray.errors import ImageTooLargeError

DICOM_SUFFIXES = (".dcm", ".dicom")
_PREAMBLE, _MAGIC = 128, b"DICM"


class DicomUnsupportedError(ValueError):
    """A DICOM file this installation cannot decode (no decoder for its transfer syntax, not an image)."""


@dataclass(frozen=True)
class DicomInfo:
    """The attributes that decided how the pixels were read; recorded per ingested film."""

    modality: str
    photometric_interpretation: str
    bits_stored: int
    transfer_syntax: str
    window: str  # "center/width", "VOI LUT", or "none" (full stored range)
    rows: int
    columns: int


def is_dicom(data: bytes | Path) -> bool:
    """Part-10 files carry ``DICM`` after a 128-byte preamble."""
    if isinstance(data, Path):
        with open(data, "rb") as fh:
            head = fh.read(_PREAMBLE + 4)
    else:
        head = data[: _PREAMBLE + 4]
    return head[_PREAMBLE:] == _MAGIC


def _grey_levels(ds: Any, stored: np.ndarray, bits_stored: int) -> tuple[np.ndarray, float, float, str]:
    """(pixels through the modality and VOI LUTs, the output range low..high, the window applied)."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    if stored.ndim == 3:  # colour (RGB after pydicom's YBR conversion): luma, as PIL's convert("L")
        return stored[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114]), 0.0, float(2**bits_stored - 1), "none"
    pixels = apply_modality_lut(stored, ds)
    lo, hi = _output_range(ds, bits_stored)
    if ds.get("VOILUTSequence"):
        window = "VOI LUT"
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        window = f"{_first(ds.WindowCenter):g}/{_first(ds.WindowWidth):g}"
    else:
        window = "none"
    if window != "none":
        pixels = apply_voi_lut(pixels, ds)
        if window == "VOI LUT":
            lo, hi = 0.0, float(2 ** int(ds.VOILUTSequence[0].LUTDescriptor[2]) - 1)
    return pixels, lo, hi, window


@dataclass(frozen=True)
class DicomRead:
    """One decoded DICOM film with what the input checks look at: the dataset (its attributes) and the stored pixels."""

    pixels: np.ndarray  # uint8 H×W, as every model sees it
    info: DicomInfo
    dataset: Any  # pydicom.Dataset
    stored: np.ndarray  # the pixel data before the LUTs (H×W, or H×W×3 for colour)


def read_dicom(data: bytes | Path, max_pixels: int) -> tuple[np.ndarray, DicomInfo]:
    """Decode a DICOM film to uint8 ``H×W`` (modality LUT, VOI LUT/window, MONOCHROME1 inverted).

    Raises ``DicomUnsupportedError`` when the file is valid DICOM that cannot be
    decoded here and ``ValueError`` for a damaged one; an image larger than
    ``max_pixels`` is refused from its header, before decoding.
    """
    read = read_dicom_dataset(data, max_pixels)
    return read.pixels, read.info


def read_dicom_dataset(data: bytes | Path, max_pixels: int) -> DicomRead:
    """``read_dicom``, keeping the dataset and the stored pixels for the input checks (no second decode)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(io.BytesIO(data) if isinstance(data, bytes) else data)
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"damaged DICOM file: {exc}") from None
    if "PixelData" not in ds:
        raise DicomUnsupportedError("DICOM file holds no image (no PixelData): a report or structured document?")
    rows, columns = int(ds.get("Rows", 0)), int(ds.get("Columns", 0))
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if rows * columns > max_pixels:
        raise ImageTooLargeError(f"image is {columns}x{rows} pixels, above the limit of {max_pixels}")
    if frames > 1:
        raise DicomUnsupportedError(f"multi-frame DICOM ({frames} frames) is not a single radiograph")
    syntax = ds.file_meta.get("TransferSyntaxUID", pydicom.uid.ImplicitVRLittleEndian)
    try:
        stored = ds.pixel_array
    except (NotImplementedError, RuntimeError) as exc:
        raise DicomUnsupportedError(
            f"no decoder installed for DICOM transfer syntax {syntax} ({getattr(syntax, 'name', '')}): {exc}".replace("\n", " ")
        ) from None
    except (ValueError, AttributeError, KeyError, TypeError, EOFError, OSError) as exc:
        raise ValueError(f"damaged DICOM pixel data: {exc}") from None

    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    bits_stored = int(ds.get("BitsStored", ds.get("BitsAllocated", 8)))
    pixels, lo, hi, window = _grey_levels(ds, stored, bits_stored)
    scaled = (np.asarray(pixels, dtype=np.float64) - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros(stored.shape[:2])
    out = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    if photometric == "MONOCHROME1":
        out = 255 - out
    info = DicomInfo(
        modality=str(ds.get("Modality", "")),
        photometric_interpretation=photometric,
        bits_stored=bits_stored,
        transfer_syntax=str(syntax),
        window=window,
        rows=rows,
        columns=columns,
    )
    return DicomRead(pixels=out, info=info, dataset=ds, stored=stored)


def _first(value: object) -> float:
    """Window center/width may be multi-valued; the first is the default presentation."""
    from pydicom.multival import MultiValue

    return float(value[0] if isinstance(value, MultiValue) else value)  # type: ignore[arg-type,index]


def _output_range(ds: object, bits_stored: int) -> tuple[float, float]:
    """The stored value range mapped through the modality LUT: what "full bit depth" means for this film."""
    if ds.get("ModalityLUTSequence"):  # type: ignore[attr-defined]
        return 0.0, float(2 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1)  # type: ignore[attr-defined]
    if int(ds.get("PixelRepresentation", 0)) == 0:  # type: ignore[attr-defined]
        lo, hi = 0.0, float(2**bits_stored - 1)
    else:
        lo, hi = float(-(2 ** (bits_stored - 1))), float(2 ** (bits_stored - 1) - 1)
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")  # type: ignore[attr-defined]
    if slope is not None and intercept is not None:
        lo, hi = lo * float(slope) + float(intercept), hi * float(slope) + float(intercept)
    return min(lo, hi), max(lo, hi)
