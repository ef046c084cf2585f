"""B − A with an interval and the verdict rule (pogdiff/evaluation/metrics.py, README "Reading B − A")."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest
from scipy.stats import binom

from pogdiff.evaluation import comparison
from pogdiff.evaluation.comparison import A_BETTER, B_BETTER, NO_DIFFERENCE, NOT_MEASURED


def _table(rows: list[tuple[str, int, str, float, int]]) -> pd.DataFrame:
    """A per-class table from (subject, train_count, shot, accuracy, n_gen)."""
    return pd.DataFrame(rows, columns=["subject", "train_count", "shot", "accuracy", "n_gen"])


def test_one_of_four_against_none_of_four_is_no_measurable_difference():
    a = _table([("rare", 2, "few", 0.0, 4)])
    b = _table([("rare", 2, "few", 0.25, 4)])
    row = comparison.per_class_verdicts(a, b).iloc[0]
    assert row["diff"] == pytest.approx(0.25)
    assert row["low"] <= 0 <= row["high"]
    assert row["verdict"] == NO_DIFFERENCE
    # one image each, right against wrong, is no evidence either
    one = comparison.per_class_verdicts(_table([("x", 1, "few", 0.0, 1)]), _table([("x", 1, "few", 1.0, 1)]))
    assert one.iloc[0]["verdict"] == NO_DIFFERENCE


def test_forty_of_forty_against_none_is_a_win_either_way_round():
    a = _table([("fox", 40, "many", 0.0, 40)])
    b = _table([("fox", 40, "many", 1.0, 40)])
    won = comparison.per_class_verdicts(a, b).iloc[0]
    assert won["diff"] == 1.0 and won["low"] > 0.8 and won["verdict"] == B_BETTER
    lost = comparison.per_class_verdicts(b, a).iloc[0]
    assert lost["diff"] == -1.0 and lost["high"] < -0.8 and lost["verdict"] == A_BETTER


def _exact_quantiles(values: np.ndarray, probs: np.ndarray, level: float = 0.95) -> tuple[float, float, float]:
    """Lower and upper quantile of a discrete distribution, and the CDF's distance from the
    quantile levels at the jumps next to them (how safely a sampled percentile lands there)."""
    order = np.argsort(values, kind="stable")
    v, p = values[order], probs[order]
    uniq = np.unique(v)
    cdf = np.array([p[v <= u].sum() for u in uniq])
    tail = (1 - level) / 2
    lo_i, hi_i = int(np.searchsorted(cdf, tail)), int(np.searchsorted(cdf, 1 - tail))
    margin = min(abs(cdf[lo_i] - tail), abs(cdf[lo_i - 1] - tail) if lo_i else 1.0,
                 abs(cdf[hi_i] - (1 - tail)), abs(cdf[hi_i - 1] - (1 - tail)) if hi_i else 1.0)
    return float(uniq[lo_i]), float(uniq[hi_i]), margin


def test_plain_bootstrap_interval_equals_enumerating_every_resample_of_the_images():
    """smoothing=0 is the bootstrap over images: enumerate all 5**5 resamples of each run's five
    outcomes (A: 1 of 5 right, B: 4 of 5) and compare the exact percentiles with the sampled ones."""
    out_a, out_b = np.array([1, 0, 0, 0, 0]), np.array([1, 1, 1, 1, 0])
    share = {}
    for name, outcomes in (("a", out_a), ("b", out_b)):
        resamples = np.array(list(itertools.product(range(5), repeat=5)))
        vals, freq = np.unique(outcomes[resamples].mean(axis=1), return_counts=True)
        share[name] = (vals, freq / freq.sum())
    diffs = np.subtract.outer(share["b"][0], share["a"][0]).ravel()
    probs = np.multiply.outer(share["b"][1], share["a"][1]).ravel()
    low, high, margin = _exact_quantiles(diffs, probs)
    assert margin > 0.005  # the sampled percentile cannot land on the next value by chance
    diff, s_low, s_high = comparison.bootstrap_share_difference([0.2], [5], [0.8], [5], smoothing=0.0, n_boot=40000)
    assert diff == pytest.approx(0.6)
    assert (s_low, s_high) == pytest.approx((low, high))
    assert (low, high) == pytest.approx((0.0, 1.0))  # it reaches 0: 1 of 5 against 4 of 5 is not measurable
    assert comparison.difference_verdict(s_low, s_high) == NO_DIFFERENCE


def test_smoothed_interval_matches_its_closed_form():
    """With smoothing s each share is Binomial(n, (k + s) / (n + 2 s)) / n; the interval of
    3 of 8 against 7 of 8 from the exact distribution of the two binomials."""
    n, k_a, k_b, s = 8, 3, 7, 0.5
    ka, kb = np.arange(n + 1), np.arange(n + 1)
    pa, pb = binom.pmf(ka, n, (k_a + s) / (n + 2 * s)), binom.pmf(kb, n, (k_b + s) / (n + 2 * s))
    diffs = np.subtract.outer(kb / n, ka / n).ravel()
    probs = np.multiply.outer(pb, pa).ravel()
    low, high, margin = _exact_quantiles(diffs, probs)
    assert margin > 0.004
    diff, s_low, s_high = comparison.bootstrap_share_difference([k_a / n], [n], [k_b / n], [n], smoothing=s,
                                                             n_boot=40000, seed=3)
    assert diff == pytest.approx(0.5) and (s_low, s_high) == pytest.approx((low, high))


def test_several_seeds_are_resampled_too():
    """Three training seeds, 1000 images each: per seed B − A is +0.5, -0.5, +0.5. Image noise is
    tiny, but which seed was drawn decides the sign, so the seeds' interval contains 0; any one
    seed alone gives a confident verdict."""
    a = [_table([("c", 3, "few", p, 1000)]) for p in (0.25, 0.75, 0.25)]
    b = [_table([("c", 3, "few", p, 1000)]) for p in (0.75, 0.25, 0.75)]
    row = comparison.per_class_verdicts(a, b).iloc[0]
    assert row["diff"] == pytest.approx(0.5 / 3)
    assert row["a"] == pytest.approx(1.25 / 3) and row["b"] == pytest.approx(1.75 / 3)
    assert row["low"] == pytest.approx(-0.5, abs=0.02) and row["verdict"] == NO_DIFFERENCE
    assert comparison.per_class_verdicts(a[0], b[0]).iloc[0]["verdict"] == B_BETTER
    assert comparison.per_class_verdicts(a[1], b[1]).iloc[0]["verdict"] == A_BETTER
    with pytest.raises(ValueError, match="pair them seed by seed"):
        comparison.per_class_verdicts(a, b[:2])


def test_bucket_verdicts_average_classes_and_resample_all_of_them():
    a = _table([("head", 40, "many", 0.0, 40), ("r1", 2, "few", 0.0, 4), ("r2", 3, "few", 0.0, 4),
                ("mid", 9, "medium", 0.5, 4)])
    b = _table([("head", 40, "many", 1.0, 40), ("r1", 2, "few", 0.25, 4), ("r2", 3, "few", 0.0, 4),
                ("mid", 9, "medium", 0.5, 4)])
    out = comparison.bucket_verdicts(a, b, groups={"judge ok": ["head", "mid"]})
    assert out.index.tolist() == ["all", "many", "medium", "few", "judge ok"]
    assert out.loc["many", "verdict"] == B_BETTER and out.loc["many", "diff"] == 1.0
    assert out.loc["few", "n_classes"] == 2 and out.loc["few", "diff"] == pytest.approx(0.125)
    assert out.loc["few", "b"] == pytest.approx(0.125) and out.loc["few", "verdict"] == NO_DIFFERENCE
    assert out.loc["medium", "diff"] == 0 and out.loc["medium", "verdict"] == NO_DIFFERENCE
    assert out.loc["all", "diff"] == pytest.approx((1 + 0.25) / 4)
    assert out.loc["judge ok", "n_classes"] == 2 and out.loc["judge ok", "diff"] == pytest.approx(0.5)


def test_difference_verdict_rule_and_missing_inputs():
    assert comparison.difference_verdict(0.01, 0.4) == B_BETTER
    assert comparison.difference_verdict(-0.4, -0.01) == A_BETTER
    assert comparison.difference_verdict(0.0, 0.4) == NO_DIFFERENCE  # touching 0 is not excluding it
    assert comparison.difference_verdict(math.nan, math.nan) == NOT_MEASURED
    only_a = comparison.per_class_verdicts(_table([("x", 3, "few", 0.5, 4)]), _table([("y", 3, "few", 0.5, 4)]))
    assert only_a["verdict"].tolist() == [NOT_MEASURED, NOT_MEASURED]
    with pytest.raises(ValueError, match="n_gen"):
        comparison.per_class_verdicts(_table([("x", 3, "few", 0.5, 4)]).drop(columns="n_gen"),
                                   _table([("x", 3, "few", 0.5, 4)]))


def _user_like_verdicts() -> pd.DataFrame:
    """The issue's set: 40/20/8/3/2 images, 4 generations per class."""
    a = _table([("circle", 40, "many", 1.0, 4), ("square", 20, "medium", 0.0, 4), ("tri", 8, "medium", 0.0, 4),
                ("cross", 3, "few", 0.0, 4), ("ring", 2, "few", 0.0, 4), ("star", 2, "few", 0.0, 4)])
    b = a.assign(accuracy=[0.0, 0.0, 0.25, 0.0, 1.0, 0.0])
    return comparison.per_class_verdicts(a, b)


def test_verdict_figure_colours_only_measurable_differences():
    verdicts = _user_like_verdicts()
    assert verdicts.set_index("subject")["verdict"].to_dict() == {
        "circle": A_BETTER, "square": NO_DIFFERENCE, "tri": NO_DIFFERENCE, "cross": NO_DIFFERENCE,
        "ring": B_BETTER, "star": NO_DIFFERENCE}
    fig = comparison.verdict_frequency_figure(verdicts, ("run-a", "run-b"))
    top, bottom = fig.axes[:2]
    bars = {round(p.get_height(), 6): tuple(round(c, 3) for c in p.get_facecolor()[:3]) for p in bottom.patches}
    from matplotlib.colors import to_rgb

    grey, green, red = (tuple(round(c, 3) for c in to_rgb(comparison.VERDICT_COLOURS[v]))
                        for v in (NO_DIFFERENCE, B_BETTER, A_BETTER))
    assert bars[0.25] == grey  # one image of four: not painted as a win
    assert bars[1.0] == green and bars[-1.0] == red
    # the two 2-image classes are drawn side by side, not on top of each other
    xs = sorted(p.get_x() + p.get_width() / 2 for p in bottom.patches)
    assert len(set(np.round(xs, 6))) == len(xs)
    labels = [t.get_text() for t in bottom.get_legend().get_texts()]
    assert labels == [B_BETTER, A_BETTER, NO_DIFFERENCE]
    with pytest.raises(ValueError, match="per_class_verdicts"):
        comparison.verdict_frequency_figure(verdicts.drop(columns="low"))


@pytest.mark.parametrize("counts", [(40, 20, 8, 3, 2, 2), (100, 43, 26, 18, 14, 11, 9, 8, 7, 6, 5, 4, 3, 2)])
def test_verdict_figure_text_does_not_overlap(counts):
    """Tick labels of the log axis never collide, and the title sits above both axes and the legends."""
    rows = [(f"c{i}", n, "few", 0.5, 4) for i, n in enumerate(counts)]
    fig = comparison.verdict_frequency_figure(comparison.per_class_verdicts(_table(rows), _table(rows)))
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    top, bottom = fig.axes[:2]
    labels = [t for t in bottom.get_xticklabels(which="both") if t.get_visible() and t.get_text()]
    assert len(labels) >= 2
    boxes = sorted((t.get_window_extent(renderer) for t in labels), key=lambda b: b.x0)
    for left, right in zip(boxes, boxes[1:]):
        assert left.x1 < right.x0, [t.get_text() for t in labels]
    assert not [t for t in top.get_xticklabels(which="both") if t.get_visible() and t.get_text()]
    title = fig._suptitle.get_window_extent(renderer)
    assert title.y1 <= fig.bbox.y1 + 0.5 and title.x0 >= 0 and title.x1 <= fig.bbox.x1
    for artist in (top, top.get_legend(), bottom.get_legend()):
        assert title.y0 >= artist.get_window_extent(renderer).y1 - 0.5 or \
            not title.overlaps(artist.get_window_extent(renderer))


def test_count_ticks_are_round_numbers_inside_the_range():
    assert comparison.count_ticks(1.5, 54) == [2, 5, 10, 20, 50]
    assert comparison.count_ticks(1.4, 3.5) == [1, 2, 5]  # one round number inside: its neighbours too
    assert comparison.count_ticks(80, 140) == [50, 100, 200]
