"""xray/serving/serving_model.py: the model directory the pusher writes, loaded back from a temporary BentoML store."""

from __future__ import annotations

import dataclasses
import os
import secrets
from pathlib import Path

import numpy as np
import pytest
import torch

from xray.serving.inference import predict_proba
from xray.models.builders import build_model
from xray.data.preprocessing import Preprocessing, equalize
from xray.serving.serving_model import (
    SPEC, WEIGHTS, ModelSpec, load_model_dir, production_model_dir, read_spec, write_model_dir,
)
from xray.pipeline.store import sha256_file

CLASSES = ("covid", "normal", "pneumonia")
PREP = Preprocessing(image_size=32, mean=0.45, std=0.22)


def trained_checkpoint(tmp_path: Path) -> tuple[torch.nn.Module, Path]:
    torch.manual_seed(0)
    model = build_model("simple_cnn", len(CLASSES)).eval()
    path = tmp_path / "simple_cnn.pt"
    torch.save(model.state_dict(), path)
    return model, path


def spec_for(checkpoint: Path) -> ModelSpec:
    return ModelSpec(
        architecture="simple_cnn", class_names=CLASSES, preprocessing=PREP, run_id="run-1",
        data_fingerprint="abc", weights_sha256=sha256_file(checkpoint), metrics={"test": {"roc_auc": 0.9}},
    )


def images(n: int = 5) -> np.ndarray:
    return np.random.default_rng(2).integers(0, 256, (n, 32, 32), dtype=np.uint8)


def test_model_dir_round_trip_and_fp32_predictions_match_the_original(tmp_path: Path) -> None:
    original, checkpoint = trained_checkpoint(tmp_path)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    spec = spec_for(checkpoint)
    write_model_dir(model_dir, spec, checkpoint)
    assert sha256_file(model_dir / WEIGHTS) == spec.weights_sha256  # byte-for-byte copy
    assert read_spec(model_dir) == spec
    loaded = load_model_dir(model_dir, precision="fp32", tag="t:1")
    assert loaded.precision == "fp32" and loaded.inference_model is loaded.model and loaded.tag == "t:1"
    probs = loaded.predict_proba(images(), batch_size=2)
    expected = predict_proba(original, images(), PREP, torch.device("cpu"), channels_last=False)
    assert probs.shape == (5, 3)
    np.testing.assert_allclose(probs, expected, rtol=1e-4, atol=1e-6)


def test_bf16_load_keeps_an_fp32_model_for_gradcam(tmp_path: Path) -> None:
    _, checkpoint = trained_checkpoint(tmp_path)
    write_model_dir(tmp_path, spec_for(checkpoint), checkpoint)
    fp32 = load_model_dir(tmp_path, precision="fp32")
    bf16 = load_model_dir(tmp_path, precision="bf16")
    assert next(bf16.model.parameters()).dtype == torch.float32
    assert next(bf16.inference_model.parameters()).dtype == torch.bfloat16
    np.testing.assert_allclose(bf16.predict_proba(images(3)), fp32.predict_proba(images(3)), atol=0.05)


def test_a_damaged_spec_is_refused(tmp_path: Path) -> None:
    _, checkpoint = trained_checkpoint(tmp_path)
    write_model_dir(tmp_path, spec_for(checkpoint), checkpoint)
    (tmp_path / SPEC).write_text((tmp_path / SPEC).read_text().replace('"image_size": 32', '"image_size": "big"'))
    with pytest.raises(ValueError, match="preprocessing.image_size: expected an integer"):
        read_spec(tmp_path)


def test_production_model_is_the_newest_gated_one_in_the_store(tmp_path: Path) -> None:
    """Saved into the temporary BENTOML_HOME that conftest gives every test, then found and loaded by name.

    With no audit log yet, production is the newest model the gate blessed; a newer unblessed one is not.
    """
    import bentoml

    name = f"xray-unit-{secrets.token_hex(4)}"
    assert production_model_dir(name) is None
    original, checkpoint = trained_checkpoint(tmp_path)
    tags = []
    for run_id in ("run-1", "run-2"):
        with bentoml.models.create(name, labels={"stage": "unit"}, metadata={"gate_passed": True}) as stored:
            write_model_dir(Path(stored.path), dataclasses.replace(spec_for(checkpoint), run_id=run_id), checkpoint)
        tags.append(str(stored.tag))
    with bentoml.models.create(name, labels={"stage": "unit"}, metadata={}) as unblessed:
        write_model_dir(Path(unblessed.path), dataclasses.replace(spec_for(checkpoint), run_id="run-3"), checkpoint)
    found = production_model_dir(name)
    assert found is not None
    tag, path = found
    assert tag == tags[-1] and read_spec(path).run_id == "run-2"
    assert path.is_relative_to(os.environ["BENTOML_HOME"])  # the temporary store, never the developer's
    probs = load_model_dir(path, precision="fp32").predict_proba(images())
    expected = predict_proba(original, images(), PREP, torch.device("cpu"), channels_last=False)
    np.testing.assert_allclose(probs, expected, rtol=1e-4, atol=1e-6)


def test_an_equalising_contract_is_kept_in_the_model_dir_and_applied_when_serving(tmp_path: Path) -> None:
    """The intensity step travels in model.json, so a served film is equalised as the training films were."""
    original, checkpoint = trained_checkpoint(tmp_path)
    equalising = dataclasses.replace(PREP, intensity="equalize")
    spec = dataclasses.replace(spec_for(checkpoint), preprocessing=equalising)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    write_model_dir(model_dir, spec, checkpoint)
    loaded = load_model_dir(model_dir, precision="fp32")
    assert loaded.spec.preprocessing.intensity == "equalize"
    dim = (images() // 4 + 40).astype(np.uint8)  # a dark, low-contrast copy: equalising undoes most of it
    served = loaded.predict_proba(dim, batch_size=2)
    expected = predict_proba(original, dim, equalising, torch.device("cpu"), channels_last=False)
    np.testing.assert_allclose(served, expected, rtol=1e-4, atol=1e-6)
    seen = loaded.spec.preprocessing.to_tensor(dim)  # what the network is given
    torch.testing.assert_close(seen, PREP.to_tensor(equalize(dim)))
    assert float((seen - PREP.to_tensor(dim)).abs().mean()) > 0.5
