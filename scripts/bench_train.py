"""Training throughput: xray's trainer vs the reference seed loop, side by side, one invocation.

Both train DenseNet-121 at 224x224, batch 16, on the same images (a fixed
80/20 split of ../shared/datasets/covid19-3class/train, linked into a temp
dir), for the same number of epochs and batches, and both are scored on the
same held-out 20 %. Prints images/s, peak memory (max RSS) and the ratios,
the machine's capability line, and utilization: achieved training FLOP/s
(the model's forward FLOPs per image, counted by torch's FlopCounterMode, x3
for forward + backward) over the measured conv peak at the precision used.

    python scripts/bench_train.py [--epochs 2] [--max-batches 0] [--data DIR]

Run it on a quiet machine: the two sides run one after the other.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(REPO))


def split_dataset(data: Path, out: Path, seed: int = 0) -> tuple[Path, Path]:
    """Symlink an 80/20 stratified split: the reference trains on one folder and tests on the other."""
    from sklearn.model_selection import train_test_split

    files = sorted((p.parent.name, p) for p in data.glob("*/*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    labels = [label for label, _ in files]
    train, holdout = train_test_split(files, test_size=0.2, random_state=seed, stratify=labels)
    for name, part in (("train", train), ("holdout", holdout)):
        for label, path in part:
            target = out / name / label / path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(path)
    return out / "train", out / "holdout"


def run_reference(train: Path, holdout: Path, epochs: int, max_batches: int) -> dict:
    script = SHARED / "reference" / "seed_train_loop.py"
    cmd = [sys.executable, str(script), str(train), "--epochs", str(epochs), "--test", str(holdout)]
    if max_batches:
        cmd += ["--max-batches", str(max_batches)]
    started = time.perf_counter()
    proc = subprocess.run(
        ["/usr/bin/time", "-f", "MAXRSS_KB=%M", *cmd], capture_output=True, text=True, check=True
    ) if Path("/usr/bin/time").exists() else subprocess.run(cmd, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - started
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    final = lines[-1]
    rss = next((int(line.split("=")[1]) for line in proc.stderr.splitlines() if line.startswith("MAXRSS_KB=")), None)
    epochs_out = final["epochs"]
    seconds = sum(e["train_s"] for e in epochs_out)
    images = sum(e["train_s"] * e["train_img_s"] for e in epochs_out)
    return {
        "images_per_s": images / seconds,
        "train_s": seconds,
        "wall_s": wall,
        "val_acc": final["best_val_acc"],
        "holdout_acc": final.get("test_acc"),
        "peak_rss_mb": rss / 1024 if rss else None,
    }


def run_xray(train: Path, holdout: Path, epochs: int, max_batches: int, out: Path) -> dict:
    """xray's path: decode once into arrays, then the trainer's fit (channels-last, bf16 where supported)."""
    code = f"""
import json, resource, sys, time
import numpy as np, torch
sys.path.insert(0, {str(REPO)!r})
from xray.components import data_ingestion, data_transformation, model_trainer
from xray.config import load_config
from xray.serving.inference import choose_device, predict_proba, prepare_model
from xray.models.builders import build_model
from xray.data.preprocessing import load_pixels
from xray.pipeline.stage import run_alone
from xray.pipeline.store import RunDir
from xray.training.fit import fit
overrides = ["trainer.candidates=[densenet121]", "trainer.batch_size=16", "trainer.epochs={epochs}",
             "trainer.max_batches_per_epoch={max_batches}", "trainer.early_stopping_patience=0",
             "trainer.min_steps=0", "trainer.min_steps_per_epoch=0", "trainer.time_budget=none", "trainer.ema_epochs=0",
             "transformation.image_size=224", "transformation.val_fraction=0.2", "transformation.test_fraction=0.01",
             "trainer.learning_rate=0.0001", "trainer.weight_decay=0.01", "trainer.warmup_epochs=0",
             "trainer.class_weighting=none", "ingestion.min_images_per_class=2"]
config = load_config(None, overrides, data_uri={str(train)!r})
run = RunDir.create(__import__("pathlib").Path({str(out)!r}), {{}}, "bench")
t0 = time.perf_counter()
ing = run_alone(data_ingestion, config, run)
tr = run_alone(data_transformation, config, run, ing)
decode_s = time.perf_counter() - t0
data = model_trainer.load_training_data(run.path, tr)
t1 = time.perf_counter()
result = fit("densenet121", data, config.trainer)
fit_s = time.perf_counter() - t1
model = prepare_model(build_model("densenet121", len(data.class_names)), choose_device())
model.load_state_dict(result.state_dict)
names = list(data.class_names)
paths = sorted(p for p in __import__("pathlib").Path({str(holdout)!r}).glob("*/*"))
pixels = np.stack([load_pixels(p, 224) for p in paths])
labels = np.array([names.index(p.parent.name) for p in paths])
probs = predict_proba(model, pixels, data.preprocessing, choose_device())
images = sum(h.images_per_second * h.seconds for h in result.history)
print(json.dumps({{"images_per_s": result.images_per_second, "train_s": result.train_seconds, "decode_s": decode_s,
  "end_to_end_images_per_s": images / (result.train_seconds + decode_s), "wall_s": decode_s + fit_s,
  "val_acc": max(h.val_accuracy for h in result.history), "holdout_acc": float((probs.argmax(1) == labels).mean()),
  "precision": result.precision, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    if proc.returncode != 0:
        raise SystemExit(f"xray side failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def training_gflop_per_image(model, channels: int, size: int = 224) -> float:
    """Forward FLOPs of one image (FlopCounterMode counts convolutions and matmuls) x3 for forward + backward."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, channels, size, size))
    return 3 * counter.get_total_flops() / 1e9


def utilization_rows(ref: dict, ours: dict) -> list[tuple[str, float, float]]:
    """(name, reference, xray) rows: GFLOP per training image, achieved GFLOP/s, and its share of the measured peak."""
    from torch import nn
    from torchvision import models

    from xray.capability import capability
    from xray.models.builders import build_model

    reference_model = models.densenet121(weights=None)
    reference_model.classifier = nn.Linear(reference_model.classifier.in_features, 3)
    ref_gflop = training_gflop_per_image(reference_model, channels=3)  # the seed feeds RGB
    our_gflop = training_gflop_per_image(build_model("densenet121", 3), channels=1)
    cap = capability()
    ref_rate, our_rate = ref["images_per_s"] * ref_gflop, ours["images_per_s"] * our_gflop
    return [
        ("GFLOP per train image", ref_gflop, our_gflop),
        ("achieved GFLOP/s", ref_rate, our_rate),
        ("utilization of peak (%)", 100 * ref_rate / cap.peak_gflops("fp32"), 100 * our_rate / cap.peak_gflops(ours["precision"])),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=SHARED / "datasets" / "covid19-3class" / "train")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--max-batches", type=int, default=0, help="batches per epoch (0: all)")
    args = parser.parse_args()
    if not args.data.is_dir():
        raise SystemExit(f"dataset not found: {args.data} (needs ../shared)")
    from xray.capability import capability

    print(capability().describe(), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        train, holdout = split_dataset(args.data, Path(tmp) / "split")
        print(f"DenseNet-121, 224x224, batch 16, {args.epochs} epoch(s), max batches {args.max_batches or 'all'}; "
              f"train {sum(1 for _ in train.glob('*/*'))} images (80% train / 20% val inside each side), "
              f"holdout {sum(1 for _ in holdout.glob('*/*'))}", flush=True)
        ref = run_reference(train, holdout, args.epochs, args.max_batches)
        print("reference:", json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in ref.items()}), flush=True)
        ours = run_xray(train, holdout, args.epochs, args.max_batches, Path(tmp) / "artifacts")
        print("xray:     ", json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in ours.items()}), flush=True)
    print()
    print(f"{'':<26}{'reference':>12}{'xray':>12}{'ratio':>9}")
    rows = [
        ("train images/s", ref["images_per_s"], ours["images_per_s"]),
        ("images/s incl. decode", ref["images_per_s"], ours["end_to_end_images_per_s"]),
        ("peak RSS (MB)", ref["peak_rss_mb"], ours["peak_rss_mb"]),
        ("best val accuracy", ref["val_acc"], ours["val_acc"]),
        ("holdout accuracy", ref["holdout_acc"], ours["holdout_acc"]),
        *utilization_rows(ref, ours),
    ]
    for name, a, b in rows:
        ratio = f"{b / a:>8.2f}x" if a else "       -"
        print(f"{name:<26}{a:>12.3f}{b:>12.3f}{ratio}")
    print(f"xray precision: {ours['precision']} (reference: fp32); one-time decode {ours['decode_s']:.1f}s; "
          "utilization = achieved / measured conv peak at that precision")


if __name__ == "__main__":
    main()
