"""Train-time augmentation on whole batches of tensors.

Random affine (rotation, scale, shift, horizontal flip) and brightness /
contrast jitter, applied with one ``grid_sample`` per batch: cheap next to a
forward pass, unlike per-image PIL transforms. Gamma, blur and noise mimic
other scanners and exposures (a different tone curve, a softer detector, a
noisier film), the shift a model meets on another hospital's films.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from xray.entity.config_entity import AugmentConfig


def augment_batch(x: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """``x``: float ``N×C×H×W`` in [0, 1]; returns a new tensor of the same shape."""
    n = x.shape[0]

    def uniform(bound: float) -> torch.Tensor:
        return (torch.rand(n, generator=generator) * 2 - 1) * bound

    angle = uniform(math.radians(cfg.rotation_degrees))
    scale = 1 + uniform(cfg.scale)
    shift_x, shift_y = uniform(cfg.translate * 2), uniform(cfg.translate * 2)  # grid units span 2
    flip = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0) if cfg.hflip else torch.ones(n)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [torch.stack([cos * flip, -sin, shift_x], 1), torch.stack([sin * flip, cos, shift_y], 1)], 1
    ).to(x.device, x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if cfg.contrast:
        mean = out.mean(dim=(1, 2, 3), keepdim=True)
        out = (out - mean) * (1 + uniform(cfg.contrast)).view(n, 1, 1, 1).to(x.device) + mean
    if cfg.brightness:
        out = out * (1 + uniform(cfg.brightness)).view(n, 1, 1, 1).to(x.device)
    out = out.clamp_(0.0, 1.0)
    if cfg.gamma:
        gamma = torch.exp(uniform(math.log1p(cfg.gamma))).view(n, 1, 1, 1).to(x.device, x.dtype)
        out = out.clamp_min(1e-6).pow(gamma)
    if cfg.blur:
        sigma = 0.1 + float(torch.rand(1, generator=generator)) * cfg.blur
        kernel = 2 * math.ceil(2 * sigma) + 1
        chosen = (torch.rand(n, generator=generator) < 0.5).to(x.device)
        out = torch.where(chosen.view(n, 1, 1, 1), TF.gaussian_blur(out, [kernel, kernel], [sigma, sigma]), out)
    if cfg.noise:
        std = (torch.rand(n, generator=generator) * cfg.noise).view(n, 1, 1, 1)
        out = out + (torch.randn(out.shape, generator=generator) * std).to(x.device, x.dtype)
    return out.clamp_(0.0, 1.0)
