"""The judge of a user's own classes (pogdiff/evaluation/user_judge.py) and the Compare metrics that use it."""

from __future__ import annotations

import io
import math
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pogdiff.evaluation import user_judge as judging
from pogdiff.evaluation.user_judge import UserJudge, stratified_folds
from pogdiff.ui import views

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
    """Random labels on random images: a classifier memorises most of them (training accuracy far
    above chance), but on images it did not see it is at chance, and the judge must say so."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (60, 16, 16, 3), dtype=np.uint8)
    labels = [f"class {i % 4}" for i in range(60)]
    judge = UserJudge(backbone=None).fit(images, labels)
    train_acc = np.mean(np.array(judge.predict(images)["subject"]) == np.array(labels))
    assert train_acc >= 0.75
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
    key = studio.data.load_upload(str(archive), progress=lambda *a, **k: None)[0]
    bundle = studio.datasets.bundle(key)
    assert sorted(bundle.subjects) == sorted(labels)
    a, b = "shipped:demo-baseline", "shipped:demo-pogdiff"
    table, fig, md = studio.metrics.compute_metrics(a, b, False, key, progress=lambda *x, **k: None)
    assert sorted(table["subject"]) == sorted(counts)  # the user's classes, not the demo identities
    row = table.set_index("subject")
    assert row.loc["sea otter", "judge"] == views.WEAK_MARK and row.loc["red fox", "judge"] == "ok"
    assert row.loc["red fox", "judge reliability"] == 1.0
    assert "Judged on" in md and "3 classes" in md and "Warning — judge too weak for 1 of 3 classes" in md
    assert "sea otter" in md and "not trained on this data set" in md and "| judge ok |" in md
    assert row["train_count"].to_dict() == counts
    cached = studio.metrics.compute_metrics(a, b, False, key, progress=lambda *x, **k: None)
    assert "2 of 2 read from the cache" in cached[2]
    pd.testing.assert_frame_equal(cached[0], table)
    with pytest.raises(gr.Error, match="no longer in memory"):
        studio.metrics.compute_metrics(a, b, False, "upload-" + "0" * 16, progress=lambda *x, **k: None)


def _shapes(counts=(40, 20, 8, 3, 2), seed: int = 0, size: int = 32) -> tuple[np.ndarray, list[str]]:
    """A long-tailed set of drawn shapes: each class one shape in one colour, on a random
    background colour with pixel noise, at a random place and size (colour alone separates the
    classes; nothing else about the images is fixed)."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    kinds = [("red circle", (220, 40, 40)), ("blue square", (40, 80, 220)), ("green triangle", (40, 170, 60)),
             ("yellow cross", (235, 200, 30)), ("purple ring", (150, 50, 190))]
    images, labels = [], []
    for (name, colour), n in zip(kinds, counts):
        for _ in range(n):
            s = 2 * size
            img = Image.new("RGB", (s, s), tuple(int(v) for v in rng.integers(0, 256, 3)))
            draw = ImageDraw.Draw(img)
            r = rng.uniform(0.22, 0.36) * s
            cx, cy = rng.uniform(r, s - r, 2)
            box = [cx - r, cy - r, cx + r, cy + r]
            shape = name.split()[1]
            if shape == "circle":
                draw.ellipse(box, fill=colour)
            elif shape == "square":
                draw.rectangle(box, fill=colour)
            elif shape == "triangle":
                draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
            elif shape == "cross":
                draw.rectangle([cx - r, cy - r / 3, cx + r, cy + r / 3], fill=colour)
                draw.rectangle([cx - r / 3, cy - r, cx + r / 3, cy + r], fill=colour)
            else:
                draw.ellipse(box, outline=colour, width=max(2, int(r / 3)))
            pixels = np.asarray(img.resize((size, size), Image.BILINEAR), dtype=np.int16)
            images.append(np.clip(pixels + rng.integers(-12, 13, pixels.shape), 0, 255).astype(np.uint8))
            labels.append(name)
    return np.stack(images), labels


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_judge_is_a_good_instrument_on_a_colour_separable_long_tailed_set(seed):
    """40/20/8/3/2 drawn shapes whose colour alone names the class: the judge's own held-out
    estimate must say it names at least 95% right, every class it can check at least 0.5 (so none
    is marked weak), and fresh images of the same kind are named right as well."""
    images, labels = _shapes(seed=seed)
    judge = UserJudge().fit(images, labels)
    rel = judge.reliability.set_index("subject")
    assert rel["n_heldout"].to_dict() == rel["n_images"].to_dict()  # every class has >= 2 images
    assert judge.heldout_accuracy() >= 0.95, judge.reliability
    assert judge.weak_subjects() == []
    fresh, truth = _shapes(counts=(4, 4, 4, 4, 4), seed=100 + seed)
    assert np.mean(np.array(judge.predict(fresh)["subject"]) == np.array(truth)) >= 0.95


def test_colour_histogram_and_foreground_weights_on_known_images():
    x = np.zeros((2, 8, 8, 3), dtype=np.float32)
    x[0] = [1.0, 0.0, 0.0]  # all pure red: one bin holds everything
    x[1, :, :4] = [0.0, 0.0, 1.0]  # half blue, half black
    hist = judging.colour_histogram(x, bins=3)
    red = (2 * 3 + 0) * 3 + 0  # index r * bins**2 + g * bins + b
    assert hist[0, red] == pytest.approx(1.0) and np.count_nonzero(hist[0]) == 1
    assert hist[1, 2] == pytest.approx(np.sqrt(0.5)) and hist[1, 0] == pytest.approx(np.sqrt(0.5))
    mid = np.full((1, 1, 1, 3), 0.25, dtype=np.float32)  # halfway between bin centres 0 and 0.5
    assert judging.colour_histogram(mid, bins=3)[0, 0] == pytest.approx(np.sqrt(1 / 8))
    # a blue square on a grey background: weight 1 on the square, 0 on the background
    img = np.full((1, 16, 16, 3), 0.5, dtype=np.float32)
    img[0, 5:11, 5:11] = [0.0, 0.0, 1.0]
    w = judging.foreground_weights(img)
    assert (w[0, 5:11, 5:11] == 1.0).all() and w.sum() == 36
    fg = judging.colour_histogram(img, w, bins=3)
    assert fg[0, 2] == pytest.approx(1.0)  # only the square's colour (0, 0, 1) counts


def test_gradient_histogram_tells_vertical_from_horizontal_edges():
    v = np.zeros((1, 8, 8, 3), dtype=np.float32)
    v[0, :, 4:] = 1.0  # a vertical edge: horizontal gradient, orientation 0
    h = v.transpose(0, 2, 1, 3).copy()  # a horizontal edge: orientation pi / 2
    gv, gh = judging.gradient_histogram(v, cells=1, orientations=4), judging.gradient_histogram(h, cells=1, orientations=4)
    assert np.argmax(gv[0]) == 0 and np.argmax(gh[0]) == 2
    assert gv[0] == pytest.approx([1, 0, 0, 0]) and gh[0] == pytest.approx([0, 0, 1, 0])
