"""The Bento service over real HTTP: a tiny model trained and pushed by `xray train`, served by `bentoml serve`.

One server for the module (training + start-up is most of the time). Limits
are lowered through the environment so oversize cases stay small and fast.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests import dicom_builders as dcm
from tests.conftest import run_cli, tiny_args
from tests.serving_fixtures import (
    BentoServer,
    encode,
    histogram,
    multipart_body,
    png_header_claiming,
    radiograph,
    EPS,
    UNSUPPORTED_IMAGES,
    fake_ghostscript,
    start_bento_server,
    stop_process_group,
)

MAX_UPLOAD_BYTES = 2_000_000
MAX_PIXELS = 4_000_000
CONCURRENT = 32
POSITIVE = ("covid", "pneumonia")
WARN_ALL_BUT_FLAT = (
    "ood_score,too_small,posterized,colour,inverted,rotated,dicom_modality,dicom_body_part,dicom_view,dicom_photometric"
)


@pytest.fixture(scope="module")
def pushed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A tiny run pushed into its own BentoML home: (root, model tag)."""
    root = tmp_path_factory.mktemp("serving")
    home = root / "bentoml"
    # an ensemble (one model to serve, two members inside) with an operating point: the richest thing the pipeline pushes
    richest = (
        "trainer.candidates=[simple_cnn,densenet121]", "evaluation.ensemble=always",
        f"evaluation.operating_point.positive=[{','.join(POSITIVE)}]",
    )
    trained = run_cli("train", *tiny_args(root / "artifacts", *richest), env={"BENTOML_HOME": str(home)})
    assert trained.returncode == 0, trained.stderr[-3000:]
    return root, "xray-classifier:" + (home / "models" / "xray-classifier" / "latest").read_text().strip()


@pytest.fixture(scope="module")
def served(pushed: tuple[Path, str]) -> Iterator[tuple[BentoServer, str]]:
    root, tag = pushed
    env = {
        "XRAY_MODEL_TAG": tag,
        "XRAY_MAX_UPLOAD_BYTES": str(MAX_UPLOAD_BYTES),
        "XRAY_MAX_PIXELS": str(MAX_PIXELS),
        "XRAY_MAX_BATCH_SIZE": "16",
        "PATH": fake_ghostscript(root / "bin", root / "ghostscript-ran"),
        # the synthetic blobs below are no chest films: every check but nearly_constant answers as a warning here
        "XRAY_INPUT_GATE_WARN": WARN_ALL_BUT_FLAT,
    }
    server = start_bento_server(root / "bentoml", root / "serve.log", env)
    try:
        yield server, tag
    finally:
        stop_process_group(server.process)


@pytest.fixture(scope="module")
def client(served: tuple[BentoServer, str]) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=served[0].url, timeout=60) as http:
        yield http


@pytest.fixture(scope="module")
def metadata(client: httpx.Client) -> dict:
    response = client.get("/metadata")
    assert response.status_code == 200
    return response.json()


def post_image(client: httpx.Client, payload: bytes, route: str = "/predict", **kwargs: object) -> httpx.Response:
    return client.post(route, files={"image": ("xray.png", payload)}, **kwargs)


def assert_prediction(response: httpx.Response, metadata: dict, tag: str) -> None:
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == tag
    assert body["label"] in metadata["class_names"]
    assert set(body["probabilities"]) == set(metadata["class_names"])
    assert abs(sum(body["probabilities"].values()) - 1.0) < 1e-4
    assert body["label"] == max(body["probabilities"], key=body["probabilities"].get)


def test_health_endpoints(client: httpx.Client) -> None:
    assert client.get("/livez").status_code == 200
    assert client.get("/readyz").status_code == 200


def test_metadata_describes_the_served_model(metadata: dict, served: tuple[BentoServer, str]) -> None:
    assert metadata["model"] == served[1]
    assert metadata["class_names"] == ["covid", "normal", "pneumonia"]
    assert metadata["architecture"] == "ensemble"
    assert metadata["members"] == ["simple_cnn", "densenet121"]
    assert metadata["image_size"] == 32
    assert metadata["run_id"] and metadata["data_fingerprint"]
    assert "test" in metadata["metrics"]
    assert metadata["serving"]["precision"] in ("bf16", "fp32", "int8")
    assert metadata["serving"]["runtime"] in ("torch", "onnxruntime", "openvino")


def test_a_refused_input_is_422_with_reasons_and_no_label(client: httpx.Client, metadata: dict, served) -> None:
    """A flat image: nearly_constant refuses it (not downgraded here); the body carries the OOD score too."""
    response = post_image(client, encode(Image.fromarray(np.full((96, 96), 128, np.uint8))))
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["refused"] is True and "label" not in body and "probabilities" not in body
    assert "nearly_constant" in [r["code"] for r in body["reasons"]] and all(r["message"] for r in body["reasons"])
    assert body["ood_gate"] == "on" and isinstance(body["ood_score"], float)
    assert body["ood_threshold"] == metadata["ood"]["threshold"] and body["model"] == served[1]


def test_the_ood_threshold_round_trips_from_evaluation_to_serving(
    client: httpx.Client, metadata: dict, pushed: tuple[Path, str]
) -> None:
    """evaluation artifact -> model.json -> /metadata and every answer, and the served score is the stored model's."""
    import json

    from xray.serving import predict as one_path
    from xray.serving.serving_model import load_model_dir

    root, tag = pushed
    [evaluation] = (root / "artifacts").glob("*/model_evaluation/artifact.json")
    shipped = json.loads(evaluation.read_text())["ood"]
    assert metadata["ood_gate"] == "on" and metadata["ood"]["threshold"] == shipped["threshold"]
    assert metadata["temperature"] is not None
    payload = encode(Image.fromarray(radiograph(seed=3)))
    answer = post_image(client, payload).json()
    assert answer["ood_threshold"] == shipped["threshold"]
    name, version = tag.split(":")
    loaded = load_model_dir(root / "bentoml" / "models" / name / version, "fp32")
    policy = one_path.Policy.for_model(loaded.spec, {one_path.WARN_ENV: WARN_ALL_BUT_FLAT})
    [local] = one_path.predict(loaded, [payload], policy)
    assert answer["ood_score"] == pytest.approx(local.ood_score, rel=0.05)  # bf16 serving where the CPU has it
    assert answer["label"] == local.label


def test_predict_png(client: httpx.Client, metadata: dict, served: tuple[BentoServer, str]) -> None:
    assert_prediction(post_image(client, encode(Image.fromarray(radiograph()))), metadata, served[1])


def test_served_ensemble_answers_the_mean_of_its_members(
    client: httpx.Client, served: tuple[BentoServer, str]
) -> None:
    """/predict through HTTP = the members' probabilities averaged in-process (TTA as the spec says)."""
    from xray.serving.inference import apply_temperature, predict_proba
    from xray.data.preprocessing import load_for_model
    from xray.serving.serving_model import load_model_dir

    payload = encode(Image.fromarray(radiograph(seed=5)))
    answer = post_image(client, payload).json()["probabilities"]
    name, version = served[1].split(":")
    loaded = load_model_dir(served[0].log.parent / "bentoml" / "models" / name / version, "fp32")
    pixels = load_for_model(payload, loaded.spec.preprocessing)[None]
    spec = loaded.spec
    members = [predict_proba(m, pixels, spec.preprocessing, loaded.device, tta=spec.tta)[0] for m in loaded.model.members]
    expected = apply_temperature(np.mean(members, axis=0)[None], spec.temperature)[0]  # served calibrated
    got = np.array([answer[name] for name in spec.class_names])
    np.testing.assert_allclose(got, expected, atol=0.02)  # bf16 serving where the CPU has it


def _sixteen_bit() -> Image.Image:
    image = Image.fromarray(radiograph().astype(np.uint16) * 257)
    assert image.mode.startswith("I;16")
    return image


def _palette(transparent: bool) -> Image.Image:
    image = Image.fromarray(radiograph()).convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE)
    if transparent:
        image.info["transparency"] = 0
    return image


IMAGES = {
    "grayscale_png": lambda: encode(Image.fromarray(radiograph())),
    "rgb_jpeg": lambda: encode(Image.fromarray(radiograph()).convert("RGB"), "JPEG", quality=90),
    "grayscale_jpeg": lambda: encode(Image.fromarray(radiograph()), "JPEG"),
    "rgba_png": lambda: encode(Image.fromarray(radiograph()).convert("RGBA")),
    "palette_png": lambda: encode(_palette(False)),
    "palette_png_transparent": lambda: encode(_palette(True), transparency=0),
    "16bit_png": lambda: encode(_sixteen_bit()),
    "large_jpeg": lambda: encode(Image.fromarray(radiograph(1600, 2400)).convert("RGB"), "JPEG", quality=85),
}


@pytest.mark.parametrize("kind", sorted(IMAGES))
def test_image_formats_are_accepted(
    kind: str, client: httpx.Client, metadata: dict, served: tuple[BentoServer, str]
) -> None:
    assert_prediction(post_image(client, IMAGES[kind]()), metadata, served[1])


def _truncated_png() -> bytes:
    data = encode(Image.fromarray(radiograph()))
    return data[: len(data) // 2]


def _big_compressible_png() -> bytes:
    """A real 8000×8000 PNG (64 MP, above the test limit of 4 MP) that is only a few hundred KB."""
    return encode(Image.new("L", (8000, 8000), 0), optimize=False)


# name -> (request kwargs, acceptable statuses)
BAD_REQUESTS = {
    "not_an_image": (lambda: {"files": {"image": ("x.png", b"this is not an image")}}, {400}),
    "zero_bytes": (lambda: {"files": {"image": ("x.png", b"")}}, {400}),
    "truncated_png": (lambda: {"files": {"image": ("x.png", _truncated_png())}}, {400}),
    "wrong_field_name": (lambda: {"files": {"file": ("x.png", encode(Image.fromarray(radiograph())))}}, {400}),
    "image_as_text_field": (lambda: _raw([("image", b"http://127.0.0.1:9/x.png", None)]), {400}),
    "missing_field": (lambda: _raw([("class_name", b"covid", None)]), {400}),
    "two_images": (
        lambda: {"files": [("image", ("a.png", encode(Image.fromarray(radiograph())))), ("image", ("b.png", b"x"))]},
        {400},
    ),
    "not_multipart": (lambda: {"json": {"image": "aGVsbG8="}}, {400, 415}),
    "broken_multipart": (lambda: {"content": b"garbage", "headers": {"content-type": "multipart/form-data; boundary=z"}}, {400}),
    "oversize_bytes": (lambda: {"files": {"image": ("x.png", b"\0" * (MAX_UPLOAD_BYTES + 1))}}, {413}),
    "oversize_chunked": (lambda: {"content": _chunks(MAX_UPLOAD_BYTES + 1), "headers": _multipart_type()}, {413}),
    "header_claims_too_many_pixels": (lambda: {"files": {"image": ("x.png", png_header_claiming(8000, 8000))}}, {413}),
    "header_claims_decompression_bomb": (
        lambda: {"files": {"image": ("x.png", png_header_claiming(100_000, 100_000))}},
        {413},
    ),
    "real_png_too_many_pixels": (lambda: {"files": {"image": ("x.png", _big_compressible_png())}}, {413}),
    **{
        f"unsupported_{kind}": (lambda make=make: {"files": {"image": ("x.img", make())}}, {415})
        for kind, make in UNSUPPORTED_IMAGES.items()
    },
}


def _raw(parts: list[tuple[str, bytes, str | None]]) -> dict:
    body, content_type = multipart_body(parts)
    return {"content": body, "headers": {"content-type": content_type}}


def _multipart_type() -> dict[str, str]:
    return {"content-type": "multipart/form-data; boundary=z"}


def _chunks(total: int, size: int = 256 * 1024) -> Iterator[bytes]:
    """A body without Content-Length (chunked transfer), so only the streaming check can stop it."""
    sent = 0
    while sent < total:
        piece = min(size, total - sent)
        sent += piece
        yield b"\0" * piece


# The upload checks are shared by both routes; /explain repeats a few of them.
EXPLAIN_CASES = (
    "not_an_image", "oversize_bytes", "truncated_png", "wrong_field_name", "unsupported_eps", "unsupported_lab_tiff"
)
BAD_CASES = [("/predict", case) for case in sorted(BAD_REQUESTS)] + [("/explain", case) for case in EXPLAIN_CASES]


@pytest.mark.parametrize(("route", "case"), BAD_CASES)
def test_bad_input_is_a_4xx_with_a_json_message(route: str, case: str, client: httpx.Client) -> None:
    make, statuses = BAD_REQUESTS[case]
    response = client.post(route, **make())
    assert response.status_code in statuses, (response.status_code, response.text)
    body = response.json()
    assert isinstance(body, dict) and isinstance(body.get("error"), str) and body["error"], body


def test_no_upload_ever_ran_ghostscript(client: httpx.Client, pushed: tuple[Path, str]) -> None:
    for route in ("/predict", "/explain"):
        assert client.post(route, files={"image": ("x.eps", EPS)}).status_code == 415
    assert not (pushed[0] / "ghostscript-ran").exists()


def test_serve_tokens_guard_the_model_routes(pushed: tuple[Path, str], tmp_path: Path) -> None:
    """With XRAY_SERVE_TOKENS set, /predict, /explain, /metrics and /metadata need one; health stays open."""
    root, tag = pushed
    token = "serve-token-0123456789abcdef"
    tokens = f"other-token-xxxxxxxxxxxxxxxx,{token}"
    env = {"XRAY_MODEL_TAG": tag, "XRAY_SERVE_TOKENS": tokens, "XRAY_MODEL_WORKERS": "1", "XRAY_INPUT_GATE_WARN": WARN_ALL_BUT_FLAT}
    home = tmp_path / "bentoml"  # its own home: BentoML keeps its metrics files there, and the module's server reads them
    home.mkdir()
    (home / "models").symlink_to(root / "bentoml" / "models")
    server = start_bento_server(home, tmp_path / "serve.log", env)
    image = {"image": ("x.png", encode(Image.fromarray(radiograph())))}
    try:
        with httpx.Client(base_url=server.url, timeout=60) as anonymous:
            for route in ("/metrics", "/metadata"):
                refused = anonymous.get(route)
                assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer", route
                assert anonymous.get(route, headers={"Authorization": "Bearer wrong"}).status_code == 401
                assert anonymous.get(route, headers={"Authorization": f"Bearer {token}"}).status_code == 200
            for route in ("/predict", "/explain"):
                assert anonymous.post(route, files=image).status_code == 401, route
            allowed = anonymous.post("/predict", files=image, headers={"Authorization": f"Bearer {token}"})
            assert allowed.status_code == 200 and allowed.json()["model"] == tag
            assert anonymous.get("/readyz").status_code == 200
    finally:
        stop_process_group(server.process)


DICOMS = {
    "16bit_monochrome2": lambda p: dcm.uncompressed(p, 16),
    "12bit_monochrome1_windowed": lambda p: dcm.uncompressed(p, 12, "MONOCHROME1", window=True),
    "12bit_jpeg2000_lossless": lambda p: dcm.jpeg2000_lossless(p, 12),
}


@pytest.mark.parametrize("kind", sorted(DICOMS))
def test_dicom_gets_the_same_prediction_as_the_png_it_was_made_from(kind: str, client: httpx.Client) -> None:
    for seed in range(3):
        pixels = radiograph(seed=seed)
        from_png = post_image(client, encode(Image.fromarray(pixels)))
        from_dicom = client.post("/predict", files={"image": ("film.dcm", DICOMS[kind](pixels), "application/dicom")})
        assert from_png.status_code == 200 and from_dicom.status_code == 200, from_dicom.text
        png, dicom = from_png.json(), from_dicom.json()
        assert dicom["label"] == png["label"] and dicom["positive"] == png["positive"]
        for name, p in png["probabilities"].items():
            assert dicom["probabilities"][name] == pytest.approx(p, abs=1e-5)


def test_dicom_explain_and_compressed_jpeg_dicom(client: httpx.Client, metadata: dict) -> None:
    payload = dcm.jpeg_baseline(radiograph())
    assert_prediction(client.post("/predict", files={"image": ("film.dcm", payload)}), metadata, metadata["model"])
    overlay = client.post("/explain", files={"image": ("film.dcm", payload)})
    assert overlay.status_code == 200 and overlay.headers["content-type"] == "image/png"


@pytest.mark.parametrize("route", ["/predict", "/explain"])
def test_undecodable_dicom_is_415_with_the_reason(route: str, client: httpx.Client) -> None:
    response = client.post(route, files={"image": ("film.dcm", dcm.undecodable(radiograph()))})
    assert response.status_code == 415, response.text
    assert "no decoder installed for DICOM transfer syntax 1.2.840.10008.1.2.4.100" in response.json()["error"]


def test_predict_returns_the_operating_point(client: httpx.Client, metadata: dict) -> None:
    point = metadata["operating_point"]
    assert point["positive"] == list(POSITIVE) and 0 <= point["threshold"] <= 1
    for seed in range(6):
        body = post_image(client, encode(Image.fromarray(radiograph(seed=seed)))).json()
        answer = body["operating_point"]
        assert answer["positive_classes"] == list(POSITIVE) and answer["threshold"] == point["threshold"]
        assert answer["target_sensitivity"] == point["target_sensitivity"] == 0.95
        assert answer["score"] == pytest.approx(sum(body["probabilities"][c] for c in POSITIVE), abs=1e-5)
        assert body["positive"] == (answer["score"] >= answer["threshold"])


def test_metadata_serves_the_model_card(metadata: dict) -> None:
    card = metadata["model_card"]
    assert set(card) >= {"model_details", "model_parameters", "quantitative_analysis", "considerations"}
    assert card["model_details"]["version"]["name"] == metadata["run_id"]
    data = card["model_parameters"]["data"][0]
    assert data["synthetic"] is True and data["fingerprint"] == metadata["data_fingerprint"]
    assert any("SYNTHETIC" in x["description"] for x in card["considerations"]["limitations"])
    assert card["quantitative_analysis"]["operating_point"]["threshold"] == metadata["operating_point"]["threshold"]
    kinds = {m["type"] for m in card["quantitative_analysis"]["performance_metrics"]}
    assert kinds == {"accuracy", "roc_auc", "sensitivity", "specificity"}


def test_explain_returns_a_png_overlay(client: httpx.Client, metadata: dict) -> None:
    payload = encode(Image.fromarray(radiograph()))
    for data in (None, {"class_name": metadata["class_names"][1]}):
        response = post_image(client, payload, route="/explain", data=data)
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "image/png"
        overlay = Image.open(io.BytesIO(response.content))
        assert overlay.format == "PNG" and overlay.mode == "RGB"
        assert overlay.size == (metadata["image_size"], metadata["image_size"])


def test_explain_unknown_class_is_400(client: httpx.Client) -> None:
    response = post_image(client, encode(Image.fromarray(radiograph())), route="/explain", data={"class_name": "nope"})
    assert response.status_code == 400
    assert "nope" in response.json()["error"]


def test_concurrent_requests_are_batched(served: tuple[BentoServer, str], metadata: dict) -> None:
    """BentoML's own batch-size histogram (in /metrics) must show forward passes of more than one image."""
    server, tag = served
    name = "bentoml_service_adaptive_batch_size"
    payloads = [encode(Image.fromarray(radiograph(seed=i))) for i in range(CONCURRENT)]

    async def burst() -> tuple[str, list[httpx.Response], str]:
        limits = httpx.Limits(max_connections=CONCURRENT)
        async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as http:
            before = (await http.get("/metrics")).text
            responses = await asyncio.gather(
                *(http.post("/predict", files={"image": ("x.png", p)}) for p in payloads)
            )
            after = (await http.get("/metrics")).text
        return before, list(responses), after

    before, responses, after = asyncio.run(burst())
    for response in responses:
        assert_prediction(response, metadata, tag)
    count0, sum0, buckets0 = histogram(before, name)
    count1, sum1, buckets1 = histogram(after, name)
    calls, images = count1 - count0, sum1 - sum0
    single = buckets1.get("1.0", 0.0) - buckets0.get("1.0", 0.0)
    assert images == CONCURRENT, (calls, images)
    assert calls < CONCURRENT and calls - single >= 1, f"{CONCURRENT} requests ran as {calls} calls ({single} of one image)"


@pytest.mark.parametrize("name", ["XRAY_MODEL_WORKERS", "XRAY_MODEL_THREADS"])
def test_a_bad_worker_setting_is_refused_with_its_name(tmp_path, name: str) -> None:
    """The service settings are read at import: a bad value must name itself, not fail later in a worker."""
    import subprocess
    import sys

    code = (
        "from xray.serving.service import ServingSettings\n"
        f"ServingSettings.from_env({{{name!r}: '0'}})\n"
    )
    env = {"BENTOML_HOME": str(tmp_path), "BENTOML_DO_NOT_TRACK": "true", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode != 0
    assert f"{name} must be a positive integer, got '0'" in done.stderr
    good = "from xray.serving.service import ServingSettings\nprint(ServingSettings.from_env({'XRAY_MODEL_WORKERS': '2', 'XRAY_MODEL_THREADS': '3'}).threads_per_model_worker())"
    assert subprocess.run([sys.executable, "-c", good], capture_output=True, text=True, env=env, timeout=120).stdout.strip() == "3"
