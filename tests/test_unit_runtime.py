"""The ONNX export made at push: it agrees with eager PyTorch, its hash is checked like the weights', a graph
that fails its check is not served, and a model pushed without one still serves on PyTorch."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from xray.data.preprocessing import Preprocessing
from xray.models.builders import build_ensemble
from xray.pipeline.store import sha256_file
from xray.serving.runtime import (
    INT8_MARGIN, MAX_PROB_DIFF, RuntimeChoice, check_export, make_export, open_session,
    session_proba_and_features,
)
from xray.serving.serving_model import ModelIntegrityError, ModelSpec, load_model_dir, write_model_dir
from xray.serving.settings import ServingSettings

CLASSES = ("covid", "normal", "pneumonia")
PREP = Preprocessing(image_size=32, mean=0.45, std=0.22)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, np.ndarray]:
    """A two-member ensemble (random weights), exported with its int8 graph, in a model directory."""
    tmp = tmp_path_factory.mktemp("runtime")
    torch.manual_seed(0)
    model = build_ensemble(("simple_cnn", "densenet121"), len(CLASSES), 1).eval()
    checkpoint = tmp / "weights.pt"
    torch.save(model.state_dict(), checkpoint)
    films = np.random.default_rng(0).integers(0, 256, (24, 32, 32), dtype=np.uint8)
    export_dir = tmp / "export"
    export_dir.mkdir()
    export = make_export(model, PREP, ("hflip",), films[:16], films, export_dir, int8=True)
    spec = ModelSpec(
        "ensemble", CLASSES, PREP, "run-1", "abc", sha256_file(checkpoint), {},
        members=("simple_cnn", "densenet121"), tta=("hflip",), export=export,
    )
    out = tmp / "model"
    out.mkdir()
    write_model_dir(out, spec, checkpoint, export_dir=export_dir)
    return out, checkpoint, films


def test_the_export_agrees_with_eager_pytorch_in_both_runtimes(exported: tuple[Path, Path, np.ndarray]) -> None:
    model_dir, _, films = exported
    eager = load_model_dir(model_dir, runtime="torch")
    assert eager.runtime == "torch" and eager.session is None
    reference = eager.scores(films[16:])
    fp32 = eager.spec.export.servable("fp32")
    assert fp32 is not None and fp32.top1_agreement == 1.0 and fp32.max_prob_diff <= MAX_PROB_DIFF
    for runtime in ("onnxruntime", "openvino"):
        served = load_model_dir(model_dir, runtime=runtime, threads=1)
        assert served.runtime == runtime and served.precision == "fp32"
        scores = served.scores(films[16:])
        np.testing.assert_allclose(scores.probabilities, reference.probabilities, atol=1e-4)
        assert (scores.probabilities.argmax(1) == reference.probabilities.argmax(1)).all()


def test_auto_serves_a_checked_graph_and_names_its_runtime(exported: tuple[Path, Path, np.ndarray]) -> None:
    model_dir, _, films = exported
    served = load_model_dir(model_dir, runtime="auto", threads=1)
    assert served.runtime in ("onnxruntime", "openvino", "torch")
    if served.session is not None:
        graph = served.spec.export.servable(served.precision, served.runtime)
        assert graph is not None and graph.passed and graph.runtime == served.runtime
    assert served.scores(films[:3]).probabilities.shape == (3, 3)


def test_every_graph_is_checked_in_every_onnx_runtime(exported: tuple[Path, Path, np.ndarray]) -> None:
    export = load_model_dir(exported[0]).spec.export
    assert {(g.file, g.precision, g.runtime) for g in export.graphs} == {
        (file, precision, runtime)
        for file, precision in (("model.onnx", "fp32"), ("model.int8.onnx", "int8"))
        for runtime in ("onnxruntime", "openvino")
    }
    assert export.servable("int8", "tensorflow") is None


def test_int8_is_tried_only_where_it_measured_clearly_faster() -> None:
    rates = {"torch": 50.0, "onnxruntime": 100.0, "openvino": 90.0, "onnxruntime_int8": 110.0, "openvino_int8": 200.0}
    choice = RuntimeChoice(rates, "bf16")
    assert choice.ranked == (
        ("openvino", "int8"), ("onnxruntime", "fp32"), ("openvino", "fp32"), ("torch", "bf16"),
    )  # onnxruntime int8 at 1.1x the best fp32 is under INT8_MARGIN; openvino int8 at 2x is over it
    assert INT8_MARGIN > 1.1
    slow_onnx = RuntimeChoice({**rates, "torch": 300.0}, "bf16")
    assert slow_onnx.ranked[0] == ("torch", "bf16") and ("openvino", "int8") not in slow_onnx.ranked


def test_auto_falls_back_past_a_graph_that_failed_in_the_fastest_runtime(
    exported: tuple[Path, Path, np.ndarray], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The measured order says openvino int8 first; its check failed there, so the next that passed serves."""
    import xray.serving.serving_model as serving_model

    model_dir, checkpoint, films = exported
    spec = load_model_dir(model_dir).spec
    failed = tuple(
        dataclasses.replace(g, passed=False, reason="forced") if (g.precision, g.runtime) == ("int8", "openvino") else g
        for g in spec.export.graphs
    )
    out = tmp_path / "model"
    out.mkdir()
    write_model_dir(out, dataclasses.replace(spec, export=dataclasses.replace(spec.export, graphs=failed)), checkpoint,
                    export_dir=model_dir)
    order = {"torch": 1.0, "onnxruntime": 2.0, "openvino": 1.5, "onnxruntime_int8": 2.1, "openvino_int8": 9.0}
    monkeypatch.setattr(serving_model, "runtime_choice", lambda threads: RuntimeChoice(order, "fp32"))
    served = load_model_dir(out, runtime="auto", threads=1)
    assert (served.runtime, served.precision) == ("onnxruntime", "fp32")
    assert served.scores(films[:2]).probabilities.shape == (2, 3)


def test_each_int8_check_records_what_its_runtime_does(exported: tuple[Path, Path, np.ndarray]) -> None:
    """Rerun on the check's own films (the first 16), each runtime's int8 graph gives the recorded figures."""
    model_dir, _, films = exported
    export = load_model_dir(model_dir).spec.export
    reference = load_model_dir(model_dir, runtime="torch").scores(films[:16]).probabilities
    for runtime in ("onnxruntime", "openvino"):
        check = next(g for g in export.graphs if (g.precision, g.runtime) == ("int8", runtime))
        session = open_session(runtime, model_dir / check.file, 1, "int8")
        probs, _ = session_proba_and_features(session, films[:16], PREP, ("hflip",))
        diff = float(np.abs(probs - reference).max())
        assert diff == pytest.approx(check.max_prob_diff, abs=2e-3)
        assert check.passed == (diff <= MAX_PROB_DIFF and check.top1_agreement >= export.min_agreement)


def test_a_changed_graph_is_refused(exported: tuple[Path, Path, np.ndarray], tmp_path: Path) -> None:
    model_dir, _, _ = exported
    copy = tmp_path / "model"
    copy.mkdir()
    for file in model_dir.iterdir():
        (copy / file.name).write_bytes(file.read_bytes())
    graph = copy / "model.onnx"
    graph.write_bytes(graph.read_bytes() + b"\0")
    with pytest.raises(ModelIntegrityError, match="model.onnx has sha256"):
        load_model_dir(copy, runtime="onnxruntime")
    graph.unlink()
    with pytest.raises(ModelIntegrityError, match="model.onnx, which is missing"):
        load_model_dir(copy, runtime="torch")  # a missing graph is refused whatever runs it


def test_a_graph_that_disagrees_fails_its_check(exported: tuple[Path, Path, np.ndarray]) -> None:
    model_dir, _, films = exported
    torch.manual_seed(1)
    other = build_ensemble(("simple_cnn", "densenet121"), len(CLASSES), 1).eval()  # other weights
    session = open_session("onnxruntime", model_dir / "model.onnx", 1)
    check = check_export(other, session, films[:16], PREP, ("hflip",), "model.onnx", "x")
    assert not check.passed and "largest probability difference" in check.reason


def test_a_model_pushed_without_an_export_serves_on_pytorch(exported: tuple[Path, Path, np.ndarray], tmp_path: Path) -> None:
    model_dir, checkpoint, films = exported
    spec = dataclasses.replace(load_model_dir(model_dir).spec, export=None)
    out = tmp_path / "old"
    out.mkdir()
    write_model_dir(out, spec, checkpoint)
    served = load_model_dir(out, runtime="auto")
    assert served.runtime == "torch" and served.session is None
    assert served.scores(films[:2]).probabilities.shape == (2, 3)


def test_xray_runtime_is_checked() -> None:
    assert ServingSettings.from_env({"XRAY_RUNTIME": "openvino"}).runtime == "openvino"
    with pytest.raises(ValueError, match="XRAY_RUNTIME"):
        ServingSettings.from_env({"XRAY_RUNTIME": "tensorflow"})
