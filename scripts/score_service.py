"""Accuracy through the served model: post labelled images to a running Bento's /predict.

    python scripts/score_service.py URL DATA_DIR [--run-dir artifacts/RUN --split test]

DATA_DIR holds CLASS/ folders. With --run-dir, only the images that run put in
--split (its data_transformation/splits.jsonl) are sent, so the number can be
compared with the run's own evaluation of the same images.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import httpx


def labelled_images(data: Path, run_dir: Path | None, split: str) -> list[tuple[str, Path]]:
    if run_dir is None:
        return sorted((p.parent.name, p) for p in data.glob("*/*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    rows = [json.loads(line) for line in (run_dir / "data_transformation" / "splits.jsonl").read_text().splitlines()]
    return [(r["label"], data / r["ref"]) for r in rows if r["split"] == split]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("url", help="the Bento's base URL, e.g. http://127.0.0.1:3000")
    parser.add_argument("data", type=Path)
    parser.add_argument("--run-dir", type=Path, default=None)
    parser.add_argument("--split", default="test")
    args = parser.parse_args()
    images = labelled_images(args.data, args.run_dir, args.split)
    confusion: Counter[tuple[str, str]] = Counter()
    with httpx.Client(timeout=120) as client:
        for label, path in images:
            response = client.post(f"{args.url.rstrip('/')}/predict", files={"image": (path.name, path.read_bytes())})
            response.raise_for_status()
            confusion[(label, response.json()["label"])] += 1
    correct = sum(n for (truth, guess), n in confusion.items() if truth == guess)
    print(f"{len(images)} images through {args.url}/predict: accuracy {correct / len(images):.4f}")
    for (truth, guess), n in sorted(confusion.items()):
        print(f"  true {truth:<18} predicted {guess:<18} {n}")


if __name__ == "__main__":
    main()
