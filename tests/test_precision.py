"""Each precision path, forced, predicts what fp32 predicts: nothing CPU-kind-specific is hard-coded.

bf16 on an AVX2-only CPU runs ~20-40x slower than fp32, so the model is tiny (simple_cnn, 32 px, a few images).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from xray.capability import Capability, capability
from xray.training.fit import TrainingData, fit
from xray.entity.config_entity import AugmentConfig
from xray.serving.inference import choose_precision, predict_proba
from xray.models.builders import build_model
from xray.data.preprocessing import Preprocessing
from xray.serving.serving_model import ModelSpec, load_model_dir, write_model_dir
from xray.pipeline.store import sha256_file
from xray.serving.service import ServingSettings

from .test_trainer import FAST


def separable_32(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    x = rng.integers(0, 60, size=(n, 32, 32)).astype(np.uint8)
    for i, label in enumerate(y):
        x[i, :, :16] += 180 if label == 0 else 0
        x[i, :, 16:] += 180 if label == 1 else 0
    return x, y.astype(np.int64)


def test_auto_follows_the_measurement_and_forced_settings_pass_through() -> None:
    cpu = torch.device("cpu")
    assert choose_precision(cpu, "auto") == ("bf16" if capability().prefers_bf16 else "fp32")
    assert choose_precision(cpu, "fp32") == "fp32" and choose_precision(cpu, "bf16") == "bf16"
    slow_bf16 = dataclasses.replace(capability(), bf16_matmul_gflops=2.0, fp32_matmul_gflops=64.0)
    fast_bf16 = dataclasses.replace(capability(), bf16_matmul_gflops=400.0, fp32_matmul_gflops=100.0,
                                    bf16_conv_gflops=300.0, fp32_conv_gflops=100.0)
    assert not slow_bf16.prefers_bf16 and fast_bf16.prefers_bf16  # measured speed decides, not flags
    assert fast_bf16.peak_gflops("bf16") == 300.0 and fast_bf16.peak_gflops("fp32") == 100.0


def test_a_corrupt_capability_cache_is_measured_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from xray import capability as module

    monkeypatch.setenv(module.CACHE_DIR_ENV, str(tmp_path))
    monkeypatch.setattr(module, "PROBE_SECONDS", 0.01)
    (tmp_path / module.CACHE_FILE).write_text("{not json")
    module.capability.cache_clear()
    try:
        found = module.capability(1)
    finally:
        module.capability.cache_clear()
    assert isinstance(found, Capability) and found.fp32_matmul_gflops > 0 and found.threads == 1
    assert "cpu:" in found.describe() and "GFLOP/s" in found.describe()
    assert "per-core" in (tmp_path / module.CACHE_FILE).read_text()  # rewritten, valid JSON again


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_each_forced_precision_trains_and_predicts_like_fp32(precision: str, tmp_path: Path) -> None:
    train_x, train_y = separable_32(16, 0)
    test_x, test_y = separable_32(8, 1)
    preprocessing = Preprocessing(image_size=32, mean=0.5, std=0.25)
    data = TrainingData(train_x, train_y, test_x, test_y, ("left", "right"), preprocessing,
                        AugmentConfig(hflip=False, rotation_degrees=0))
    result = fit("simple_cnn", data, dataclasses.replace(FAST, epochs=3, precision=precision))
    assert result.precision == precision

    model = build_model("simple_cnn", 2)
    model.load_state_dict(result.state_dict)
    reference = predict_proba(model, test_x, preprocessing, torch.device("cpu"), "fp32")
    autocast = predict_proba(model, test_x, preprocessing, torch.device("cpu"), precision)

    # The serving path: XRAY_PRECISION chooses it, load_model_dir casts the weights for bf16.
    checkpoint, model_dir = tmp_path / "best.pt", tmp_path / "model"
    model_dir.mkdir()
    torch.save(result.state_dict, checkpoint)
    spec = ModelSpec("simple_cnn", ("left", "right"), preprocessing, "test", "none", sha256_file(checkpoint), {})
    write_model_dir(model_dir, spec, checkpoint)
    settings = ServingSettings.from_env({"XRAY_PRECISION": precision})
    served = load_model_dir(model_dir, settings.precision)
    assert served.precision == precision
    serving = served.predict_proba(test_x)

    for probs in (autocast, serving):
        assert (probs.argmax(1) == reference.argmax(1)).all()
        assert np.abs(probs - reference).max() < 0.05
    assert (reference.argmax(1) == test_y).mean() >= 0.75, "the model learned the task, so agreement means something"
