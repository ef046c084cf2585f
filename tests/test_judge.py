"""The judge of a user's own classes (pogdiff/judge.py) and the Compare metrics that use it."""

from __future__ import annotations

import io
import math
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pogdiff import judge as judging
from pogdiff.judge import UserJudge, stratified_folds

SHIPPED = Path(__file__).resolve().parent.parent / "checkpoints"


def _coloured(counts: dict[str, int], seed: int = 0, noise: int = 40) -> tuple[np.ndarray, list[str]]:
    """Each class a distinct colour, with per-image noise: easy to tell apart."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for c, (name, n) in enumerate(counts.items()):
        base = np.array([(70 * c) % 256, (140 * c + 60) % 256, (200 - 45 * c) % 256])
        for _ in range(n):
            img = base + rng.integers(-noise, noise + 1, (16, 16, 3))
            images.append(np.clip(img, 0, 255).astype(np.uint8))
            labels.append(name)
    return np.stack(images), labels


def test_stratified_folds_hold_out_every_class_but_keep_one_of_it_in():
    subjects = ["a"] * 7 + ["b"] * 2 + ["c"] + ["d"] * 3
    fold = stratified_folds(subjects, folds=5, seed=1)
    labels = np.array(subjects)
    assert (fold[labels == "c"] == -1).all()  # one image: never held out
    for c in "abd":
        held = fold[labels == c]
        assert (held >= 0).all() and len(set(held)) == min(5, len(held))
    for f in range(5):
        test = fold == f
        for c in "abd":
            assert ((labels == c) & ~test).any()  # whichever fold is out, the class keeps an image in
    assert np.array_equal(fold, stratified_folds(subjects, folds=5, seed=1))


def test_judge_names_separable_classes_and_flags_what_it_cannot_check():
    counts = {"fox": 12, "wolf": 6, "owl": 3, "otter": 1}
    images, labels = _coloured(counts)
    judge = UserJudge(backbone=None).fit(images, labels)
    rel = judge.reliability.set_index("subject")
    assert rel.loc[["fox", "wolf", "owl"], "reliability"].tolist() == [1.0, 1.0, 1.0]
    assert rel.loc["otter", "n_heldout"] == 0 and math.isnan(rel.loc["otter", "reliability"])
    assert judge.weak_subjects() == ["otter"]  # one image: nothing to hold out
    assert rel["n_images"].to_dict() == counts
    fresh, truth = _coloured(counts, seed=7)
    out = judge.predict(fresh)
    assert out["subject"] == truth and out["features"].shape[0] == len(truth)
    assert np.allclose(np.linalg.norm(out["features"], axis=1), 1.0, atol=1e-5)


def test_reliability_is_held_out_not_training_accuracy():
    """Random labels on random images: a classifier memorises them (training accuracy 1), but on
    images it did not see it is at chance, and the judge must say so."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (60, 16, 16, 3), dtype=np.uint8)
    labels = [f"class {i % 4}" for i in range(60)]
    judge = UserJudge(backbone=None).fit(images, labels)
    train_acc = np.mean(np.array(judge.predict(images)["subject"]) == np.array(labels))
    assert train_acc == 1.0
    assert judge.heldout_accuracy() < judging.WEAK_BELOW
    assert len(judge.weak_subjects()) >= 3


def test_judge_needs_two_classes_and_matching_lengths():
    images, labels = _coloured({"fox": 3})
    with pytest.raises(ValueError, match="at least 2 classes"):
        UserJudge().fit(images, labels)
    with pytest.raises(ValueError, match="3 images but 2 classes"):
        UserJudge().fit(images, labels[:2])
    with pytest.raises(RuntimeError, match="before fit"):
        UserJudge().predict(images)


def test_prompt_rows_cap_each_class_and_spread_over_it():
    subjects = ["a"] * 10 + ["b"] * 3 + ["a"] * 2
    rows = judging.prompt_rows(subjects, 4)
    assert [subjects[r] for r in rows].count("a") == 4 and [subjects[r] for r in rows].count("b") == 3
    assert rows == sorted(rows) and 0 in rows and 14 in rows  # first and last of class a
    assert judging.prompt_rows(subjects, None) == list(range(15))


def test_dataset_digest_follows_pixels_captions_and_classes():
    images, labels = _coloured({"fox": 2, "owl": 2})
    captions = [f"{s}, photo" for s in labels]
    d = judging.dataset_digest(images, captions, labels)
    assert d == judging.dataset_digest(images.copy(), list(captions), list(labels))
    changed = images.copy()
    changed[0, 0, 0, 0] ^= 1
    assert judging.dataset_digest(changed, captions, labels) != d
    assert judging.dataset_digest(images, captions[::-1], labels) != d
    assert judging.dataset_digest(images, captions, ["x"] + labels[1:]) != d


@pytest.mark.skipif(not (SHIPPED / "demo-baseline").exists(), reason="shipped demo checkpoints missing")
def test_compare_metrics_on_user_data_are_judged_on_its_own_classes(tmp_path):
    """Compute metrics with a user's set loaded: the prompts are its own captions, the classes its
    own, the judge's reliability is shown per class with the weak ones marked, and a second request
    is read from the cache."""
    import gradio as gr
    from PIL import Image

    from pogdiff import ui

    counts = {"red fox": 6, "grey wolf": 4, "sea otter": 1}
    images, labels = _coloured(counts, noise=20)
    archive = tmp_path / "animals.zip"  # class folders with kohya-style tag captions
    with zipfile.ZipFile(archive, "w") as zf:
        for i, (img, name) in enumerate(zip(images, labels)):
            png = io.BytesIO()
            Image.fromarray(np.kron(img, np.ones((2, 2, 1), dtype=np.uint8))).save(png, format="PNG")
            zf.writestr(f"{name}/{i:02d}.png", png.getvalue())
            zf.writestr(f"{name}/{i:02d}.txt", f"{name}, outdoors, photo")
    studio = ui.Studio(tmp_path / "runs", shipped_dir=SHIPPED, device="cpu")
    key = studio.load_upload(str(archive), progress=lambda *a, **k: None)[0]
    bundle = studio.bundle(key)
    assert sorted(bundle.subjects) == sorted(labels)
    a, b = "shipped:demo-baseline", "shipped:demo-pogdiff"
    table, fig, md = studio.compute_metrics(a, b, False, key, progress=lambda *x, **k: None)
    assert sorted(table["subject"]) == sorted(counts)  # the user's classes, not the demo identities
    row = table.set_index("subject")
    assert row.loc["sea otter", "judge"] == ui.WEAK_MARK and row.loc["red fox", "judge"] == "ok"
    assert row.loc["red fox", "judge reliability"] == 1.0
    assert "Judged on" in md and "3 classes" in md and "Warning — judge too weak for 1 of 3 classes" in md
    assert "sea otter" in md and "not trained on this data set" in md and "| judge ok |" in md
    assert row["train_count"].to_dict() == counts
    cached = studio.compute_metrics(a, b, False, key, progress=lambda *x, **k: None)
    assert "2 of 2 read from the cache" in cached[2]
    pd.testing.assert_frame_equal(cached[0], table)
    with pytest.raises(gr.Error, match="no longer in memory"):
        studio.compute_metrics(a, b, False, "upload-" + "0" * 16, progress=lambda *x, **k: None)
