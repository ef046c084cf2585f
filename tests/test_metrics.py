"""Metrics on constructed features with numbers that can be counted by hand."""

from __future__ import annotations

import math

import itertools

import numpy as np
import pandas as pd
import pytest

from pogdiff.config import DataConfig
from pogdiff.evaluation.metrics import (
    accuracy_vs_frequency_figure,
    dino_score,
    frechet_distance,
    g_recall,
    identity_accuracy,
    knn_radii,
    per_class_table,
    summarise,
)


def test_identity_accuracy_and_per_class():
    pred = ["a", "a", "b", "c", "c", "c"]
    target = ["a", "b", "b", "c", "c", "a"]
    assert identity_accuracy(pred, target) == pytest.approx(4 / 6)
    assert math.isnan(identity_accuracy([], []))
    with pytest.raises(ValueError, match="pred_subjects has 1 entries but target_subjects has 2"):
        identity_accuracy(["a"], ["a", "b"])


def test_knn_radii_on_a_line():
    x = np.array([[0.0], [1.0], [3.0], [7.0]])
    # Distances from 0: 1, 3, 7; from 1: 1, 2, 6; from 3: 2, 3, 4; from 7: 4, 6, 7.
    np.testing.assert_allclose(knn_radii(x, 1), [1, 1, 2, 4])
    np.testing.assert_allclose(knn_radii(x, 2), [3, 2, 3, 6])
    np.testing.assert_allclose(knn_radii(x, 3), [7, 6, 4, 7])
    with pytest.raises(ValueError, match="more than k=4 points"):
        knn_radii(x, 4)


def test_g_recall_counts_reals_inside_generated_balls():
    gen = np.array([[0.0], [1.0], [3.0], [7.0]])
    # k=1 radii [1, 1, 2, 4]: balls [-1, 1], [0, 2], [1, 5], [3, 11] -> covered interval [-1, 11].
    real = np.array([[-1.0], [0.5], [2.9], [10.9], [11.5], [-3.0], [20.0], [5.0]])
    assert g_recall(real, gen, k=1) == pytest.approx(5 / 8)
    # k=2 radii [3, 2, 3, 6]: balls [-3, 3], [-1, 3], [0, 6], [1, 13] -> [-3, 13].
    assert g_recall(real, gen, k=2) == pytest.approx(7 / 8)


def test_g_recall_two_dimensional_square():
    gen = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    # k=1: every radius is 1 (side of the square).
    real = np.array([[0.5, 0.5], [2.0, 0.0], [2.01, 0.0], [-0.7, -0.7], [0.5, -1.2]])
    # (0.5,0.5) in; (2,0) on the sphere around (1,0): in; (2.01,0) out;
    # (-0.7,-0.7) at distance 0.99 from the origin: in; (0.5,-1.2) at 1.3 from (0,0) and (1,0): out.
    assert g_recall(real, gen, k=1) == pytest.approx(3 / 5)


def test_g_recall_identical_disjoint_and_too_few():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 8))
    assert g_recall(x, x, k=3) == 1.0
    assert g_recall(x + 100.0, x, k=3) == 0.0
    assert g_recall(x, x[:3], k=3) == 0.0  # fewer than k + 1 generations
    assert g_recall(x, x[:4], k=3) > 0.0


def test_frechet_distance_identical_and_far():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 4))
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-6)
    # Shifting by 10 in every one of 4 dimensions adds 4 * 100 to the mean term only.
    assert frechet_distance(x, x + 10.0) == pytest.approx(400.0, rel=1e-6)


def test_frechet_distance_matches_closed_form_for_diagonal_covariances():
    rng = np.random.default_rng(2)
    a = rng.normal(loc=[0.0, 1.0, -2.0], scale=[1.0, 2.0, 0.5], size=(500, 3))
    b = rng.normal(loc=[1.0, 1.0, 0.0], scale=[3.0, 1.0, 0.5], size=(400, 3))
    mu_a, mu_b = a.mean(0), b.mean(0)
    # Sample covariances are not exactly diagonal, so use the full matrices' closed form with
    # eigen-decomposition square roots: Tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2).
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(s1)
    s1_half = v @ np.diag(np.sqrt(w)) @ v.T
    w2, _ = np.linalg.eigh(s1_half @ s2 @ s1_half)
    expected = ((mu_a - mu_b) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(w2).sum()
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-8)
    # And exactly diagonal statistics: ||mu1-mu2||^2 + sum (s1 + s2 - 2 sqrt(s1 s2)).
    d1, d2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    # Four points per axis at mean +- sqrt(var * 3 / 4) * [1, 1, -1, -1] patterns give exact sample stats.
    signs = np.array([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]], dtype=float)
    pa = np.array([0.0, 1.0, -2.0]) + signs * np.sqrt(d1 * 3 / 4)
    pb = np.array([1.0, 1.0, 0.0]) + signs * np.sqrt(d2 * 3 / 4)
    np.testing.assert_allclose(np.cov(pa, rowvar=False), np.diag(d1), atol=1e-12)
    closed = 1.0 + 0.0 + 4.0 + ((d1 + d2 - 2 * np.sqrt(d1 * d2))).sum()  # = 5 + 4 + 1 + 0 = 10
    assert closed == pytest.approx(10.0)
    assert frechet_distance(pa, pb) == pytest.approx(closed, abs=1e-8)


def test_frechet_distance_singular_covariance_is_finite():
    # 3 samples in 5 dimensions: rank-2 covariances.
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(3, 5)), rng.normal(size=(3, 5))
    fd = frechet_distance(a, b)
    assert np.isfinite(fd) and fd > 0
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-4)
    with pytest.raises(ValueError, match=">= 2 samples per set"):
        frechet_distance(a[:1], b)


def test_dino_score():
    v = np.array([[3.0, 4.0]])
    assert dino_score(v, v) == pytest.approx(1.0)
    assert dino_score(v, -v) == pytest.approx(-1.0)
    gen = np.array([[1.0, 0.0], [0.0, 2.0]])
    real = np.array([[1.0, 1.0], [5.0, 0.0]])
    # cosines: (1,0).(1,1)/sqrt2 = .7071, (1,0).(1,0) = 1, (0,1).(1,1)/sqrt2 = .7071, (0,1).(1,0) = 0
    assert dino_score(gen, real) == pytest.approx((2 / math.sqrt(2) + 1) / 4)


def _hand_built_case():
    """Three classes on a line: many-shot 'A' (30), medium 'B' (10), few 'C' (2)."""
    gen_feats, subjects_gen, pred_gen, real_feats, real_subjects = [], [], [], [], []
    # A at x ~ 0: 4 generations, all correct, at 0, 1, 2, 3; reals at 0.5, 1.5, 50 -> gRecall 2/3 (k=1 radii 1).
    for x in (0.0, 1.0, 2.0, 3.0):
        gen_feats.append([x, 1.0]); subjects_gen.append("A"); pred_gen.append("A")
    for x in (0.5, 1.5, 50.0):
        real_feats.append([x, 1.0]); real_subjects.append("A")
    # B: 4 generations, 3 correct (at 10, 11, 12) and one predicted 'A' (at 100) -> accuracy .75;
    # reals at 10.5 and 11.9 -> gRecall 1.
    for x, p in ((10.0, "B"), (11.0, "B"), (12.0, "B"), (100.0, "A")):
        gen_feats.append([x, 1.0]); subjects_gen.append("B"); pred_gen.append(p)
    for x in (10.5, 11.9):
        real_feats.append([x, 1.0]); real_subjects.append("B")
    # C: 2 generations, 1 correct -> accuracy .5, gRecall 0 (fewer than k+1 correct).
    for x, p in ((20.0, "C"), (21.0, "B")):
        gen_feats.append([x, 1.0]); subjects_gen.append("C"); pred_gen.append(p)
    real_feats.append([20.0, 1.0]); real_subjects.append("C")
    return dict(
        subjects_gen=subjects_gen, pred_gen=pred_gen, gen_feats=np.array(gen_feats),
        real_subjects=real_subjects, real_feats=np.array(real_feats),
        train_counts={"C": 2, "A": 30, "B": 10, "unused": 7},
    )


def test_per_class_table_on_hand_built_case():
    case = _hand_built_case()
    attr_target = {"smiling": np.array([1, 0, 1, 0, 1, 1, 1, 1, 0, 0])}
    attr_pred = {"smiling": np.array([1, 0, 0, 0, 1, 1, 0, 0, 0, 1])}
    table = per_class_table(**case, k=1, attr_pred=attr_pred, attr_target=attr_target)
    assert list(table.columns) == [
        "subject", "train_count", "shot", "accuracy", "gRecall", "dino", "attr_smiling_acc", "n_gen",
    ]
    assert list(table["subject"]) == ["A", "B", "C"]  # by train count, unused class left out
    assert list(table["shot"]) == ["many", "medium", "few"]
    np.testing.assert_allclose(table["accuracy"], [1.0, 0.75, 0.5])
    np.testing.assert_allclose(table["gRecall"], [2 / 3, 1.0, 0.0])
    np.testing.assert_allclose(table["attr_smiling_acc"], [0.75, 0.5, 0.5])
    assert list(table["n_gen"]) == [4, 4, 2]
    feats = case["gen_feats"]
    expected_dino_c = dino_score(feats[8:10], np.array([[20.0, 1.0]]))
    assert table.loc[2, "dino"] == pytest.approx(expected_dino_c)
    moved = per_class_table(**case, k=1, config=DataConfig(many_shot_above=9, few_shot_below=3))
    assert list(moved["shot"]) == ["many", "many", "few"]


def test_per_class_table_rejects_bad_inputs():
    case = _hand_built_case()
    with pytest.raises(ValueError, match="subjects without a train count: \\['A'\\]"):
        per_class_table(**{**case, "train_counts": {"B": 10, "C": 2}})
    with pytest.raises(ValueError, match="subjects_gen has 10 entries but pred_gen has 9"):
        per_class_table(**{**case, "pred_gen": case["pred_gen"][:-1]})
    with pytest.raises(ValueError, match="attr_target lacks attribute"):
        per_class_table(**case, attr_pred={"glasses": np.zeros(10, int)})


def test_summarise_bucket_means_and_fd():
    case = _hand_built_case()
    table = per_class_table(**case, k=1)
    summary = summarise(table)
    assert list(summary.index) == ["all", "many", "medium", "few"]
    assert summary.loc["all", "accuracy"] == pytest.approx((1.0 + 0.75 + 0.5) / 3)
    assert summary.loc["all", "gRecall"] == pytest.approx((2 / 3 + 1.0 + 0.0) / 3)
    assert summary.loc["many", "accuracy"] == 1.0
    assert summary.loc["medium", "accuracy"] == 0.75
    assert summary.loc["few", "gRecall"] == 0.0
    assert list(summary["n_classes"]) == [3, 1, 1, 1]
    assert list(summary["n_gen"]) == [10, 4, 4, 2]
    assert summary["FD"].isna().all()

    # Two few-shot classes: the bucket mean is the class average, not the generation average.
    extra = pd.DataFrame([{"subject": "D", "train_count": 3, "shot": "few", "accuracy": 0.0,
                           "gRecall": 1.0, "dino": 0.0, "n_gen": 8}])
    summary2 = summarise(pd.concat([table, extra], ignore_index=True))
    assert summary2.loc["few", "accuracy"] == pytest.approx(0.25)
    assert summary2.loc["few", "gRecall"] == pytest.approx(0.5)

    g, r = case["gen_feats"], case["real_feats"]
    s_all = summarise(table, gen_feats_all=g, real_feats_all=r)
    assert s_all.loc["all", "FD"] == pytest.approx(frechet_distance(g, r))
    assert s_all.loc[["many", "medium", "few"], "FD"].isna().all()

    per_bucket = summarise(table, gen_feats_all=g, real_feats_all=r,
                           gen_subjects_all=case["subjects_gen"], real_subjects_all=case["real_subjects"])
    assert per_bucket.loc["many", "FD"] == pytest.approx(frechet_distance(g[:4], r[:3]))
    assert per_bucket.loc["medium", "FD"] == pytest.approx(frechet_distance(g[4:8], r[3:5]))
    assert math.isnan(per_bucket.loc["few", "FD"])  # one real image: no covariance
    assert per_bucket.loc["all", "FD"] == pytest.approx(frechet_distance(g, r))


def test_accuracy_vs_frequency_figure(tmp_path):
    table = per_class_table(**_hand_built_case(), k=1)
    other = table.assign(accuracy=[0.9, 0.9, 0.9])
    fig = accuracy_vs_frequency_figure({"baseline": table, "pogdiff": other}, tmp_path / "acc.png")
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["baseline", "pogdiff"]
    np.testing.assert_allclose(ax.lines[0].get_xdata(), [2, 10, 30])
    np.testing.assert_allclose(ax.lines[0].get_ydata(), [0.5, 0.75, 1.0])
    assert (tmp_path / "acc.png").stat().st_size > 0


def test_paired_ratios_by_hand():
    from pogdiff.evaluation.comparison import paired_ratios

    assert paired_ratios([0.3, 0.2, 0.0, 0.1], [0.2, 0.4, 0.0, 0.0]) == [pytest.approx(1.5), 0.5, pytest.approx(float("nan"), nan_ok=True), float("inf")]
    with pytest.raises(ValueError, match="as many treated as control"):
        paired_ratios([1.0], [1.0, 2.0])


def test_bootstrap_ratio_ci_matches_the_exact_resampling_distribution():
    """Two classes: the 4 equally likely resamples give ratios 1.5 (x,x), 1.25 (y,y) and 8/6 (x,y twice)."""
    from pogdiff.evaluation.comparison import bootstrap_ratio_ci

    ratio, low, high = bootstrap_ratio_ci([0.3, 0.5], [0.2, 0.4], n_boot=20_000, level=0.9, seed=1)
    assert ratio == pytest.approx(0.8 / 0.6)
    # exact distribution: P(1.25) = P(1.5) = 1/4, P(4/3) = 1/2 -> 5% and 95% quantiles are 1.25 and 1.5
    assert low == pytest.approx(1.25) and high == pytest.approx(1.5)
    same = bootstrap_ratio_ci([0.2, 0.2, 0.2], [0.1, 0.1, 0.1])
    assert same == (pytest.approx(2.0), pytest.approx(2.0), pytest.approx(2.0))
    nan_ratio, lo, hi = bootstrap_ratio_ci([0.1, 0.2], [0.0, 0.0])
    assert np.isnan(nan_ratio) and np.isnan(lo) and np.isnan(hi)
    with pytest.raises(ValueError, match="equal-length"):
        bootstrap_ratio_ci([0.1], [0.1, 0.2])


def test_hierarchical_interval_with_one_seed_is_the_class_bootstrap():
    from pogdiff.evaluation.comparison import bootstrap_ratio_ci, hierarchical_ratio_ci

    rng = np.random.default_rng(3)
    a, b = rng.uniform(0.2, 1.0, 12), rng.uniform(0.2, 1.0, 12)
    assert hierarchical_ratio_ci(a[None], b[None], seed=4) == bootstrap_ratio_ci(a, b, seed=4)
    # identical seeds add nothing either: every seed row equal gives the class bootstrap again
    assert hierarchical_ratio_ci(np.tile(a, (3, 1)), np.tile(b, (3, 1)), seed=4) == pytest.approx(
        bootstrap_ratio_ci(a, b, seed=4))


def test_hierarchical_interval_matches_enumerating_every_seed_and_class_resample():
    """2 seeds x 2 classes: 4 seed draws x 4 class draws, all equally likely; the exact 5% and 95%
    quantiles of the ratio come from that enumeration."""
    from pogdiff.evaluation.comparison import hierarchical_ratio_ci

    a = np.array([[0.9, 0.3], [0.5, 0.1]])
    b = np.array([[0.6, 0.2], [0.5, 0.3]])
    ratios = sorted(a[np.ix_(s, c)].mean() / b[np.ix_(s, c)].mean()
                    for s in itertools.product(range(2), repeat=2) for c in itertools.product(range(2), repeat=2))
    ratio, low, high = hierarchical_ratio_ci(a, b, n_boot=40_000, level=0.9, seed=2)
    assert ratio == pytest.approx(a.mean() / b.mean())
    # 16 atoms of 1/16: the 5% quantile lies on the 1st atom, the 95% one on the 16th
    assert low == pytest.approx(ratios[0], abs=0.02) and high == pytest.approx(ratios[-1], abs=0.02)


def test_hierarchical_interval_sees_a_seed_spread_the_class_bootstrap_hides():
    from pogdiff.evaluation.comparison import bootstrap_ratio_ci, hierarchical_ratio_ci

    # every class moves together with the seed: seed 0 favours a, seed 1 favours b
    a = np.array([[0.8] * 6, [0.4] * 6])
    b = np.array([[0.4] * 6, [0.8] * 6])
    _, lo_c, hi_c = bootstrap_ratio_ci(a.mean(0), b.mean(0))
    _, lo_h, hi_h = hierarchical_ratio_ci(a, b)
    assert lo_c == hi_c == pytest.approx(1.0)  # classes alone: no spread at all
    assert lo_h == pytest.approx(0.5) and hi_h == pytest.approx(2.0)  # seeds (0,0) and (1,1)
    with pytest.raises(ValueError, match="seeds x classes"):
        hierarchical_ratio_ci(a[0], b[0])
