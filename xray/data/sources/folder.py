"""A local folder of class folders (``CLASS/…`` or ``train|val|test/CLASS/…``): the films are its image files.

The demo data and an S3 mirror are read the same way once taken (``FolderFilms``).
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

from xray.data.sources.base import Decoder, Place, Scan, Snapshot
from xray.data.sources.local import LocalSource, local_path
from xray.entity.artifact_entity import Item, UnreadableFile
from xray.entity.config_entity import IngestionConfig
from xray.errors import DataError

SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


class FolderFilms:
    """Films as image files under class folders: how a folder, the demo data and an S3 mirror are read."""

    def scan(self, snapshot: Snapshot, config: IngestionConfig) -> Scan:
        return scan_folder(snapshot.root)

    def decoder(self, root: Path, size: int) -> Decoder:
        return file_decoder(root, size)


class FolderSource(FolderFilms, LocalSource):
    kind = "folder"
    noun = "a folder"

    def takes_path(self, path: Path) -> bool:
        return path.is_dir()

    def snapshot(self, uri: str, config: IngestionConfig, place: Place) -> Snapshot:
        path = local_path(uri)
        if path is None:
            raise DataError(f"data source not found: {uri}")
        return Snapshot(root=path.resolve(), copied=False)


def _sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def scan_folder(root: Path) -> Scan:
    from tqdm import tqdm

    from xray.data.preprocessing import DICOM_SUFFIXES, IMAGE_SUFFIXES, ImageDecodeError, decode_grayscale, open_image

    top = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not top:
        raise DataError(f"{root} holds no class folders (expected CLASS/… or train/CLASS/…)")
    split_layout = all(p.name.lower() in SPLIT_NAMES for p in top)
    if split_layout and not any(SPLIT_NAMES[p.name.lower()] == "train" for p in top):
        raise DataError(f"{root} has split folders but no train/ folder")
    candidates: list[tuple[str, str, Path]] = []  # split, label, path
    for split_dir in top if split_layout else [root]:
        split = SPLIT_NAMES[split_dir.name.lower()] if split_layout else "all"
        for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
            for path in sorted(class_dir.rglob("*")):
                if path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_SUFFIXES:
                    candidates.append((split, class_dir.name, path))
    if not candidates:
        raise DataError(f"{root} holds no PNG, JPEG or DICOM images")

    sides: dict[str, int] = {}

    def check(entry: tuple[str, str, Path]) -> Item | UnreadableFile:
        split, label, path = entry
        ref = path.relative_to(root).as_posix()
        dicom = None
        try:
            if path.suffix.lower() in DICOM_SUFFIXES:  # decoded in full: a syntax without a decoder shows here
                pixels, info = decode_grayscale(path)
                sides[ref] = min(pixels.shape)
                dicom = asdict(info) if info is not None else None
            else:
                image = open_image(path, draft_size=64, keep_size=True)
                sides[ref] = min(image.info["xray_original_size"])
        except ImageDecodeError as exc:
            return UnreadableFile(path=ref, reason=str(exc))
        return Item(split=split, label=label, ref=ref, sha256=_sha256(path), dicom=dicom)

    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) * 2)) as pool:
        results = list(tqdm(pool.map(check, candidates), total=len(candidates), desc="validate", unit="img", leave=False, disable=None))
    items = [r for r in results if isinstance(r, Item)]
    unreadable = [r for r in results if isinstance(r, UnreadableFile)]
    class_names = sorted({i.label for i in items} | {label for _, label, _ in candidates})
    median_side = _median(list(sides.values()))
    return Scan(items, class_names, unreadable, median_side)


def _median(values: list[int]) -> int:
    import numpy as np

    return int(np.median(values)) if values else 0


def file_decoder(root: Path, size: int) -> Decoder:
    import numpy as np
    from tqdm import tqdm

    from xray.data.preprocessing import load_pixels

    def decode(items: list[Item], split: str) -> np.ndarray:
        out = np.empty((len(items), size, size), dtype=np.uint8)

        def one(index: int) -> None:
            out[index] = load_pixels(root / items[index].ref, size)

        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            list(tqdm(pool.map(one, range(len(items))), total=len(items), desc=f"decode {split}", unit="img", leave=False, disable=None))
        return out

    return decode
