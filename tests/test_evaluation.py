"""The evaluation protocol's own measurements: copy rate, attribute coverage, sampling seeds."""

from __future__ import annotations

import numpy as np
import pytest

from pogdiff.evaluation import protocol as evaluation
from pogdiff.data.identities import make_identities, sample_attributes
from pogdiff.data.render import render


def _renders(identity, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([np.asarray(render(identity, sample_attributes(rng))) for _ in range(n)])


@pytest.fixture(scope="module")
def person():
    """One identity: 3 training photos, 8 held-out photos and 40 further fresh photos."""
    identity = make_identities(1, seed=11)[0]
    return {"train": _renders(identity, 3, 1), "held_out": _renders(identity, 8, 2), "fresh": _renders(identity, 40, 3)}


def test_nearest_distance_matches_a_brute_force_loop():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (5, 4, 4, 3), dtype=np.uint8)
    b = rng.integers(0, 256, (7, 4, 4, 3), dtype=np.uint8)
    want = [min(np.sqrt(np.mean((x / 255.0 - y / 255.0) ** 2)) for y in b) for x in a]
    np.testing.assert_allclose(evaluation.nearest_distance(a, b), want, rtol=1e-9, atol=1e-12)


def test_exact_and_slightly_noisy_copies_of_training_images_count_as_copies(person):
    train, held = person["train"], person["held_out"]
    copies = np.concatenate([train, train])
    assert evaluation.copy_flags(copies, train, held).mean() == 1.0
    noise = np.random.default_rng(0).integers(-2, 3, copies.shape)
    noisy = np.clip(copies.astype(int) + noise, 0, 255).astype(np.uint8)
    assert evaluation.copy_flags(noisy, train, held).mean() == 1.0


def test_fresh_photos_of_the_subject_are_not_copies(person):
    rate = evaluation.copy_flags(person["fresh"], person["train"], person["held_out"]).mean()
    assert rate <= 0.05


def test_a_copy_needs_a_held_out_reference():
    img = np.zeros((1, 4, 4, 3), np.uint8)
    with pytest.raises(ValueError, match="held-out real images"):
        evaluation.copy_flags(img, img, img[:0])


def test_attribute_coverage_counts_combinations_shown_by_the_right_subject():
    prompted = {"smiling": np.array([0, 0, 1, 1]), "glasses": np.array([0, 1, 0, 1])}
    # Generation 0 shows (0, 0) as asked; 1 shows (0, 0) instead of (0, 1); 2 is right but another
    # subject; 3 shows (1, 1) as asked.
    predicted = {"smiling": np.array([0, 0, 1, 1]), "glasses": np.array([0, 0, 0, 1])}
    who = ["ann", "ann", "bob", "ann"]
    assert evaluation.attribute_coverage(who, "ann", prompted, predicted) == pytest.approx(2 / 4)
    # A copier: the same picture whatever is asked covers one combination.
    same = {"smiling": np.zeros(4, int), "glasses": np.zeros(4, int)}
    assert evaluation.attribute_coverage(["ann"] * 4, "ann", prompted, same) == pytest.approx(1 / 4)
    assert evaluation.attribute_coverage(["ann"] * 4, "ann", prompted, prompted) == 1.0


def test_sampling_seeds_start_with_the_row_index_and_never_repeat():
    assert evaluation.sampling_seeds(3, 1) == [0, 1, 2]
    assert evaluation.sampling_seeds(3, 2) == [0, 1, 2, 3, 4, 5]
    with pytest.raises(ValueError, match="sample_seeds must be >= 1"):
        evaluation.sampling_seeds(3, 0)


def test_copy_and_coverage_add_one_value_per_class(person):
    import pandas as pd
    from types import SimpleNamespace

    train = SimpleNamespace(subjects=["ann"] * 3, images=person["train"])
    held = SimpleNamespace(subjects=["ann"] * 8, images=person["held_out"])
    images = np.concatenate([person["train"][:2], person["fresh"][:2]])  # 2 copies, 2 fresh
    pred = {"subject": ["ann"] * 4, "attrs": {"smiling": np.array([0, 1, 0, 1])}}
    table = pd.DataFrame({"subject": ["ann"]})
    out = evaluation.copy_and_coverage(table, subjects=["ann"] * 4, images=images, pred=pred,
                                       prompted={"smiling": np.array([0, 1, 1, 1])}, train_set=train, eval_set=held)
    assert out.loc[0, "copy"] == pytest.approx(0.5)
    assert out.loc[0, "coverage"] == pytest.approx(1.0)  # (0) asked and shown by row 0; (1) by row 1
