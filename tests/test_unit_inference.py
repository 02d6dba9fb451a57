"""xray/serving/inference.py: batched prediction equals a plain forward pass; device and precision choice."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from xray.capability import capability
from xray.serving.inference import autocast, choose_precision, predict_logits, predict_proba, prepare_model
from xray.data.preprocessing import Preprocessing

PREP = Preprocessing(image_size=12, mean=0.4, std=0.2)


def tiny_model(num_classes: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(4, num_classes),
    )


def pixels(n: int = 10) -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, (n, PREP.image_size, PREP.image_size), dtype=np.uint8)


def plain_forward(model: nn.Module, batch: np.ndarray) -> torch.Tensor:
    """The same computation written out: scale to [0, 1], normalise, one forward pass in eval mode."""
    x = torch.from_numpy(batch.astype(np.float32) / 255.0)[:, None]
    with torch.no_grad():
        return model.eval()((x - PREP.mean) / PREP.std)


@pytest.mark.parametrize("channels_last", [True, False])
def test_batched_logits_equal_one_plain_forward(channels_last: bool) -> None:
    model = tiny_model()
    batch = pixels(10)
    expected = plain_forward(model, batch)
    device = torch.device("cpu")
    prepared = prepare_model(model, device, channels_last=channels_last)
    logits = predict_logits(prepared, batch, PREP, device, batch_size=3, channels_last=channels_last)  # 3+3+3+1
    assert logits.dtype == torch.float32 and logits.shape == (10, 3)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-5)
    probs = predict_proba(prepared, batch, PREP, device, batch_size=4, channels_last=channels_last)
    np.testing.assert_allclose(probs, torch.softmax(expected, 1).numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


def test_prediction_leaves_the_model_in_eval_mode_and_empty_input_is_empty() -> None:
    model = tiny_model().train()
    assert predict_logits(model, pixels(0), PREP, torch.device("cpu")).numel() == 0
    predict_logits(model, pixels(2), PREP, torch.device("cpu"))
    assert not model.training


def test_prepare_model_puts_conv_weights_channels_last() -> None:
    def conv() -> nn.Module:  # two input channels: a 1-channel weight is contiguous in both layouts
        return nn.Sequential(nn.Conv2d(2, 4, 3))

    assert prepare_model(conv(), torch.device("cpu"))[0].weight.is_contiguous(memory_format=torch.channels_last)
    plain = prepare_model(conv(), torch.device("cpu"), channels_last=False)[0].weight
    assert not plain.is_contiguous(memory_format=torch.channels_last)


def test_a_bf16_model_takes_bf16_input_and_returns_float32_close_to_fp32() -> None:
    model = tiny_model()
    batch = pixels(6)
    expected = plain_forward(model, batch)
    logits = predict_logits(model.to(torch.bfloat16), batch, PREP, torch.device("cpu"))
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, expected, rtol=0.05, atol=0.05)


def test_precision_choice() -> None:
    cpu = torch.device("cpu")
    assert choose_precision(cpu, "fp32") == "fp32" and choose_precision(cpu, "bf16") == "bf16"
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    native = "avx512_bf16" in flags or "amx_bf16" in flags
    assert choose_precision(cpu, "auto") == ("bf16" if capability().prefers_bf16 else "fp32")  # the measurement decides
    if not native:
        assert choose_precision(cpu, "auto") == "fp32"  # never bf16 on an AVX2-only CPU: it measures far slower there


def test_autocast_is_on_only_for_bf16() -> None:
    cpu = torch.device("cpu")
    with autocast(cpu, "fp32"):
        assert not torch.is_autocast_enabled("cpu")
    with autocast(cpu, "bf16"):
        assert torch.is_autocast_enabled("cpu")
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16
