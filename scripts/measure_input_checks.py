"""How often each input check refuses real chest films, and how often it catches inverted and rotated copies.

Every film is decoded as serving decodes it for the model that would read it
(``decode_image`` with the JPEG draft at the model's side: 128 px for the
Covid19 three-class model and the external sets it is checked on, the 28-px
arrays themselves for PneumoniaMNIST), then checked with the default
``input_gate`` config at that model's side. The copies are made from the same
decoded film: grey scale inverted (255 - v), rotated by 90, 180 and 270 degrees.

    PYTHONPATH=. .venv/bin/python scripts/measure_input_checks.py
    PYTHONPATH=. .venv/bin/python scripts/measure_input_checks.py --json measured.json

Prints one table per source: rows are the films as they are and each copy,
columns the share each check flags and the share refused by any check.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from xray.data.preprocessing import IMAGE_SUFFIXES, decode_image  # noqa: E402
from xray.data.quality import IMAGE_CHECKS, findings_from_stats, image_stats  # noqa: E402
from xray.entity.config_entity import InputGateConfig  # noqa: E402

logger = logging.getLogger("measure_input_checks")
VARIANTS = {
    "as is": lambda g: g,
    "inverted": lambda g: 255 - g,
    "rotated 90": lambda g: np.rot90(g, 1),
    "rotated 270": lambda g: np.rot90(g, 3),
    "rotated 180": lambda g: np.rot90(g, 2),
}
FOLDER_SOURCES = {  # name -> (folder under the datasets root, the reading model's side)
    "covid19-3class/train": ("covid19-3class/train", 128),
    "hannover-covid/Covid": ("external/hannover-covid/Covid", 128),
    "nih-cxr8": ("external/nih-cxr8", 128),
}
NPZ = "pneumoniamnist/pneumoniamnist_trainval.npz"


@dataclass(frozen=True)
class Film:
    raw: object  # as decoded, before grey conversion
    grey: np.ndarray


def folder_films(root: Path, side: int) -> list[Film]:
    paths = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    films = []
    for path in paths:
        decoded = decode_image(path, draft_size=side)
        films.append(Film(raw=decoded.raw, grey=decoded.grey))
    return films


def npz_films(path: Path) -> list[Film]:
    with np.load(path) as archive:
        images = np.concatenate([archive["train_images"], archive["val_images"]])
    return [Film(raw=image, grey=image) for image in images]


def measure(films: list[Film], side: int, config: InputGateConfig) -> dict[str, dict[str, float]]:
    """variant -> check code (and "any") -> share of films flagged."""
    table: dict[str, dict[str, float]] = {}
    for variant, transform in VARIANTS.items():
        counts: Counter[str] = Counter()
        for film in films:
            stats = image_stats(film.raw, np.ascontiguousarray(transform(film.grey)), config.colour_spread)
            findings = findings_from_stats(stats, config, side)
            counts.update({f.code for f in findings})
            counts["any"] += bool(findings)
        table[variant] = {code: counts[code] / len(films) for code in (*IMAGE_CHECKS, "any")}
    return table


def print_table(name: str, count: int, table: dict[str, dict[str, float]]) -> None:
    columns = (*IMAGE_CHECKS, "any")
    print(f"\n{name} ({count} films)\n")
    print("| copy | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for variant, shares in table.items():
        print(f"| {variant} | " + " | ".join(f"{100 * shares[c]:.1f} %" for c in columns) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", type=Path, default=REPO.parent / "shared" / "datasets")
    parser.add_argument("--json", type=Path, help="also write the shares here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config = InputGateConfig()
    results = {}
    sources = [(name, lambda f=folder, s=side: folder_films(args.datasets / f, s), side) for name, (folder, side) in FOLDER_SOURCES.items()]
    sources.append(("pneumoniamnist (train+val)", lambda: npz_films(args.datasets / NPZ), 28))
    for name, load, side in sources:
        films = load()
        table = measure(films, side, config)
        results[name] = {"films": len(films), "model_side": side, "shares": table}
        print_table(name, len(films), table)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
