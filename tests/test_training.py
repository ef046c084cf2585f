"""Trainer: every method runs, checkpoints load and sample, stop and resume behave."""

from __future__ import annotations

import dataclasses
import threading

import numpy as np
import pytest

from pogdiff import checkpoints
from pogdiff.config import DataConfig, PsiConfig, SampleConfig, TrainConfig
from pogdiff.data import load_image_text_set
from pogdiff.sampling import generate
from pogdiff.training import loss_curve, train
from tests.conftest import SMALL_MODEL

FAST = TrainConfig(batch_size=4, max_steps=2, checkpoint_every=0, log_every=0, warmup_steps=1)


@pytest.fixture(scope="module")
def dataset(small_demo):
    return load_image_text_set(small_demo / "train", DataConfig())


@pytest.mark.parametrize("method", ["baseline", "pogdiff", "cbdm", "resample"])
def test_two_steps_of_each_method_write_a_checkpoint_that_loads_and_samples(method, dataset, tmp_path):
    cfg = dataclasses.replace(FAST, method=method)
    result = train(dataset=dataset, model_cfg=SMALL_MODEL, train_cfg=cfg, run_dir=tmp_path)
    assert result.steps_done == 2 and not result.stopped
    assert result.last_checkpoint is not None and (result.last_checkpoint / "configs.json").exists()
    assert np.isfinite(loss_curve(result.history)).all()
    model = checkpoints.load_model(result.last_checkpoint)
    images = generate(model, [dataset.captions[0]], [0], SampleConfig(steps=2))
    assert images.shape == (1, 32, 32, 3) and images.dtype == np.uint8


def test_resume_reproduces_the_uninterrupted_loss_curve(dataset, tmp_path):
    cfg = dataclasses.replace(FAST, method="pogdiff", max_steps=6)
    full = train(dataset=dataset, model_cfg=SMALL_MODEL, train_cfg=cfg, run_dir=tmp_path / "full")

    stop = threading.Event()

    def stop_at_3(info):
        if info.step == 3:
            stop.set()

    first = train(dataset=dataset, model_cfg=SMALL_MODEL, train_cfg=cfg, run_dir=tmp_path / "split",
                  callback=stop_at_3, stop_event=stop)
    assert first.stopped and first.steps_done == 3
    second = train(dataset=dataset, model_cfg=SMALL_MODEL, train_cfg=cfg, run_dir=tmp_path / "split")
    assert second.steps_done == 6 and not second.stopped
    np.testing.assert_allclose(loss_curve(second.history), loss_curve(full.history), rtol=1e-5, atol=1e-6)


def test_stop_event_is_honoured_within_one_step(dataset, tmp_path):
    stop = threading.Event()
    seen = []

    def cb(info):
        seen.append(info.step)
        if info.step == 2:
            stop.set()

    cfg = dataclasses.replace(FAST, max_steps=50)
    result = train(dataset=dataset, model_cfg=SMALL_MODEL, train_cfg=cfg, run_dir=tmp_path, callback=cb,
                   stop_event=stop)
    assert result.stopped and result.steps_done == 2 and seen == [1, 2]
    assert result.last_checkpoint.name == "checkpoint-000002"


def test_pogdiff_with_every_row_gated_off_equals_the_plain_loss(dataset, tmp_path):
    base = train(dataset=dataset, model_cfg=SMALL_MODEL, train_cfg=dataclasses.replace(FAST, method="baseline"),
                 run_dir=tmp_path / "b")
    gated = dataclasses.replace(FAST, method="pogdiff", psi=PsiConfig(psi_threshold=1e9))
    pog = train(dataset=dataset, model_cfg=SMALL_MODEL, train_cfg=gated, run_dir=tmp_path / "p")
    assert all(h.psi_active == 0.0 for h in pog.history)
    np.testing.assert_array_equal(loss_curve(pog.history), loss_curve(base.history))


def test_pogdiff_runs_the_neighbour_pass_only_for_rows_above_threshold(dataset, tmp_path):
    cfg = dataclasses.replace(FAST, method="pogdiff", max_steps=4, caption_dropout=0.0)
    result = train(dataset=dataset, model_cfg=SMALL_MODEL, train_cfg=cfg, run_dir=tmp_path)
    assert any(h.psi_active > 0 for h in result.history)
    assert all(0.0 <= h.psi_active <= 1.0 for h in result.history)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"method": "magic"}, "unknown method 'magic'"),
        ({"max_steps": 0}, "max_steps must be >= 1"),
        ({"learning_rate": -1.0}, "learning_rate must be a finite number > 0"),
        ({"caption_dropout": 1.5}, "caption_dropout must be in [0, 1)"),
        ({"mixed_precision": "fp8"}, "mixed_precision must be"),
    ],
)
def test_bad_train_config_is_refused_with_a_clear_message(override, message, dataset, tmp_path):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace(")", r"\)")):
        train(dataset=dataset, model_cfg=SMALL_MODEL, train_cfg=dataclasses.replace(FAST, **override),
              run_dir=tmp_path)


def test_image_size_must_match_the_model(dataset, tmp_path):
    cfg = dataclasses.replace(SMALL_MODEL, resolution=16)
    with pytest.raises(ValueError, match="images are 32x32 but the model expects 16x16"):
        train(dataset=dataset, model_cfg=cfg, train_cfg=FAST, run_dir=tmp_path)


def test_ema_weights_are_saved_and_differ_from_the_raw_weights(dataset, tmp_path):
    import torch

    cfg = dataclasses.replace(FAST, max_steps=3, ema_decay=0.5)
    result = train(dataset=dataset, model_cfg=SMALL_MODEL, train_cfg=cfg, run_dir=tmp_path)
    raw = checkpoints.load_model(result.last_checkpoint)
    ema = checkpoints.load_model(result.last_checkpoint, use_ema=True)
    diffs = [not torch.equal(a, b) for a, b in zip(raw.unet.parameters(), ema.unet.parameters())]
    assert any(diffs)
