"""Stage 2: split, decode every image once into cached arrays, record the augmentation.

Epochs then read uint8 arrays from memory instead of re-decoding JPEGs, which
is where a naive loop spends most of its time on full-size radiographs.
Exact duplicates are kept in the same split so a test image never has a twin
in training.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold, train_test_split

from xray.entity.artifact_entity import DataIngestionArtifact, DataTransformationArtifact, Item
from xray.entity.config_entity import PipelineConfig
from xray.errors import DataError
from xray.pipeline.stage import Inputs, StageContext
from xray.pipeline.store import fingerprint as fingerprint_of, new_header, stage_code_hash
from xray.data.preprocessing import equalize, resolve_image_size
from xray.data.snapshot import SPLITS, Decoder, decoder
from xray.data.sources.registry import source_named
from xray.typed import to_jsonable

logger = logging.getLogger(__name__)

STAGE = "data_transformation"
CACHED = True


def fingerprint(config: PipelineConfig, inputs: Inputs) -> str:
    upstream = [inputs.get(DataIngestionArtifact).header.fingerprint]
    return fingerprint_of(STAGE, to_jsonable(config.transformation), upstream, stage_code_hash(__name__))


def run(ctx: StageContext, inputs: Inputs) -> DataTransformationArtifact:
    cfg, run_dir = ctx.config.transformation, ctx.run
    ingestion = inputs.get(DataIngestionArtifact)
    size = resolve_image_size(cfg.image_size, ingestion.median_image_side)
    items = ingestion.read_items(run_dir.path)
    splits, strategy = assign_splits(items, ingestion.splits_given, cfg.val_fraction, cfg.test_fraction, cfg.seed)
    grouped = any(i.group is not None for i in items)
    if grouped:
        strategy += ", grouped by patient (StratifiedGroupKFold)"
    if len({i.source for i in items}) > 1:
        strategy += f", stratified by class and source ({len({i.source for i in items})} sources)"
    out = run_dir.stage_dir(STAGE)
    arrays, counts, train_pixels = _write_splits(splits, ingestion.class_names, decoder(ingestion, run_dir.path, size), out)
    files = [out / f"{split}_{part}.npy" for split in SPLITS for part in ("x", "y")] + [out / "splits.jsonl"]
    if cfg.intensity == "equalize":  # the mean and std of what the models will see
        train_pixels = equalize(train_pixels).numpy()
    scaled = train_pixels.astype(np.float32) / 255.0
    normalization = {"mean": round(float(scaled.mean()), 6), "std": round(max(float(scaled.std()), 1e-3), 6)}
    logger.info(
        "split (%s): %s; %d px arrays cached", strategy,
        ", ".join(f"{s} {sum(counts[s].values())}" for s in SPLITS), size,
    )
    return DataTransformationArtifact(
        header=new_header(
            run_dir, DataTransformationArtifact, STAGE, ctx.fingerprint, parents=[ingestion.header.artifact_id], files=files,
        ),
        class_names=ingestion.class_names,
        image_size=size,
        channels=1,
        split_strategy=strategy,
        counts=counts,
        arrays={key: run_dir.relative(path) for key, path in arrays.items()},
        normalization=normalization,
        augmentation=to_jsonable(cfg.augment),
        grouped_by="patient" if grouped else "image",
        intensity=cfg.intensity,
        **source_contract(ingestion),
    )


def _write_splits(
    splits: dict[str, list[Item]], class_names: tuple[str, ...], decode: Decoder, out: Path
) -> tuple[dict[str, Path], dict[str, dict[str, int]], np.ndarray]:
    """Decode each split once into {split}_x/_y.npy and index it in splits.jsonl: (arrays, counts, train pixels)."""
    class_index = {name: i for i, name in enumerate(class_names)}
    arrays: dict[str, Path] = {}
    counts: dict[str, dict[str, int]] = {}
    train_pixels = np.empty((0, 0, 0), dtype=np.uint8)
    with open(out / "splits.jsonl", "w") as index:
        for split in SPLITS:
            chosen = splits[split]
            pixels = decode(chosen, split)
            np.save(out / f"{split}_x.npy", pixels)
            np.save(out / f"{split}_y.npy", np.array([class_index[i.label] for i in chosen], dtype=np.int64))
            arrays[f"{split}_x"], arrays[f"{split}_y"] = out / f"{split}_x.npy", out / f"{split}_y.npy"
            counts[split] = dict(sorted(Counter(i.label for i in chosen).items()))
            for row, item in enumerate(chosen):
                index.write(json.dumps({
                    "split": split, "row": row, "label": item.label, "ref": item.ref, "sha256": item.sha256,
                    "group": item.group, "metadata": item.metadata, "source": item.source,
                }) + "\n")
            if split == "train":
                train_pixels = pixels
    return arrays, counts, train_pixels


def source_contract(ingestion: DataIngestionArtifact) -> dict[str, str | int]:
    """How the source's films were made from full-size films (its source says), for serving and the external check."""
    return source_named(ingestion.source_kind).contract(ingestion.median_image_side)


def assign_splits(
    items: list[Item], given: tuple[str, ...], val_fraction: float, test_fraction: float, seed: int
) -> tuple[dict[str, list[Item]], str]:
    """Honour the source's splits; carve the missing ones from train, stratified, duplicates kept together."""
    by_split: dict[str, list[Item]] = {s: [i for i in items if i.split == s] for s in SPLITS}
    if not given:
        pool = [i for i in items if i.split == "all"]
        rest, test = _stratified_groups(pool, test_fraction, seed)
        train, val = _stratified_groups(rest, val_fraction / (1 - test_fraction), seed + 1)
        return {"train": train, "val": val, "test": test}, f"stratified(seed={seed}, val={val_fraction}, test={test_fraction})"
    carved = []
    if not by_split["test"]:
        by_split["train"], by_split["test"] = _stratified_groups(by_split["train"], test_fraction, seed)
        carved.append(f"test={test_fraction}")
    if not by_split["val"]:
        by_split["train"], by_split["val"] = _stratified_groups(by_split["train"], val_fraction, seed + 1)
        carved.append(f"val={val_fraction}")
    strategy = "source" if not carved else f"source + stratified from train(seed={seed}, {', '.join(carved)})"
    return by_split, strategy


def _stratified_groups(pool: list[Item], fraction: float, seed: int) -> tuple[list[Item], list[Item]]:
    """Split ``pool`` so identical images (same sha256), and one patient's films, land on the same side."""
    if any(i.group is not None for i in pool):
        return _patient_split(pool, fraction, seed)
    groups: dict[str, list[Item]] = {}
    for item in pool:
        groups.setdefault(item.sha256, []).append(item)
    keys = sorted(groups)
    stratify = None
    for stratum in _strata(pool):  # (class, source) first; class alone when those are too small to stratify on
        labels = [Counter(stratum(i) for i in groups[k]).most_common(1)[0][0] for k in keys]
        counts = Counter(labels)
        if min(counts.values()) >= 2 and len(keys) * fraction >= len(counts):
            stratify = labels
            break
    try:
        keep, take = train_test_split(keys, test_size=fraction, random_state=seed, stratify=stratify)
    except ValueError as exc:
        raise DataError(f"cannot split {len(pool)} images into train/val/test: {exc}") from None
    flatten = lambda ks: [i for k in sorted(ks) for i in groups[k]]  # noqa: E731
    return flatten(keep), flatten(take)


def _patient_split(pool: list[Item], fraction: float, seed: int) -> tuple[list[Item], list[Item]]:
    """Grouped stratification: one fold of scikit-learn's StratifiedGroupKFold (about ``fraction`` of the pool)
    is taken out, so class balance is kept as far as whole patients allow and no patient is cut in two."""
    groups = _connected_groups(pool)
    labels = [_strata(pool)[0](i) for i in pool]
    folds = max(2, round(1 / fraction))
    if len(set(groups)) < folds:
        raise DataError(f"cannot split {len(set(groups))} patient group(s) into train/val/test: too few patients")
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    keep, take = next(splitter.split(np.zeros(len(pool)), labels, groups))
    return [pool[k] for k in keep], [pool[t] for t in take]


def _strata(pool: list[Item]) -> list[Callable[[Item], str]]:
    """What to stratify on, best first: (class, source) when the pool pools sources, so each source's classes
    are spread over train, val and test alike (a source found only in train would be a look never tested)."""
    by_class: Callable[[Item], str] = lambda item: item.label  # noqa: E731
    if len({i.source for i in pool}) < 2:
        return [by_class]
    return [lambda item: f"{item.label}\t{item.source}", by_class]


def _connected_groups(pool: list[Item]) -> list[int]:
    """Patient id per image, merging patients that share an identical image (so duplicates stay together too)."""
    parent: dict[str, str] = {}

    def root(key: str) -> str:
        while parent.setdefault(key, key) != key:
            parent[key] = parent[parent[key]]
            key = parent[key]
        return key

    for item in pool:
        parent[root(f"h:{item.sha256}")] = root(f"g:{item.group or item.sha256}")
    ids: dict[str, int] = {}
    return [ids.setdefault(root(f"g:{i.group or i.sha256}"), len(ids)) for i in pool]
