"""The pixels of an ingested dataset snapshot: decode its items at any square size.

Why here and not in a stage: transformation decodes every split once into the
cached arrays, and the pusher re-decodes the test split at the production
model's size to re-score it; both read the ingestion artifact's snapshot the
same way, and neither stage may import the other.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from xray.entity.artifact_entity import DataIngestionArtifact, DataTransformationArtifact, Item
from xray.errors import DataError
from xray.data.preprocessing import load_pixels, resize_square, to_grayscale_array

SPLITS = ("train", "val", "test")
Decoder = Callable[[list[Item], str], np.ndarray]


def decoder(ingestion: DataIngestionArtifact, run_path: Path, size: int) -> Decoder:
    """(items, split name) -> uint8 N×size×size, for the snapshot's kind (files or an .npz)."""
    root = ingestion.dataset_root(run_path)
    return _npz_decoder(root, size) if ingestion.source_kind == "npz" else _file_decoder(root, size)


def load_npz_split(archive: np.lib.npyio.NpzFile, split: str) -> tuple[np.ndarray, np.ndarray]:
    images = archive[f"{split}_images"]
    labels = np.asarray(archive[f"{split}_labels"])
    if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] not in (1, 3)):
        raise DataError(f"{split}_images must be N×H×W or N×H×W×3, got shape {images.shape}")
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{split}_labels must be N or N×1 integers, got shape {labels.shape} {labels.dtype}")
    return images, labels.astype(np.int64)


def split_pixels(
    run_path: Path, ingestion: DataIngestionArtifact, transformation: DataTransformationArtifact, split: str, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """A split's images at any size: the cached arrays, or re-decoded from the snapshot for another size."""
    labels = transformation.load_array(run_path, f"{split}_y")
    if size == transformation.image_size:
        return transformation.load_array(run_path, f"{split}_x"), labels
    index_path = run_path / Path(transformation.arrays[f"{split}_x"]).parent / "splits.jsonl"
    with open(index_path) as fh:
        rows = [json.loads(line) for line in fh]
    items = [Item(**{k: v for k, v in r.items() if k != "row"}) for r in rows if r["split"] == split]
    return decoder(ingestion, run_path, size)(items, split), labels


def _file_decoder(root: Path, size: int) -> Decoder:
    def decode(items: list[Item], split: str) -> np.ndarray:
        out = np.empty((len(items), size, size), dtype=np.uint8)

        def one(index: int) -> None:
            out[index] = load_pixels(root / items[index].ref, size)

        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            list(tqdm(pool.map(one, range(len(items))), total=len(items), desc=f"decode {split}", unit="img", leave=False, disable=None))
        return out

    return decode


def _npz_decoder(path: Path, size: int) -> Decoder:
    with np.load(path, allow_pickle=False) as archive:
        arrays = {s: load_npz_split(archive, s)[0] for s in SPLITS if f"{s}_images" in archive.files}

    def decode(items: list[Item], split: str) -> np.ndarray:
        out = np.empty((len(items), size, size), dtype=np.uint8)
        for row, item in enumerate(items):
            source_split, index = item.ref.split(":")
            out[row] = resize_square(npz_grey(arrays[source_split][int(index)]), size)
        return out

    return decode


def npz_grey(pixels: np.ndarray) -> np.ndarray:
    """One ``.npz`` image (H×W, H×W×1 or H×W×3, any dtype) -> uint8 grey ``H×W``, as transformation reads it."""
    from PIL import Image

    if pixels.ndim == 3:
        pixels = pixels[..., 0] if pixels.shape[-1] == 1 else to_grayscale_array(Image.fromarray(_as_uint8(pixels), mode="RGB"))
    return _as_uint8(pixels)


def _as_uint8(pixels: np.ndarray) -> np.ndarray:
    """MedMNIST ships uint8; other archives may hold 16-bit or [0, 1] floats."""
    if pixels.dtype == np.uint8:
        return np.ascontiguousarray(pixels)
    values = pixels.astype(np.float64)
    if np.issubdtype(pixels.dtype, np.floating) and values.max() <= 1.0:
        values = values * 255.0
    elif pixels.dtype == np.uint16 or values.max() > 255:
        values = values / max(values.max(), 1.0) * 255.0
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)
