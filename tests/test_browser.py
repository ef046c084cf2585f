"""A real browser (Debian's chromium driven by Playwright) renders every tab of the app.

Screenshots go to ``tmp_path``; with ``POGDIFF_UPDATE_SCREENSHOTS=1`` they replace the ones in
``assets/screenshots/`` that the README shows. Without ``/usr/bin/chromium`` the test is skipped,
unless ``POGDIFF_REQUIRE_BROWSER=1`` (then it fails).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from tests.fakes import free_port

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]
SCREENSHOTS = Path(__file__).resolve().parent.parent / "assets" / "screenshots"
VIEWPORT = {"width": 1440, "height": 1000}
LOAD_MS = 120_000  # first use builds the demo set and loads the sentence encoder
TRAIN_MS = 300_000
TRAIN_STEPS = 24
PREVIEW_EVERY = 8


def _browser_or_skip():
    if not CHROMIUM.exists():
        message = f"{CHROMIUM} is missing: install Debian's chromium (apt-get install -y chromium)"
        if os.environ.get("POGDIFF_REQUIRE_BROWSER") == "1":
            pytest.fail(message + " (POGDIFF_REQUIRE_BROWSER=1)")
        pytest.skip(message)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:  # pragma: no cover
        if os.environ.get("POGDIFF_REQUIRE_BROWSER") == "1":
            pytest.fail(f"playwright is not installed: {exc}")
        pytest.skip(f"playwright is not installed: {exc}")
    return sync_playwright


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    _browser_or_skip()
    import app
    from pogdiff.ui import Studio

    studio = Studio(tmp_path_factory.mktemp("browser") / "runs", device="cpu")
    demo = app.build_demo(studio)
    demo.queue(default_concurrency_limit=2)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                **app.launch_options(studio, 50))
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


@pytest.fixture(scope="module")
def page(app_url):
    sync_playwright = _browser_or_skip()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        context = browser.new_context(viewport=VIEWPORT, device_scale_factor=1)
        page = context.new_page()
        page.set_default_timeout(LOAD_MS)
        page.goto(app_url)
        page.get_by_text("PoGDiff Studio").first.wait_for()
        yield page
        context.close()
        browser.close()


def _shot(page, name: str, tmp_path: Path) -> Path:
    folder = SCREENSHOTS if os.environ.get("POGDIFF_UPDATE_SCREENSHOTS") == "1" else tmp_path
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.png"
    page.wait_for_timeout(800)  # let plots finish their transitions
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 10_000
    return path


def _open_tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()


def _set_number(page, label: str, value: float, *, slider: bool = False) -> None:
    box = page.get_by_label(f"number input for {label}" if slider else label, exact=True).first
    box.fill(str(value))
    box.press("Tab")


def test_data_tab(page, tmp_path):
    _open_tab(page, "Data")
    page.get_by_role("button", name="Use the built-in demo set").click()
    page.get_by_text("imbalance ratio").first.wait_for()
    page.get_by_text("Validation passed").first.wait_for()
    body = page.inner_text("body")
    assert "few" in body and "many" in body and "Images per class" in body
    _shot(page, "data", tmp_path)


def test_neighbours_tab(page, tmp_path):
    _open_tab(page, "Neighbours")
    page.get_by_text("mean psi over its").first.wait_for(timeout=LOAD_MS)
    body = page.inner_text("body")
    assert "w_density" in body and "s_img" in body and "s_txt" in body
    _shot(page, "neighbours", tmp_path)


def test_train_tab(page, tmp_path):
    _open_tab(page, "Train")
    page.get_by_text("Idle.").first.wait_for()
    _set_number(page, "Steps", TRAIN_STEPS)
    _set_number(page, "Batch size", 16)
    _set_number(page, "Preview every (steps)", PREVIEW_EVERY)
    page.get_by_role("button", name="Start training").click()
    page.get_by_text(f"after {TRAIN_STEPS} of {TRAIN_STEPS} steps").first.wait_for(timeout=TRAIN_MS)
    body = page.inner_text("body")
    assert f"step {TRAIN_STEPS} / {TRAIN_STEPS}" in body
    assert "Loss terms" in body and "Runs (finished, stopped, interrupted)" in body
    _shot(page, "train", tmp_path)


def test_compare_tab(page, tmp_path):
    _open_tab(page, "Compare")
    page.get_by_text("Same prompts and the same seeds", exact=False).first.wait_for()
    _set_number(page, "Seeds per prompt", 2, slider=True)
    _set_number(page, "Sampling steps", 10, slider=True)
    page.get_by_role("button", name="Generate A and B").click()
    page.get_by_text("the slider shows").first.wait_for(timeout=TRAIN_MS)
    body = page.inner_text("body")
    assert "Per-class metrics" in body
    _shot(page, "compare", tmp_path)
