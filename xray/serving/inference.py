"""Running a model: device and precision choice, batched prediction.

Evaluation, the trainer's validation pass and the Bento service all predict
through ``predict_proba`` so their numbers agree by construction; test-time
augmentation (``tta``) lives here for the same reason: evaluation decides
whether it helps and serving repeats exactly that.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import numpy as np
import torch
from torch import nn

from xray.capability import capability
from xray.data.preprocessing import Preprocessing
from xray.models.builders import logits_and_features

logger = logging.getLogger(__name__)


def choose_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def choose_precision(device: torch.device, setting: str) -> str:
    """``auto`` on CPU: bf16 only where this machine measured it faster than fp32 (``xray.capability``);
    training and serving both decide here."""
    if setting != "auto":
        return setting
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if capability().prefers_bf16 else "fp32"


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def prepare_model(model: nn.Module, device: torch.device, channels_last: bool = True) -> nn.Module:
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


@torch.inference_mode()
def predict_logits(
    model: nn.Module,
    pixels: np.ndarray,
    preprocessing: Preprocessing,
    device: torch.device,
    precision: str = "fp32",
    batch_size: int = 128,
    channels_last: bool = True,
) -> torch.Tensor:
    """uint8 ``N×H×W`` -> float32 logits ``N×C`` (on CPU)."""
    model.eval()
    dtype = next(model.parameters()).dtype  # a bf16 model takes bf16 input
    outputs = []
    for start in range(0, len(pixels), batch_size):
        x = preprocessing.to_tensor(pixels[start : start + batch_size]).to(device, dtype, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, precision):
            outputs.append(model(x).float().cpu())
    return torch.cat(outputs) if outputs else torch.empty(0)


TTA_VIEWS = ("hflip",)


def tta_view(pixels: np.ndarray, view: str) -> np.ndarray:
    """One test-time view of uint8 ``N×H×W`` images; ``hflip`` mirrors them, as training's augmentation does."""
    if view == "hflip":
        return np.ascontiguousarray(pixels[:, :, ::-1])
    raise ValueError(f"unknown test-time view {view!r} (known: {', '.join(TTA_VIEWS)})")


def predict_proba(
    model: nn.Module,
    pixels: np.ndarray,
    preprocessing: Preprocessing,
    device: torch.device,
    *args: Any,
    tta: tuple[str, ...] = (),
    **kwargs: Any,
) -> np.ndarray:
    """Class probabilities, softmax of ``predict_logits`` (further arguments are its own: precision,
    batch_size, ...); with ``tta`` views, the mean over the plain image and each view."""
    views = [pixels] + [tta_view(pixels, view) for view in tta]
    probs = [torch.softmax(predict_logits(model, v, preprocessing, device, *args, **kwargs), dim=1).numpy() for v in views]
    return probs[0] if len(probs) == 1 else np.mean(probs, axis=0)


@torch.inference_mode()
def predict_proba_and_features(
    model: nn.Module,
    pixels: np.ndarray,
    preprocessing: Preprocessing,
    device: torch.device,
    precision: str = "fp32",
    batch_size: int = 128,
    tta: tuple[str, ...] = (),
) -> tuple[np.ndarray, list[np.ndarray]]:
    """``predict_proba``'s probabilities and, from the same forward pass over the plain image, each
    member's penultimate features (float32 ``N×D``; one array per ensemble member) for the OOD score."""
    model.eval()
    dtype = next(model.parameters()).dtype
    logits, features = [], []
    for start in range(0, len(pixels), batch_size):
        x = preprocessing.to_tensor(pixels[start : start + batch_size]).to(device, dtype, non_blocking=True)
        with autocast(device, precision):
            out, feats = logits_and_features(model, x.contiguous(memory_format=torch.channels_last))
        logits.append(out.float().cpu())
        features.append([f.float().cpu() for f in feats])
    if not logits:
        return np.empty((0, 0), np.float32), []
    probs = torch.softmax(torch.cat(logits), dim=1).numpy()
    if tta:
        views = [probs] + [predict_proba(model, tta_view(pixels, v), preprocessing, device, precision=precision, batch_size=batch_size) for v in tta]
        probs = np.mean(views, axis=0)
    members = [torch.cat([batch[i] for batch in features]).numpy() for i in range(len(features[0]))]
    return probs, members


def apply_temperature(probs: np.ndarray, temperature: float | None) -> np.ndarray:
    """Temperature scaling on a model's probabilities: ``softmax(log p / T)``.

    For one model without test-time views ``log p`` is its logits less a
    per-image constant, so this is Guo et al.'s temperature scaling exactly;
    for an ensemble (or TTA) it scales the averaged output, one parameter for
    the whole model. It never changes which class is most probable. ``None``
    or 1: the probabilities as they are (a model pushed before calibration).
    """
    if temperature is None or temperature == 1.0 or probs.size == 0:
        return probs
    scaled = np.log(np.clip(probs, 1e-12, 1.0)) / temperature
    scaled -= scaled.max(axis=1, keepdims=True)
    out = np.exp(scaled)
    return (out / out.sum(axis=1, keepdims=True)).astype(probs.dtype)
