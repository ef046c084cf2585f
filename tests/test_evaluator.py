"""Evaluator: a short training on a few identities, checkpoint round trip, output contracts."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pogdiff.evaluation import demo_classifier as ev
from pogdiff.data.demo import SPLITS, DemoSpec, demo_identities, render_set, split_seed
from pogdiff.data.identities import ATTRIBUTE_HEADS
from pogdiff.evaluation.demo_classifier import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    Evaluator,
    EvaluatorConfig,
    augment,
    load_evaluator,
    save_evaluator,
    train_evaluator,
)

SPEC = DemoSpec(n_identities=4, n_eval_per_identity=6)
CFG = EvaluatorConfig(steps=40, batch_size=32, lr=3e-3, warmup_steps=5, n_val_per_identity=10,
                      width=16, feature_dim=32)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Train once for the module, recording every render seed the training asks for."""
    out = tmp_path_factory.mktemp("evaluator")
    seeds: list[int] = []

    def recording_render_set(identities, counts, seed, size=32):
        seeds.append(seed)
        return render_set(identities, counts, seed, size)

    steps: list[int] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ev, "render_set", recording_render_set)
        result = train_evaluator(SPEC, CFG, out, callback=lambda step, logs: steps.append(step))
    return {"out": out, "result": result, "seeds": seeds, "steps": steps}


@pytest.fixture(scope="module")
def eval_images():
    return render_set(demo_identities(SPEC), 3, seed=12345)


def test_short_training_separates_identities(trained):
    acc = trained["result"]["accuracy"]
    # Chance is 0.25 for 4 identities.
    assert acc["val"]["identity"] >= 0.9
    assert acc["eval_split"]["identity"] >= 0.9
    assert set(acc["val"]) == {"identity", *ATTRIBUTE_HEADS}
    assert trained["steps"] == list(range(CFG.steps))


def test_training_never_renders_a_demo_split_seed(trained):
    seeds = trained["seeds"]
    eval_seed = split_seed(SPEC.seed, "eval")
    train_seeds = seeds[:CFG.steps]
    assert len(set(train_seeds)) == CFG.steps  # a fresh render every step
    assert not set(train_seeds) & {split_seed(SPEC.seed, s) for s in SPLITS}
    assert seeds[CFG.steps:].count(eval_seed) == 1  # only the eval-split measurement


def test_checkpoint_files_and_metadata(trained):
    out = trained["out"]
    assert (out / WEIGHTS_FILE).is_file()
    meta = json.loads((out / CONFIG_FILE).read_text())
    assert meta["arch"]["subjects"] == [i.name for i in demo_identities(SPEC)]
    assert meta["config"]["steps"] == CFG.steps
    assert meta["spec"]["n_identities"] == SPEC.n_identities
    assert meta["metrics"]["accuracy"] == trained["result"]["accuracy"]


def test_loaded_evaluator_reproduces_stored_accuracy(trained):
    model = load_evaluator(trained["out"] / WEIGHTS_FILE)
    assert not model.training
    held = render_set(demo_identities(SPEC), SPEC.n_eval_per_identity, split_seed(SPEC.seed, "eval"))
    assert ev.measure(model, held) == trained["result"]["accuracy"]["eval_split"]


def test_save_load_round_trip_gives_identical_predictions(tmp_path, eval_images):
    torch.manual_seed(0)
    model = Evaluator(subjects=["a", "b", "c", "d"], width=8, feature_dim=16)
    model.train()
    with torch.no_grad():  # move the BatchNorm running statistics away from their defaults
        model(torch.rand(16, 3, 32, 32) * 2 - 1)
    save_evaluator(model, tmp_path)
    loaded = load_evaluator(tmp_path)
    a, b = model.predict(eval_images.images), loaded.predict(eval_images.images)
    assert a["subject"] == b["subject"]
    np.testing.assert_array_equal(a["features"], b["features"])
    np.testing.assert_array_equal(a["subject_prob"], b["subject_prob"])
    for name in ATTRIBUTE_HEADS:
        np.testing.assert_array_equal(a["attrs"][name], b["attrs"][name])
    assert model.training  # predict restores the mode it found


def test_features_and_predict_contracts(trained, eval_images):
    model = load_evaluator(trained["out"])
    n = len(eval_images)
    feats = model.features(eval_images.images)
    assert feats.shape == (n, CFG.feature_dim) and feats.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-5)
    pred = model.predict(eval_images.images)
    assert len(pred["subject"]) == n and set(pred["subject"]) <= set(model.subjects)
    assert pred["subject_prob"].shape == (n,)
    assert np.all((pred["subject_prob"] > 1 / len(model.subjects)) & (pred["subject_prob"] <= 1))
    assert set(pred["attrs"]) == set(ATTRIBUTE_HEADS)
    for name, n_classes in ATTRIBUTE_HEADS.items():
        assert pred["attrs"][name].shape == (n,)
        assert pred["attrs"][name].min() >= 0 and pred["attrs"][name].max() < n_classes
    np.testing.assert_allclose(pred["features"], feats, atol=1e-6)
    # Batching does not change the answer; other sizes are resized.
    np.testing.assert_allclose(model._run(eval_images.images, batch_size=5)["features"],
                               model._run(eval_images.images)["features"], atol=1e-5)
    big = eval_images.images.repeat(2, axis=1).repeat(2, axis=2)
    assert model.features(big).shape == (n, CFG.feature_dim)
    assert model.features(eval_images.images[:0]).shape == (0, CFG.feature_dim)


def test_bad_inputs_are_named():
    model = Evaluator(subjects=["a", "b"], width=8, feature_dim=8)
    with pytest.raises(ValueError, match=r"uint8 \[N, H, W, 3\], got float64 \(2, 32, 32, 3\)"):
        model.features(np.zeros((2, 32, 32, 3)))
    with pytest.raises(ValueError, match="subjects must be >= 2 distinct names"):
        Evaluator(subjects=["a", "a"])
    with pytest.raises(FileNotFoundError, match="no evaluator at"):
        load_evaluator("does-not-exist")


def test_augment_is_seeded_bounded_and_mild():
    x = torch.rand(8, 3, 32, 32) * 2 - 1
    a = augment(x, torch.Generator().manual_seed(0))
    b = augment(x, torch.Generator().manual_seed(0))
    c = augment(x, torch.Generator().manual_seed(1))
    assert a.shape == x.shape
    torch.testing.assert_close(a, b)
    assert not torch.equal(a, c)
    assert a.min() >= -1 and a.max() <= 1
    # A constant image stays near-constant: shifts and blur do nothing; colour and noise are small.
    flat = augment(torch.zeros(4, 3, 32, 32), torch.Generator().manual_seed(0))
    assert flat.abs().max() < 0.5


def test_fresh_seed_skips_reserved():
    first = ev._fresh_seed(0, 101, 7, set())
    assert ev._fresh_seed(0, 101, 7, {first}) != first
    assert ev._fresh_seed(0, 101, 7, set()) == first
