"""The pixels of an ingested dataset snapshot: decode its items at any square size.

Why here and not in a stage: transformation decodes every split once into the
cached arrays, and the pusher re-decodes the test split at the production
model's size to re-score it; both read the ingestion artifact's snapshot the
same way, and neither stage may import the other.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from xray.entity.artifact_entity import DataIngestionArtifact, DataTransformationArtifact, Item
from xray.data.sources.base import Decoder
from xray.data.sources.registry import source_named

SPLITS = ("train", "val", "test")


def decoder(ingestion: DataIngestionArtifact, run_path: Path, size: int) -> Decoder:
    """(items, split name) -> uint8 N×size×size, read back the way the snapshot's source reads its films."""
    return source_named(ingestion.source_kind).decoder(ingestion.dataset_root(run_path), size)


def split_rows(run_path: Path, transformation: DataTransformationArtifact, *splits: str) -> list[dict]:
    """The splits.jsonl rows of the given splits, in array order (split by SPLITS order, then row).

    One reader for the index transformation writes beside the arrays: its rows carry each image's
    ref, sha256, group, metadata and source, which the trainer, evaluator and pusher each need.
    """
    index_path = run_path / Path(transformation.arrays["train_x"]).parent / "splits.jsonl"
    with open(index_path) as fh:
        rows = [row for row in map(json.loads, fh) if row["split"] in splits]
    return sorted(rows, key=lambda r: (SPLITS.index(r["split"]), r["row"]))


def split_pixels(
    run_path: Path, ingestion: DataIngestionArtifact, transformation: DataTransformationArtifact, split: str, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """A split's images at any size: the cached arrays, or re-decoded from the snapshot for another size."""
    labels = transformation.load_array(run_path, f"{split}_y")
    if size == transformation.image_size:
        return transformation.load_array(run_path, f"{split}_x"), labels
    rows = split_rows(run_path, transformation, split)
    items = [Item(**{k: v for k, v in r.items() if k != "row"}) for r in rows]
    return decoder(ingestion, run_path, size)(items, split), labels
