"""DICOM films built with pydicom from 8-bit pixels, in the variants hospitals send.

Each builder stores ``pixels`` so that the pipeline's DICOM path must give
back the same 8-bit image (±1 where a window rounds): that is what lets the
tests compare a DICOM with the PNG it was made from.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    SecondaryCaptureImageStorage,
    UID,
    generate_uid,
)

# MPEG-2 video: a real transfer syntax no installed pixel-data handler decodes.
UNDECODABLE_SYNTAX = UID("1.2.840.10008.1.2.4.100")


def _dataset(pixels: np.ndarray, syntax: UID = ExplicitVRLittleEndian) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.PatientID = "PHANTOM"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PixelRepresentation = 0
    return ds


def _bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def uncompressed(
    pixels: np.ndarray, bits: int = 16, photometric: str = "MONOCHROME2", window: bool = False
) -> bytes:
    """``bits``-bit film whose full stored range maps back to ``pixels``; MONOCHROME1 stores it inverted.

    With ``window`` the stored values sit in the middle half of the range and
    a window covering exactly that half is given (so ignoring the window would
    give a washed-out image, not the original).
    """
    top = 2**bits - 1
    values = pixels.astype(np.float64) / 255.0
    if photometric == "MONOCHROME1":
        values = 1.0 - values
    ds = _dataset(pixels)
    if window:
        low, width = top / 4, top / 2
        stored = np.rint(low + values * width)
        ds.WindowCenter, ds.WindowWidth = f"{low + width / 2 + 0.5:.1f}", f"{width + 1:.1f}"
    else:
        stored = np.rint(values * top)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits, bits - 1
    ds.PhotometricInterpretation = photometric
    ds.PixelData = stored.astype(np.uint16).tobytes()
    return _bytes(ds)


def jpeg_baseline(pixels: np.ndarray, quality: int = 95) -> bytes:
    """8-bit JPEG-compressed DICOM (what many PACS export): a Pillow JPEG, encapsulated."""
    buffer = io.BytesIO()
    Image.fromarray(pixels, "L").save(buffer, format="JPEG", quality=quality)
    ds = _dataset(pixels, JPEGBaseline8Bit)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = encapsulate([buffer.getvalue()])
    ds["PixelData"].VR = "OB"
    return _bytes(ds)


def jpeg2000_lossless(pixels: np.ndarray, bits: int = 12) -> bytes:
    """``bits``-bit JPEG 2000 lossless film, compressed by pydicom through pylibjpeg-openjpeg."""
    top = 2**bits - 1
    ds = _dataset(pixels)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits, bits - 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    stored = np.rint(pixels.astype(np.float64) / 255.0 * top).astype(np.uint16)
    ds.compress(JPEG2000Lossless, stored)
    return _bytes(ds)


def undecodable(pixels: np.ndarray) -> bytes:
    """Valid DICOM whose pixel data claim a transfer syntax nothing here decodes."""
    ds = _dataset(pixels, UNDECODABLE_SYNTAX)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = encapsulate([b"\x00\x00\x01\xb3" + bytes(64)])
    ds["PixelData"].VR = "OB"
    return _bytes(ds)


def write(path: Path, payload: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(payload)
    return path


def with_attributes(payload: bytes, **attributes: str) -> bytes:
    """The same film with DICOM attributes set (``Modality="CT"``, ``ViewPosition="LL"``…); ``""`` deletes one."""
    from pydicom import dcmread

    ds = dcmread(io.BytesIO(payload))
    for name, value in attributes.items():
        if value == "":
            if name in ds:
                delattr(ds, name)
        else:
            setattr(ds, name, value)
    return _bytes(ds)


def rgb(pixels: np.ndarray) -> bytes:
    """An 8-bit RGB DICOM (a secondary capture, as some systems export): ``pixels`` in all three channels."""
    ds = _dataset(pixels)
    ds.SamplesPerPixel, ds.PlanarConfiguration = 3, 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PhotometricInterpretation = "RGB"
    ds.PixelData = np.ascontiguousarray(np.stack([pixels] * 3, -1)).tobytes()
    return _bytes(ds)
