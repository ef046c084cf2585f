"""The Data tab's verdict on a set's own balancing (pogdiff/ui/balance_views.py): shares per class
under the set's repeats, plain and tempered batches, and a note whose figures come from summary.json."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from pogdiff.config import DataConfig
from pogdiff.constants import QUALITY_SUMMARY
from pogdiff.data import load_image_text_set
from pogdiff.ui.balance_views import (
    balance_frame,
    effective_alpha,
    measured,
    parse_loss_weights,
    verdict_markdown,
)
from tests.test_trainer_configs import SHAPES, kohya_tree


@pytest.fixture(scope="module")
def kohya_set(tmp_path_factory):
    return load_image_text_set(kohya_tree(tmp_path_factory.mktemp("kohya")), DataConfig())


def test_the_table_gives_each_class_its_repeats_and_three_shares(kohya_set):
    frame = balance_frame(kohya_set, {"gold moon": 2.0})
    assert list(frame["class"]) == ["red circle", "blue square", "green star", "gold moon"]  # most images first
    row = frame.set_index("class").loc["gold moon"]
    total = sum(n * r for n, r in SHAPES.values())
    n_all = sum(n for n, _ in SHAPES.values())
    sqrt_all = sum(n ** 0.5 for n, _ in SHAPES.values())
    assert (row["images"], row["repeats"], row["loss weight"], row["draws per epoch"]) == (2, "13", 2.0, 26.0)
    assert row["your repeats %"] == pytest.approx(round(100 * 26 / total, 1))
    assert row["plain %"] == pytest.approx(round(100 * 2 / n_all, 1))
    assert row["tempered default %"] == pytest.approx(round(100 * 2 ** 0.5 / sqrt_all, 1))
    assert frame["your repeats %"].sum() == pytest.approx(100, abs=0.2)


def test_a_set_without_repeats_has_no_share_of_its_own(small_demo):
    ds = load_image_text_set(small_demo / "train", DataConfig())
    frame = balance_frame(ds)
    assert frame["your repeats %"].isna().all() and (frame["repeats"] == "").all()
    assert "says nothing about how often" in verdict_markdown(ds, None)


def test_effective_alpha_recovers_the_exponent():
    counts = [100, 20, 5, 2]
    for alpha in (0.0, 0.5, 1.0, -0.5):
        shares = [n ** alpha for n in counts]
        total = sum(shares)
        assert effective_alpha(counts, [s / total for s in shares]) == pytest.approx(alpha)
    assert effective_alpha([3, 3], [0.5, 0.5]) is None


def test_the_note_quotes_summary_json_and_nothing_written_in_code(kohya_set, tmp_path):
    fake = {"setA": {"comparisons": {"pogdiff_no_pog_vs_resample": {
        "few": {"ratio_of_means": 1.234, "bootstrap_ci95": [1.111, 1.357]},
        "many": {"ratio_of_means": 0.987, "bootstrap_ci95": [0.9, 1.05]}}}}}
    note = verdict_markdown(kohya_set, fake)
    # The shapes' repeats over-balance (gold moon 46% of draws with 2 images): nearest measured is class-uniform.
    assert "more* often than frequent ones" in note and "class-uniform resampling" in note
    assert "few-shot 1.23x [1.11, 1.36], many-shot 0.99x [0.90, 1.05] on setA" in note
    assert "No quality benchmark results" in verdict_markdown(kohya_set, None)
    real = json.loads(QUALITY_SUMMARY.read_text()) if QUALITY_SUMMARY.exists() else None
    if real:
        for figure in measured(real, "pogdiff_no_pog_vs_resample"):
            assert figure in verdict_markdown(kohya_set, real)


def test_edited_loss_weights_are_read_and_bad_ones_refused_in_words():
    frame = pd.DataFrame({"class": ["a", "b", "c"], "loss weight": [1.0, "2.5", 1]})
    assert parse_loss_weights(frame, ["a", "b", "c"]) == {"b": 2.5}
    with pytest.raises(ValueError, match=r"row 2 \(b\): loss weight 'x' must be a number above 0"):
        parse_loss_weights(pd.DataFrame({"class": ["a", "b"], "loss weight": [1, "x"]}), ["a", "b"])
    with pytest.raises(ValueError, match="row 1: the set has no class 'zzz'"):
        parse_loss_weights(pd.DataFrame({"class": ["zzz"], "loss weight": [2]}), ["a"])
    with pytest.raises(ValueError, match="must be a number above 0"):
        parse_loss_weights([{"class": "a", "loss weight": 0}], ["a"])
