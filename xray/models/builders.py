"""Candidate architectures: a compact custom CNN and torchvision's DenseNets, in one table.

``ARCHITECTURES`` names each candidate with its builder, its Grad-CAM target
layer and its input channels; training, evaluation and serving all build
through it, and ``CANDIDATES`` (xray/entity/config_entity.py, free of torch)
is held equal to its names by a test. Adding a candidate: one entry here, its
name there.

All take one grayscale channel. DenseNet's stem is adapted by summing the
ImageNet filters over RGB, the standard way to keep pretrained features when
the input has one channel.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import nn
from torchvision import models as tv_models

from xray.entity.artifact_entity import CandidateModel
from xray.errors import ConfigError

logger = logging.getLogger(__name__)


class StemConv(nn.Conv2d):
    """A 3×3 convolution that strides by 2 on inputs larger than ``LARGE_INPUT`` pixels.

    At 128 px a full-resolution first block cost several times the rest of
    the network (no faster than DenseNet-121 there); striding its first
    convolution makes every later layer see a quarter of the pixels, and in
    3-fold CV on the Covid19 train set the strided stem at 128 px scored as
    well as the unstrided one at 64 px (figures: docs/benchmarks.md). MedMNIST-size inputs (<= 64 px) keep full resolution, so the
    same weights serve both, and the rule is a pure function of the input:
    identical in training and serving.
    """

    LARGE_INPUT = 64

    def extra_repr(self) -> str:
        return super().extra_repr().replace("stride=(1, 1)", f"stride=1, or 2 on inputs > {self.LARGE_INPUT} px")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stride = 2 if x.shape[-1] > self.LARGE_INPUT else 1
        return nn.functional.conv2d(x, self.weight, self.bias, stride, self.padding)


def _conv_block(c_in: int, c_out: int, first: type[nn.Conv2d] = nn.Conv2d) -> nn.Sequential:
    return nn.Sequential(
        first(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


class SimpleCNN(nn.Module):
    """Four conv/BN/ReLU/max-pool blocks, global pooling, dropout: the seeds' CNN, doubled convs,
    with a first convolution that strides on full-size inputs (see ``StemConv``)."""

    def __init__(self, num_classes: int, in_channels: int = 1, widths: tuple[int, ...] = (32, 64, 128, 256)):
        super().__init__()
        blocks, c_in = [], in_channels
        for index, width in enumerate(widths):
            blocks.append(_conv_block(c_in, width, StemConv if index == 0 else nn.Conv2d))
            c_in = width
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Dropout(0.3), nn.Linear(c_in, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)))


class Ensemble(nn.Module):
    """Several trained models as one: the output is the log of their mean probabilities.

    ``softmax`` of that output *is* the mean of the members' probabilities, so
    every caller of ``predict_proba`` (evaluation, serving, the gate) treats an
    ensemble as any other model, and it is stored and served as one state_dict.
    """

    def __init__(self, members: list[nn.Module], names: tuple[str, ...]):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.names = names

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return log_mean_probability([m(x) for m in self.members])


def log_mean_probability(member_logits: list[torch.Tensor]) -> torch.Tensor:
    """An ensemble's output from its members' logits: the log of their mean softmax."""
    probs = torch.stack([torch.softmax(z.float(), dim=1) for z in member_logits]).mean(dim=0)
    return torch.log(probs.clamp_min(1e-12))


ENSEMBLE = "ensemble"


def ensemble_state_dict(member_states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The state_dict of an ``Ensemble`` whose members hold these weights, in this order."""
    return {f"members.{i}.{key}": value for i, state in enumerate(member_states) for key, value in state.items()}


def flat_ensemble(models: list[nn.Module], names: tuple[str, ...]) -> Ensemble:
    """An ensemble of models some of which may be ensembles (k-fold bags): their members are taken in.

    With bags of equal size the flat mean is the mean of the bags' means, and a
    flat list of architectures is what a ModelSpec's ``members`` can name.
    """
    members: list[nn.Module] = []
    member_names: list[str] = []
    for model, name in zip(models, names):
        if isinstance(model, Ensemble):
            members += list(model.members)
            member_names += list(model.names)
        else:
            members.append(model)
            member_names.append(name)
    return Ensemble(members, tuple(member_names))


def build_ensemble(members: tuple[str, ...], num_classes: int, in_channels: int | None = None) -> Ensemble:
    return Ensemble([build_model(m, num_classes, in_channels) for m in members], members)


def build_model(name: str, num_classes: int, in_channels: int | None = None, weights: str = "none") -> nn.Module:
    """A candidate by name (``in_channels`` None: the architecture's own), from ``ARCHITECTURES``."""
    architecture = ARCHITECTURES.get(name)
    if architecture is None:
        raise ConfigError(f"unknown candidate {name!r}")
    return architecture.build(num_classes, architecture.in_channels if in_channels is None else in_channels, weights)


def _simple_cnn(num_classes: int, in_channels: int, weights: str) -> nn.Module:
    if weights != "none":
        logger.info("simple_cnn has no pretrained weights; training from scratch")
    return SimpleCNN(num_classes, in_channels)


def _densenet(name: str, num_classes: int, in_channels: int, weights: str) -> nn.Module:
    factory, imagenet = tv_models.get_model_builder(name), tv_models.get_model_weights(name).IMAGENET1K_V1
    model = factory(weights=None)
    if weights != "none":
        model.load_state_dict(_load_pretrained(name, imagenet, weights))
    stem = model.features.conv0
    new_stem = nn.Conv2d(in_channels, stem.out_channels, 7, stride=2, padding=3, bias=False)
    with torch.no_grad():
        if in_channels == 1:
            new_stem.weight.copy_(stem.weight.sum(dim=1, keepdim=True))
        else:
            new_stem.weight.copy_(stem.weight)
    model.features.conv0 = new_stem
    model.classifier = nn.Linear(model.classifier.in_features, num_classes)
    return model


def _load_pretrained(name: str, imagenet: tv_models.WeightsEnum, weights: str) -> dict[str, torch.Tensor]:
    """Weights only from disk: a named file or torch's cache. Never downloads."""
    if weights == "imagenet":
        filename = Path(imagenet.url).name
        path = Path(torch.hub.get_dir()) / "checkpoints" / filename
    else:
        path = Path(weights)
    if not path.is_file():
        raise ConfigError(
            f"{name}: pretrained weights not found at {path}; place torchvision's {Path(imagenet.url).name} "
            f"there (or set trainer.weights to a local file path, or 'none'). Nothing is downloaded."
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
        raise ConfigError(f"{name}: cannot read pretrained weights {path}: {exc}") from None
    # torchvision's old DenseNet checkpoints use keys like 'norm.1'; its loader renames them.
    state = {k.replace("norm.1", "norm1").replace("norm.2", "norm2").replace("conv.1", "conv1").replace("conv.2", "conv2"): v for k, v in state.items()}
    return state


def gradcam_target_layers(model: nn.Module) -> list[nn.Module]:
    """The last spatial feature map: where Grad-CAM has both resolution and semantics.

    An ensemble gives each member's; pytorch-grad-cam averages the per-layer
    maps (each scaled to the input), i.e. the members' Grad-CAMs averaged.
    """
    if isinstance(model, Ensemble):
        return [layer for member in model.members for layer in gradcam_target_layers(member)]
    for architecture in ARCHITECTURES.values():
        if isinstance(model, architecture.model_type):
            return [architecture.gradcam_layer(model)]
    raise ValueError(f"no Grad-CAM target layer is known for a {type(model).__name__}")


def _simple_cnn_cam_layer(model: nn.Module) -> nn.Module:
    return model.features[-1][-3]  # last block's final BatchNorm (its ReLU is in-place), before pooling


def _densenet_cam_layer(model: nn.Module) -> nn.Module:
    return model.features[-1]  # DenseNet: final norm5 (its ReLU is functional)


@dataclass(frozen=True)
class Architecture:
    """One candidate: how it is built, where Grad-CAM looks, what it takes."""

    name: str
    build: Callable[[int, int, str], nn.Module]  # (num_classes, in_channels, weights) -> the model
    model_type: type[nn.Module]  # what it is built as: how a built model finds its entry
    gradcam_layer: Callable[[nn.Module], nn.Module]  # the last spatial feature map of a built model
    in_channels: int = 1  # radiographs are grayscale


# The one table of candidates: what trainer.candidates may name (CANDIDATES holds the same names, in order).
ARCHITECTURES: dict[str, Architecture] = {
    a.name: a
    for a in (
        Architecture("simple_cnn", _simple_cnn, SimpleCNN, _simple_cnn_cam_layer),
        *(
            Architecture(name, partial(_densenet, name), tv_models.DenseNet, _densenet_cam_layer)
            for name in ("densenet121", "densenet169", "densenet201")
        ),
    )
}


def load_candidate(candidate: CandidateModel, run_path: Path, num_classes: int) -> nn.Module:
    """A trained candidate's best checkpoint in its architecture (a k-fold bag: the ensemble of its folds),
    on CPU, in eval mode. Here, not on the record: the artifact is a plain record below every stage."""
    model = (
        build_ensemble(candidate.members, num_classes) if candidate.members else build_model(candidate.name, num_classes)
    )
    return load_checkpoint(model, run_path / candidate.checkpoint)


def penultimate(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The globally pooled features a single model's classifier reads (``N×D``), for the OOD score.

    ``classifier_head(model)(penultimate(model, x))`` is ``model(x)``: the
    features are taken where each architecture's own forward pass has them.
    """
    if isinstance(model, SimpleCNN):
        return model.pool(model.features(x)).flatten(1)
    if isinstance(model, Ensemble):
        raise TypeError("an ensemble has one feature vector per member: use member_outputs")
    # torchvision DenseNet.forward: features -> ReLU -> global average pool -> classifier
    return nn.functional.adaptive_avg_pool2d(nn.functional.relu(model.features(x)), 1).flatten(1)


def classifier_head(model: nn.Module) -> nn.Module:
    """The layer(s) that turn ``penultimate`` features into logits."""
    return model.classifier


def member_outputs(model: nn.Module) -> list[nn.Module]:
    """The single models whose features are scored: an ensemble's members, else the model itself."""
    return list(model.members) if isinstance(model, Ensemble) else [model]


def logits_and_features(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One forward pass: the model's output (as ``model(x)``) and each member's penultimate features."""
    members = member_outputs(model)
    features = [penultimate(m, x) for m in members]
    logits = [classifier_head(m)(f) for m, f in zip(members, features)]
    return (log_mean_probability(logits) if isinstance(model, Ensemble) else logits[0]), features


def load_checkpoint(model: nn.Module, path: Path) -> nn.Module:
    """Weights saved by the trainer (a state_dict), loaded on CPU without unpickling code."""
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
