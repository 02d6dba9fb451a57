"""A MedMNIST-style ``.npz``: ``train_images``/``train_labels`` (and ``val_``, ``test_``), integer labels.

Its films are arrays, read where the archive lies; its images were cut from
full-size films (MedMNIST: the centre square, shrunk with a bicubic filter),
which the contract records so serving shrinks a full-size film the same way.
"""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

from xray.data.sources.base import Decoder, Place, Scan, Snapshot
from xray.data.sources.local import LocalSource, local_path
from xray.entity.artifact_entity import Item
from xray.entity.config_entity import IngestionConfig
from xray.errors import DataError

if TYPE_CHECKING:
    import numpy as np

SPLITS = ("train", "val", "test")


class NpzSource(LocalSource):
    kind = "npz"
    noun = "an .npz file"

    def takes_path(self, path: Path) -> bool:
        return path.is_file()  # any file: one that is not an .npz is refused by name below

    def serves_path(self, path: Path) -> bool:
        return path.suffix == ".npz" and path.is_file()

    def snapshot(self, uri: str, config: IngestionConfig, place: Place) -> Snapshot:
        path = local_path(uri)
        if path is None:
            raise DataError(f"data source not found: {uri}")
        root = path.resolve()
        if root.suffix != ".npz":
            raise DataError(f"{uri} is a file but not an .npz archive")
        return Snapshot(root=root, copied=False)

    def scan(self, snapshot: Snapshot, config: IngestionConfig) -> Scan:
        return scan_npz(snapshot.root, config.class_names)

    def decoder(self, root: Path, size: int) -> Decoder:
        return npz_decoder(root, size)

    def contract(self, median_side: int) -> dict[str, str | int]:
        """MedMNIST-style images were cut from full-size films: the centre square, at this side, bicubic."""
        return {"source_crop": "center_square", "source_size": median_side, "source_filter": "bicubic"}


def scan_npz(path: Path, names: tuple[str, ...]) -> Scan:
    import numpy as np

    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path} is not a readable .npz archive: {exc}") from None
    with archive:
        keys = set(archive.files)
        if "train_images" not in keys or "train_labels" not in keys:
            raise DataError(f"{path} lacks train_images/train_labels (has: {', '.join(sorted(keys)) or 'nothing'})")
        label_values: set[int] = set()
        per_split: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for split in SPLITS:
            if f"{split}_images" not in keys and f"{split}_labels" not in keys:
                continue
            if f"{split}_images" not in keys or f"{split}_labels" not in keys:
                raise DataError(f"{path}: {split}_images and {split}_labels must come together")
            try:
                images, labels = load_npz_split(archive, split)
            except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
                raise DataError(f"{path}: cannot read {split} arrays: {exc}") from None
            if len(images) != len(labels):
                raise DataError(f"{path}: {split}_images has {len(images)} entries but {split}_labels has {len(labels)}")
            per_split[split] = (images, labels)
            label_values |= set(labels.tolist())
        stored_names = tuple(str(n) for n in archive["class_names"].tolist()) if "class_names" in keys else ()
    if min(label_values) < 0:
        raise DataError(f"{path}: labels must be non-negative integers")
    count = max(label_values) + 1
    class_names = list(names or stored_names or tuple(f"class_{i}" for i in range(count)))
    if len(class_names) < count:
        raise DataError(f"{path}: labels go up to {count - 1} but only {len(class_names)} class names are given")
    items = []
    median_side = min(per_split["train"][0].shape[1:3])
    for split, (images, labels) in per_split.items():
        for index in range(len(images)):
            digest = hashlib.sha256(np.ascontiguousarray(images[index]).tobytes()).hexdigest()
            items.append(Item(split=split, label=class_names[int(labels[index])], ref=f"{split}:{index}", sha256=digest))
    return Scan(items, class_names, [], median_side)


def load_npz_split(archive: np.lib.npyio.NpzFile, split: str) -> tuple[np.ndarray, np.ndarray]:
    import numpy as np

    images = archive[f"{split}_images"]
    labels = np.asarray(archive[f"{split}_labels"])
    if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] not in (1, 3)):
        raise DataError(f"{split}_images must be N×H×W or N×H×W×3, got shape {images.shape}")
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{split}_labels must be N or N×1 integers, got shape {labels.shape} {labels.dtype}")
    return images, labels.astype(np.int64)


def npz_decoder(path: Path, size: int) -> Decoder:
    import numpy as np

    from xray.data.preprocessing import resize_square

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

    from xray.data.preprocessing import to_grayscale_array

    if pixels.ndim == 3:
        pixels = pixels[..., 0] if pixels.shape[-1] == 1 else to_grayscale_array(Image.fromarray(_as_uint8(pixels), mode="RGB"))
    return _as_uint8(pixels)


def _as_uint8(pixels: np.ndarray) -> np.ndarray:
    """MedMNIST ships uint8; other archives may hold 16-bit or [0, 1] floats."""
    import numpy as np

    if pixels.dtype == np.uint8:
        return np.ascontiguousarray(pixels)
    values = pixels.astype(np.float64)
    if np.issubdtype(pixels.dtype, np.floating) and values.max() <= 1.0:
        values = values * 255.0
    elif pixels.dtype == np.uint16 or values.max() > 255:
        values = values / max(values.max(), 1.0) * 255.0
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)
