"""The seed recipe and xray's default small-data training in the same stratified k-fold, on the carve's train part only.

``bench_time_to_accuracy.py`` scores both on one 63-film held-out part, where
one film is 1.6 points and both scores sit inside each other's 95 % interval.
This script asks the same question with every train film held out once, and
never touches the held-out part (so nothing here can tune on it):

* the same carve as ``bench_time_to_accuracy.py`` (stratified, ``--holdout-fraction``, ``--split-seed``);
  only its train part is used;
* outer ``StratifiedKFold(--folds, shuffle, random_state=0)`` over those films;
* seed: ``seed_train_loop.py FOLD_TRAIN --test FOLD_HELD`` (its own 80/20 validation inside);
* xray: the default config (``config/pipeline.yaml``) as the trainer resolves it for this many films
  (``small_data_batch``, ``monitor: auto``), each ``--members`` model fit with a 15 % validation
  split carved from the fold's train part, at ``--size`` px for ``--epochs`` epochs (no time budget:
  the defaults are what the budget's plan gave on the Covid19 carve, docs/benchmarks.md), scored with hflip TTA;
  then the members' probability average.

Prints each fold and the totals, and the CPU kind.

    .venv/bin/python scripts/bench_cv_recipes.py                   # the reported figure (its run time: docs/benchmarks.md)
    .venv/bin/python scripts/bench_cv_recipes.py --skip-seed       # xray's side only
    ... --epochs 1 --seed-epochs 1 --seed-max-batches 1 --folds 2  # a quick smoke run (not the reported figure)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))
from bench_time_to_accuracy import SHARED, SUFFIXES, carve, cpu_kind, link_image_folders  # noqa: E402 - after the paths are set


def fold_dirs(files: list[Path], train_rows: np.ndarray, held_rows: np.ndarray, out: Path) -> tuple[Path, Path]:
    link_image_folders(out, {"train": [files[i].resolve() for i in train_rows], "held": [files[i].resolve() for i in held_rows]})
    return out / "train", out / "held"


def seed_fold(train: Path, held: Path, epochs: int, max_batches: int) -> float:
    command = [sys.executable, str(SHARED / "reference" / "seed_train_loop.py"), str(train), "--test", str(held),
               "--epochs", str(epochs), "--max-batches", str(max_batches)]
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"seed recipe failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["test_acc"]


def xray_fold(x: np.ndarray, y: np.ndarray, train_rows: np.ndarray, held_rows: np.ndarray, classes: tuple[str, ...],
              members: list[str], epochs: int) -> dict[str, np.ndarray]:
    """Each member's held-out probabilities, trained as the default config trains on this many films."""
    import torch
    from sklearn.model_selection import train_test_split

    from xray.config import load_config
    from xray.serving.inference import predict_proba
    from xray.data.preprocessing import Preprocessing
    from xray.training.budget import planned_schedule
    from xray.training.fit import TrainingData, batch_plan, fit, small_data_batch

    config = load_config(REPO / "config" / "pipeline.yaml")
    inner, val = train_test_split(train_rows, test_size=0.15, random_state=42, stratify=y[train_rows])
    size = x.shape[-1]
    prep = Preprocessing(image_size=size, mean=float(x[inner].mean() / 255), std=float(x[inner].std() / 255), channels=1)
    data = TrainingData(x[inner], y[inner], x[val], y[val], classes, prep, config.transformation.augment)
    cfg = small_data_batch(dataclasses.replace(config.trainer, time_budget="none"), len(inner))
    steps = batch_plan(len(inner), cfg.batch_size, 1)[2]
    probs = {}
    for name in members:
        result = fit(name, data, planned_schedule(cfg, steps, epochs))
        model = result_model(name, len(classes), result.state_dict)
        probs[name] = predict_proba(model, x[held_rows], prep, torch.device("cpu"), tta=("hflip",))
    return probs


def result_model(name: str, num_classes: int, state: dict):
    from xray.models.builders import build_model

    model = build_model(name, num_classes)
    model.load_state_dict(state)
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=SHARED / "datasets" / "covid19-3class" / "train")
    parser.add_argument("--holdout-fraction", type=float, default=0.25)
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--size", type=int, default=64, help="xray's image size (the budget's plan on the carve: 64)")
    parser.add_argument("--epochs", type=int, default=14, help="xray's epochs (the budget's plan on the carve: 14)")
    parser.add_argument("--members", default="simple_cnn,densenet121")
    parser.add_argument("--skip-seed", action="store_true")
    parser.add_argument("--seed-epochs", type=int, default=15, help="the seed recipe's epochs (15: the reported figure)")
    parser.add_argument("--seed-max-batches", type=int, default=0, help="batches per seed epoch (0: all; smoke runs)")
    args = parser.parse_args()
    if not args.data.is_dir():
        raise SystemExit(f"dataset not found: {args.data} (needs ../shared)")
    from sklearn.model_selection import StratifiedKFold

    from xray.capability import capability
    from xray.data.preprocessing import load_pixels, resize_batch

    print(f"CPU: {cpu_kind()}", flush=True)
    print(capability().describe(), flush=True)
    members = args.members.split(",")
    with tempfile.TemporaryDirectory(prefix="xray-cv-bench-") as tmp:
        train_dir, _, digest = carve(args.data, Path(tmp) / "split", args.holdout_fraction, args.split_seed)
        files = sorted(p for p in train_dir.glob("*/*") if p.suffix.lower() in SUFFIXES)
        classes = tuple(sorted({p.parent.name for p in files}))
        y = np.array([classes.index(p.parent.name) for p in files])
        x = resize_batch(np.stack([load_pixels(p, 128) for p in files]), args.size)  # decoded as ingestion does
        print(f"carve train part: {len(files)} films (held-out part {digest} never read); {args.folds} folds", flush=True)
        totals = {name: 0 for name in [*members, "xray ensemble", "seed"]}
        splitter = StratifiedKFold(args.folds, shuffle=True, random_state=0)
        for k, (train_rows, held_rows) in enumerate(splitter.split(np.zeros(len(y)), y), start=1):
            started = time.perf_counter()
            probs = xray_fold(x, y, train_rows, held_rows, classes, members, args.epochs)
            probs["xray ensemble"] = np.mean(list(probs.values()), axis=0)
            correct = {name: int((p.argmax(1) == y[held_rows]).sum()) for name, p in probs.items()}
            xray_s = time.perf_counter() - started
            if not args.skip_seed:
                started = time.perf_counter()
                train, held = fold_dirs(files, train_rows, held_rows, Path(tmp) / f"fold{k}")
                correct["seed"] = round(seed_fold(train, held, args.seed_epochs, args.seed_max_batches) * len(held_rows))
                seed_s = time.perf_counter() - started
            for name, n in correct.items():
                totals[name] += n
            print(f"fold {k} ({len(held_rows)} films): " + ", ".join(f"{n} {c}" for n, c in correct.items())
                  + f"; xray {xray_s:.0f} s" + ("" if args.skip_seed else f", seed {seed_s:.0f} s"), flush=True)
    print()
    for name, n in totals.items():
        if name != "seed" or not args.skip_seed:
            print(f"{name:<16}{n:>5}/{len(y)} = {n / len(y):.3f}")


if __name__ == "__main__":
    main()
