"""Faults in real processes: kill -9 in the middle of training, then resume; two CPU processes
(torchrun, gloo) whose checkpoint resumes on one; the CLI on a diverging run."""

from __future__ import annotations

import dataclasses
import json
import re
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pogdiff.model import checkpoints
from pogdiff.runs.store import RunStore
from pogdiff.config import DataConfig, PsiConfig, TrainConfig
from pogdiff.data import load_image_text_set
from pogdiff.training.trainer import Trainer
from pogdiff.training.run import build_model, train
from pogdiff.method.prepare import prepare_data
from tests.conftest import SMALL_MODEL
from tests.fakes import free_port

REPO = Path(__file__).resolve().parent.parent
# The same configuration as tests/train_worker.py builds.
WORKER_CFG = TrainConfig(batch_size=4, log_every=0, warmup_steps=1, checkpoint_minutes=0.0, method="pogdiff")


@pytest.fixture(scope="module")
def dataset(small_demo):
    return load_image_text_set(small_demo / "train", DataConfig())


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_MIXED_PRECISION"):
        env.pop(key, None)
    return env


def _tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(ckpt.rglob("*.safetensors")):
        for k, v in load_file(f).items():
            out[f"{f.relative_to(ckpt)}:{k}"] = v
    return out


def test_kill_9_in_the_middle_loses_at_most_one_interval_and_resumes_exactly(small_demo, dataset, tmp_path):
    run_dir = tmp_path / "killed"
    cmd = [sys.executable, "-m", "tests.train_worker", "--data", str(small_demo / "train"), "--run-dir",
           str(run_dir), "--steps", "12", "--checkpoint-every", "2"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    seen = 0
    try:
        deadline = time.monotonic() + 120
        for line in proc.stdout:
            if line.startswith("step "):
                seen = int(line.split()[1])
            if seen >= 5 or time.monotonic() > deadline:
                break
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert 5 <= seen < 12, f"the worker was not killed mid-run (last step seen: {seen})"
    latest = checkpoints.latest_checkpoint(run_dir)
    assert latest is not None
    saved_step = checkpoints.read_trainer_state(latest)["step"]
    assert saved_step >= seen - 2  # at most one checkpoint interval lost
    [run] = RunStore(tmp_path).list_runs()
    assert (run.run_dir, run.state, run.steps_done) == (run_dir.resolve(), "interrupted", saved_step)

    cfg = dataclasses.replace(WORKER_CFG, max_steps=12, checkpoint_every=2)
    resumed = train(dataset=dataset, model_cfg=SMALL_MODEL, train_cfg=cfg, run_dir=run_dir)
    assert resumed.steps_done == 12 and len(resumed.history) == 12
    assert not list(run_dir.glob(".tmp-*"))
    assert [(r.state, r.steps_done) for r in RunStore(tmp_path).list_runs() if r.run_dir == run_dir.resolve()] == [
        ("finished", 12)]
    full = train(dataset=dataset, model_cfg=SMALL_MODEL, train_cfg=cfg, run_dir=tmp_path / "full")
    a, b = _tensors(full.last_checkpoint), _tensors(resumed.last_checkpoint)
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


@pytest.mark.slow
def test_two_cpu_processes_train_together_and_their_checkpoint_resumes_on_one(small_demo, dataset, tmp_path):
    run_dir = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), "-m", "tests.train_worker", "--data", str(small_demo / "train"), "--run-dir",
           str(run_dir), "--steps", "4", "--ema-decay", "0.9"]
    out = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    steps = [line for line in out.stdout.splitlines() if line.startswith("step ")]
    assert [s.split()[1] for s in steps] == ["1", "2", "3", "4"]  # logged by the main process only
    # both processes print to one pipe, so their final lines can run together: match, don't split
    assert sorted(re.findall(r"done (\d+) rank (\d+)", out.stdout)) == [("4", "0"), ("4", "1")]
    assert [p.name for p in run_dir.glob("checkpoint-*")] == ["checkpoint-000004"]
    state = json.loads((run_dir / "checkpoint-000004" / "trainer_state.json").read_text())
    assert state["extra"]["num_processes"] == 2

    cfg = dataclasses.replace(WORKER_CFG, max_steps=6, ema_decay=0.9, checkpoint_every=0)
    resumed = train(dataset=dataset, model_cfg=SMALL_MODEL, train_cfg=cfg, run_dir=run_dir)
    assert resumed.steps_done == 6 and len(resumed.history) == 6
    assert np.isfinite([h.terms["loss"] for h in resumed.history]).all()


def test_processes_draw_disjoint_rows_and_distinct_noise(dataset, tmp_path):
    model = build_model(SMALL_MODEL)
    data = prepare_data(dataset, model, PsiConfig(), need_table=False)
    trainer = Trainer(model, data, dataclasses.replace(WORKER_CFG, method="baseline", max_steps=2), run_dir=tmp_path)
    trainer.num_processes = 2
    batches = []
    for rank in (0, 1):
        trainer.accelerator = types.SimpleNamespace(process_index=rank)
        batches.append(trainer.sample_batch(trainer.generator(3), trainer.rows_generator(3)))
    rows = [set(b.rows.tolist()) for b in batches]
    assert len(rows[0]) == len(rows[1]) == 4 and not rows[0] & rows[1]
    shared = set(torch.randperm(len(data), generator=trainer.rows_generator(3))[:8].tolist())
    assert rows[0] | rows[1] == shared
    assert not torch.equal(batches[0].eps, batches[1].eps)
    seeds = set()
    for rank in range(1000):  # no stride limit on the number of processes
        trainer.accelerator = types.SimpleNamespace(process_index=rank)
        seeds.update(trainer.generator(s).initial_seed() for s in (0, 1))
    assert len(seeds) == 2000


def test_cli_train_with_a_huge_learning_rate_exits_non_zero_naming_the_non_finite_loss(small_demo, tmp_path,
                                                                                         capsys):
    from pogdiff.cli import main

    rc = main(["train", "--data", str(small_demo / "train"), "--base", "none", "--method", "baseline",
               "--lr", "1e6", "--steps", "30", "--batch-size", "4", "--run-dir", str(tmp_path / "run"),
               "--cache-dir", str(tmp_path / "cache")])
    err = capsys.readouterr().err
    assert rc == 3
    assert "non-finite loss at step" in err and "Try a lower learning rate (now 1e+06)" in err
    rc = main(["train", "--data", str(small_demo / "train"), "--lr", "inf", "--run-dir", str(tmp_path / "r2")])
    assert rc == 2 and "learning_rate must be a finite number > 0, got inf" in capsys.readouterr().err
