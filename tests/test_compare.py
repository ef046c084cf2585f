"""Compare and Neighbours views: the pure pieces (pogdiff.ui.compare_views, pogdiff.ui.neighbours_views,
the two-run figure) and the tabs' callbacks behind them, with a fake sampler instead of a model."""

from __future__ import annotations

import json
from pathlib import Path

import gradio as gr
import numpy as np
import pandas as pd
import pytest

from pogdiff.ui import compare_views as cv
from pogdiff.ui import neighbours_views as nv
from tests.fakes import relative_luminance
from pogdiff.ui import state as ui_state
from pogdiff.ui import views

A_TABLE = pd.DataFrame({"subject": ["a", "b", "c"], "train_count": [40, 2, 9], "shot": ["many", "few", "medium"],
                        "accuracy": [0.9, 0.1, 0.5], "gRecall": [0.6, 0.0, 0.3], "n_gen": [4, 4, 4]})
B_TABLE = pd.DataFrame({"subject": ["c", "a", "b"], "train_count": [9, 40, 2], "shot": ["medium", "many", "few"],
                        "accuracy": [0.55, 0.8, 0.4], "gRecall": [0.3, 0.7, 0.25], "n_gen": [4, 4, 4]})


# ============================================================================== pure: Compare
@pytest.mark.parametrize("prompt,subject", [
    ("a photo of Mira Okafor", "Mira Okafor"),
    ("a photo of Mira Okafor, smiling, about 40 years old", "Mira Okafor"),
    ("Red Fox in the snow", "red fox"),
    ("a photo of fox", None),  # 'fox' alone is not a subject; 'red fox' is not in the text
    ("a foxglove", None),
])
def test_subject_for_prompt(prompt, subject):
    assert cv.subject_for_prompt(prompt, ["Mira Okafor", "red fox", "Mira"], "a photo of {subject}") == subject


def test_real_examples_picks_that_subject_and_counts_all():
    images = np.stack([np.full((4, 4, 3), i, np.uint8) for i in range(12)])
    subjects = ["x"] * 10 + ["y", "x"]
    picked, count = cv.real_examples(images, subjects, "x", limit=3)
    assert count == 11 and picked[:, 0, 0, 0].tolist() == [0, 1, 2]
    picked, count = cv.real_examples(images, subjects, "y")
    assert count == 1 and picked[:, 0, 0, 0].tolist() == [10]
    picked, count = cv.real_examples(images, subjects, None)
    assert count == 0 and picked.shape == (0, 4, 4, 3)


def test_difference_view_numbers_and_heatmap_for_known_images():
    a = np.zeros((2, 4, 4, 3), np.uint8)
    b = a.copy()
    b[0, :2, :, :] = 255  # top half white: mean |A-B| = 127.5
    b[1, 0, 0, 0] = 96  # one channel of one pixel: 96 / 48 = 2.0
    view = cv.difference_view(a, b, gain=4.0)
    assert view.mean_abs.tolist() == pytest.approx([127.5, 2.0])
    assert view.overall == pytest.approx(64.75)
    assert "**64.75** of 255" in view.summary() and "(**25.39%**)" in view.summary()
    black, bright = cv.heat_colours(np.array([0.0, 1.0]))
    assert (view.heatmaps[0, 0, 0] == bright).all() and (view.heatmaps[0, 3, 3] == black).all()
    # pixel (0,0) of image 1: |diff| mean over RGB = 32, x4 / 255 = 0.502 of the colour map
    assert (view.heatmaps[1, 0, 0] == cv.heat_colours(np.array(32 * 4 / 255))).all()
    assert cv.difference_view(a[0], a[0]).overall == 0.0
    with pytest.raises(ValueError, match="same shape"):
        cv.difference_view(a, a[:1])


def test_delta_table_is_b_minus_a_rarest_first_with_few_marked():
    table = cv.delta_table(A_TABLE, B_TABLE, "base", "pog")
    assert table["subject"].tolist() == ["b", "c", "a"]  # sorted by training count
    assert table["few"].tolist() == [cv.FEW_MARK, "", ""]
    for m in ("accuracy", "gRecall"):
        a = A_TABLE.set_index("subject").loc[table["subject"], m].to_numpy()
        b = B_TABLE.set_index("subject").loc[table["subject"], m].to_numpy()
        assert table[f"{m} · base"].tolist() == a.tolist() and table[f"{m} · pog"].tolist() == b.tolist()
        assert table[f"{m} · B−A"].to_numpy() == pytest.approx(b - a)
    assert "dino · B−A" not in table.columns  # only metrics both tables have
    with pytest.raises(ValueError, match="share none of the metrics"):
        cv.delta_table(A_TABLE[["subject", "train_count", "shot"]], B_TABLE)
    with pytest.raises(ValueError, match="lacks column"):
        cv.delta_table(A_TABLE.drop(columns="shot"), B_TABLE)


def test_parse_typed_prompts_validates():
    assert cv.parse_typed_prompts("  red  fox \n\n a  cat\n", 4, 20) == ["red fox", "a cat"]
    assert cv.parse_typed_prompts(None, 4, 20) == []
    with pytest.raises(ValueError, match="Typed prompt 2 is 21 characters long; the limit is 20"):
        cv.parse_typed_prompts("ok\n" + "x" * 21, 4, 20)
    with pytest.raises(ValueError, match="3 typed prompts; at most 2"):
        cv.parse_typed_prompts("a\nb\nc", 2, 20)
    with pytest.raises(ValueError, match="control characters"):
        cv.parse_typed_prompts("a\x07b", 2, 20)
    with pytest.raises(ValueError, match="must be text"):
        cv.parse_typed_prompts(["a"], 2, 20)


def test_compare_state_round_trips_through_json_and_rejects_junk():
    state = cv.CompareState("run:a", "shipped:demo-pogdiff", ["a photo of x"], "red fox", 2, 3.5, 10,
                            cv.ResultCache.new_token())
    raw = json.loads(json.dumps(state.to_browser()))
    assert cv.CompareState.from_browser(raw, max_prompts=4, max_chars=50) == state
    for junk in (None, "x", {"version": 99}, {**raw, "n_seeds": 2.5}, {**raw, "prompts": "abc"},
                 {**raw, "prompts": ["y" * 51]}, {**raw, "guidance": float("nan")}):
        assert cv.CompareState.from_browser(junk, max_prompts=4, max_chars=50) is None
    assert cv.CompareState.from_browser({**raw, "token": "../etc"}, max_prompts=4, max_chars=50).token is None


def test_result_cache_is_bounded_and_merges():
    cache = cv.ResultCache(max_items=2)
    t1, t2, t3 = (cv.ResultCache.new_token() for _ in range(3))
    assert t1 != t2 and len(t1) == 32
    cache.put(t1, images=1)
    cache.put(t1, metrics=2)
    assert cache.get(t1) == {"images": 1, "metrics": 2}
    cache.put(t2, images=3)
    cache.get(t1)  # t1 is now the most recent
    cache.put(t3, images=4)
    assert cache.get(t2) == {} and cache.get(t1) and cache.get(t3) and cache.get(None) == {}


# ============================================================================ pure: Neighbours
def test_pca_2d_matches_covariance_eigenvectors_and_is_deterministic():
    rng = np.random.default_rng(10)
    x = rng.standard_normal((50, 5)) * np.array([5.0, 3.0, 1.0, 0.5, 0.1])
    p = nv.pca_2d(x)
    assert p.shape == (50, 2) and p.dtype == np.float32
    xc = x - x.mean(0)
    evals, evecs = np.linalg.eigh(np.cov(xc.T))
    top = evecs[:, ::-1][:, :2]
    top *= np.sign(top[np.abs(top).argmax(axis=0), [0, 1]])
    np.testing.assert_allclose(p, xc @ top, atol=1e-4)
    np.testing.assert_array_equal(nv.pca_2d(x), p)
    # the sign convention follows the data: negated data gives the negated map
    np.testing.assert_allclose(nv.pca_2d(-x), -p, atol=1e-4)
    assert nv.pca_2d(x[:1]).shape == (1, 2)


@pytest.mark.parametrize("value,expected", [(0.123456, 0.123), (-98765.4, -98800.0), (1.0005, 1.0),
                                            (0.0, 0.0), (0.00012345, 0.000123)])
def test_round_sig(value, expected):
    assert nv.round_sig(value) == expected


def test_size_bins_and_colours_keep_rare_points_dark():
    assert [nv.size_bin(n) for n in (1, 2, 3, 4, 15, 16, 31, 32, 500)] == [
        "1 img", "2–3 img", "2–3 img", "4–7 img", "8–15 img", "16–31 img", "16–31 img", "32+ img", "32+ img"]
    cmap = nv.size_colour_map()
    assert list(cmap)[0] == "1 img" and len(cmap) == len(nv.SIZE_BINS)
    assert max(relative_luminance(c) for c in cmap.values()) < 0.5
    assert relative_luminance("#ffffff") == pytest.approx(1.0)
    with pytest.raises(ValueError, match="at least one image"):
        nv.size_bin(0)


def test_points_in_band_and_thumbnail():
    frame = pd.DataFrame({"x": [0.0, 1.0, 2.0, 3.0], "class size": [9, 1, 5, 1], "row": [0, 1, 2, 3]})
    assert nv.points_in_band(frame, [2.5, 0.5])["row"].tolist() == [1, 2]
    with pytest.raises(ValueError, match="two numbers"):
        nv.points_in_band(frame, "x")
    md = nv.thumbnail_markdown(np.zeros((8, 8, 3), np.uint8), px=16)
    assert md.startswith("![thumbnail](data:image/png;base64,")
    import base64
    import io

    from PIL import Image

    img = Image.open(io.BytesIO(base64.b64decode(md.split(",", 1)[1].rstrip(")"))))
    assert img.size == (16, 16)


# ================================================================================= Studio
@pytest.fixture
def studio(tmp_path):
    import gradio as gr  # noqa: F401

    from pogdiff import ui
    from pogdiff.runs.jobs import JobManager
    from tests.fakes import HashEncoder
    from tests.fakes import FakeTrain

    return ui.Studio(tmp_path / "runs", shipped_dir=tmp_path / "shipped",
                     jobs=JobManager(tmp_path / "runs", train_fn=FakeTrain()), device="cpu", view_encoder=HashEncoder())


def _noop(*args, **kwargs):
    return None


@pytest.fixture
def key(studio, tmp_path):
    from tests.fakes import tiny_set

    folder = tiny_set(tmp_path / "set", {"Ann Lee": 6, "Bo Chan": 2, "Cy Dee": 1})
    return studio.data.load_upload([str(p) for p in sorted(folder.iterdir())], progress=_noop)[0]


@pytest.fixture
def fake_runs(studio, tmp_path, monkeypatch):
    """Two runs whose 'sampler' paints every image 0 (run A) or 40 (run B); records its calls."""

    sources = [ui_state.Source("run:a", "run · a", tmp_path / "a"), ui_state.Source("run:b", "run · b", tmp_path / "b")]
    monkeypatch.setattr(studio.sources, "all", lambda: sources)
    monkeypatch.setattr(studio.sources, "model", lambda src: src.key)
    calls = []

    def generate(model, captions, seeds, cfg, **kwargs):
        calls.append((model, list(captions), list(seeds), cfg.steps))
        return np.full((len(captions), 8, 8, 3), 0 if model == "run:a" else 40, np.uint8)

    monkeypatch.setattr("pogdiff.model.sampling.generate", generate)
    return calls


def test_typed_prompts_reach_the_sampler_and_are_validated(studio, fake_runs):
    import gradio as gr

    pair, grid_a, grid_b, note = studio.compare.generate_pair(
        "run:a", "run:b", ["a photo of Bo Chan"], " red  fox, snow\n\n a cat ", 2, 3.0, 5, progress=_noop)
    assert [c[0] for c in fake_runs] == ["run:a", "run:b"]
    assert fake_runs[0][1] == ["a photo of Bo Chan", "red fox, snow", "a cat"] * 2
    assert fake_runs[0][2] == [0, 0, 0, 1, 1, 1] and fake_runs[0][3] == 5
    assert "3 prompt(s)" in note
    long = "x" * (studio.limits.max_text_chars + 1)
    with pytest.raises(gr.Error, match="Typed prompt 1 is .* characters long"):
        studio.compare.generate_pair("run:a", "run:b", [], long, 1, 3.0, 5, progress=_noop)


def test_real_images_and_difference_beside_a_and_b(studio, key, fake_runs):

    studio.compare.generate_pair("run:a", "run:b", ["a photo of Bo Chan", "a photo of Ann Lee"], "a photo of nobody", 1,
                         3.0, 5, progress=_noop)
    gallery, real_md, diff, diff_md, state = studio.compare.pair_views("run:a", "run:b", key, None)
    bundle = studio.datasets.bundle(key)
    bo = [i for i, s in enumerate(bundle.subjects) if s == "Bo Chan"]
    ann = [i for i, s in enumerate(bundle.subjects) if s == "Ann Lee"]
    expected = [bundle.ds.images[i] for i in bo + ann[:cv.MAX_REAL_IMAGES]]
    assert len(gallery) == len(expected)
    for (img, label), want in zip(gallery, expected):
        assert np.array_equal(img, views.upscale(want))
    assert gallery[0][1].startswith("Bo Chan · 1 of 2")
    assert "**Bo Chan**: 2 training images (few-shot)" in real_md
    assert "**Ann Lee**: 6 training images" in real_md
    assert "*a photo of nobody*: no training class matches" in real_md
    assert "Mean |A − B| = **40.00** of 255" in diff_md
    pixel = np.asarray(diff)[0, 0]
    assert (pixel == cv.heat_colours(np.array(40 * cv.DIFF_GAIN / 255))).all()
    assert cv.CompareState.from_browser(state, max_prompts=99, max_chars=999).token


def test_real_images_come_from_the_session_data_then_the_demo_set(studio, key, monkeypatch):

    demo = ui_state.DatasetBundle(key="demo", name="demo set", ds=None, table=pd.DataFrame(), summary={})
    monkeypatch.setattr(studio.datasets, "load_demo", lambda: demo)
    own = studio.datasets.bundle(key)
    assert studio.compare.training_bundles("shipped:demo-baseline", "shipped:demo-pogdiff", None) == [demo]
    assert studio.compare.training_bundles("shipped:demo-baseline", "run:x", key) == [own, demo]
    assert studio.compare.training_bundles("run:y", "run:x", key) == [own]
    # a subject found in the session's data is shown from there, with the dataset named
    items, md = studio.compare.real_panel([own, own], ["a photo of Cy Dee"])
    assert len(items) == 1 and f"**Cy Dee**: 1 training image (few-shot) in *{own.name}*" in md


def test_compare_state_survives_tab_switches_and_reloads(studio, key, fake_runs):
    a, b, _ = studio.compare.compare_choices("run:b", "run:a")  # a tab switch keeps the choice
    assert (a.value, b.value) == ("run:b", "run:a")
    a, b, _ = studio.compare.compare_choices("run:gone", None)
    assert (a.value, b.value) == ("run:b", "run:a")  # the defaults: the older run as A, the newest as B
    prompts = studio.compare.prompt_choices(key, ["a photo of Ann Lee", "typed by hand"])
    assert prompts.value == ["a photo of Ann Lee", "typed by hand"]
    assert studio.compare.prompt_choices(key).value == ["a photo of Cy Dee", "a photo of Bo Chan"]  # few-shot default

    state = studio.compare.remember_compare("run:a", "run:b", ["a photo of Bo Chan"], "a cat", 1, 2.5, 7, None)
    pair, *_ = studio.compare.generate_pair("run:a", "run:b", ["a photo of Bo Chan"], "a cat", 1, 2.5, 7, progress=_noop)
    *_, state = studio.compare.pair_views("run:a", "run:b", key, state)
    state = json.loads(json.dumps(state))  # what the browser keeps
    restored = studio.compare.restore_compare(state)
    names = studio.compare.RESTORE_OUTPUTS
    values = dict(zip(names, restored))
    assert values["run_a"].value == "run:a" and values["run_b"].value == "run:b"
    assert values["prompts"].value == ["a photo of Bo Chan"] and values["custom"] == "a cat"
    assert (values["n_seeds"], values["guidance"], values["sample_steps"]) == (1, 2.5, 7)
    assert np.array_equal(values["slider"][0], pair[0]) and np.array_equal(values["slider"][1], pair[1])
    assert "Mean |A − B| = **40.00**" in values["diff_md"]
    # a browser without a state, or with junk, changes nothing
    assert all(isinstance(v, dict) and v.get("__type__") == "update" for v in studio.compare.restore_compare({"x": 1}))


def _ship(studio, name, acc):
    folder = studio.shipped_dir / name
    folder.mkdir(parents=True)
    (folder / "configs.json").write_text("{}")
    table = A_TABLE if acc == "a" else B_TABLE
    table.to_csv(folder / "per_class.csv", index=False)


def test_metric_table_is_the_delta_of_the_two_runs_and_is_kept(studio):
    _ship(studio, "demo-baseline", "a")
    _ship(studio, "demo-pogdiff", "b")
    table, fig, md = studio.metrics.precomputed_metrics("shipped:demo-baseline", "shipped:demo-pogdiff")
    want = cv.delta_table(A_TABLE, B_TABLE, "demo-baseline", "demo-pogdiff")
    assert table["subject"].tolist() == ["b", "c", "a"]
    assert table["accuracy · B−A"].tolist() == pytest.approx(want["accuracy · B−A"].tolist())
    assert table["accuracy · B−A"].tolist() == pytest.approx([0.3, 0.05, -0.1])
    assert len(fig.axes) == 2  # both runs, and B − A per class
    state = studio.metrics.keep_metrics("shipped:demo-baseline", "shipped:demo-pogdiff", None)
    values = dict(zip(studio.compare.RESTORE_OUTPUTS, studio.compare.restore_compare(state)))
    assert values["metrics_table"]["accuracy · B−A"].tolist() == pytest.approx([0.3, 0.05, -0.1])
    assert values["metrics_md"] == md
    # on a page load the kept metrics win over the shipped ones
    assert all(v.get("__type__") == "update" for v in studio.metrics.load_metrics("shipped:demo-baseline",
                                                                          "shipped:demo-pogdiff", state))
    assert studio.metrics.load_metrics("shipped:demo-baseline", "shipped:demo-pogdiff", None)[2] == md


# ============================================================================ Studio: Neighbours
def test_map_frame_rounds_and_bins_and_keeps_rare_points_on_top(studio, key):
    scatter, dd, banner = studio.neighbours.neighbour_map(key, "class frequency", progress=_noop)
    assert scatter.color == "class size bin" and list(scatter.color_map)[0] == "1 img"
    frame = studio.neighbours.map_frame(studio.datasets.bundle(key))
    assert frame["class size"].tolist() == sorted(frame["class size"], reverse=True)  # the rarest drawn last
    bundle = studio.datasets.bundle(key)
    for r in frame.itertuples():
        assert r.x == nv.round_sig(bundle.coords[r.row, 0]) and r.y == nv.round_sig(bundle.coords[r.row, 1])
        assert r.caption == bundle.captions[r.row]
    assert frame["class size bin"].tolist() == [nv.size_bin(n) for n in frame["class size"]]
    assert set(frame["class size bin"]) == {"1 img", "2–3 img", "4–7 img"}


def test_points_table_and_brushed_band_pick_a_caption(studio, key):
    import gradio as gr

    studio.neighbours.neighbour_map(key, "shot bucket", progress=_noop)
    points = studio.neighbours.map_points(key)
    assert points["subject"].tolist()[0] == "Cy Dee" and points["class size"].is_monotonic_increasing
    second = points.iloc[2]
    evt = gr.SelectData(None, {"index": [2, 1], "value": second["caption"], "selected": True})
    assert studio.neighbours.hop(key, points, evt) == int(second["row"])  # a click on a row picks its caption
    frame = studio.neighbours.map_frame(studio.datasets.bundle(key))
    x = float(frame.loc[frame["subject"] == "Bo Chan", "x"].iloc[0])
    band, row = studio.neighbours.map_band(key, gr.SelectData(None, {"index": [x - 1e-9, x + 1e-9], "value": None}))
    assert "Bo Chan" in band["subject"].tolist() and row == int(band.iloc[0]["row"])
    assert studio.neighbours.map_band(key, gr.SelectData(None, {"index": "junk", "value": None}))[1].get("__type__") == "update"


def test_neighbour_list_shows_each_neighbours_image(studio, key):
    import base64
    import io

    from PIL import Image


    head, frame, gallery = studio.neighbours.neighbours_of(key, 0, 3, 1.0, "all")
    assert frame.columns[0] == "image" and len(frame) == 3
    bundle = studio.datasets.bundle(key)
    for r in frame.itertuples():
        png = base64.b64decode(r.image.split(",", 1)[1].rstrip(")"))
        img = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
        assert np.array_equal(img, views.upscale(bundle.ds.images[r.row], nv.THUMB_MARKDOWN_PX))
    assert all(isinstance(v, float) for v in frame["psi"])


def test_compute_metrics_fast_by_default_full_on_request_and_cached(tmp_path, monkeypatch):
    """Fast mode scores 4 held-out captions per class, full mode all 8; a second request for the
    same checkpoint weights and mode is read from the cache, not generated again."""
    import pandas as pd

    from pogdiff import ui
    from pogdiff.evaluation import protocol as evaluation

    shipped = Path(__file__).resolve().parent.parent / "checkpoints"
    studio = ui.Studio(tmp_path / "runs", shipped_dir=shipped, device="cpu")
    calls = []

    def fake_evaluate(model, eval_set, evaluator, counts, **kw):
        calls.append(len(eval_set.captions))
        subjects = sorted(set(eval_set.subjects))
        table = pd.DataFrame({"subject": subjects, "train_count": [counts[s] for s in subjects],
                              "shot": ["few"] * len(subjects), "accuracy": [0.5] * len(subjects),
                              "n_gen": [list(eval_set.subjects).count(s) for s in subjects]})
        return table, None, None

    monkeypatch.setattr(evaluation, "evaluate_model", fake_evaluate)
    monkeypatch.setattr(studio.sources, "model", lambda source: object())
    a, b = "shipped:demo-baseline", "shipped:demo-pogdiff"
    n_classes = len(set(studio.datasets.eval_set().subjects))
    *_, md = studio.metrics.compute_metrics(a, b, progress=lambda *x, **k: None)
    assert calls == [4 * n_classes, 4 * n_classes] and "fast mode" in md and "cache" not in md
    *_, md = studio.metrics.compute_metrics(a, b, progress=lambda *x, **k: None)
    assert len(calls) == 2 and "2 of 2 read from the cache" in md
    *_, md = studio.metrics.compute_metrics(a, b, True, progress=lambda *x, **k: None)
    assert calls[2:] == [8 * n_classes, 8 * n_classes] and "full mode" in md
    with pytest.raises(gr.Error, match="Full evaluation"):
        studio.metrics.compute_metrics(a, b, "yes please", progress=lambda *x, **k: None)


# ====================================================== metrics table: key columns, verdicts, CSV
def test_verdict_table_puts_the_difference_interval_verdict_and_judge_first():
    from pogdiff.evaluation import comparison as m

    verdicts = m.per_class_verdicts(A_TABLE, B_TABLE)
    rel = pd.DataFrame({"subject": ["a", "b", "c"], "reliability": [1.0, 0.25, 0.8], "weak": [False, True, False]})
    table = cv.verdict_table(A_TABLE, B_TABLE, "base", "pog", verdicts, rel, weak_mark="WEAK")
    assert list(table.columns[:9]) == ["subject", "train_count", "accuracy · B−A", "95% interval", "verdict",
                                       "judge reliability", "judge", "accuracy · base", "accuracy · pog"]
    assert list(table.columns[9:11]) == ["shot", "few"]
    assert table["subject"].tolist() == ["b", "c", "a"]  # rarest first
    row = table.set_index("subject").loc["b"]
    assert row["judge"] == "WEAK" and row["judge reliability"] == 0.25
    assert row["verdict"] == "no measurable difference"  # 0.1 vs 0.4 of 4 images
    got = verdicts.set_index("subject").loc["b"]
    assert row["95% interval"] == f"[{got['low']:.2f}, {got['high']:.2f}]"
    assert cv.interval_text(float("nan"), 1.0) == "—"


def test_bucket_markdown_and_metrics_csv_frame():
    from pogdiff.evaluation import comparison as m

    md = cv.bucket_markdown(m.bucket_verdicts(A_TABLE, B_TABLE), ("base", "pog"))
    lines = md.splitlines()
    assert lines[0].startswith("| bucket | classes | accuracy · base (A) | accuracy · pog (B) | B − A |")
    few = next(line for line in lines if line.startswith("| few |"))
    assert few.startswith("| few | 1 | 0.100 | 0.400 | +0.300 | [") and few.endswith("| no measurable difference |")
    shown = pd.DataFrame({"subject": ["b", "c"], "accuracy · B−A": [0.3, 0.05], "95% interval": ["[-0.25, 0.75]", "—"],
                          "verdict": ["no measurable difference", "—"]})
    frame = cv.metrics_csv_frame(shown)
    assert list(frame.columns) == ["subject", "accuracy · B−A", "B−A low", "B−A high", "verdict"]
    assert frame["B−A low"].iloc[0] == -0.25 and frame["B−A high"].iloc[0] == 0.75
    assert np.isnan(frame["B−A low"].iloc[1])


def test_per_class_metrics_download_as_csv(studio):
    _ship(studio, "demo-baseline", "a")
    _ship(studio, "demo-pogdiff", "b")
    table, fig, md = studio.metrics.precomputed_metrics("shipped:demo-baseline", "shipped:demo-pogdiff")
    button = studio.metrics.metrics_csv(table)
    assert button.interactive
    path = Path(button.value["path"] if isinstance(button.value, dict) else button.value)
    assert path.name == "per_class_metrics.csv"
    saved = pd.read_csv(path)
    assert saved["subject"].tolist() == ["b", "c", "a"]
    assert saved["accuracy · B−A"].tolist() == pytest.approx([0.3, 0.05, -0.1])
    assert list(saved.columns[:6]) == ["subject", "train_count", "accuracy · B−A", "B−A low", "B−A high", "verdict"]
    assert (saved["B−A low"] <= saved["accuracy · B−A"] + 1e-9).all()
    assert (saved["B−A high"] >= saved["accuracy · B−A"] - 1e-9).all()
    empty = studio.metrics.metrics_csv(pd.DataFrame(columns=["subject", "accuracy"]))
    assert not empty.interactive


def test_compare_lists_every_shipped_demo_run(studio):
    """The shipped resampling run README recommends is offered beside baseline and PoGDiff."""
    import json

    for name, method in (("demo-resample", "resample"), ("demo-pogdiff", "pogdiff"), ("demo-baseline", None),
                         ("demo-cbdm", "cbdm")):
        folder = studio.shipped_dir / name
        folder.mkdir(parents=True)
        (folder / "configs.json").write_text(json.dumps({"train": {"method": method}} if method else {}))
    (studio.shipped_dir / "evaluator").mkdir()  # not a demo run
    keys = [s.key for s in studio.sources.all()]
    assert keys[:4] == ["shipped:demo-baseline", "shipped:demo-pogdiff", "shipped:demo-cbdm", "shipped:demo-resample"]
    assert not any("evaluator" in k for k in keys)
    labels = {s.key: s.label for s in studio.sources.all()}
    assert labels["shipped:demo-resample"] == "shipped · demo-resample (resample, demo set)"
    assert labels["shipped:demo-baseline"] == "shipped · demo-baseline (baseline, demo set)"
    a, b, _ = studio.compare.compare_choices()
    assert (a.value, b.value) == ("shipped:demo-baseline", "shipped:demo-pogdiff")
    assert ("shipped · demo-resample (resample, demo set)", "shipped:demo-resample") in a.choices


@pytest.mark.skipif(not (Path(__file__).resolve().parent.parent / "checkpoints" / "demo-resample").exists(),
                    reason="shipped checkpoints missing")
def test_the_real_shipped_checkpoints_include_resampling(tmp_path):
    from pogdiff import ui

    studio = ui.Studio(tmp_path / "runs", shipped_dir=Path(__file__).resolve().parent.parent / "checkpoints",
                       device="cpu")
    keys = [s.key for s in studio.sources.all() if s.key.startswith("shipped:")]
    assert {"shipped:demo-baseline", "shipped:demo-pogdiff", "shipped:demo-resample"} <= set(keys)
    assert all(s.metrics_csv is not None for s in studio.sources.all() if s.key.startswith("shipped:"))


# ====================================================== default prompts follow the caption style
KOHYA = {  # the set: class first, then tags
    "red circle": ["red circle, flat, white background", "red circle, flat, grey background",
                   "red circle, small, flat", "red circle, flat"],
    "blue square": ["blue square, flat, outline", "blue square, outline, flat", "blue square, flat"],
    "green ring": ["green ring, thin", "green ring, thick"],
}


def _flatten(sets):
    captions = [c for caps in sets.values() for c in caps]
    subjects = [s for s, caps in sets.items() for _ in caps]
    return captions, subjects


def test_tag_captions_get_tag_prompts_and_sentences_keep_the_template():
    captions, subjects = _flatten(KOHYA)
    assert cv.captions_are_tags(captions)
    assert cv.class_prompts(captions, subjects) == {
        "red circle": "red circle, flat",  # 'flat' is in 4 of 4; each background in only 1
        "blue square": "blue square, flat, outline",  # 'flat' in 3 of 3, 'outline' in 2 of 3
        "green ring": "green ring",  # 'thin' and 'thick' in half each: neither is common
    }
    sentences = ["a photo of Vera Dahl, smiling", "a photo of Vera Dahl, wearing glasses", "a photo of Omar Castillo"]
    assert not cv.captions_are_tags(sentences)
    assert cv.class_prompts(sentences, ["Vera Dahl", "Vera Dahl", "Omar Castillo"]) == {
        "Vera Dahl": "a photo of Vera Dahl", "Omar Castillo": "a photo of Omar Castillo"}
    # one tag per caption, or every first tag different: not a tag set
    assert not cv.captions_are_tags(["fox", "fox", "owl"])
    assert not cv.captions_are_tags([f"thing {i}, outdoors" for i in range(6)])
    with pytest.raises(ValueError, match="3 captions but 2 classes"):
        cv.class_prompts(sentences, ["a", "b"])


def test_compare_default_prompts_of_a_tag_captioned_upload(studio, tmp_path):
    from PIL import Image

    folder = tmp_path / "tags"
    folder.mkdir()
    rows = []
    for subject, caps in KOHYA.items():
        for i, caption in enumerate(caps):
            name = f"{subject.replace(' ', '_')}_{i}.png"
            Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)).save(folder / name)
            rows.append({"file_name": name, "text": caption, "subject": subject})
    (folder / "metadata.jsonl").write_text("\n".join(__import__("json").dumps(r) for r in rows) + "\n")
    key = studio.data.load_upload([str(p) for p in sorted(folder.iterdir())], progress=_noop)[0]
    dd = studio.compare.prompt_choices(key)
    choices = [c[0] if isinstance(c, tuple) else c for c in dd.choices]
    assert choices == ["green ring", "blue square, flat, outline", "red circle, flat"]  # rarest first
    assert dd.value == ["green ring", "blue square, flat, outline", "red circle, flat"]  # all few-shot
    assert not any(c.startswith("a photo of") for c in choices)
    # a prompt of that style still finds its class's real images
    assert cv.subject_for_prompt("blue square, flat, outline", list(KOHYA)) == "blue square"


def test_neighbour_table_shows_psi_draw_and_informative_first(studio, key):
    import app

    head, frame, gallery = studio.neighbours.neighbours_of(key, 0, 3, 1.0, "all")
    assert list(frame.columns[:6]) == ["image", "rank", "subject", "psi", "p(draw)", "informative"]
    table = next(b for b in app.build_demo(studio).blocks.values() if getattr(b, "elem_id", None) == "pg-nb-table")
    assert table.headers == list(frame.columns)  # the tab lays out the columns the callback fills
    types = dict(zip(table.headers, table.datatype))
    assert types["informative"] == "bool" and types["image"] == "markdown"
