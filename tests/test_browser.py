"""A real browser (Debian's chromium driven by Playwright) walks every tab of the app.

The Data tab first shows the built-in demo set; then a user's own data takes over: a flat
kohya-style zip made in ``tmp_path``, one ``NN.png`` and one ``NN.txt`` of comma-separated tags per
image in the zip's root, the class tag first (``red circle, white background, flat colors``), the
classes differing by colour and shape (a red circle, a blue square, ... drawn on white, grey or
black) with a long tail (16 / 8 / 4 / 3 / 2 images). A broken upload comes first (its error pop-up
lists the report, not a Markdown table of raw pipes), then the good one: the page says its classes
come from the first tag (``auto``, no clustering), with their counts, and its validation table keeps
the 'level' column on one line, in a wide window and a narrow one.
The Neighbours map, a short run of each training method (baseline, resample, cbdm, pogdiff) and
Compare (plain fine-tuning as A against PoGDiff as B: real images beside them, a visible
difference, per-class metrics judged on the folder's own classes with the verdict wording and the
key columns in view, all without a reload; then state kept over a page reload) all run on that set.

Each test asks for the state it needs (a fresh visitor, the own set loaded, the runs trained on it)
through fixtures, so they pass in any order. Screenshots go to ``tmp_path``; with
``POGDIFF_UPDATE_SCREENSHOTS=1`` they replace the ones in ``assets/screenshots/`` that the README
shows. Without ``/usr/bin/chromium`` the test is skipped, unless ``POGDIFF_REQUIRE_BROWSER=1``
(then it fails).
"""

from __future__ import annotations

import io
import math
import os
import re
import zipfile
from pathlib import Path

import numpy as np

import pytest
from tests.fakes import CHROMIUM, CHROMIUM_ARGS, VIEWPORT, browser_or_skip, free_port, open_tab

pytestmark = pytest.mark.slow  # a real browser, a model and four short training runs: about 4 minutes on 2 cores

SCREENSHOTS = Path(__file__).resolve().parent.parent / "assets" / "screenshots"
LOAD_MS = 120_000  # first use builds the demo set and loads the sentence encoder
TRAIN_MS = 300_000
TRAIN_STEPS = 16
PREVIEW_EVERY = 8
# The user's own set: classes that differ by colour and shape, with a long tail (few-shot: fewer than 5).
OWN_CLASSES = {"red circle": 16, "blue square": 8, "green triangle": 4, "yellow star": 3, "purple hexagon": 2}
OWN_COLOURS = {"red circle": (220, 40, 40), "blue square": (40, 80, 230), "green triangle": (40, 180, 60),
               "yellow star": (240, 210, 30), "purple hexagon": (150, 50, 200)}
OWN_BACKGROUNDS = {"white background": (245, 245, 245), "grey background": (128, 128, 128),
                   "black background": (15, 15, 15)}
OWN_ZIP = "shapes.zip"
N_OWN = sum(OWN_CLASSES.values())
# One short run of each method the Train tab offers, in this order; Compare sets plain fine-tuning (A)
# against PoGDiff (B).
RUNS = {"baseline": "walk-baseline", "resample": "walk-resample", "cbdm": "walk-cbdm", "pogdiff": "walk-pogdiff"}
NARROW_WIDTH = 900  # a narrow window: the validation report's column is about 400 px wide
VERDICTS = ("B better", "A better", "no measurable difference", "—")


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    browser_or_skip()
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
def browser(app_url):
    sync_playwright = browser_or_skip()
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def _visit(browser, url: str):
    """A new visitor (a browser context of its own, so a session and browser storage of its own) on the app."""
    context = browser.new_context(viewport=VIEWPORT, device_scale_factor=1)
    page = context.new_page()
    page.set_default_timeout(LOAD_MS)
    page.goto(url)
    page.get_by_text("PoGDiff Studio").first.wait_for()
    return context, page


@pytest.fixture
def fresh_page(browser, app_url):
    context, page = _visit(browser, app_url)
    yield page
    context.close()


@pytest.fixture(scope="module")
def own_page(browser, app_url, tmp_path_factory):
    """A visitor who uploads their own set: a broken zip first (its error is shown and the button
    comes back), then the good one. The tests that use this page find the set loaded, whatever
    ran before them."""
    broken, good = make_own_set(tmp_path_factory.mktemp("own"))
    context, page = _visit(browser, app_url)
    open_tab(page, "Data")
    _upload(page, [broken])
    page.get_by_role("button", name="Validate and load upload").click()
    page.get_by_text("Not a readable zip archive").first.wait_for()
    toast = page.get_by_test_id("toast-text").filter(has_text="Not a readable zip archive").first
    page.broken_upload_error = (toast.inner_text(), toast.locator("li").count())  # what the visitor read
    page.get_by_test_id("toast-close").first.click()  # read, then closed
    load = page.get_by_role("button", name="Validate and load upload")
    page.wait_for_function("b => !b.disabled", arg=load.element_handle())
    clear = page.get_by_role("button", name="Clear")
    if clear.count():
        clear.first.click()  # remove the broken file before adding the good one
    _upload(page, [good])
    load.click()
    page.get_by_text(f"{N_OWN} images · {len(OWN_CLASSES)} classes").first.wait_for()
    yield page
    context.close()


@pytest.fixture(scope="module")
def trained_page(own_page):
    """The own-set visitor after one short run of each method on the set (:data:`RUNS`, previews saved),
    each started from the Train tab's form."""
    page = own_page
    open_tab(page, "Train")
    page.get_by_text("Idle.").first.wait_for()
    start = page.get_by_role("button", name="Start training")
    for method, run in RUNS.items():
        page.get_by_test_id(f"{method}-radio-label").first.click()  # the Method choice
        _set_number(page, "Steps", TRAIN_STEPS)
        _set_number(page, "Batch size", 8)
        _set_number(page, "Preview every (steps)", PREVIEW_EVERY)
        name = page.get_by_label("Run name (optional)")
        name.fill(run)
        page.wait_for_function("b => !b.disabled", arg=start.element_handle())
        start.click()
        page.get_by_text(re.compile(rf"Finished {run} \({method}\) after {TRAIN_STEPS} of {TRAIN_STEPS} steps"))\
            .first.wait_for(timeout=TRAIN_MS)
        # the run holds that name now: the box empties, so a plain second Start is not refused as a taken name
        page.wait_for_function("e => e.value === ''", arg=name.element_handle())
    return page


def _shot(page, name: str, tmp_path: Path) -> Path:
    folder = SCREENSHOTS if os.environ.get("POGDIFF_UPDATE_SCREENSHOTS") == "1" else tmp_path
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.png"
    page.wait_for_timeout(800)  # let plots finish their transitions
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 10_000
    return path


def _set_number(page, label: str, value: float, *, slider: bool = False) -> None:
    box = page.get_by_label(f"number input for {label}" if slider else label, exact=True).first
    box.fill(str(value))
    box.press("Tab")


def _shape_points(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """The corners of a square, triangle, five-pointed star or hexagon of radius ``r`` around ``(cx, cy)``."""
    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    corners, inner = {"triangle": (3, 1.0), "star": (10, 0.45), "hexagon": (6, 1.0)}[shape]
    return [(cx + r * (inner if k % 2 else 1.0) * math.cos(-math.pi / 2 + 2 * math.pi * k / corners),
             cy + r * (inner if k % 2 else 1.0) * math.sin(-math.pi / 2 + 2 * math.pi * k / corners))
            for k in range(corners)]


def make_own_set(root: Path) -> tuple[Path, Path]:
    """A broken upload and a good one: ``(broken.zip, shapes.zip)``.

    ``shapes.zip`` is a flat kohya-style set: in its root one ``NN.png`` per image (a flat-coloured
    shape on a white, grey or black background, 64 px, a little moved and resized each time) and one
    ``NN.txt`` of comma-separated tags, the class tag first: ``red circle, grey background, flat colors``.
    """
    from PIL import Image, ImageDraw

    root.mkdir(parents=True, exist_ok=True)
    broken = root / "broken.zip"
    broken.write_bytes(b"this is not a zip archive")
    good = root / OWN_ZIP
    rng = np.random.default_rng(0)
    backgrounds = list(OWN_BACKGROUNDS.items())
    n = 0
    with zipfile.ZipFile(good, "w") as zf:
        for name, count in OWN_CLASSES.items():
            shape = name.split()[-1]
            for i in range(count):
                where, background = backgrounds[i % len(backgrounds)]
                img = Image.new("RGB", (64, 64), background)
                draw = ImageDraw.Draw(img)
                r = int(rng.integers(12, 19))
                cx, cy = (int(v) for v in rng.integers(24, 41, 2))
                if shape == "circle":
                    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=OWN_COLOURS[name])
                else:
                    draw.polygon(_shape_points(shape, cx, cy, r), fill=OWN_COLOURS[name])
                png = io.BytesIO()
                img.save(png, "PNG")
                n += 1
                zf.writestr(f"{n:02d}.png", png.getvalue())
                zf.writestr(f"{n:02d}.txt", f"{name}, {where}, flat colors")
    return broken, good


def _upload(page, files) -> None:
    page.locator("input[type=file]").first.set_input_files([str(f) for f in files])
    page.wait_for_timeout(1500)  # the upload finishes before the click reads the component


def _grid(locator) -> tuple[list[str], list[list[str]]]:
    """A gradio Dataframe's column headers and the text of its rendered rows."""
    return locator.evaluate("""g => {
        const heads = [...g.querySelectorAll("[role=columnheader]")].map(h => h.getAttribute("title") || h.innerText.trim());
        const rows = {};
        for (const c of g.querySelectorAll("[role=gridcell]")) {
            (rows[c.dataset.row] ||= [])[Number(c.dataset.col)] = c.innerText.trim();
        }
        return [heads, Object.keys(rows).sort((a, b) => a - b).map(k => rows[k])];
    }""")


# How many lines of text each cell of a table column takes, and its width: a cell wrapped letter by
# letter takes as many lines as it has letters.
_COLUMN_LINES = """(table, name) => {
    const heads = [...table.querySelectorAll("thead th")].map(th => th.innerText.trim());
    const col = heads.indexOf(name);
    if (col < 0) return null;
    return [...table.querySelectorAll("tr")].map(tr => {
        const cell = tr.children[col];
        const range = document.createRange();
        range.selectNodeContents(cell);
        const tops = new Set([...range.getClientRects()].filter(r => r.width > 0).map(r => Math.round(r.top)));
        return {text: cell.innerText.trim(), lines: tops.size, width: cell.getBoundingClientRect().width,
                em: parseFloat(getComputedStyle(cell).fontSize)};
    });
}"""


# How many lines the text of a table's header ``name`` takes (its text only, not its sort buttons).
_HEADER_TEXT_LINES = """(table, name) => {
    const th = [...table.querySelectorAll("thead th")].find(t => t.innerText.trim() === name);
    if (!th) return null;
    const walker = document.createTreeWalker(th, NodeFilter.SHOW_TEXT);
    const tops = new Set();
    while (walker.nextNode()) {
        const range = document.createRange();
        range.selectNodeContents(walker.currentNode);
        for (const r of range.getClientRects()) if (r.width > 0) tops.add(Math.round(r.top));
    }
    return tops.size;
}"""


def test_data_tab(fresh_page, tmp_path):
    page = fresh_page
    open_tab(page, "Data")
    page.get_by_role("button", name="Use the built-in demo set").click()
    page.get_by_text("imbalance ratio").first.wait_for()
    page.get_by_text("Validation passed").first.wait_for()
    body = page.inner_text("body")
    assert "few" in body and "many" in body and "Images per class" in body
    _shot(page, "data", tmp_path)


def test_own_set_broken_upload_then_its_tag_classes(own_page, tmp_path):
    """After the broken zip, the flat kohya zip: its first tags are the classes (``auto`` says why), with
    their counts, and the validation table keeps its 'level' column on one line."""
    page = own_page
    # the broken zip's error: the report as a list, not a Markdown table of raw pipes
    text, items = page.broken_upload_error
    assert items == 1 and "corrupt_archive" in text and "Problems found: 0 of 0 images loaded" in text, text
    assert "|---" not in text and "**" not in text, text
    open_tab(page, "Data")
    page.get_by_text(f"{N_OWN} images · {len(OWN_CLASSES)} classes").first.wait_for()
    heads, rows = _grid(page.locator("[role=grid][aria-label='Images per class']"))
    assert heads[:2] == ["subject", "count"]
    assert {r[0]: int(r[1]) for r in rows} == OWN_CLASSES
    headline = page.locator(".prose").filter(has_text="Loaded:").first.inner_text()
    assert f"Loaded: {OWN_ZIP}" in headline
    assert re.search(rf"Classes from: first tag \(auto: the captions are tags \({N_OWN} of {N_OWN} comma-separated",
                     headline), headline
    assert "cluster" not in headline
    # the Class source choice is there, on auto
    choice = page.locator("#pg-class-source")
    assert "Class source" in choice.inner_text()
    values = choice.locator("input[type=radio]").evaluate_all("xs => xs.map(x => x.value)")
    assert values == ["auto", "column", "folder", "first_tag", "template", "cluster"]
    assert choice.locator("input[value=auto]").is_checked()
    # the validation report: the 64 px images were shrunk (a note), in a table whose level column does
    # not wrap letter by letter
    report = page.locator("#pg-report")
    assert "images_resized" in report.inner_text()
    table = report.locator("table").first
    for width in (VIEWPORT["width"], NARROW_WIDTH):  # also where the report's column is narrow
        page.set_viewport_size({"width": width, "height": VIEWPORT["height"]})
        page.wait_for_timeout(300)
        cells = table.evaluate(_COLUMN_LINES, "level")
        assert cells is not None and [c["text"] for c in cells] == ["level", "info"], cells
        for cell in cells:
            assert cell["lines"] == 1 and cell["width"] >= 3 * cell["em"], (width, cells)
    page.set_viewport_size(VIEWPORT)
    _shot(page, "data-own", tmp_path)


def test_neighbours_tab(own_page, tmp_path):
    page = own_page
    open_tab(page, "Neighbours")
    page.get_by_text("mean psi over its").first.wait_for(timeout=LOAD_MS)
    body = page.inner_text("body")
    assert "w_density" in body and "s_img" in body and "s_txt" in body
    assert "purple hexagon" in page.locator("#pg-map-points").inner_text()
    # the points table's headers stay on one line ("class size" used to wrap a few letters a line)
    points = page.locator("#pg-map-points table").first
    assert [points.evaluate(_HEADER_TEXT_LINES, name) for name in ("subject", "class size", "caption")] == [1, 1, 1]
    # the neighbour list shows each neighbour's image
    page.locator("#pg-nb-table [role=gridcell] img[src^='data:image/png']").first.wait_for()
    # a click on a row of the map's points table picks that caption
    cell = (page.locator("#pg-map-points [role=row]").filter(has_text="blue square").first
            .locator("[role=gridcell]").filter(has_text="blue square").first)
    caption = cell.inner_text().strip()
    cell.click()
    page.get_by_text(re.compile(rf"subject \*?blue square\*? with {OWN_CLASSES['blue square']} training images"))\
        .first.wait_for()
    assert caption.startswith("blue square")
    page.get_by_label("class frequency").check()  # rare classes in their own strong colour
    _shot(page, "neighbours", tmp_path)


def test_train_tab(trained_page, tmp_path):
    """Each method's run finished; the last (PoGDiff) is on screen with its curve and previews."""
    page = trained_page
    open_tab(page, "Train")
    assert OWN_ZIP in page.inner_text("body")  # the banner names the user's set
    page.get_by_text(f"Finished {RUNS['pogdiff']} (pogdiff) after {TRAIN_STEPS} of {TRAIN_STEPS} steps").first\
        .wait_for()
    body = page.inner_text("body")
    assert f"step {TRAIN_STEPS} / {TRAIN_STEPS}" in body
    assert "Loss terms" in body and "Runs (finished, stopped, interrupted)" in body
    assert re.search(r"PoGDiff, last \d+ steps: mean psi [0-9.]+ · neighbour pass on \d+% of rows", body)
    assert "the run name is left empty" in body and page.get_by_label("Run name (optional)").input_value() == ""
    _, runs = _grid(page.locator("[role=grid][aria-label='Runs']"))
    listed = [" ".join(r) for r in runs]
    for method, run in RUNS.items():
        assert any(run in row and method in row for row in listed), (run, listed)
    # the finished run recorded its step time: the estimate for the next start uses it
    page.get_by_text(re.compile(rf"About .+ for {TRAIN_STEPS} steps: [0-9.]+ s/step")).first.wait_for()
    page.get_by_text("Preview history (saved in the run folder)").first.click()
    page.get_by_text(re.compile(r"Step \d+ of the saved previews at steps")).first.wait_for()
    _shot(page, "train", tmp_path)


def _mean_difference(page) -> float:
    text = page.get_by_text("Mean |A − B| =").first.inner_text()
    return float(re.search(r"Mean \|A − B\| = ([0-9.]+)", text).group(1))


def _pick(page, label: str, run: str) -> None:
    page.get_by_label(label).click()
    page.get_by_role("option", name=re.compile(rf"^run · {run} ")).first.click()


def _interval(text: str) -> tuple[float, float]:
    low, high = re.fullmatch(r"\[(-?[0-9.]+), (-?[0-9.]+)\]", text).groups()
    return float(low), float(high)


def _in_view(page, table, header: str) -> None:
    """``header``'s column header shows inside the viewport and the table's own scroll box."""
    cell = table.locator("[role=columnheader]", has_text=header).first
    box, frame = cell.bounding_box(), table.bounding_box()
    assert box is not None and box["width"] > 0, header
    right = min(VIEWPORT["width"], frame["x"] + frame["width"])
    assert box["x"] >= max(0, frame["x"]) - 1 and box["x"] + box["width"] <= right + 1, (header, box, frame)
    assert 0 <= box["y"] and box["y"] + box["height"] <= VIEWPORT["height"], (header, box)


def test_compare_tab(trained_page, tmp_path):
    """Plain fine-tuning (A) against PoGDiff (B), both trained on the set: images, then per-class metrics
    judged on the set's own classes, without a reload; then a reload keeps all of it."""
    page = trained_page
    open_tab(page, "Compare")
    page.get_by_text("Same prompts and the same seeds", exact=False).first.wait_for()
    _pick(page, "A (left)", RUNS["baseline"])
    _pick(page, "B (right)", RUNS["pogdiff"])
    # the demo pair's shipped metrics leave with the demo pair
    page.get_by_text("No metrics for these two checkpoints yet").first.wait_for()
    _set_number(page, "Seeds per prompt", 2, slider=True)
    _set_number(page, "Sampling steps", 10, slider=True)
    typed = "red circle, white background, flat colors"
    page.get_by_label("Or type prompts").fill(typed)
    page.get_by_role("button", name="Generate A and B").click()
    page.get_by_text("the slider shows").first.wait_for(timeout=TRAIN_MS)
    page.get_by_text("Mean |A − B| =").first.wait_for(timeout=LOAD_MS)
    assert _mean_difference(page) > 0  # plain fine-tuning and PoGDiff: they differ
    real = page.locator("#pg-real-images")
    real.locator("img").first.wait_for()
    panel = page.locator("#pg-real-md").inner_text()
    for name in ("purple hexagon", "yellow star", "green triangle", "red circle"):
        assert name in panel and f"{OWN_CLASSES[name]} training image" in panel, panel
    _shot(page, "compare", tmp_path)
    # per-class metrics judged on the user's own classes, the judge's reliability beside them
    page.get_by_role("button", name=re.compile(r"^Compute metrics")).first.click()
    page.get_by_text(f"Judged on {OWN_ZIP}'s own {len(OWN_CLASSES)} classes").first.wait_for(timeout=TRAIN_MS)
    table = page.locator("#pg-metrics-table [role=grid]").filter(has_text="purple hexagon").first
    table.wait_for()
    heads, rows = _grid(table)
    key = ["subject", "train_count", "accuracy · B−A", "95% interval", "verdict", "judge reliability", "judge"]
    assert heads[:len(key)] == key, heads
    assert f"accuracy · {RUNS['baseline']}" in heads and f"accuracy · {RUNS['pogdiff']}" in heads
    by_class = {r[0]: dict(zip(heads, r)) for r in rows}
    assert set(by_class) == set(OWN_CLASSES)
    for name, row in by_class.items():
        assert int(row["train_count"]) == OWN_CLASSES[name]
        # a win only when the interval excludes 0, else "no measurable difference"
        verdict = row["verdict"]
        assert verdict in VERDICTS, row
        if verdict != "—":
            low, high = _interval(row["95% interval"])
            assert low <= float(row["accuracy · B−A"]) <= high, row
            # (the interval is shown to 2 digits: a win's lower end may read 0.00)
            expected = {"B better": low >= 0, "A better": high <= 0, "no measurable difference": low <= 0 <= high}
            assert expected[verdict], row
            if low > 0 or high < 0:
                assert verdict == ("B better" if low > 0 else "A better"), row
    assert [r[0] for r in rows] == sorted(OWN_CLASSES, key=OWN_CLASSES.get)  # rarest first
    body = page.inner_text("body")
    assert "Hugo Haddad" not in body  # a demo identity: not among the scored classes
    assert "not trained on this data set" not in body  # both runs were trained on it
    assert "| judge ok |" not in body and "judge ok" in body  # the summary table is rendered as a table
    assert "counts as a win only when its 95% interval" in body and "otherwise: no measurable difference" in body
    # the key columns are in view, without scrolling the table sideways (beside the figure, the
    # verdict and the judge's reliability ran past the table's right edge)
    table.scroll_into_view_if_needed()
    for header in ("subject", "accuracy · B−A", "95% interval", "verdict", "judge reliability", "judge"):
        _in_view(page, table, header)
    _shot(page, "metrics-own-data", tmp_path)
    # kept over a page reload: the choices, the generated images and the metrics come back
    before = _mean_difference(page)
    page.reload()
    page.get_by_text("PoGDiff Studio").first.wait_for()
    open_tab(page, "Compare")
    page.get_by_text("Mean |A − B| =").first.wait_for()
    assert _mean_difference(page) == before
    assert page.get_by_label("Or type prompts").input_value() == typed
    page.get_by_text(f"Judged on {OWN_ZIP}'s own").first.wait_for()


def test_a_kohya_tree_zip_shows_its_repeats_and_their_verdict(fresh_page, tmp_path):
    """A kohya tree (``img/<repeats>_<class>/`` with ``.txt`` tags): the class table names the classes
    without the prefix, with their images and repeats; the Balancing panel sets the shares of draws under
    the repeats beside plain and tempered batches, with its note; the Train form offers *your repeats*."""
    from tests.test_balance_ui import kohya_zip_of
    from tests.test_trainer_configs import SHAPES

    page = fresh_page
    open_tab(page, "Data")
    _upload(page, [kohya_zip_of(tmp_path)])
    page.get_by_role("button", name="Validate and load upload").click()
    page.get_by_text(f"{sum(n for n, _ in SHAPES.values())} images · {len(SHAPES)} classes").first.wait_for()
    heads, rows = _grid(page.locator("[role=grid][aria-label='Images per class']"))
    col = {h: i for i, h in enumerate(heads)}
    assert {r[col["subject"]]: (int(r[col["count"]]), r[col["repeats"]]) for r in rows} == \
        {c: (n, str(r)) for c, (n, r) in SHAPES.items()}
    page.get_by_text("Balancing: your repeats, plain and tempered batches, loss weights").first.click()
    note = page.locator("#pg-balance-note")
    note.get_by_text("Your balancing").first.wait_for()
    assert "gold moon" in note.inner_text() and "class-uniform resampling" in note.inner_text()
    heads, rows = _grid(page.locator("[role=grid][aria-label='Share of draws per class']"))
    col = {h: i for i, h in enumerate(heads)}
    shares = {r[col["class"]]: float(r[col["your repeats %"]]) for r in rows}
    assert shares["gold moon"] == pytest.approx(round(100 * 26 / 57, 1))
    page.get_by_role("button", name="Use these loss weights for training").click()
    page.get_by_text("Every class weighs 1").first.wait_for()
    _shot(page, "data-kohya", tmp_path)
    open_tab(page, "Train")
    assert page.get_by_text("your repeats (kohya / OneTrainer)").count() >= 1
