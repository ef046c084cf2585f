"""Per-class draws and loss weights (pogdiff/training/balance.py): ``balance="from-data"`` draws
the shares kohya gives, class loss weights and ``class_loss_beta`` against their closed forms."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from pogdiff.config import DataConfig, PsiConfig, TrainConfig, configs_from_options, from_dict, to_dict
from pogdiff.data import load_image_text_set
from pogdiff.training.balance import beta_loss_weights, class_loss_table, with_data_weights
from tests.conftest import SMALL_MODEL
from tests.fakes import loss_curve
from tests.test_trainer_configs import SHAPES, kohya_tree

FAST = TrainConfig(method="baseline", batch_size=4, max_steps=3, checkpoint_every=0, log_every=0, warmup_steps=1,
                   caption_dropout=0.0)


@pytest.fixture(scope="module")
def kohya_set(tmp_path_factory):
    return load_image_text_set(kohya_tree(tmp_path_factory.mktemp("kohya")), DataConfig())


def _trainer(dataset, cfg, tmp_path):
    from pogdiff.method.prepare import prepare_data
    from pogdiff.model.models import build_tiny
    from pogdiff.training.trainer import Trainer

    model = build_tiny(SMALL_MODEL, seed=0)
    data = prepare_data(dataset, model, PsiConfig(), need_table=False)
    return Trainer(model, data, with_data_weights(cfg, dataset), run_dir=tmp_path), data


def test_from_data_draws_every_image_as_often_as_kohya_does(kohya_set, tmp_path):
    """Each image of class c: r_c / sum_k n_k r_k of the draws (kohya's epoch), so class c gets
    n_c r_c / sum_k n_k r_k."""
    trainer, data = _trainer(kohya_set, dataclasses.replace(FAST, balance="from-data"), tmp_path)
    draws = 60_000
    rows = trainer._draw_rows(draws, torch.Generator().manual_seed(0)).numpy()
    total = sum(n * r for n, r in SHAPES.values())
    per_image = np.bincount(rows, minlength=len(data)) / draws
    want_image = np.array([SHAPES[s][1] / total for s in data.subjects])
    # 60k draws: the binomial standard error of an image's share is at most 0.0009.
    np.testing.assert_allclose(per_image, want_image, atol=0.004)
    per_class = {c: per_image[[i for i, s in enumerate(data.subjects) if s == c]].sum() for c in SHAPES}
    want_class = {c: n * r / total for c, (n, r) in SHAPES.items()}
    assert per_class == pytest.approx(want_class, abs=0.008)
    assert {c: kohya_set.class_weights[c]["share"] for c in SHAPES} == pytest.approx(want_class)


def test_from_data_fills_the_config_with_the_sets_weights_and_refuses_a_set_without_them(kohya_set, small_demo):
    cfg = with_data_weights(dataclasses.replace(FAST, balance="from-data"), kohya_set)
    assert cfg.class_draw_weights == {c: float(n * r) for c, (n, r) in SHAPES.items()}
    assert cfg.class_loss_weights == {}  # kohya has no loss weights
    assert with_data_weights(FAST, kohya_set) is FAST  # the method's draw: nothing taken from the set
    plain = load_image_text_set(small_demo / "train", DataConfig())
    with pytest.raises(ValueError, match="balance 'from-data' .* has none: load kohya <repeats>_<name> folders"):
        with_data_weights(dataclasses.replace(FAST, balance="from-data"), plain)


def test_class_loss_weights_multiply_each_rows_loss(kohya_set, tmp_path):
    weights = {"gold moon": 3.0, "red circle": 0.5}
    plain, _ = _trainer(kohya_set, FAST, tmp_path / "a")
    weighted, data = _trainer(kohya_set, dataclasses.replace(FAST, class_loss_weights=weights), tmp_path / "b")
    batch = plain.sample_batch(torch.Generator().manual_seed(3))
    batch = dataclasses.replace(batch, rows=torch.tensor([0, 5, 9, 16]))  # red circle, two others, gold moon
    a, _ = plain.forward_backward(batch, torch.Generator().manual_seed(1))
    b, _ = weighted.forward_backward(batch, torch.Generator().manual_seed(1))
    w = torch.tensor([weights.get(data.subjects[int(r)], 1.0) for r in batch.rows])
    assert set(data.subjects[int(r)] for r in batch.rows) >= {"gold moon", "red circle"}
    for key in a:
        torch.testing.assert_close(b[key].detach(), a[key].detach() * w)


def test_class_loss_beta_has_mean_one_over_a_plain_batch_and_the_closed_form():
    counts = [8, 4, 3, 2]
    n = np.array(counts, dtype=np.float64)
    for beta in (0.0, 0.25, 0.5, 1.0):
        w = beta_loss_weights(counts, beta).numpy()
        np.testing.assert_allclose(w, n ** -beta * n.sum() / (n ** (1 - beta)).sum(), rtol=1e-12)
        assert float((n / n.sum() * w).sum()) == pytest.approx(1.0, rel=1e-12)  # a plain batch's rows weigh 1
    np.testing.assert_allclose(beta_loss_weights(counts, 1.0).numpy() * n, n.sum() / 4)  # every class alike
    np.testing.assert_allclose(beta_loss_weights(counts, 0.0).numpy(), 1.0)
    cfg = TrainConfig(class_loss_beta=0.5, class_loss_weights={"b": 2.0})
    table = class_loss_table(cfg, ["a", "b", "c", "d"], counts).numpy()
    np.testing.assert_allclose(table, beta_loss_weights(counts, 0.5).numpy() * [1, 2, 1, 1], rtol=1e-6)
    assert class_loss_table(TrainConfig(), ["a"], [3]) is None  # off: the loss is untouched
    with pytest.raises(ValueError, match="names class\\(es\\) 'x' that the set does not have"):
        class_loss_table(TrainConfig(class_loss_weights={"x": 2.0}), ["a"], [3])


def test_bad_values_are_refused_naming_the_option():
    with pytest.raises(ValueError, match="balance must be one of 'method', 'from-data'"):
        TrainConfig(balance="kohya")
    with pytest.raises(ValueError, match="class_loss_beta must be a finite number >= 0 and <= 1"):
        TrainConfig(class_loss_beta=1.5)
    with pytest.raises(ValueError, match="class_loss_weights\\['a'\\] must be a finite number > 0"):
        TrainConfig(class_loss_weights={"a": -1.0})
    with pytest.raises(ValueError, match="class_loss_weights must be a table"):
        configs_from_options(class_loss_weights=[1.0])
    _, cfg = configs_from_options(balance="from-data", class_loss_beta=0.25, class_loss_weights={"a": 2})
    assert (cfg.balance, cfg.class_loss_beta, cfg.class_loss_weights) == ("from-data", 0.25, {"a": 2.0})


def test_the_new_fields_round_trip_and_older_configs_load_without_them():
    cfg = TrainConfig(balance="from-data", class_draw_weights={"a": 8.0}, class_loss_weights={"a": 2.0},
                      class_loss_beta=0.5)
    assert from_dict(TrainConfig, to_dict(cfg)) == cfg
    old = to_dict(TrainConfig())
    for key in ("balance", "class_draw_weights", "class_loss_weights", "class_loss_beta"):
        old.pop(key)
    assert from_dict(TrainConfig, old) == TrainConfig()


def test_a_from_data_run_records_its_weights_and_resumes_bit_for_bit(kohya_set, tmp_path):
    from pogdiff.model import checkpoints
    from pogdiff.training.run import train

    cfg = dataclasses.replace(FAST, balance="from-data", class_loss_beta=0.5, max_steps=4)
    whole = train(dataset=kohya_set, model_cfg=SMALL_MODEL, train_cfg=cfg, run_dir=tmp_path / "whole")
    train(dataset=kohya_set, model_cfg=SMALL_MODEL, train_cfg=dataclasses.replace(cfg, max_steps=2),
          run_dir=tmp_path / "split")
    resumed = train(dataset=kohya_set, model_cfg=SMALL_MODEL, train_cfg=cfg, run_dir=tmp_path / "split")
    np.testing.assert_array_equal(loss_curve(whole.history), loss_curve(resumed.history))
    saved = checkpoints.load_configs(whole.last_checkpoint)[1]
    assert saved.balance == "from-data" and saved.class_draw_weights["gold moon"] == 26.0
    plain = train(dataset=kohya_set, model_cfg=SMALL_MODEL, train_cfg=dataclasses.replace(FAST, max_steps=4),
                  run_dir=tmp_path / "plain")
    assert not np.allclose(loss_curve(plain.history), loss_curve(whole.history))


def test_the_train_flags_reach_the_config():
    import argparse

    from pogdiff.cli import build_parser, class_weight_item, configs_from_args

    args = build_parser().parse_args(["train", "--run-dir", "r", "--balance", "from-data", "--class-loss-beta", "0.5",
                                      "--class-loss-weight", "red circle=2", "--class-loss-weight", "a=b=0.5"])
    _, cfg = configs_from_args(args)
    assert (cfg.balance, cfg.class_loss_beta) == ("from-data", 0.5)
    assert cfg.class_loss_weights == {"red circle": 2.0, "a=b": 0.5}
    for bad in ("red circle", "x=0", "x=-1", "=2", "x=inf", "x=two"):
        with pytest.raises(argparse.ArgumentTypeError, match="write CLASS=WEIGHT"):
            class_weight_item(bad)


def test_a_runs_class_shares_are_the_trainers_draw():
    """run_class_shares (the Data tab's table, the kohya export) gives what the trainer draws."""
    from pogdiff.training.balance import run_class_shares
    from pogdiff.training.trainer import class_draw_weights

    rows, names, counts = [list(range(9)), list(range(4)), [0]], ["a", "b", "c"], [9, 4, 1]
    for alpha in (0.0, 0.5, 1.0):
        shares = run_class_shares(TrainConfig(method="resample", balance_alpha=alpha), names, counts)
        np.testing.assert_allclose([shares[c] for c in names], class_draw_weights(rows, alpha).numpy(), rtol=1e-12)
    assert run_class_shares(TrainConfig(method="baseline"), names, counts) == pytest.approx(
        {"a": 9 / 14, "b": 4 / 14, "c": 1 / 14})
    cfg = TrainConfig(balance="from-data", class_draw_weights={"a": 9.0, "b": 8.0, "c": 13.0})
    assert run_class_shares(cfg, names, counts) == pytest.approx({"a": 0.3, "b": 8 / 30, "c": 13 / 30})
