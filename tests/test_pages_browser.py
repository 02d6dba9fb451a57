"""The pages in a real headless Chromium: log in, read a run as an auditor would, classify an upload.

Uses the system's Chromium (Debian: ``apt-get install chromium``) driven by
Playwright's Python package with ``executable_path``: no browser download.
Screenshots land in the test's tmp dir.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.app_helpers import (
    READ_TOKEN,
    ADMIN_TOKEN,
    TINY_OVERRIDES,
    TRAIN_TOKEN,
    AppServer,
    new_server,
    start_training,
    wait_for_run,
)

pytestmark = pytest.mark.timeout(300)

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def chromium_path() -> str | None:
    explicit = os.environ.get("XRAY_CHROMIUM")
    if explicit:
        return explicit if Path(explicit).exists() else None
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.fixture(scope="module")
def browser():
    executable = chromium_path()
    if executable is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium, or set XRAY_CHROMIUM)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS, headless=True)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory):
    """A server with one tiny trained (and pushed) run."""
    server = new_server(tmp_path_factory.mktemp("pages")).start()
    try:
        with server.client(ADMIN_TOKEN) as client:
            run_id = start_training(client, TINY_OVERRIDES)
            detail = wait_for_run(client, run_id)
        assert detail["status"] == "succeeded", f"{detail['reason']}\n{server.log_tail()}"
        yield server, detail
    finally:
        server.stop()


@pytest.fixture
def page(browser, site):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    yield context.new_page()
    context.close()


def login(page, server: AppServer, token: str, next_path: str) -> None:
    page.goto(f"{server.url}{next_path}")
    assert "/login" in page.url, "an anonymous browser is sent to the login form"
    page.fill("#token", token)
    page.click("#login-submit")
    page.wait_for_url(f"{server.url}{next_path}")


def broken_images(page) -> list[str]:
    return page.eval_on_selector_all(
        "img", "imgs => imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src)"
    )


def test_run_page(page, site, tmp_path: Path) -> None:
    server, detail = site
    run_id = detail["run_id"]
    page.goto(f"{server.url}/login")
    page.fill("#token", "wrong-token-wrong-token")
    page.click("#login-submit")
    assert "invalid token" in page.inner_text("main")

    login(page, server, READ_TOKEN, "/ui/runs")
    page.click(f"a[href='/ui/runs/{run_id}']")
    page.wait_for_url(f"**/ui/runs/{run_id}")
    assert page.inner_text("#status") == "succeeded"
    assert "simple_cnn" in page.inner_text("#comparison")
    assert page.locator("#confusion-matrix tbody tr").count() == 3
    push = page.inner_text("#push")
    assert ("pushed" in push) and detail["push"]["reasons"][0] in push
    assert page.locator("#plots img").count() >= 3 and page.locator("#gradcam img").count() >= 1
    page.wait_for_load_state("networkidle")
    assert broken_images(page) == []
    lineage = page.inner_text("#lineage")
    for stage in ("data_ingestion", "data_transformation", "model_trainer", "model_evaluation"):
        assert detail["stages"][stage]["artifact_id"] in lineage
    assert "trainer:" in page.inner_text("pre.config") and "candidates:" in page.inner_text("pre.config")

    page.click("#verify")
    page.wait_for_selector("#verify-result")
    assert "match their sha256" in page.inner_text("#verify-result")
    page.screenshot(path=str(tmp_path / "run.png"), full_page=True)


def test_predict_page(page, site, tmp_path: Path) -> None:
    server, detail = site
    run_dir = server.artifacts / detail["run_id"]
    film = next((run_dir / "data_ingestion" / "snapshot").rglob("*.png"))
    login(page, server, READ_TOKEN, "/ui/predict")

    page.set_input_files("#image", str(film))
    page.click("#classify")
    page.wait_for_selector("#result", timeout=60_000)
    label = page.inner_text("#label")
    classes = ["covid", "normal", "pneumonia"]
    assert label in classes
    rows = page.locator("#probabilities tbody tr")
    assert rows.count() == 3 and sorted(rows.nth(i).locator("td").first.inner_text() for i in range(3)) == classes
    assert page.eval_on_selector("#gradcam", "i => i.complete && i.naturalWidth") > 0
    page.screenshot(path=str(tmp_path / "predict.png"), full_page=True)

    notes = tmp_path / "notes.txt"
    notes.write_text("not an x-ray")
    page.set_input_files("#image", str(notes))
    page.click("#classify")
    page.wait_for_selector("#predict-error")
    assert "cannot be used" in page.inner_text("#predict-error")
    assert page.locator("#result").count() == 0
    page.screenshot(path=str(tmp_path / "predict-error.png"), full_page=True)


def test_read_token_cannot_cancel_and_logout_works(page, site) -> None:
    server, detail = site
    login(page, server, READ_TOKEN, f"/ui/runs/{detail['run_id']}")
    assert page.locator("text=Cancel run").count() == 0
    page.click("#logout")
    page.wait_for_url("**/login")
    page.goto(f"{server.url}/ui/runs")
    assert "/login" in page.url


def test_docs_render_offline(page, site) -> None:
    """Swagger UI renders with every request kept on the service: nothing is fetched from a CDN."""
    server, _ = site
    elsewhere: list[str] = []

    def only_local(route) -> None:
        if route.request.url.startswith(server.url):
            route.continue_()
        else:
            elsewhere.append(route.request.url)
            route.abort()

    page.route("**/*", only_local)
    page.goto(f"{server.url}/docs")
    page.wait_for_selector(".swagger-ui .info .title", timeout=60_000)
    assert "xray training service" in page.inner_text(".swagger-ui .info .title")
    assert page.locator(".opblock-summary-path[data-path='/train']").count() == 1
    assert elsewhere == []
