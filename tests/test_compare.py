"""Compare and Neighbours views: the pure pieces (pogdiff.compare_views, the two-run figure) and
the Studio methods behind them, with a fake sampler instead of a model."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from pogdiff import compare_views as cv
from pogdiff import metrics

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


def test_paired_frequency_figure_bars_are_b_minus_a():
    fig = metrics.paired_frequency_figure(A_TABLE, B_TABLE, ("base", "pog"))
    top, bottom = fig.axes
    heights = sorted(round(p.get_height(), 6) for p in bottom.patches)
    assert heights == sorted([round(0.4 - 0.1, 6), round(0.55 - 0.5, 6), round(0.8 - 0.9, 6)])
    colours = {round(p.get_height(), 6): p.get_facecolor()[:3] for p in bottom.patches}
    assert colours[round(0.8 - 0.9, 6)][0] > colours[round(0.8 - 0.9, 6)][1]  # B below A: red
    assert [t.get_text() for t in top.get_legend().get_texts()][:2] == ["base", "pog"]
    with pytest.raises(ValueError, match="lacks column"):
        metrics.paired_frequency_figure(A_TABLE, B_TABLE.drop(columns="accuracy"))


# ============================================================================ pure: Neighbours
@pytest.mark.parametrize("value,expected", [(0.123456, 0.123), (-98765.4, -98800.0), (1.0005, 1.0),
                                            (0.0, 0.0), (0.00012345, 0.000123)])
def test_round_sig(value, expected):
    assert cv.round_sig(value) == expected


def test_size_bins_and_colours_keep_rare_points_dark():
    assert [cv.size_bin(n) for n in (1, 2, 3, 4, 15, 16, 31, 32, 500)] == [
        "1 img", "2–3 img", "2–3 img", "4–7 img", "8–15 img", "16–31 img", "16–31 img", "32+ img", "32+ img"]
    cmap = cv.size_colour_map()
    assert list(cmap)[0] == "1 img" and len(cmap) == len(cv.SIZE_BINS)
    assert max(cv.relative_luminance(c) for c in cmap.values()) < 0.5
    assert cv.relative_luminance("#ffffff") == pytest.approx(1.0)
    with pytest.raises(ValueError, match="at least one image"):
        cv.size_bin(0)


def test_points_in_band_and_thumbnail():
    frame = pd.DataFrame({"x": [0.0, 1.0, 2.0, 3.0], "class size": [9, 1, 5, 1], "row": [0, 1, 2, 3]})
    assert cv.points_in_band(frame, [2.5, 0.5])["row"].tolist() == [1, 2]
    with pytest.raises(ValueError, match="two numbers"):
        cv.points_in_band(frame, "x")
    md = cv.thumbnail_markdown(np.zeros((8, 8, 3), np.uint8), px=16)
    assert md.startswith("![thumbnail](data:image/png;base64,")
    import base64
    import io

    from PIL import Image

    img = Image.open(io.BytesIO(base64.b64decode(md.split(",", 1)[1].rstrip(")"))))
    assert img.size == (16, 16)
