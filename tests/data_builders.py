"""Small datasets built on the fly in every image mode the ingestion must accept."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def pattern(label_index: int, index: int, size: int = 40) -> np.ndarray:
    """Distinct per class (bright band position) and per image (noise), so duplicates only occur on purpose."""
    rng = np.random.default_rng(1000 * label_index + index)
    image = rng.integers(0, 60, (size, size)).astype(np.uint8)
    band = slice(label_index * size // 4, label_index * size // 4 + size // 4)
    image[band, :] += 150
    return image


def save(image: np.ndarray, path: Path, mode: str = "L") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "L":
        Image.fromarray(image, "L").save(path)
    elif mode == "RGB":
        Image.fromarray(np.stack([image] * 3, -1), "RGB").save(path)
    elif mode == "RGBA":
        rgba = np.dstack([image, image, image, np.full_like(image, 255)])
        Image.fromarray(rgba, "RGBA").save(path)
    elif mode == "I;16":
        Image.fromarray(image.astype(np.uint16) * 257).save(path)
    elif mode == "P":
        Image.fromarray(image, "L").convert("P").save(path)
    else:
        raise ValueError(mode)
    return path


def class_folder(root: Path, classes: dict[str, int], modes: tuple[str, ...] = ("L",), suffix: str = ".png") -> Path:
    for c, (name, count) in enumerate(classes.items()):
        for i in range(count):
            mode = modes[i % len(modes)]
            ext = ".jpg" if mode == "RGB" and suffix == ".jpg" else suffix
            save(pattern(c, i), root / name / f"{name}_{i:03d}{ext}", mode)
    return root


def split_folder(root: Path, splits: dict[str, dict[str, int]]) -> Path:
    offset = 0
    for split, classes in splits.items():
        for c, (name, count) in enumerate(classes.items()):
            for i in range(count):
                save(pattern(c, offset + i), root / split / name / f"{name}_{i:03d}.png")
        offset += 100
    return root


def npz_file(path: Path, n_train: int = 30, n_val: int = 10, rgb: bool = False) -> Path:
    def make(n: int, start: int) -> tuple[np.ndarray, np.ndarray]:
        labels = np.arange(n) % 2
        images = np.stack([pattern(int(y), start + i, 28) for i, y in enumerate(labels)])
        if rgb:
            images = np.stack([images] * 3, -1)
        return images, labels.reshape(-1, 1).astype(np.uint8)

    train_x, train_y = make(n_train, 0)
    val_x, val_y = make(n_val, 500)
    np.savez(path, train_images=train_x, train_labels=train_y, val_images=val_x, val_labels=val_y)
    return path


def acquisition_folder(
    root: Path, per_class: int = 40, suffixes: tuple[str, str] = (".png", ".png"), marker: bool = False,
    centre_patch: bool = False, size: int = 48,
) -> Path:
    """Two classes ``a`` and ``b`` whose films are drawn alike (noise in 0..120) except for what is asked:
    class b stored with ``suffixes[1]``, or with a bright marker in the top-left corner, or a bright centre patch."""
    rng = np.random.default_rng(7)
    for c, (name, suffix) in enumerate(zip(("a", "b"), suffixes)):
        for i in range(per_class):
            image = rng.integers(0, 120, (size, size)).astype(np.uint8)
            if c == 1 and marker:
                image[: size // 8, : size // 8] = 255
            if c == 1 and centre_patch:
                image[size // 3 : 2 * size // 3, size // 3 : 2 * size // 3] = 255
            path = root / name / f"{name}_{i:03d}{suffix}"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image, "L").save(path, quality=90) if suffix == ".jpg" else Image.fromarray(image, "L").save(path)
    return root
