"""DDP on one machine: `torchrun --nproc_per_node=N xray train` against one process, same config and epochs.

Each side is a whole `xray train` in its own artifacts root (demo data,
push off), run one after the other. Reports the wall time of the command,
the trainer's own training seconds and images/s (summed over ranks), and the
metrics, so speed and quality are read side by side.

    python scripts/bench_ddp.py [--nproc 2] [--epochs 3] [--image-size 64] [--per-class 100]

Both sides share this machine's cores: with N ranks each gets cores // N
threads, so the comparison is "N processes x cores/N threads" against
"1 process x all cores". A third side, one process limited to cores // N
threads (``trainer.num_threads``), separates what the extra process buys from
what fewer threads per process buy on a busy machine.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from xray.ports import free_port  # noqa: E402 - after the repo is importable

logger = logging.getLogger("bench_ddp")


def train_args(args: argparse.Namespace, artifacts: Path, threads: int = 0) -> list[str]:
    settings = [
        f"artifacts_dir={artifacts}",
        f"trainer.candidates=[{args.candidate}]",
        f"trainer.epochs={args.epochs}",
        f"trainer.batch_size={args.batch_size}",
        "trainer.early_stopping_patience=0",
        "trainer.min_steps=0",  # exactly --epochs, whatever the dataset size
        "trainer.time_budget=none",  # and no budget cutting them short
        f"transformation.image_size={args.image_size}",
        f"ingestion.demo_images_per_class={args.per_class}",
        "evaluation.gradcam_per_class=0",
        "push.enabled=false",
        f"trainer.num_threads={threads}",
    ]
    out = ["train", "--data", "demo"]
    for item in settings:
        out += ["--set", item]
    return out


def run_side(label: str, prefix: list[str], args: argparse.Namespace, root: Path, threads: int = 0) -> dict:
    from xray.pipeline.store import list_runs, load_stage_artifact

    artifacts = root / label.replace(" ", "_").replace(",", "")
    env = {**os.environ, "BENTOML_DO_NOT_TRACK": "true", "BENTOML_HOME": str(root / "bentoml")}
    logger.info("%s: %s", label, " ".join(prefix + ["..."]))
    started = time.perf_counter()
    proc = subprocess.run([*prefix, *train_args(args, artifacts, threads)], cwd=REPO, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{label} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    match = re.search(r"^run (\S+): succeeded", proc.stdout, re.MULTILINE)
    assert match, proc.stdout
    [manifest] = [m for m in list_runs(artifacts) if m.run_id == match.group(1)]
    candidate = load_stage_artifact(artifacts, manifest, "model_trainer").candidates[0]
    metrics = manifest.summary["candidates"][args.candidate]
    return {
        "side": label,
        "world_size": candidate.world_size,
        "threads_per_rank": manifest.environment.get("distributed", {}).get("threads_per_rank", threads or os.cpu_count()),
        "wall_s": round(wall, 1),
        "train_s": candidate.train_seconds,
        "images_per_s": candidate.images_per_second,
        "epoch_s": [h.seconds for h in candidate.history],
        "val_auc": round(metrics["validation"]["roc_auc"], 4),
        "val_acc": round(metrics["validation"]["accuracy"], 4),
        "test_auc": round(metrics["test"]["roc_auc"], 4),
        "test_acc": round(metrics["test"]["accuracy"], 4),
        "precision": candidate.precision,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--candidate", default="simple_cnn")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")

    single = [sys.executable, "-m", "xray"]
    ddp = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.nproc}",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "xray"]
    with tempfile.TemporaryDirectory(prefix="bench-ddp-") as tmp:
        root = Path(tmp)
        per_rank = max(1, (os.cpu_count() or 1) // args.nproc)
        results = [
            run_side("1 process", single, args, root),
            run_side(f"1 proc, {per_rank} thr", single, args, root, threads=per_rank),
            run_side(f"{args.nproc}-rank DDP", ddp, args, root),
        ]

    from xray.capability import capability

    print(capability().describe())
    print(f"{args.candidate}, {args.image_size} px, {args.per_class}/class demo, {args.epochs} epochs, "
          f"global batch {args.batch_size}, {os.cpu_count()} CPUs")
    for r in results:
        print(json.dumps(r))
    print()
    columns = ["wall_s", "train_s", "images_per_s", "val_auc", "val_acc", "test_auc", "test_acc"]
    print(f"{'':<16}" + "".join(f"{c:>13}" for c in columns))
    for r in results:
        print(f"{r['side']:<16}" + "".join(f"{r[c]:>13}" for c in columns))
    many = results[-1]
    for base in results[:-1]:
        print(f"DDP vs {base['side']}: train {base['train_s'] / many['train_s']:.2f}x faster, "
              f"wall {base['wall_s'] / many['wall_s']:.2f}x")


if __name__ == "__main__":
    main()
