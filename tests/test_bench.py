"""Benchmarks: the quality pipeline runs end to end at its quick size; aggregation is exact."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from pogdiff.bench import quality as bench
from pogdiff.bench import report, summary
from pogdiff.config import TrainConfig

needs_shipped = pytest.mark.skipif(
    not (bench.EVALUATOR_DIR / "evaluator.json").exists(), reason="checkpoints/evaluator is not built"
)


def test_aggregate_gives_mean_and_sample_std_over_seeds():
    long = pd.DataFrame({
        "method": ["a", "a", "a", "b"], "bucket": ["few"] * 4, "seed": [0, 1, 2, 0],
        "accuracy": [0.2, 0.4, 0.6, 1.0],
    })
    res = summary.aggregate(long).set_index("method")
    assert res.loc["a", "accuracy_mean"] == pytest.approx(0.4)
    assert res.loc["a", "accuracy_std"] == pytest.approx(0.2)
    assert res.loc["b", "accuracy_std"] == 0.0
    assert res.loc["a", "n_seeds"] == 3


def test_overrides_are_typed_after_the_field_and_unknown_fields_are_refused():
    cfg = bench._apply_overrides(TrainConfig(), ["psi.psi_max=2.5", "psi.pool=all", "batch_size=8",
                                                 "balanced_sampling=true"])
    assert cfg.psi.psi_max == 2.5 and cfg.psi.pool == "all" and cfg.batch_size == 8
    assert cfg.balanced_sampling is True
    with pytest.raises(ValueError, match="unknown field 'psi.nope'"):
        bench._apply_overrides(TrainConfig(), ["psi.nope=1"])


@needs_shipped
def test_quality_benchmark_runs_end_to_end_at_quick_size(tmp_path):
    report = bench.quality(out=tmp_path, methods=["baseline", "pogdiff"], seeds=[0], quick=True, batch_size=4,
                           budgets=[1])
    assert set(report["method"]) == {"baseline", "pogdiff"}
    acc = report["accuracy_mean"].dropna()  # buckets without classes in the quick subset are NaN
    assert len(acc) >= 2 and ((acc >= 0) & (acc <= 1)).all()
    folder = tmp_path / "demo"
    for name in ("results.md", "results.csv", "results.json", "accuracy_vs_frequency.png", "summary_all_seeds.csv",
                 "per_class_all_seeds.csv"):
        assert (folder / name).exists(), name
    rows = json.loads((folder / "results.json").read_text())
    assert {r["bucket"] for r in rows} >= {"all"}
    assert "| baseline |" in (folder / "results.md").read_text()
    summary = json.loads((tmp_path / "summary.json").read_text())["demo"]
    assert summary["steps"] == bench.QUICK_STEPS and summary["seeds"] == [0]
    assert set(summary["methods"]) == {"baseline", "pogdiff"}
    for name in ("few_acc", "medium_acc", "many_acc", "few_grecall", "few_copy", "all_copy", "all_coverage"):
        assert len(summary["methods"]["pogdiff"][name]) == 1
    assert summary["methods"]["pogdiff"]["all_copy"][0] is not None
    # Paired generations of two recipes (same captions and seeds) move apart by a measured amount.
    shift = [c.get("generation_shift") for c in summary["comparisons"]["pogdiff_vs_baseline"].values()]
    assert any(v is not None and v > 0 for v in shift)
    assert set(summary["comparisons"]["pogdiff_vs_baseline"]) == {"few", "medium", "many"}
    assert summary["recipes"]["pogdiff"] == bench.RECIPES["pogdiff"] and summary["budgets"] == [1, bench.QUICK_STEPS]
    # The budget curve: both budgets of the one run per recipe, each with its own block.
    curve = json.loads((tmp_path / "budget.json").read_text())["demo"]
    assert curve["budgets"] == [1, 2] and set(curve["by_budget"]) == {"1", "2"}
    assert curve["by_budget"]["2"]["methods"] == summary["methods"]
    runs = tmp_path / "demo" / "runs" / "pogdiff-seed0"
    assert (runs / "checkpoint-000001").is_dir() and (runs / "checkpoint-000002").is_dir()
    assert (runs / "eval-000001" / "per_class.csv").is_file() and (folder / "budget.png").is_file()
    # A second call reads the finished runs back instead of training and sampling again.
    again = bench.quality(out=tmp_path, methods=["baseline", "pogdiff"], seeds=[0], quick=True, batch_size=4,
                          budgets=[1])
    pd.testing.assert_frame_equal(report, again, check_dtype=False, rtol=1e-6)
    # A run folder that holds other settings is refused, not mixed in.
    with pytest.raises(ValueError, match="holds a run with other settings"):
        bench.quality(out=tmp_path, methods=["baseline", "pogdiff"], seeds=[0], quick=True, batch_size=4,
                      budgets=[1], overrides=["learning_rate=0.001"])


def test_summary_entry_holds_per_seed_values_and_paired_comparisons():
    long = pd.DataFrame([
        {"method": m, "seed": s, "bucket": b, "accuracy": acc, "gRecall": 0.5, "FD": 0.1}
        for m, accs in {"baseline": [0.2, 0.4], "pogdiff": [0.3, 0.5]}.items()
        for s, acc in zip([0, 1], accs) for b in ("all", "many", "medium", "few")
    ])
    classes = pd.DataFrame([
        {"method": m, "seed": s, "subject": c, "shot": "few", "accuracy": acc}
        for m, table in {"baseline": {"x": 0.2, "y": 0.4}, "pogdiff": {"x": 0.3, "y": 0.5}}.items()
        for s in (0, 1) for c, acc in table.items()
    ])
    entry = summary.summary_entry(long, classes, steps=10, seeds=[0, 1], batch_size=4, n_eval_captions=8, overrides=[])
    assert entry["methods"]["pogdiff"]["few_acc"] == [0.3, 0.5]
    few = entry["comparisons"]["pogdiff_vs_baseline"]["few"]
    assert few["paired_ratio"] == [pytest.approx(1.5), pytest.approx(1.25)]
    assert few["every_seed_above_1"] is True and few["mean_difference"] == pytest.approx(0.1)
    assert few["ratio_of_means"] == pytest.approx(0.8 / 0.6) and few["n_classes"] == 2
    low, high = few["bootstrap_ci95"]
    assert 1.25 - 1e-9 <= low <= few["ratio_of_means"] <= high <= 1.5 + 1e-9
    assert few["ci_half_width_relative"] == pytest.approx((high - low) / (2 * few["ratio_of_means"]))


def test_speed_benchmark_reports_every_configuration_relative_to_baseline():
    table = bench.speed(steps=1, warmup=0, batch_size=4, repeats=1)
    assert len(table) == 7 and table["configuration"].is_unique and (table["s_per_step"] > 0).all()
    # each ratio is the configuration's own time over the plain step's; the table rounds times to
    # 0.1 ms and ratios to 0.001, so they agree within what that rounding can move
    base = float(table.loc[table["configuration"] == "baseline (plain loss)", "s_per_step"].iloc[0])
    for _, row in table.iterrows():
        ratio = row["s_per_step"] / base
        assert row["ratio_to_baseline"] == pytest.approx(ratio, abs=5e-5 * (1 + ratio) / base + 5e-4 + 1e-9)
    naive = table[table["configuration"].str.startswith("pogdiff naive")]
    assert float(naive["rows_with_neighbour_pass"].iloc[0]) == 1.0
    capped = table[table["configuration"].str.contains("quarter")]
    assert float(capped["rows_with_neighbour_pass"].iloc[0]) <= 0.25  # 1 row of 4 at most
    t2h = table[table["configuration"].str.startswith("t2h")]
    assert float(t2h["rows_with_neighbour_pass"].iloc[0]) == 0.0


def test_summary_markdown_lists_methods_and_comparisons():
    summary = {"demo": {"steps": 10, "batch_size": 4, "seeds": [0, 1],
                        "methods": {"baseline": {"few_acc": [0.2, 0.4]}, "pogdiff": {"few_acc": [0.3, 0.5]}},
                        "comparisons": {"pogdiff_vs_baseline": {"few": {
                            "paired_ratio": [1.5, 1.25], "every_seed_above_1": True, "ratio_of_means": 1.333,
                            "bootstrap_ci95": [1.25, 1.5]}}}}}
    text = report.summary_markdown(summary)
    curve = {"demo": {"budgets": [10, 20], "seeds": [0, 1], "by_budget": {
        "10": summary["demo"], "20": {"methods": {"baseline": {"few_acc": [0.4, 0.6]}}}}}}
    table = report.budget_markdown(curve)
    assert "| baseline | few_acc | 0.300 ± 0.141 | 0.500 ± 0.141 |" in table
    assert "| baseline | 0.300 ± 0.141 |" in text
    assert "| pogdiff vs baseline | few | 1.50, 1.25 | 1.33 [1.25, 1.50] | — | — | yes | — | — |" in text


def test_target_checks_judge_each_target_from_the_summary_block():
    block = {"methods": {"pogdiff": {"few_copy": [0.1, 0.1], "many_acc": [0.95, 0.97]},
                         "resample": {"few_copy": [0.3, 0.2]}, "baseline": {"many_acc": [0.98, 0.98]},
                         "pogdiff_no_pog": {}},
             "comparisons": {"pogdiff_vs_baseline": {"few": {"ratio_of_means": 1.6, "bootstrap_ci95": [1.2, 2.0]}},
                             "pogdiff_vs_resample": {"few": {"ratio_of_means": 1.1, "bootstrap_ci95": [0.9, 1.3]}},
                             "pogdiff_vs_pogdiff_no_pog": {"few": {"ratio_of_means": 0.9,
                                                                    "bootstrap_ci95": [0.8, 0.95]}}}}
    checks = {c["target"]: c["met"] for c in report.target_checks(block)}
    assert checks["few-shot acc >= 1.5x plain"] is True
    assert checks["few-shot acc above resample"] is False  # interval reaches below 1
    assert checks["few-shot acc above cbdm"] is None  # not run
    assert checks["few-shot copy rate below resample's"] is True
    assert checks["many-shot acc within 2 points of plain"] is True  # 0.96 vs 0.98
    pog = "PoG term's own effect: few-shot >= 1.05x the same recipe without it, interval (seeds and classes) above 1"
    assert checks[pog] is False  # 0.9x, for the worse
    assert checks["few-shot acc at least T2H's"] is None  # not run
    block["comparisons"]["pogdiff_vs_pogdiff_no_pog"]["few"] = {"ratio_of_means": 1.08, "bootstrap_ci95": [1.02, 1.1],
                                                               "hierarchical_ci95": [0.97, 1.2]}
    block["comparisons"]["pogdiff_vs_t2h"] = {"few": {"ratio_of_means": 1.01}}
    checks = {c["target"]: c["met"] for c in report.target_checks(block)}
    assert checks[pog] is False  # above 1.05, but the interval over seeds and classes reaches below 1
    assert checks["few-shot acc at least T2H's"] is True
    block["comparisons"]["pogdiff_vs_pogdiff_no_pog"]["few"]["hierarchical_ci95"] = [1.01, 1.2]
    assert {c["target"]: c["met"] for c in report.target_checks(block)}[pog] is True


def test_generation_shift_is_the_rms_pixel_difference_of_paired_images():
    import numpy as np

    a = np.zeros((2, 2, 2, 3), np.uint8)
    b = a.copy()
    b[1] = 255  # second pair differs by 1.0 everywhere
    np.testing.assert_allclose(summary.generation_shift(a, b), [0.0, 1.0])
    with pytest.raises(ValueError, match="differ in shape"):
        summary.generation_shift(a, b[:1])


def test_a_recipe_with_fewer_seeds_is_compared_on_the_seeds_both_have():
    long = pd.DataFrame([
        {"method": m, "seed": s, "bucket": "few", "accuracy": acc}
        for m, accs in {"baseline": {0: 0.2, 1: 0.4}, "pogdiff": {0: 0.3}}.items() for s, acc in accs.items()
    ])
    classes = pd.DataFrame([
        {"method": m, "seed": s, "subject": c, "shot": "few", "accuracy": acc}
        for m, per_seed in {"baseline": {0: {"x": 0.2, "y": 0.2}, 1: {"x": 0.9, "y": 0.9}},
                            "pogdiff": {0: {"x": 0.3, "y": 0.3}}}.items()
        for s, table in per_seed.items() for c, acc in table.items()
    ])
    entry = summary.summary_entry(long, classes, steps=10, seeds=[0, 1], batch_size=4, n_eval_captions=8, overrides=[])
    assert entry["methods"]["pogdiff"]["few_acc"] == [0.3, None]
    few = entry["comparisons"]["pogdiff_vs_baseline"]["few"]
    assert few["paired_seeds"] == [0] and few["paired_ratio"] == [pytest.approx(1.5)]
    assert few["ratio_of_means"] == pytest.approx(1.5)  # seed 1 of the baseline is left out
    assert bench._seeds_for(["cbdm=0", "resample=0,1"]) == {"cbdm": [0], "resample": [0, 1]}
    with pytest.raises(ValueError, match="write RECIPE=SEED"):
        bench._seeds_for(["cbdm"])
