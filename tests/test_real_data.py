"""Real data from ../shared: PneumoniaMNIST through the whole pipeline, briefly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .conftest import PNEUMONIAMNIST, needs_shared, run_cli
from .test_pipeline import run_id_of


@needs_shared(PNEUMONIAMNIST)
@pytest.mark.timeout(900)
def test_pneumoniamnist_simple_cnn_reaches_auc_090(tmp_path: Path) -> None:
    artifacts = tmp_path / "artifacts"
    overrides = [
        "trainer.candidates=[simple_cnn]", "trainer.epochs=2", "trainer.min_steps=0", "transformation.image_size=32",
        "ingestion.class_names=[normal,pneumonia]", "push.enabled=false", f"artifacts_dir={artifacts}",
        "evaluation.gradcam_per_class=1",
    ]
    result = run_cli("train", "--data", str(PNEUMONIAMNIST), *[a for o in overrides for a in ("--set", o)], timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    run_id = run_id_of(result.stdout)
    report = json.loads(run_cli("runs", "--artifacts", str(artifacts), "show", run_id, "--json").stdout)
    validation = report["candidates"]["simple_cnn"]["validation"]
    assert validation["roc_auc"] >= 0.90, validation
    ingestion = json.loads((artifacts / run_id / "data_ingestion" / "artifact.json").read_text())
    assert ingestion["counts"]["train"] == {"normal": 1214, "pneumonia": 3494}
    assert ingestion["counts"]["val"] == {"normal": 135, "pneumonia": 389}
    assert ingestion["leakage"], "PneumoniaMNIST has exact duplicates across its official splits"
