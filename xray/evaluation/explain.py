"""Grad-CAM heat maps over radiographs (pytorch-grad-cam), for reports and for /explain."""

from __future__ import annotations

import numpy as np
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.image import show_cam_on_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from xray.models.builders import gradcam_target_layers
from xray.data.preprocessing import Preprocessing


def gradcam_overlays(
    model: nn.Module,
    pixels: np.ndarray,
    preprocessing: Preprocessing,
    target_classes: list[int] | None = None,
) -> list[np.ndarray]:
    """uint8 ``N×H×W`` -> RGB uint8 overlays; ``None`` targets the predicted class."""
    model = model.float().eval()
    x = preprocessing.to_tensor(pixels).to(next(model.parameters()).device)
    targets = [ClassifierOutputTarget(c) for c in target_classes] if target_classes is not None else None
    with GradCAM(model=model, target_layers=gradcam_target_layers(model)) as cam:
        masks = cam(input_tensor=x, targets=targets)
    overlays = []
    for image, mask in zip(pixels, masks):
        rgb = np.repeat((image.astype(np.float32) / 255.0)[..., None], 3, axis=2)
        overlays.append(show_cam_on_image(rgb, mask, use_rgb=True, image_weight=0.6))
    return overlays
