"""Training options: 8-bit AdamW, the tensorboard tracker and the run's history.jsonl."""

from __future__ import annotations

import dataclasses
import json
import sys
import threading
import types

import numpy as np
import pytest
import torch

from pogdiff.model import checkpoints
from pogdiff.training import run_folder
from pogdiff.training import accelerator, setup
from pogdiff.config import DataConfig, TrainConfig
from pogdiff.data import load_image_text_set
from pogdiff.training.optimizer import build_optimizer
from pogdiff.training.records import history_from_rows
from pogdiff.training.run import train
from tests.fakes import loss_curve
from tests.conftest import SMALL_MODEL

FAST = TrainConfig(method="baseline", batch_size=4, max_steps=4, checkpoint_every=0, log_every=1,
                   warmup_steps=1, checkpoint_minutes=0)


@pytest.fixture(scope="module")
def dataset(small_demo):
    return load_image_text_set(small_demo / "train", DataConfig())


# ------------------------------------------------------------------------------ 8-bit AdamW
def test_adamw8bit_is_refused_before_any_work_naming_what_is_missing(dataset, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes -> ImportError
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = dataclasses.replace(FAST, optimizer="adamw8bit")
    with pytest.raises(ValueError, match=r"bitsandbytes is not installed and CUDA is not available.*"
                                         r"install bitsandbytes.*on a CUDA machine, or use optimizer 'adamw'"):
        train(dataset=dataset, model_cfg=SMALL_MODEL, train_cfg=cfg, run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()  # refused before the run folder was touched


def test_adamw8bit_without_cuda_names_cuda_only(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", _fake_bitsandbytes())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"but CUDA is not available: install"):
        setup.check_train_config(dataclasses.replace(FAST, optimizer="adamw8bit"), 10)


def test_an_unknown_optimizer_is_refused():
    with pytest.raises(ValueError, match=r"unknown optimizer 'sgd'; choose one of adamw, adamw8bit"):
        setup.check_train_config(dataclasses.replace(FAST, optimizer="sgd"), 10)


def _fake_bitsandbytes():
    class AdamW8bit(torch.optim.AdamW):
        pass

    module = types.ModuleType("bitsandbytes")
    module.optim = types.SimpleNamespace(AdamW8bit=AdamW8bit)
    return module


def test_adamw8bit_builds_bitsandbytes_optimizer_on_cuda(monkeypatch):
    fake = _fake_bitsandbytes()
    monkeypatch.setitem(sys.modules, "bitsandbytes", fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    params = [torch.nn.Parameter(torch.zeros(3))]
    cfg = dataclasses.replace(FAST, optimizer="adamw8bit", learning_rate=3e-4, weight_decay=0.01)
    opt = build_optimizer(params, cfg, "cuda:0")
    assert type(opt) is fake.optim.AdamW8bit
    assert opt.param_groups[0]["lr"] == 3e-4 and opt.param_groups[0]["weight_decay"] == 0.01
    # The parameters themselves on the CPU: refused, naming the device.
    with pytest.raises(ValueError, match=r"the model is on cpu, not on a CUDA device"):
        build_optimizer(params, cfg, "cpu")
    assert type(build_optimizer(params, dataclasses.replace(cfg, optimizer="adamw"), "cpu")) is torch.optim.AdamW


# -------------------------------------------------------------------------------- trackers
def test_tensorboard_run_writes_the_loss_of_every_logging_step(dataset, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = dataclasses.replace(FAST, report_to="tensorboard", log_every=2)
    result = train(dataset=dataset, model_cfg=SMALL_MODEL, train_cfg=cfg, run_dir=tmp_path)
    events = sorted((tmp_path / "logs").rglob("events.out.tfevents.*"))
    assert events, "no tensorboard event file under logs/"
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    logged = [(e.step, e.value) for e in acc.Scalars("loss")]
    want = [(h.step, float(np.float32(h.terms["loss"]))) for h in result.history if h.step % 2 == 0]
    assert logged == want and len(want) == 2
    assert [e.value for e in acc.Scalars("lr")] == [float(np.float32(h.lr)) for h in result.history[1::2]]


def test_missing_tensorboard_or_unknown_tracker_is_refused(monkeypatch):
    monkeypatch.setattr(accelerator, "_tensorboard_available", lambda: False)
    with pytest.raises(ValueError, match=r"report_to 'tensorboard' needs the tensorboard package.*pip install"):
        setup.check_train_config(dataclasses.replace(FAST, report_to="tensorboard"), 10)
    with pytest.raises(ValueError, match=r"unknown report_to 'wandb'; choose one of none, tensorboard"):
        setup.check_train_config(dataclasses.replace(FAST, report_to="wandb"), 10)


# --------------------------------------------------------------------------------- history
def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / run_folder.HISTORY_FILE).read_text().splitlines()]


def test_history_is_one_file_and_a_resumed_run_keeps_it_equal_to_an_uninterrupted_one(dataset, tmp_path):
    full = train(dataset=dataset, model_cfg=SMALL_MODEL, train_cfg=FAST, run_dir=tmp_path / "full")
    stop = threading.Event()

    def stop_at_2(info):
        if info.step == 2:
            stop.set()

    train(dataset=dataset, model_cfg=SMALL_MODEL, train_cfg=FAST, run_dir=tmp_path / "split",
          callback=stop_at_2, stop_event=stop)
    split = tmp_path / "split"
    assert [r["step"] for r in _rows(split)] == [1, 2]
    # A killed process may leave rows past its last checkpoint: the resume drops them.
    run_folder.append_history(split, [dict(_rows(split)[-1], step=3, terms={"loss": 99.0})])
    second = train(dataset=dataset, model_cfg=SMALL_MODEL, train_cfg=FAST, run_dir=split)
    assert second.steps_done == 4
    full_rows, split_rows = _rows(tmp_path / "full"), _rows(split)
    assert [r["step"] for r in split_rows] == [1, 2, 3, 4]
    for key in ("step", "terms", "lr", "psi_mean", "psi_active", "pog_share"):
        assert [r[key] for r in split_rows] == [r[key] for r in full_rows], key
    np.testing.assert_array_equal(loss_curve(second.history), loss_curve(full.history))
    assert loss_curve(history_from_rows(run_folder.read_history(split))).tolist() == loss_curve(full.history).tolist()
    # trainer_state.json keeps counters and RNG, no history.
    state = json.loads((second.last_checkpoint / checkpoints.STATE_JSON).read_text())
    assert "history" not in state["extra"] and state["step"] == 4
    # A checkpoint folder reads its run's history up to its own step.
    assert [r["step"] for r in run_folder.read_history(split / "checkpoint-000002")] == [1, 2]


def test_a_run_whose_checkpoint_holds_the_history_still_reads_and_resumes(dataset, tmp_path):
    run = tmp_path / "old"
    cfg = dataclasses.replace(FAST, max_steps=2)
    first = train(dataset=dataset, model_cfg=SMALL_MODEL, train_cfg=cfg, run_dir=run)
    # Rewrite as an older version left it: history inside trainer_state.json, no history.jsonl.
    rows = _rows(run)
    (run / run_folder.HISTORY_FILE).unlink()
    state_file = first.last_checkpoint / checkpoints.STATE_JSON
    state = json.loads(state_file.read_text())
    state["extra"]["history"] = rows
    state_file.write_text(json.dumps(state))
    manifest = first.last_checkpoint / checkpoints.MANIFEST
    manifest.write_text(json.dumps(checkpoints._manifest(first.last_checkpoint)))
    assert run_folder.read_history(run) == rows and run_folder.read_history(run, upto=1) == rows[:1]
    resumed = train(dataset=dataset, model_cfg=SMALL_MODEL, train_cfg=dataclasses.replace(cfg, max_steps=3),
                    run_dir=run)
    assert [h.step for h in resumed.history] == [1, 2, 3]
    assert [r["step"] for r in _rows(run)] == [1, 2, 3] and _rows(run)[:2] == rows


def test_a_history_line_cut_short_is_skipped_with_a_warning(tmp_path, caplog):
    run_folder.append_history(tmp_path, [{"step": 1, "terms": {"loss": 0.5}}])
    with open(tmp_path / run_folder.HISTORY_FILE, "a") as f:
        f.write('{"step": 2, "ter')
    assert run_folder.read_history(tmp_path) == [{"step": 1, "terms": {"loss": 0.5}}]
    assert "line 2 is not JSON" in caplog.text
    assert run_folder.read_history(tmp_path / "nothing-here") == []


# ------------------------------------------------------------------------ runtime checks
def test_runtime_shape_checks_say_what_is_wrong():
    from pogdiff.model.models import build_tiny
    from pogdiff.model.text import TextEmbeddings
    from pogdiff.method.prepare import TrainData

    model = build_tiny(SMALL_MODEL, seed=0)
    with pytest.raises(ValueError, match=r"expects RGB images \[N, 3, H, W\], got shape \(2, 32, 32, 3\)"):
        model.encode_images(torch.zeros(2, 32, 32, 3))
    text = TextEmbeddings(torch.zeros(2, 4), torch.zeros(2, 3, 4), torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"x0 has 3 rows but \{'text': 2, 'captions': 2\} differ"):
        TrainData(torch.zeros(3, 3, 32, 32), text, ["a", "b"], ["a", "b", "c"], torch.zeros(3, dtype=torch.long),
                  None)
    with pytest.raises(ValueError, match=r"copy the EMA weights into the module"):
        checkpoints._save_unet(model.unet, "unused", state_dict={})
