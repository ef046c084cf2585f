"""A run's balance back to kohya_ss and OneTrainer (pogdiff/runs/trainer_export.py): whole
num_repeats whose shares come back when the file is read again."""

from __future__ import annotations

import dataclasses
import json
import tomllib

import pytest

from pogdiff.config import DataConfig, TrainConfig
from pogdiff.data import load_image_text_set
from pogdiff.runs.trainer_export import class_folders, export_rows, kohya_dataset_config, onetrainer_concepts
from pogdiff.training.balance import kohya_repeats, run_class_shares, with_data_weights
from tests.test_trainer_configs import SHAPES, kohya_tree


@pytest.fixture(scope="module")
def kohya_set(tmp_path_factory):
    root = kohya_tree(tmp_path_factory.mktemp("kohya"))
    return root, load_image_text_set(root, DataConfig())


def _shares(ds) -> dict[str, float]:
    return {c: e["share"] for c, e in ds.class_weights.items()}


def test_a_from_data_run_exports_the_sets_own_repeats_and_reads_back_the_same(kohya_set):
    root, ds = kohya_set
    cfg = with_data_weights(TrainConfig(method="baseline", balance="from-data"), ds)
    text = kohya_dataset_config(ds, cfg, run="mine")
    doc = tomllib.loads(text)
    subsets = {s["class_tokens"]: s for s in doc["datasets"][0]["subsets"]}
    assert {c: s["num_repeats"] for c, s in subsets.items()} == {c: r for c, (_, r) in SHAPES.items()}
    # the loader reads the tree from its one top folder (img/), so the folders are named from there
    assert subsets["gold moon"]["image_dir"] == "13_gold moon" and "from run mine" in text
    (root / "img" / "dataset_config.toml").write_text(text)
    try:
        back = load_image_text_set(root, DataConfig())
    finally:
        (root / "img" / "dataset_config.toml").unlink()
    assert back.trainer_config == "kohya_toml" and _shares(back) == pytest.approx(_shares(ds))


def test_the_tempered_default_becomes_whole_repeats_within_five_percent(kohya_set):
    root, ds = kohya_set
    cfg = TrainConfig()  # pogdiff, class-balanced batches tempered with alpha 0.5
    counts = {c: n for c, (n, _) in SHAPES.items()}
    total = sum(n ** 0.5 for n in counts.values())
    want = {c: n ** 0.5 / total for c, n in counts.items()}
    assert run_class_shares(cfg, sorted(counts), [counts[c] for c in sorted(counts)]) == pytest.approx(want)
    # r_c ~ n_c^-0.5 = 1 : 1.41 : 1.63 : 2; scaled by 3 and rounded: 3, 4, 5, 6 (within 5% of each share).
    assert kohya_repeats(want, counts) == {"red circle": 3, "blue square": 4, "green star": 5, "gold moon": 6}
    rows = {r["class"]: r for r in export_rows(ds, cfg)}
    assert all(abs(r["kohya_share"] - want[c]) <= 0.05 * want[c] for c, r in rows.items())
    plain = {r["class"]: r["repeats"] for r in export_rows(ds, dataclasses.replace(cfg, method="baseline"))}
    assert plain == {c: 1 for c in SHAPES}  # plain batches: every image once
    (root / "img" / "dataset_config.toml").write_text(kohya_dataset_config(ds, cfg))
    try:
        back = load_image_text_set(root, DataConfig())
    finally:
        (root / "img" / "dataset_config.toml").unlink()
    assert _shares(back) == pytest.approx({c: r["kohya_share"] for c, r in rows.items()})


def test_onetrainer_concepts_carry_exact_repeats_and_the_loss_weights(kohya_set):
    root, ds = kohya_set
    cfg = TrainConfig(class_loss_weights={"gold moon": 2.0})
    concepts = json.loads(onetrainer_concepts(ds, cfg))
    assert {c["name"]: c["loss_weight"] for c in concepts}["gold moon"] == 2.0
    (root / "img" / "concepts.json").write_text(json.dumps(concepts))
    try:
        back = load_image_text_set(root, DataConfig())
    finally:
        (root / "img" / "concepts.json").unlink()
    counts = {c: n for c, (n, _) in SHAPES.items()}
    want = run_class_shares(cfg, sorted(counts), [counts[c] for c in sorted(counts)])
    assert _shares(back) == pytest.approx(want, rel=1e-3)
    assert back.class_weights["gold moon"]["loss_weight"] == 2.0
    assert "gold moon 2" in kohya_dataset_config(ds, cfg)  # kohya has no loss weight: said in a comment


def test_a_class_without_a_folder_of_its_own_is_told_where_to_go():
    folders = class_folders(["a/1.png", "a/2.png", "mixed/3.png", "mixed/4.png", "top.png"],
                            ["x", "x", "y", "z", "w"])
    assert folders == {"x": "a", "y": None, "z": None, "w": None}


def test_the_cli_writes_both_files(kohya_set, tmp_path):
    from pogdiff.cli import main

    root, _ = kohya_set
    out, ot = tmp_path / "k" / "dataset_config.toml", tmp_path / "concepts.json"
    assert main(["data", "kohya-config", str(root), "--out", str(out), "--onetrainer", str(ot)]) == 0
    doc = tomllib.loads(out.read_text())
    assert len(doc["datasets"][0]["subsets"]) == len(SHAPES) and len(json.loads(ot.read_text())) == len(SHAPES)
