#!/usr/bin/env python3
"""Does bf16 serving predict what fp32 predicts? Agreement of the two over a real image set.

    python scripts/check_bf16_agreement.py --model-tag xray-classifier:latest --data ../shared/datasets/covid19-3class/train
    python scripts/check_bf16_agreement.py --model-dir PATH --data ../shared/datasets/pneumoniamnist/pneumoniamnist_trainval.npz --split val

Why: the service runs bf16 autocast where the CPU has it, while the gate
scored the model in fp32 eager. This loads one servable model twice through
xray.serving.serving_model (fp32, then bf16), runs the same pixels (the shared
preprocessing) through both and reports how often the predicted class agrees,
plus accuracy of each where labels are known. Exit status 1 below
--min-agreement (default 99%). Needs a trained model to mean anything.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from xray.data.preprocessing import IMAGE_SUFFIXES, load_pixels, resize_square, to_grayscale_array  # noqa: E402
from xray.serving.serving_model import load_model_dir  # noqa: E402


def model_path(args: argparse.Namespace) -> tuple[str, Path]:
    if args.model_dir:
        return str(args.model_dir), Path(args.model_dir)
    import bentoml

    stored = bentoml.models.get(args.model_tag)
    return str(stored.tag), Path(stored.path)


def spread(items: list, limit: int | None) -> list:
    """``limit`` items evenly spaced over the list, so a small sample still covers every class folder."""
    if limit is None or limit >= len(items):
        return items
    return [items[int(i)] for i in np.linspace(0, len(items) - 1, limit)]


def folder_pixels(root: Path, size: int, class_names: tuple[str, ...], limit: int | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Images under ``root`` (recursively); labels from the parent folder where it names a class."""
    files = spread(sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES), limit)
    if not files:
        raise SystemExit(f"no {'/'.join(IMAGE_SUFFIXES)} images under {root}")
    lookup = {name.lower(): i for i, name in enumerate(class_names)}
    pixels = np.stack([load_pixels(f, size) for f in files])
    labels = [lookup.get(f.parent.name.lower()) for f in files]
    return pixels, (np.array(labels) if all(label is not None for label in labels) else None)


def npz_pixels(path: Path, split: str, size: int, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    from xray.data.sources.npz import load_npz_split

    with np.load(path, allow_pickle=False) as archive:
        images, labels = load_npz_split(archive, split)
    keep = spread(list(range(len(images))), limit)
    images, labels = images[keep], labels[keep]
    out = np.empty((len(images), size, size), dtype=np.uint8)
    for row, image in enumerate(images):
        if image.ndim == 3:
            image = image[..., 0] if image.shape[-1] == 1 else to_grayscale_array(Image.fromarray(image, mode="RGB"))
        out[row] = resize_square(np.ascontiguousarray(image, dtype=np.uint8), size)
    return out, labels


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model-tag", help="a model in the BentoML store (BENTOML_HOME), e.g. xray-classifier:latest")
    source.add_argument("--model-dir", type=Path, help="a servable model directory (model.json + weights.pt)")
    parser.add_argument("--data", type=Path, required=True, help="an image folder (CLASS/… labels) or a MedMNIST .npz (label i = class i)")
    parser.add_argument("--split", default="val", help="npz split (default val)")
    parser.add_argument("--limit", type=int, default=None, help="use N images spread over the set")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--min-agreement", type=float, default=0.99)
    args = parser.parse_args()

    from xray.capability import capability

    print(capability().describe())
    tag, path = model_path(args)
    fp32 = load_model_dir(path, precision="fp32", tag=tag)
    bf16 = load_model_dir(path, precision="bf16", tag=tag)
    spec = fp32.spec
    size = spec.preprocessing.image_size
    if args.data.suffix == ".npz":
        pixels, labels = npz_pixels(args.data, args.split, size, args.limit)
    else:
        pixels, labels = folder_pixels(args.data, size, spec.class_names, args.limit)

    p32 = fp32.predict_proba(pixels, batch_size=args.batch_size)
    p16 = bf16.predict_proba(pixels, batch_size=args.batch_size)
    y32, y16 = p32.argmax(1), p16.argmax(1)
    agreement = float((y32 == y16).mean())
    print(f"model: {tag} ({spec.architecture}, {size}x{size}, classes {list(spec.class_names)})")
    print(f"data: {args.data}{f' [{args.split}]' if args.data.suffix == '.npz' else ''}: {len(pixels)} images")
    print(f"bf16 vs fp32 predicted class agreement: {agreement:.2%} ({int((y32 == y16).sum())}/{len(pixels)})")
    print(f"max |p_bf16 - p_fp32|: {float(np.abs(p16 - p32).max()):.4f}; mean: {float(np.abs(p16 - p32).mean()):.5f}")
    if labels is not None and len(labels) and (args.data.suffix != ".npz" or labels.max() + 1 == len(spec.class_names)):
        print(f"accuracy fp32: {float((y32 == labels).mean()):.2%}; bf16: {float((y16 == labels).mean()):.2%}")
    ok = agreement >= args.min_agreement
    print(f"{'PASS' if ok else 'FAIL'}: agreement {'>=' if ok else '<'} {args.min_agreement:.0%}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
