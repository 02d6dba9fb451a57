"""xray/models/builders.py: every candidate builds, runs at the sizes the pipeline uses, and loads weights from disk only."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision import models as tv_models

from xray.entity.config_entity import CANDIDATES
from xray.errors import ConfigError
from xray.models.builders import (
    ARCHITECTURES,
    Ensemble,
    SimpleCNN,
    build_ensemble,
    build_model,
    count_parameters,
    ensemble_state_dict,
    flat_ensemble,
    gradcam_target_layers,
    load_checkpoint,
)

DENSENETS = [name for name in CANDIDATES if name != "simple_cnn"]


def test_the_config_names_exactly_the_builders_table() -> None:
    """CANDIDATES lives in a module free of torch; the table is the truth, and the two stay equal."""
    assert tuple(ARCHITECTURES) == CANDIDATES
    assert all(name == a.name and a.in_channels == 1 for name, a in ARCHITECTURES.items())


@pytest.mark.parametrize("name", CANDIDATES)
def test_every_built_candidate_finds_its_table_entry(name: str) -> None:
    model = build_model(name, num_classes=2)
    assert isinstance(model, ARCHITECTURES[name].model_type)
    layer = gradcam_target_layers(model)
    assert layer == [ARCHITECTURES[name].gradcam_layer(model)] and isinstance(layer[0], nn.BatchNorm2d)
    assert next(model.parameters()).shape[1] == ARCHITECTURES[name].in_channels  # the stem takes one channel


def test_a_model_outside_the_table_has_no_gradcam_layer() -> None:
    with pytest.raises(ValueError, match="no Grad-CAM target layer is known for a Linear"):
        gradcam_target_layers(nn.Linear(2, 2))


def parameters_of(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", CANDIDATES)
@pytest.mark.parametrize("size", [32, 128])  # image_size auto clamps to 32..128 (MedMNIST -> 32, films -> 128)
def test_every_candidate_maps_a_grayscale_batch_to_class_logits(name: str, size: int) -> None:
    torch.manual_seed(0)
    model = build_model(name, num_classes=3).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 1, size, size))
    assert out.shape == (1, 3) and torch.isfinite(out).all()
    assert count_parameters(model) == parameters_of(model) > 0


def test_forward_at_224_the_benchmark_size() -> None:
    with torch.no_grad():
        assert build_model("simple_cnn", num_classes=2).eval()(torch.zeros(2, 1, 224, 224)).shape == (2, 2)


@pytest.mark.parametrize("name", DENSENETS)
def test_densenet_differs_from_torchvision_only_in_stem_and_head(name: str) -> None:
    reference = getattr(tv_models, name)(weights=None)  # 3-channel stem, 1000-class head
    features = reference.classifier.in_features
    stem = reference.features.conv0.weight.shape  # 64 x 3 x 7 x 7
    expected = parameters_of(reference) - stem[0] * 2 * stem[2] * stem[3] - (1000 - 3) * (features + 1)
    model = build_model(name, num_classes=3)
    assert count_parameters(model) == expected
    assert model.features.conv0.in_channels == 1 and model.classifier.out_features == 3


def test_simple_cnn_size_and_shape() -> None:
    model = build_model("simple_cnn", num_classes=2)
    assert isinstance(model, SimpleCNN)
    widths = [(1, 32), (32, 64), (64, 128), (128, 256)]
    convs = sum(9 * a * b + 9 * b * b for a, b in widths)  # two 3x3 convs per block, no bias
    norms = sum(2 * 2 * b for _, b in widths)  # two BatchNorms per block, weight + bias
    assert count_parameters(model) == convs + norms + 256 * 2 + 2


def test_unknown_candidate_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown candidate 'resnet50'"):
        build_model("resnet50", 2)


def test_simple_cnn_ignores_pretrained_weights_and_still_builds() -> None:
    assert isinstance(build_model("simple_cnn", 2, weights="imagenet"), SimpleCNN)


def test_pretrained_weights_come_from_a_local_file_and_the_stem_sums_rgb(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = tv_models.densenet121(weights=None)
    path = tmp_path / "densenet121.pth"
    torch.save(source.state_dict(), path)
    model = build_model("densenet121", 2, weights=str(path))
    torch.testing.assert_close(model.features.conv0.weight, source.features.conv0.weight.sum(dim=1, keepdim=True))
    torch.testing.assert_close(model.features.denseblock1.denselayer1.conv1.weight,
                               source.features.denseblock1.denselayer1.conv1.weight)


def test_missing_or_unreadable_weights_are_config_errors_and_nothing_downloads(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found at .*Nothing is downloaded"):
        build_model("densenet121", 2, weights=str(tmp_path / "absent.pth"))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="cannot read pretrained weights"):
        build_model("densenet121", 2, weights=str(garbage))


def test_gradcam_layer_is_the_last_spatial_feature_map() -> None:
    cnn = build_model("simple_cnn", 2)
    last_block = cnn.features[-1]  # conv, BN, ReLU, conv, BN, ReLU, max-pool
    assert gradcam_target_layers(cnn) == [last_block[4]]  # its final BatchNorm: 256 maps before ReLU and pooling
    assert isinstance(last_block[4], nn.BatchNorm2d) and last_block[4].num_features == 256
    dense = build_model("densenet121", 2)
    assert gradcam_target_layers(dense) == [dense.features.norm5]


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    trained = build_model("simple_cnn", 3).eval()
    path = tmp_path / "model.pt"
    torch.save(trained.state_dict(), path)
    torch.manual_seed(1)
    loaded = load_checkpoint(build_model("simple_cnn", 3).train(), path)
    assert not loaded.training
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), trained(x))


def test_simple_cnn_strides_its_first_conv_only_on_full_size_inputs() -> None:
    model = build_model("simple_cnn", 3).eval()
    first_block = model.features[0]
    with torch.no_grad():
        assert first_block(torch.zeros(1, 1, 64, 64)).shape[-1] == 32  # MedMNIST size: full resolution, then pooled
        assert first_block(torch.zeros(1, 1, 128, 128)).shape[-1] == 32  # full-size: strided, then pooled
        assert model(torch.zeros(2, 1, 128, 128)).shape == (2, 3)


def test_k_fold_bags_join_the_candidates_ensemble_as_their_members() -> None:
    torch.manual_seed(0)
    folds = [SimpleCNN(3).eval() for _ in range(2)]
    bag = build_ensemble(("simple_cnn", "simple_cnn"), 3).eval()
    bag.load_state_dict(ensemble_state_dict([f.state_dict() for f in folds]))
    other_folds = [SimpleCNN(3).eval() for _ in range(2)]
    other = Ensemble(other_folds, ("simple_cnn", "simple_cnn")).eval()
    joined = flat_ensemble([bag, other], ("a", "b"))
    assert joined.names == ("simple_cnn",) * 4 and len(joined.members) == 4
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        by_fold = torch.stack([torch.softmax(m(x), 1) for m in folds + other_folds]).mean(0)
        mean_of_bags = (torch.softmax(bag(x), 1) + torch.softmax(other(x), 1)) / 2
        assert torch.allclose(torch.softmax(bag(x), 1), torch.stack([torch.softmax(f(x), 1) for f in folds]).mean(0), atol=1e-6)
        assert torch.allclose(torch.softmax(joined(x), 1), by_fold, atol=1e-6)
        assert torch.allclose(torch.softmax(joined(x), 1), mean_of_bags, atol=1e-6)  # equal bags: the mean of their means
    restored = build_ensemble(joined.names, 3).eval()
    restored.load_state_dict(joined.state_dict())  # a flat list of architectures is enough to rebuild it
    assert len(gradcam_target_layers(joined)) == 4
