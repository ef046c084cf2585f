"""In a real browser: a failed action re-enables its buttons, and an upload survives a page reload.

Skipped like ``test_browser.py`` when Debian's chromium is missing. Training uses the fake train
function of ``fakes.py``; no model is loaded.
"""

from __future__ import annotations

import re

import pytest

from tests.fakes import CHROMIUM, CHROMIUM_ARGS, VIEWPORT, FakeTrain, browser_or_skip, free_port, open_tab, tiny_set

WAIT_MS = 60_000


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    sync_playwright = browser_or_skip()
    import app
    from pogdiff.runs.jobs import JobManager
    from pogdiff.ui import Studio

    root = tmp_path_factory.mktemp("browser-safety")
    studio = Studio(root / "runs", shipped_dir=root / "shipped", device="cpu",
                    jobs=JobManager(root / "runs", train_fn=FakeTrain()))
    demo = app.build_demo(studio)
    demo.queue(default_concurrency_limit=2)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                **app.launch_options(studio, 50))
    bad = root / "bad"
    bad.mkdir()
    (bad / "notes.txt").write_text("no images here")
    files = sorted(str(p) for p in tiny_set(root / "set").iterdir())
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
            context = browser.new_context(viewport=VIEWPORT, device_scale_factor=1)
            pg = context.new_page()
            pg.set_default_timeout(WAIT_MS)
            pg.goto(f"http://127.0.0.1:{port}/")
            pg.get_by_text("PoGDiff Studio").first.wait_for()
            pg.bad_files, pg.good_files = [str(bad / "notes.txt")], files
            yield pg
            context.close()
            browser.close()
    finally:
        demo.close()


METRICS_BUTTON = "Compute metrics (A and B draw each class of the loaded data; judged per class)"


def _enabled_after_error(page, button: str, error_text: str | re.Pattern) -> None:
    page.get_by_text(error_text).first.wait_for()
    btn = page.get_by_role("button", name=button)
    page.wait_for_function("b => !b.disabled", arg=btn.element_handle(), timeout=WAIT_MS)
    assert btn.is_enabled()


def _upload(page, files) -> None:
    page.locator("input[type=file]").first.set_input_files(files)
    page.wait_for_timeout(1500)  # the upload finishes before the click reads the component


def test_a_bad_upload_re_enables_the_load_buttons(page):
    open_tab(page, "Data")
    _upload(page, page.bad_files)
    page.get_by_role("button", name="Validate and load upload").click()
    _enabled_after_error(page, "Validate and load upload", "no images found")
    assert page.get_by_role("button", name="Use the built-in demo set").is_enabled()


def test_an_upload_survives_a_page_reload(page):
    page.reload()
    page.get_by_text("PoGDiff Studio").first.wait_for()
    open_tab(page, "Data")
    _upload(page, page.good_files)
    page.get_by_role("button", name="Validate and load upload").click()
    page.get_by_text("8 images · 2 classes").first.wait_for()
    page.wait_for_function("() => !!window.localStorage.getItem('pogdiff-dataset')")  # kept (encrypted) by the browser
    page.reload()
    page.get_by_text("PoGDiff Studio").first.wait_for()
    page.get_by_text("8 images · 2 classes").first.wait_for()
    assert "Loaded:" in page.inner_text("body")


def test_a_refused_training_re_enables_start(page):
    # The studio is pinned to the CPU (device="cpu" above), so sd15 is refused on any machine, GPU or not.
    open_tab(page, "Train")
    page.get_by_text("Idle.").first.wait_for()
    page.get_by_role("radio", name="sd15").check()
    page.get_by_role("button", name="Start training").click()
    _enabled_after_error(page, "Start training", "needs a GPU")
    page.get_by_role("radio", name="tiny").check()


def test_compare_and_metrics_without_checkpoints_re_enable_their_buttons(page):
    # Data of its own (the same set again if an earlier test loaded it), so the refusal is the missing
    # checkpoint whichever tests ran before.
    open_tab(page, "Data")
    _upload(page, page.good_files)
    page.get_by_role("button", name="Validate and load upload").click()
    page.get_by_text("8 images · 2 classes").first.wait_for()
    open_tab(page, "Compare")
    page.get_by_role("button", name="Generate A and B").click()
    _enabled_after_error(page, "Generate A and B", "is not available")
    page.get_by_role("button", name=METRICS_BUTTON).click()
    _enabled_after_error(page, METRICS_BUTTON, "is not available")
