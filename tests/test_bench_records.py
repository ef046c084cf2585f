"""bench combine (pogdiff/bench/records.py): records of several bench quality runs put together."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from pogdiff.bench.records import combine, parse_source

REPO = Path(__file__).resolve().parent.parent
RECORDS = REPO / "results" / "quality" / "records" / "round3"  # the previous round's records, kept as made


def _split(tmp_path: Path, name: str, keep) -> Path:
    """A bench quality output folder holding only the committed demo records that ``keep`` selects."""
    folder = tmp_path / name
    (folder / "demo").mkdir(parents=True)
    shutil.copy(RECORDS / "summary.json", folder / "summary.json")
    for csv in ("summary_all_seeds.csv", "per_class_all_seeds.csv"):
        frame = pd.read_csv(RECORDS / "demo" / csv)
        frame[keep(frame)].to_csv(folder / "demo" / csv, index=False)
    return folder


def test_records_split_by_seed_combine_to_the_summary_of_all_of_them(tmp_path):
    one = _split(tmp_path, "seed0", lambda f: f["seed"] == 0)
    two = _split(tmp_path, "seed1", lambda f: f["seed"] == 1)
    both = combine(sources=[str(one), str(two)], data="demo", out=tmp_path / "out", steps=1000,
                   compared=("pogdiff", "pogdiff_no_pog"))
    whole = json.loads((RECORDS / "summary.json").read_text())["demo"]
    for method, metrics in whole["methods"].items():
        assert {k: v for k, v in both["methods"][method].items() if k in metrics and k != "seed_to_seed_shift"} == \
               {k: v for k, v in metrics.items() if k != "seed_to_seed_shift"}
    few = both["comparisons"]["pogdiff_vs_pogdiff_no_pog"]["few"]
    assert few["ratio_of_means"] == whole["comparisons"]["pogdiff_vs_pogdiff_no_pog"]["few"]["ratio_of_means"]
    assert few["paired_seeds"] == [0, 1] and len(few["hierarchical_ci95"]) == 2
    assert both["seeds_for"]["baseline"] == [0] and both["sources"] == [str(one), str(two)]
    written = json.loads((tmp_path / "out" / "summary.json").read_text())["demo"]
    assert written["comparisons"].keys() == both["comparisons"].keys()


def test_a_renamed_recipe_is_compared_as_its_own_recipe(tmp_path):
    main = _split(tmp_path, "main", lambda f: f["method"] != "pogdiff")
    variant = _split(tmp_path, "variant", lambda f: f["method"] == "pogdiff")
    block = combine(sources=[str(main), f"{variant}:pogdiff=pogdiff_variant"], data="demo", out=tmp_path / "out",
                    steps=1000, compared=("pogdiff_variant", "pogdiff_no_pog"))
    assert "pogdiff" not in block["methods"] and "pogdiff_variant_vs_pogdiff_no_pog" in block["comparisons"]
    assert block["recipes"]["pogdiff_variant"] == ["method=pogdiff"]
    assert "pogdiff_no_pog_vs_pogdiff_variant" not in block["comparisons"]  # each pair once


def test_two_different_records_of_one_run_are_refused(tmp_path):
    one = _split(tmp_path, "a", lambda f: f["seed"] == 0)
    two = _split(tmp_path, "b", lambda f: f["seed"] == 0)
    frame = pd.read_csv(two / "demo" / "per_class_all_seeds.csv")
    frame.loc[0, "accuracy"] = 1.0 - frame.loc[0, "accuracy"]
    frame.to_csv(two / "demo" / "per_class_all_seeds.csv", index=False)
    with pytest.raises(ValueError, match="two different class records"):
        combine(sources=[str(one), str(two)], data="demo", out=tmp_path / "out", steps=1000, compared=("pogdiff",))


def test_another_protocol_and_bad_sources_are_refused_in_words(tmp_path):
    one = _split(tmp_path, "a", lambda f: f["seed"] == 0)
    two = _split(tmp_path, "b", lambda f: f["seed"] == 1)
    summary = json.loads((two / "summary.json").read_text())
    summary["demo"]["batch_size"] = 32
    (two / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(ValueError, match="another protocol"):
        combine(sources=[str(one), str(two)], data="demo", out=tmp_path / "out", steps=1000, compared=("pogdiff",))
    with pytest.raises(ValueError, match="holds no records"):
        combine(sources=[str(tmp_path / "none")], data="demo", out=tmp_path / "out", steps=1000, compared=())
    with pytest.raises(ValueError, match="no records of recipe"):
        combine(sources=[f"{one}:t2h=x"], data="demo", out=tmp_path / "out", steps=1000, compared=())
    with pytest.raises(ValueError, match="DIR:RECIPE=NEW_NAME"):
        parse_source("out:pogdiff")


def test_tune_chooses_on_the_validation_split_and_scores_the_choice_on_the_evaluation_split(tmp_path):
    from pogdiff.bench import tune

    record = tune.tune(data="demo", recipe="cbdm", knob="cbdm_tau", values=[0.1, 1.0], out=tmp_path, quick=True)
    assert set(record["validation"]) == {"0.1", "1"} and record["chosen"] in record["validation"]
    best = max(v["all"] for v in record["validation"].values())
    assert record["validation"][record["chosen"]]["all"] == best
    chosen = tmp_path / f"cbdm-cbdm_tau-{record['chosen']}"
    summary = json.loads((chosen / "summary.json").read_text())["demo"]
    assert summary["split"] == "eval" and summary["overrides"] == [f"cbdm_tau={record['chosen']}"]
    other = tmp_path / f"cbdm-cbdm_tau-{'1' if record['chosen'] == '0.1' else '0.1'}"
    assert json.loads((other / "summary.json").read_text())["demo"]["split"] == "val"
    saved = json.loads((tmp_path / "tuning.json").read_text())["demo"]["cbdm"]
    assert saved == record
    # validation records never mix with evaluation records
    with pytest.raises(ValueError, match="another protocol"):
        combine(sources=[str(chosen), str(other)], data="demo", out=tmp_path / "mix", steps=2, compared=())


def test_choose_takes_the_best_class_mean_accuracy_and_the_first_of_equals():
    from pogdiff.bench.tune import choose

    assert choose({"0.01": {"all": 0.4, "few": 0.9}, "0.1": {"all": 0.6, "few": 0.1}}) == "0.1"
    assert choose({"1": {"all": 0.5}, "2": {"all": 0.5}}) == "1"
    with pytest.raises(ValueError, match="no value"):
        choose({})
