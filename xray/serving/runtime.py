"""Inference runtimes for CPUs: the ONNX export made at push, its agreement check, and the runtime that serves it.

Eager PyTorch at batch 1-8 leaves a CPU mostly idle; ONNX Runtime and
OpenVINO fuse the graph and carry kernels tuned for small batches. So the
pusher exports the served model (an ensemble as one graph holding every
member) to ONNX, and serving runs that graph through whichever runtime
measured fastest on this machine.

* **The graph** (``ExportGraph``) takes the normalised ``N×C×H×W`` float
  tensor and returns the model's output (an ensemble's log mean probability)
  and each member's penultimate features, so one call gives both the
  probabilities and the OOD score, as ``predict_proba_and_features`` does.
* **The check** (``check_export``): on the validation films, through the
  spec's test-time views, the runtime's probabilities against eager fp32
  PyTorch. Top-1 agreement at least ``MIN_AGREEMENT`` and the largest
  probability difference at most ``MAX_PROB_DIFF``, or the graph is not
  served and the record says why.
* **int8** (``quantize_int8``): ONNX Runtime's static post-training
  quantization (QDQ, per-channel int8 weights, uint8 activations), calibrated
  on training films, under the same check. It is served only where it passes
  and only where this CPU measured it clearly faster than the best fp32 (or
  bf16) runtime. Each graph is checked in each ONNX runtime, since each runs
  its own kernels: a graph serves only in a runtime where it passed.
* **The choice** (``runtime_choice``): ONNX Runtime and OpenVINO (fp32 and
  int8) and eager PyTorch (at the precision it would serve at) are timed
  once per machine (and thread count) on a random
  DenseNet-121 at a small size, and the result is cached beside the CPU
  capability record (``xray.capability``). ``XRAY_RUNTIME`` overrides it.

``/explain`` stays on PyTorch: Grad-CAM needs gradients.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import nn

from xray.capability import cached_measurement, capability
from xray.data.preprocessing import Preprocessing
from xray.entity.artifact_entity import ExportCheck, RuntimeExport
from xray.models.builders import build_model, logits_and_features, member_outputs
from xray.serving.inference import predict_proba, tta_view

logger = logging.getLogger(__name__)

ONNX_RUNTIMES = ("onnxruntime", "openvino")  # each checks and serves the same ONNX file
RUNTIMES = (*ONNX_RUNTIMES, "torch")
OPSET = 17
MIN_AGREEMENT = 0.995  # top-1 agreement with eager fp32 on validation, or the export is not served
MAX_PROB_DIFF = 0.01  # largest probability difference on validation, or the export is not served
INT8_MARGIN = 1.15  # int8 must be this much faster than the best fp32 runtime to be used
CALIBRATION_FILMS = 64  # training films that calibrate int8 activations
FP32_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"


class ExportGraph(nn.Module):
    """The served model as one graph: ``x -> (output, features_0, ..., features_{k-1})``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        output, features = logits_and_features(self.model, x)
        return (output, *features)


def output_names(model: nn.Module) -> list[str]:
    return ["output"] + [f"features_{i}" for i in range(len(member_outputs(model)))]


@contextlib.contextmanager
def _quiet_export() -> Iterator[None]:
    """torch.onnx prints deprecation notes to stdout, and ONNX Runtime's quantizer warns through the root
    logger once per normalisation weight; the run log keeps only what ``make_export`` says."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)
        try:
            yield
        finally:
            logging.disable(logging.NOTSET)


def export_onnx(model: nn.Module, preprocessing: Preprocessing, path: Path) -> Path:
    """Write ``model`` (fp32, eval mode) as an ONNX graph with a dynamic batch axis."""
    model = model.float().eval()
    size = preprocessing.image_size
    example = torch.zeros(1, preprocessing.channels, size, size)
    names = output_names(model)
    with _quiet_export(), torch.inference_mode():
        torch.onnx.export(
            ExportGraph(model), (example,), str(path), input_names=["x"], output_names=names,
            dynamic_axes={name: {0: "batch"} for name in ["x", *names]}, opset_version=OPSET, dynamo=False,
        )
    return path


class Session(Protocol):
    """One loaded graph: normalised float32 ``N×C×H×W`` in, (output ``N×K``, member features) out."""

    runtime: str
    precision: str

    def run(self, x: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]: ...


@dataclass
class OrtSession:
    """ONNX Runtime's CPU execution provider, every graph optimisation on, ``threads`` intra-op threads."""

    path: Path
    threads: int
    precision: str = "fp32"
    runtime: str = "onnxruntime"

    def __post_init__(self) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        self._session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])

    def run(self, x: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        output, *features = self._session.run(None, {"x": np.ascontiguousarray(x, np.float32)})
        return output, features


@dataclass
class OpenVinoSession:
    """OpenVINO's CPU plugin on the same ONNX file, latency hint, ``threads`` inference threads."""

    path: Path
    threads: int
    precision: str = "fp32"
    runtime: str = "openvino"

    def __post_init__(self) -> None:
        import openvino as ov

        config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": self.threads, "INFERENCE_PRECISION_HINT": "f32"}
        self._compiled = ov.Core().compile_model(str(self.path), "CPU", config)

    def run(self, x: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        result = self._compiled(np.ascontiguousarray(x, np.float32))
        output, *features = [np.asarray(result[port]) for port in self._compiled.outputs]
        return output, features


def open_session(runtime: str, path: Path, threads: int, precision: str = "fp32") -> Session:
    if runtime == "onnxruntime":
        return OrtSession(Path(path), threads, precision)
    if runtime == "openvino":
        return OpenVinoSession(Path(path), threads, precision)
    raise ValueError(f"no ONNX session for runtime {runtime!r} (known: onnxruntime, openvino)")


def session_proba_and_features(
    session: Session, pixels: np.ndarray, preprocessing: Preprocessing, tta: tuple[str, ...] = (), batch_size: int = 64
) -> tuple[np.ndarray, list[np.ndarray]]:
    """``predict_proba_and_features`` through a runtime session: probabilities (mean over the test-time
    views) and each member's features from the plain image."""
    def one_view(view: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        outputs, features = [], []
        for start in range(0, len(view), batch_size):
            x = preprocessing.to_tensor(view[start : start + batch_size]).numpy()
            output, feats = session.run(x)
            outputs.append(output)
            features.append(feats)
        logits = torch.from_numpy(np.concatenate(outputs).astype(np.float32))
        members = [np.concatenate([batch[i] for batch in features]) for i in range(len(features[0]))]
        return torch.softmax(logits, dim=1).numpy(), members

    if len(pixels) == 0:
        return np.empty((0, 0), np.float32), []
    probs, members = one_view(pixels)
    if tta:
        probs = np.mean([probs] + [one_view(tta_view(pixels, view))[0] for view in tta], axis=0)
    return probs, members


def check_export(
    model: nn.Module, session: Session, pixels: np.ndarray, preprocessing: Preprocessing, tta: tuple[str, ...],
    file: str, sha256: str,
) -> ExportCheck:
    """The session's probabilities on ``pixels`` (the validation films) against eager fp32 PyTorch."""
    reference = predict_proba(model.float().eval(), pixels, preprocessing, torch.device("cpu"), tta=tta)
    probs, _ = session_proba_and_features(session, pixels, preprocessing, tta)
    agreement = float(np.mean(reference.argmax(axis=1) == probs.argmax(axis=1))) if len(pixels) else 0.0
    diff = float(np.abs(reference - probs).max()) if len(pixels) else float("inf")
    reasons = []
    if agreement < MIN_AGREEMENT:
        reasons.append(f"top-1 agreement {agreement:.4f} < {MIN_AGREEMENT}")
    if diff > MAX_PROB_DIFF:
        reasons.append(f"largest probability difference {diff:.4f} > {MAX_PROB_DIFF}")
    if len(pixels) == 0:
        reasons.append("no validation films to check on")
    return ExportCheck(
        file=file, sha256=sha256, precision=session.precision, runtime=session.runtime, films=len(pixels),
        top1_agreement=agreement, max_prob_diff=diff, passed=not reasons,
        reason="; ".join(reasons) if reasons else f"agrees with eager fp32 on {len(pixels)} validation films",
    )


class _Calibration:
    """ONNX Runtime's CalibrationDataReader over normalised training films, a few at a time."""

    def __init__(self, pixels: np.ndarray, preprocessing: Preprocessing, batch: int = 8):
        self._batches = iter(
            [preprocessing.to_tensor(pixels[i : i + batch]).numpy() for i in range(0, len(pixels), batch)]
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {"x": batch}


def quantize_int8(fp32: Path, out: Path, calibration: np.ndarray, preprocessing: Preprocessing) -> Path:
    """Static post-training quantization of ``fp32`` to ``out``, calibrated on ``calibration`` (uint8 films)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(prefix="xray-int8-") as tmp, _quiet_export():
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared), str(out), _Calibration(calibration[:CALIBRATION_FILMS], preprocessing),
            quant_format=QuantFormat.QDQ, per_channel=True, weight_type=QuantType.QInt8,
            activation_type=QuantType.QUInt8, calibrate_method=CalibrationMethod.MinMax,
            reduce_range=not _has_vnni(),  # without VNNI, u8s8 products can saturate: 7-bit weights avoid it
        )
    return out


def _has_vnni() -> bool:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_vnni" in text or "avx_vnni" in text


@dataclass(frozen=True)
class RuntimeChoice:
    """This machine's measured films/s per runtime on the probe, and the order serving tries them in."""

    rates: dict[str, float]  # films/s at the probe's batch: torch (at its auto precision), onnxruntime, openvino,
    # and onnxruntime_int8 / openvino_int8
    torch_precision: str  # what eager PyTorch was timed at: fp32, or bf16 where this CPU prefers it

    @property
    def ranked(self) -> tuple[tuple[str, str], ...]:
        """(runtime, precision), fastest first. int8 enters only at INT8_MARGIN times the best other rate:
        its small loss in agreement must buy a clear gain. Eager PyTorch is always there, as the fallback."""
        plain = {("torch", self.torch_precision): self.rates["torch"]}
        plain |= {(name, "fp32"): self.rates[name] for name in ONNX_RUNTIMES if name in self.rates}
        best = max(plain.values())
        int8 = {(name, "int8"): self.rates[f"{name}_int8"] for name in ONNX_RUNTIMES if f"{name}_int8" in self.rates}
        candidates = plain | {key: rate for key, rate in int8.items() if rate >= INT8_MARGIN * best}
        return tuple(sorted(candidates, key=candidates.__getitem__, reverse=True))

    def describe(self) -> str:
        rates = ", ".join(f"{name} {rate:.1f}" for name, rate in sorted(self.rates.items()))
        order = " > ".join(f"{runtime} {precision}" for runtime, precision in self.ranked)
        return f"serving runtimes, fastest first: {order}; probe films/s: {rates}"


PROBE_SIZE, PROBE_BATCH, PROBE_SECONDS = 96, 4, 1.0


def runtime_choice(threads: int) -> RuntimeChoice:
    """The runtimes timed on this machine at ``threads`` threads, measured once and cached (``xray.capability``)."""
    import onnxruntime
    import openvino

    torch_precision = "bf16" if capability().prefers_bf16 else "fp32"  # as eager serving's ``auto`` chooses
    key = (
        f"runtime|{threads} threads|torch {torch.__version__} {torch_precision}|ort {onnxruntime.__version__}"
        f"|ov {openvino.__version__}|v2"
    )
    rates = cached_measurement(key, lambda: _measure_runtimes(threads, torch_precision))
    return RuntimeChoice(rates, torch_precision)


def _rate(run: Callable[[], object]) -> float:
    run()
    calls, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < PROBE_SECONDS or calls < 3:
        run()
        calls += 1
    return PROBE_BATCH * calls / elapsed


def _measure_runtimes(threads: int, torch_precision: str = "fp32") -> dict[str, float]:
    """Films/s of a random DenseNet-121 (PROBE_SIZE px, batch PROBE_BATCH) in each runtime: eager PyTorch at
    ``torch_precision``, and each ONNX runtime on the fp32 graph and on its int8 quantization."""
    torch.manual_seed(0)
    model = build_model("densenet121", 3, 1).eval()
    preprocessing = Preprocessing(image_size=PROBE_SIZE, mean=0.5, std=0.25)
    films = np.random.default_rng(0).integers(0, 256, (16, PROBE_SIZE, PROBE_SIZE), dtype=np.uint8)
    x = preprocessing.to_tensor(films[:PROBE_BATCH])
    previous = torch.get_num_threads()
    rates: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="xray-runtime-probe-") as tmp:
        fp32 = export_onnx(model, preprocessing, Path(tmp) / FP32_FILE)
        torch.set_num_threads(threads)
        try:
            eager = copy.deepcopy(model).to(torch.bfloat16) if torch_precision == "bf16" else model
            batch = x.to(torch.bfloat16) if torch_precision == "bf16" else x
            with torch.inference_mode():
                rates["torch"] = _rate(lambda: eager(batch.contiguous(memory_format=torch.channels_last)))
        finally:
            torch.set_num_threads(previous)
        int8 = quantize_int8(fp32, Path(tmp) / INT8_FILE, films, preprocessing)
        for runtime in ONNX_RUNTIMES:
            session = open_session(runtime, fp32, threads)
            rates[runtime] = _rate(lambda: session.run(x.numpy()))
            session = open_session(runtime, int8, threads, "int8")
            rates[f"{runtime}_int8"] = _rate(lambda: session.run(x.numpy()))
    logger.info("serving runtimes measured at %d thread(s): %s", threads, rates)
    return {name: round(rate, 2) for name, rate in rates.items()}


def _sha256(path: Path) -> str:
    import hashlib

    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def make_export(
    model: nn.Module,
    preprocessing: Preprocessing,
    tta: tuple[str, ...],
    validation: np.ndarray,
    calibration: np.ndarray,
    out_dir: Path,
    int8: bool = True,
) -> RuntimeExport:
    """Export ``model`` to ``out_dir`` (fp32 and, with ``int8``, its static quantization) and check each graph
    on ``validation`` films in each ONNX runtime (each runs its own kernels, so each is checked on its own);
    ``calibration``: training films for the int8 activation ranges."""
    threads = torch.get_num_threads()
    files = [(export_onnx(model, preprocessing, out_dir / FP32_FILE), "fp32")]
    if int8:
        files.append((quantize_int8(files[0][0], out_dir / INT8_FILE, calibration, preprocessing), "int8"))
    graphs = [
        check_export(
            model, open_session(runtime, file, threads, precision), validation, preprocessing, tta, file.name,
            _sha256(file),
        )
        for file, precision in files
        for runtime in ONNX_RUNTIMES
    ]
    for graph in graphs:
        log = logger.info if graph.passed else logger.warning
        log(
            "ONNX export %s (%s, %s): %s%s", graph.file, graph.precision, graph.runtime,
            "" if graph.passed else "not served: ", graph.reason,
        )
    return RuntimeExport("onnx", OPSET, tuple(graphs), MIN_AGREEMENT, MAX_PROB_DIFF)
