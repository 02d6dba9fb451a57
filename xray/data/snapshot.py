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
