"""The external check: score models on full-size films from another source, through serving's path.

Validation comes from the training source; a model can look perfect there and
still fail on another hospital's films (PneumoniaMNIST's own test split already
scores lower than its validation: docs/benchmarks.md). ``evaluation.external`` names a folder of class subfolders from a
different source and ``evaluation.external_classes`` maps each model class to
one subfolder. Every film goes through ``load_for_model``, the exact path
``/predict`` uses (including the MedMNIST crop-and-shrink contract), so the
number measures what a service would do with such films.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from xray.errors import DataError
from xray.data.preprocessing import IMAGE_SUFFIXES, ImageDecodeError, Preprocessing, load_for_model

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExternalSet:
    uri: str
    pixels: np.ndarray  # uint8 N×S×S, at the model's input size
    labels: np.ndarray  # int64 N: indices into the model's classes
    counts: dict[str, int]  # model class -> films scored
    unreadable: tuple[str, ...] = ()


def external_files(uri: str, class_map: dict[str, str], class_names: tuple[str, ...]) -> list[tuple[Path, int]]:
    """(film, model-class index) for every image under the mapped subfolders, in a fixed order."""
    root = Path(uri)
    if not root.is_dir():
        raise DataError(f"evaluation.external: {uri} is not a folder (expected CLASS/ subfolders of images)")
    if set(class_map) != set(class_names):
        raise DataError(
            f"evaluation.external_classes must map every model class {list(class_names)} to a subfolder of {uri}, "
            f"got {sorted(class_map)}"
        )
    files = []
    for index, name in enumerate(class_names):
        folder = root / class_map[name]
        if not folder.is_dir():
            raise DataError(f"evaluation.external: no subfolder {class_map[name]!r} in {uri} (for class {name!r})")
        images = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise DataError(f"evaluation.external: {folder} holds no PNG or JPEG images")
        files += [(p, index) for p in images]
    return files


def load_external(
    uri: str, class_map: dict[str, str], class_names: tuple[str, ...], contract: Preprocessing
) -> ExternalSet:
    files = external_files(uri, class_map, class_names)

    def decode(path: Path) -> np.ndarray | None:
        try:
            return load_for_model(path, contract)
        except ImageDecodeError as exc:
            logger.warning("external check: skipping %s: %s", path, exc)
            return None

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        decoded = list(pool.map(decode, [p for p, _ in files]))
    kept = [(pixels, label) for pixels, (_, label) in zip(decoded, files) if pixels is not None]
    if not kept:
        raise DataError(f"evaluation.external: none of the {len(files)} images under {uri} could be read")
    labels = np.array([label for _, label in kept], dtype=np.int64)
    return ExternalSet(
        uri=uri,
        pixels=np.stack([pixels for pixels, _ in kept]),
        labels=labels,
        counts={name: int((labels == i).sum()) for i, name in enumerate(class_names)},
        unreadable=tuple(str(p) for pixels, (p, _) in zip(decoded, files) if pixels is None),
    )
