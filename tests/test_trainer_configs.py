"""kohya_ss and OneTrainer sets (pogdiff/data/trainer_configs.py): folders, dataset_config.toml and
concepts files read as their trainers read them, broken ones refused in words."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pogdiff.config import DataConfig
from pogdiff.data import load_image_text_set

# The issue's shape classes: images and kohya repeats per class.
SHAPES = {"red circle": (8, 1), "blue square": (4, 2), "green star": (3, 5), "gold moon": (2, 13)}


def _image(path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(path)


def kohya_tree(root: Path, *, caption_ext: str = ".txt", prefix: bool = True) -> Path:
    """``img/<repeats>_<class>/`` with one tag caption per image (``prefix=False``: plain class folders)."""
    k = 0
    for name, (n, repeats) in SHAPES.items():
        folder = root / "img" / (f"{repeats}_{name}" if prefix else name)
        for i in range(n):
            _image(folder / f"{i:02d}.png", k)
            (folder / f"{i:02d}{caption_ext}").write_text(f"{name}, shape, plain background, v{i}")
            k += 1
    return root


def _zip(folder: Path, out: Path) -> Path:
    with zipfile.ZipFile(out, "w") as z:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                z.write(p, p.relative_to(folder).as_posix())
    return out


def _expected_shares() -> dict[str, float]:
    weights = {name: n * r for name, (n, r) in SHAPES.items()}
    total = sum(weights.values())
    return {name: w / total for name, w in weights.items()}


def _check(ds) -> None:
    assert sorted(ds.classes) == sorted(SHAPES)
    counts = {c: ds.subjects.count(c) for c in SHAPES}
    assert counts == {name: n for name, (n, _) in SHAPES.items()}
    want = _expected_shares()
    for name, (n, repeats) in SHAPES.items():
        entry = ds.class_weights[name]
        assert entry["images"] == n and entry["repeats"] == repeats
        assert entry["share"] == pytest.approx(want[name])


def test_kohya_folders_give_the_class_without_the_prefix_and_the_repeats(tmp_path):
    ds = load_image_text_set(_zip(kohya_tree(tmp_path / "set"), tmp_path / "set.zip"), DataConfig())
    _check(ds)
    assert ds.class_source == "folder" and ds.trainer_config == "kohya_folders"
    assert "kohya folders" in ds.class_source_reason
    assert all(c.startswith(f"{s}, shape") for c, s in zip(ds.captions, ds.subjects))  # the .txt tags


def test_the_same_data_as_a_dataset_config_toml_and_as_onetrainer_concepts_agree(tmp_path):
    plain = kohya_tree(tmp_path / "toml", prefix=False)
    subsets = "\n".join(f'[[datasets.subsets]]\nimage_dir = "img/{name}"\nnum_repeats = {r}\nclass_tokens = "{name}"\n'
                        f'caption_extension = ".txt"\n' for name, (_, r) in SHAPES.items())
    (plain / "dataset_config.toml").write_text("[general]\nenable_bucket = true\n\n[[datasets]]\nresolution = 512\n\n"
                                               + subsets)
    ds_toml = load_image_text_set(plain, DataConfig())
    _check(ds_toml)
    assert ds_toml.trainer_config == "kohya_toml"
    other = kohya_tree(tmp_path / "ot", prefix=False)
    concepts = [{"name": name, "path": f"img/{name}", "balancing": float(r), "balancing_strategy": "REPEATS",
                 "loss_weight": 1.0, "image": {"enable_random_flip": True}} for name, (_, r) in SHAPES.items()]
    (other / "concepts.json").write_text(json.dumps(concepts, indent=2))
    ds_ot = load_image_text_set(other, DataConfig())
    _check(ds_ot)
    assert ds_ot.trainer_config == "onetrainer"
    assert any(i.code == "onetrainer_unread_key" and "'image'" in i.message for i in ds_ot.report.issues)
    kohya = load_image_text_set(kohya_tree(tmp_path / "k"), DataConfig())
    assert {c: kohya.class_weights[c]["share"] for c in SHAPES} == pytest.approx(
        {c: ds_toml.class_weights[c]["share"] for c in SHAPES})


def test_onetrainer_samples_and_loss_weights(tmp_path):
    root = kohya_tree(tmp_path / "ot", prefix=False)
    concepts = [{"path": f"img/{name}", "balancing": 10.0 if name == "gold moon" else 20.0,
                 "balancing_strategy": "SAMPLES", "loss_weight": 2.0 if name == "gold moon" else 1.0}
                for name in SHAPES]
    (root / "concepts.json").write_text(json.dumps(concepts))
    ds = load_image_text_set(root, DataConfig())
    assert ds.class_weights["gold moon"]["share"] == pytest.approx(10 / 70)
    assert ds.class_weights["gold moon"]["loss_weight"] == 2.0 and ds.class_weights["red circle"]["loss_weight"] == 1.0


def test_a_caption_extension_of_the_toml_is_read(tmp_path):
    root = kohya_tree(tmp_path / "c", caption_ext=".caption", prefix=False)
    subsets = "\n".join(f'[[datasets.subsets]]\nimage_dir = "img/{name}"\nnum_repeats = {r}\n'
                        for name, (_, r) in SHAPES.items())
    (root / "dataset_config.toml").write_text('[[datasets]]\ncaption_extension = ".caption"\n' + subsets)
    ds = load_image_text_set(root, DataConfig())
    assert ds.captions[0].startswith("blue square, shape") and not ds.report.warnings


def _codes(ds) -> set[str]:
    return {i.code for i in ds.report.issues}


def test_a_folder_without_a_number_and_repeats_zero_are_refused_in_words(tmp_path):
    root = kohya_tree(tmp_path / "a")
    (root / "img" / "2_blue square").rename(root / "img" / "blue square")
    ds = load_image_text_set(root, DataConfig())
    issue = next(i for i in ds.report.issues if i.code == "kohya_folder_name")
    assert "blue square" in issue.where and "'1_blue square'" in issue.fix
    assert ds.trainer_config == "" and not ds.class_weights  # loaded, without repeats
    root = kohya_tree(tmp_path / "b")
    (root / "img" / "13_gold moon").rename(root / "img" / "0_gold moon")
    ds = load_image_text_set(root, DataConfig())
    assert "kohya_repeats" in _codes(ds) and ds.trainer_config == ""


def test_a_toml_image_dir_outside_the_upload_is_refused_and_nothing_there_is_read(tmp_path):
    outside = kohya_tree(tmp_path / "outside", prefix=False)
    root = kohya_tree(tmp_path / "up", prefix=False)
    (root / "dataset_config.toml").write_text(
        f'[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{(outside / "img" / "red circle").as_posix()}"\n'
        '[[datasets.subsets]]\nimage_dir = "../outside/img/blue square"\n')
    ds = load_image_text_set(root, DataConfig())
    issue = next(i for i in ds.report.issues if i.code == "kohya_toml_outside")
    assert "outside the upload" in issue.message and "[[datasets.subsets]] 1" in issue.where
    assert ds.trainer_config == "" and len(ds) == sum(n for n, _ in SHAPES.values())  # only the upload's images


def test_bad_toml_and_concepts_files_name_the_line_and_key(tmp_path):
    root = kohya_tree(tmp_path / "t", prefix=False)
    (root / "dataset_config.toml").write_text('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "img/red circle"\n'
                                              "num_repeats = 2.5\nflip_aug = true\nfoo = 1\n")
    ds = load_image_text_set(root, DataConfig())
    issue = next(i for i in ds.report.issues if i.code == "kohya_repeats")
    assert "num_repeats = 2.5" in issue.message and "subsets]] 1" in issue.where
    unread = [i.message for i in ds.report.issues if i.code == "kohya_toml_unread_key"]
    assert any("'foo'" in m for m in unread) and any("'flip_aug'" in m for m in unread)
    (root / "dataset_config.toml").write_text("[[datasets]\n")
    ds = load_image_text_set(root, DataConfig())
    assert "kohya_toml_syntax" in _codes(ds)
    (root / "dataset_config.toml").unlink()
    (root / "concepts.json").write_text('[{"path": "img/no such folder"}]')
    ds = load_image_text_set(root, DataConfig())
    issue = next(i for i in ds.report.issues if i.code == "kohya_toml_missing_dir")
    assert "concept 1" in issue.where and "no such folder" in issue.message
    (root / "concepts.json").write_text('[{"path": "img/red circle",\n "balancing": -1}]')
    assert "onetrainer_value" in _codes(load_image_text_set(root, DataConfig()))
    (root / "concepts.json").write_text('[{"path": "img/red circle",\n "balancing": }]')
    issue = next(i for i in load_image_text_set(root, DataConfig()).report.issues if i.code == "onetrainer_json")
    assert "line 2" in issue.message


def test_errors_name_the_files_line_and_key(tmp_path):
    root = kohya_tree(tmp_path / "t", prefix=False)
    (root / "dataset_config.toml").write_text('[general]\nshuffle_caption = true\n\n[[datasets]]\n'
                                              '  [[datasets.subsets]]\n  image_dir = "img/red circle"\n'
                                              '  num_repeats = 0\n')
    issues = load_image_text_set(root, DataConfig()).report.issues
    repeats = next(i for i in issues if i.code == "kohya_repeats")
    assert repeats.where == "dataset_config.toml:7 ([[datasets]] 1, [[datasets.subsets]] 1, key num_repeats)"
    unread = next(i for i in issues if i.code == "kohya_toml_unread_key")
    assert unread.where == "dataset_config.toml:2 ([general], key shuffle_caption)"
    (root / "dataset_config.toml").unlink()
    (root / "concepts.json").write_text('[\n  {"path": "img/red circle"},\n  {"name": "x",\n   "path": "img/gold moon",\n'
                                        '   "loss_weight": 0}\n]')
    issue = next(i for i in load_image_text_set(root, DataConfig()).report.issues if i.code == "onetrainer_value")
    assert issue.where == "concepts.json:5 (concept 2, key loss_weight)" and "loss_weight = 0" in issue.message


def test_options_of_general_and_datasets_apply_to_their_subsets_and_reg_subsets_are_left_out(tmp_path):
    root = kohya_tree(tmp_path / "g", caption_ext=".cap", prefix=False)
    subsets = "\n".join(f'[[datasets.subsets]]\nimage_dir = "img/{name}"\nclass_tokens = "{name}"\n'
                        for name in SHAPES if name != "gold moon")
    (root / "dataset_config.toml").write_text(
        '[general]\ncaption_extension = ".cap"\nkeep_tokens = 1\n[[datasets]]\nnum_repeats = 3\n' + subsets
        + '[[datasets.subsets]]\nimage_dir = "img/gold moon"\nis_reg = true\n')
    ds = load_image_text_set(root, DataConfig())
    assert sorted(ds.classes) == sorted(set(SHAPES) - {"gold moon"})
    assert all(ds.class_weights[c]["repeats"] == 3 for c in ds.classes)  # num_repeats of its [[datasets]]
    assert all(c.startswith(f"{s}, shape") for c, s in zip(ds.captions, ds.subjects))  # .cap from [general]
    codes = _codes(ds)
    assert {"kohya_reg_subset", "kohya_keep_tokens"} <= codes and "not_in_concept" not in codes


def test_an_image_in_no_concept_is_skipped_and_an_old_repeats_key_is_read(tmp_path):
    root = kohya_tree(tmp_path / "o", prefix=False)
    concepts = [{"path": f"img/{name}", "repeats": float(r)} for name, (_, r) in SHAPES.items() if name != "red circle"]
    (root / "concepts.json").write_text(json.dumps(concepts))
    ds = load_image_text_set(root, DataConfig())
    assert "red circle" not in ds.classes and ds.class_weights["gold moon"]["repeats"] == 13.0
    skipped = [i for i in ds.report.issues if i.code == "not_in_concept"]
    assert len(skipped) == SHAPES["red circle"][0] and "img/red circle/" in skipped[0].where


def test_a_path_of_the_users_machine_is_refused_with_the_uploads_folder_of_that_name(tmp_path):
    root = kohya_tree(tmp_path / "p", prefix=False)
    (root / "dataset_config.toml").write_text('[[datasets]]\n[[datasets.subsets]]\n'
                                              'image_dir = "C:\\\\train\\\\img\\\\red circle"\n')
    issue = next(i for i in load_image_text_set(root, DataConfig()).report.issues if i.code == "kohya_toml_outside")
    assert '"img/red circle" (the upload\'s folder of that name)' in issue.fix
