"""JobManager with an injected fake train function: fast and deterministic."""

from __future__ import annotations

import json
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest

from pogdiff.config import ModelConfig, TrainConfig
from pogdiff.runs.jobs import JobBusyError, JobManager, JobStatus
from pogdiff.training.run_folder import read_previews
from tests.fakes import FakeDataset, FakeTrain

TIMEOUT = 10.0


def _cfgs(steps: int = 4, method: str = "pogdiff"):
    return ModelConfig(), TrainConfig(method=method, max_steps=steps, batch_size=2)


def test_idle_status_before_any_job(tmp_path):
    jobs = JobManager(tmp_path, train_fn=FakeTrain())
    status = jobs.status()
    assert status.state == "idle" and not status.busy and status.progress == 0.0
    assert jobs.current() is None and jobs.runs.list_runs() == [] and jobs.stop() is False


def test_run_to_completion_records_history_preview_and_run(tmp_path):
    fake = FakeTrain()
    jobs = JobManager(tmp_path, train_fn=fake)
    jobs.start(FakeDataset(), *_cfgs(4), preview_captions=["x", "y"], base_checkpoint="base")
    status = jobs.wait(TIMEOUT)
    assert status.state == "finished" and not status.stopped
    assert status.step == 4 and status.max_steps == 4 and status.progress == 1.0
    assert [row["step"] for row in status.history] == [1, 2, 3, 4]
    assert status.history[1]["loss"] == pytest.approx(0.5) and "psi_mean" in status.history[0]
    assert status.preview_step == 4 and status.preview_images.shape == (2, 8, 8, 3)
    assert status.preview_captions == ["x", "y"]
    assert fake.kwargs["base_checkpoint"] == "base"
    runs = jobs.runs.list_runs()
    assert len(runs) == 1
    run = runs[0]
    assert run.method == "pogdiff" and run.steps_done == 4 and run.state == "finished"
    assert run.checkpoint.name == "checkpoint-000004" and run.train_cfg["max_steps"] == 4
    assert run.dataset == {"root": "demo", "num_samples": 3, "num_classes": 2}


def test_second_start_is_refused_with_a_clear_message(tmp_path):
    fake = FakeTrain(gated=True)
    jobs = JobManager(tmp_path, train_fn=fake)
    jobs.start(FakeDataset(), *_cfgs(3))
    assert fake.started.wait(TIMEOUT)
    with pytest.raises(JobBusyError, match="already running.*One job runs per server"):
        jobs.start(FakeDataset(), *_cfgs(3))
    for _ in range(3):
        fake.step_gate.release()
    assert jobs.wait(TIMEOUT).state == "finished"
    jobs.start(FakeDataset(), *_cfgs(1, "baseline"))  # allowed once the first one ended
    fake.step_gate.release()
    assert jobs.wait(TIMEOUT).method == "baseline"


def test_stop_stops_within_a_step_and_keeps_the_checkpoint(tmp_path):
    fake = FakeTrain(gated=True)
    jobs = JobManager(tmp_path, train_fn=fake)
    jobs.start(FakeDataset(), *_cfgs(100))
    fake.step_gate.release()
    fake.step_gate.release()
    # wait until two steps are logged
    for _ in range(200):
        if jobs.status().step == 2:
            break
        threading.Event().wait(0.01)
    assert jobs.stop() is True
    assert jobs.status().state == "stopping"
    assert jobs.stop() is False  # already stopping
    fake.step_gate.release()
    status = jobs.wait(TIMEOUT)
    assert status.state == "finished" and status.stopped and status.step == 2
    assert Path(status.last_checkpoint).name == "checkpoint-000002"
    assert jobs.runs.list_runs()[0].stopped is True


def test_failure_is_captured_and_the_manager_keeps_working(tmp_path):
    jobs = JobManager(tmp_path, train_fn=FakeTrain(fail_at=2))
    jobs.start(FakeDataset(), *_cfgs(5))
    status = jobs.wait(TIMEOUT)
    assert status.state == "failed"
    assert status.error == "ValueError: learning_rate must be positive, got -1"
    assert "ValueError: learning_rate must be positive" in status.traceback
    meta = json.loads((Path(status.run_dir) / "run.json").read_text())
    assert meta["state"] == "failed" and "learning_rate" in meta["error"]
    assert jobs.runs.list_runs() == []  # no checkpoint was written
    jobs._train_fn = FakeTrain()
    jobs.start(FakeDataset(), *_cfgs(2))
    assert jobs.wait(TIMEOUT).state == "finished"


def test_status_reattaches_from_a_fresh_reference(tmp_path):
    """A page refresh holds nothing but the shared manager: its snapshot shows the live job."""
    fake = FakeTrain(gated=True)
    jobs = JobManager(tmp_path, train_fn=fake)
    jobs.start(FakeDataset(), *_cfgs(3))
    fake.step_gate.release()
    for _ in range(200):
        if jobs.status().step == 1:
            break
        threading.Event().wait(0.01)

    def from_another_tab(manager: JobManager) -> JobStatus:
        return manager.status()

    status = from_another_tab(jobs)
    assert status.state == "running" and status.busy and status.step == 1 and status.run_name
    # snapshots are copies: mutating one does not touch the job
    status.history.clear()
    assert len(jobs.status().history) == 1
    assert jobs.runs.list_runs() == []  # the running job is not a finished run
    for _ in range(2):
        fake.step_gate.release()
    assert jobs.wait(TIMEOUT).state == "finished"


def test_export_weights_is_the_fp16_unet_or_the_lora_file_alone(tmp_path):
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    jobs = JobManager(tmp_path / "runs", train_fn=FakeTrain())
    jobs.start(FakeDataset(), *_cfgs(2))
    jobs.wait(TIMEOUT)
    run = jobs.runs.list_runs()[0]
    unet = run.run_dir / "checkpoint-000002" / "unet"
    with pytest.raises(ValueError, match="has no UNet weights"):
        jobs.runs.export_weights(run)
    weights = {"conv.weight": torch.randn(4, 3, dtype=torch.float32), "steps": torch.tensor([7])}
    save_file(weights, str(unet / "diffusion_pytorch_model.safetensors"))
    (unet / "config.json").write_text('{"sample_size": 32}')
    path = jobs.runs.export_weights(run)
    assert path.name == f"{run.name}-unet-fp16.safetensors"
    out = load_file(str(path))
    assert out["conv.weight"].dtype == torch.float16 and out["steps"].dtype == weights["steps"].dtype
    torch.testing.assert_close(out["conv.weight"].float(), weights["conv.weight"], atol=1e-3, rtol=1e-3)
    with safe_open(str(path), "pt") as fh:
        assert fh.metadata()["config"] == '{"sample_size": 32}'
    lora = {"lora_A.weight": torch.randn(2, 4)}
    save_file(lora, str(unet / "pytorch_lora_weights.safetensors"))
    path = jobs.runs.export_weights(run.name)
    assert path.name == f"{run.name}-lora.safetensors"
    torch.testing.assert_close(load_file(str(path))["lora_A.weight"], lora["lora_A.weight"])  # LoRA kept exact


def test_export_zip_holds_weights_config_and_run_file(tmp_path):
    jobs = JobManager(tmp_path / "runs", train_fn=FakeTrain())
    jobs.start(FakeDataset(), *_cfgs(2))
    jobs.wait(TIMEOUT)
    run = jobs.runs.list_runs()[0]
    path = jobs.runs.export_zip(run)
    assert path.suffix == ".zip" and path.exists()
    with zipfile.ZipFile(path) as zf:
        names = set(zf.namelist())
    assert f"{run.name}/run.json" in names
    assert f"{run.name}/checkpoint-000002/configs.json" in names
    assert f"{run.name}/checkpoint-000002/unet/weights.safetensors" in names
    assert jobs.runs.export_zip(run.name) == path  # by name, cached
    assert jobs.runs.list_runs()[0].name == run.name  # the exports folder is not a run
    with pytest.raises(ValueError, match="no finished run"):
        jobs.runs.export_zip("nope")


def test_interrupted_run_on_disk_is_listed(tmp_path):
    run_dir = tmp_path / "20250101-000000-pogdiff"
    (run_dir / "checkpoint-000010").mkdir(parents=True)
    (run_dir / "checkpoint-000010" / "configs.json").write_text("{}")
    (run_dir / "run.json").write_text(json.dumps({"name": run_dir.name, "state": "running", "method": "pogdiff"}))
    runs = JobManager(tmp_path, train_fn=FakeTrain()).runs.list_runs()
    assert [(r.name, r.state, r.checkpoint.name) for r in runs] == [
        (run_dir.name, "interrupted", "checkpoint-000010")
    ]


def test_an_interrupted_run_is_listed_and_resumes_in_its_own_folder(tmp_path):
    fake = FakeTrain()
    jobs = JobManager(tmp_path, train_fn=fake)
    jobs.start(FakeDataset(), *_cfgs(4), base_checkpoint="base")
    jobs.wait(TIMEOUT)
    run = jobs.runs.list_runs()[0]
    meta = json.loads((run.run_dir / "run.json").read_text())
    meta["state"] = "running"  # what a server killed mid-run leaves behind
    (run.run_dir / "run.json").write_text(json.dumps(meta))
    restarted = JobManager(tmp_path, train_fn=fake)
    listed = restarted.runs.list_runs()
    assert [(r.name, r.state) for r in listed] == [(run.name, "interrupted")]
    restarted.resume(run.name, FakeDataset())
    status = restarted.wait(TIMEOUT)
    assert status.state == "finished" and status.run_name == run.name
    assert fake.kwargs["run_dir"] == run.run_dir and fake.kwargs["base_checkpoint"] == "base"
    assert fake.kwargs["train_cfg"] == _cfgs(4)[1]
    assert [r.name for r in restarted.runs.list_runs()] == [run.name]  # no new folder
    with pytest.raises(ValueError, match="already finished all 4 steps"):
        restarted.resume(run.name, FakeDataset())
    with pytest.raises(ValueError):
        restarted.resume("../elsewhere", FakeDataset())


# ----------------------------------------------------------------- previews, run settings, step time
def test_previews_are_saved_in_the_run_folder_and_read_back(tmp_path):
    from pogdiff.training.run_folder import read_previews

    jobs = JobManager(tmp_path, train_fn=FakeTrain())
    jobs.start(FakeDataset(), *_cfgs(5), preview_captions=["x", "y"], run_name="named")
    jobs.wait(TIMEOUT)
    folder = tmp_path / "named" / "previews"
    assert sorted(p.name for p in folder.iterdir()) == ["step_000002.json", "step_000002.png",
                                                         "step_000004.json", "step_000004.png"]
    previews = read_previews(tmp_path / "named")
    assert [p.step for p in previews] == [2, 4] and [p.captions for p in previews] == [["x", "y"]] * 2
    assert previews[1].images.shape == (2, 8, 8, 3) and previews[1].images.dtype == np.uint8
    assert (previews[0].images == 2).all() and (previews[1].images == 4).all()  # FakeTrain fills with the step
    assert [p.step for p in jobs.runs.previews()] == [2, 4]  # the current job
    assert [p.step for p in JobManager(tmp_path).runs.previews("named")] == [2, 4]  # after a restart, by name
    (folder / "step_000004.png").write_bytes(b"not a png")
    assert [p.step for p in read_previews(tmp_path / "named")] == [2]  # a broken one is skipped
    with pytest.raises(ValueError, match="is not a run name"):
        jobs.runs.previews("../elsewhere")


def test_previews_of_the_current_job_are_read_with_a_relative_runs_folder(tmp_path, monkeypatch):
    """``python app.py`` from the clone: runs_dir is the relative ``runs``."""
    monkeypatch.chdir(tmp_path)
    jobs = JobManager("runs", train_fn=FakeTrain())
    jobs.start(FakeDataset(), *_cfgs(4), preview_captions=["x", "y"], run_name="rel")
    jobs.wait(TIMEOUT)
    assert not jobs.current().run_dir.is_absolute()
    assert [p.step for p in jobs.runs.previews()] == [2, 4]  # the current or last job
    assert [p.step for p in jobs.runs.previews("rel")] == [2, 4]  # by name
    assert [(p.step, p.captions) for p in read_previews(Path("runs") / "rel")] == [(2, ["x", "y"]), (4, ["x", "y"])]


def test_save_preview_refuses_images_and_captions_that_do_not_match(tmp_path):
    from pogdiff.training.run_folder import save_preview

    with pytest.raises(ValueError, match=r"needs N images \[N, H, W, 3\] and N captions, got \(2, 8, 8, 3\) and 1"):
        save_preview(tmp_path, 1, np.zeros((2, 8, 8, 3), np.uint8), ["only one"])


def test_run_meta_of_the_current_job_or_else_the_newest_run(tmp_path):
    jobs = JobManager(tmp_path, train_fn=FakeTrain())
    assert jobs.runs.run_meta() is None
    jobs.start(FakeDataset(), *_cfgs(3, "cbdm"), run_name="first")
    jobs.wait(TIMEOUT)
    meta = jobs.runs.run_meta()
    assert meta["name"] == "first" and meta["train_cfg"]["method"] == "cbdm" and meta["state"] == "finished"
    assert JobManager(tmp_path).runs.run_meta()["name"] == "first"  # a restarted server: the newest run on disk
    assert jobs.runs.run_meta("first") == meta


def test_a_finished_run_records_its_step_time_for_later_estimates(tmp_path):
    jobs = JobManager(tmp_path, train_fn=FakeTrain())
    model_cfg, train_cfg = _cfgs(3)
    jobs.start(FakeDataset(), model_cfg, train_cfg, run_name="timed")
    jobs.wait(TIMEOUT)
    meta = json.loads((tmp_path / "timed" / "run.json").read_text())
    assert meta["seconds_per_step"] == pytest.approx(0.01) and meta["timed_steps"] == 3  # FakeStep's figure
    same = dict(preset="tiny", method="pogdiff", batch_size=2, resolution=model_cfg.resolution)
    found = jobs.runs.recorded_step_time(**same)
    assert (found.seconds_per_step, found.steps, found.source) == (pytest.approx(0.01), 3, "run timed")
    assert jobs.runs.recorded_step_time(**{**same, "batch_size": 4}) is None
    assert jobs.runs.recorded_step_time(**{**same, "method": "baseline"}) is None


def test_time_steps_times_the_steps_after_the_first_and_keeps_nothing(tmp_path):
    ticks = iter([100.0, 103.0, 104.5, 106.0])  # start, then the end of steps 1, 2 and 3
    fake = FakeTrain()
    jobs = JobManager(tmp_path, train_fn=fake)
    model_cfg, train_cfg = _cfgs(300)
    measured = jobs.time_steps(FakeDataset(), model_cfg, train_cfg, steps=2, clock=lambda: next(ticks))
    assert measured.seconds_per_step == pytest.approx(1.5) and measured.setup_seconds == pytest.approx(3.0)
    assert (measured.steps, measured.source) == (2, "trial")
    assert fake.kwargs["train_cfg"].max_steps == 3 and fake.kwargs["train_cfg"].sample_every == 0
    assert fake.kwargs["preview_captions"] is None
    assert list(tmp_path.iterdir()) == [] and jobs.runs.list_runs() == []  # the scratch folder is gone
    assert jobs.status().state == "idle"


def test_no_job_starts_during_a_step_time_trial_and_no_trial_during_a_job(tmp_path):
    refused = []

    def train_that_tries_to_start(**kwargs):
        try:
            jobs.start(FakeDataset(), *_cfgs(2))
        except JobBusyError as exc:
            refused.append(str(exc))
        return FakeTrain()(**kwargs)

    jobs = JobManager(tmp_path, train_fn=train_that_tries_to_start)
    jobs.time_steps(FakeDataset(), *_cfgs(5))
    assert refused and "step-time trial is running" in refused[0]
    gated = FakeTrain(gated=True)
    jobs = JobManager(tmp_path / "b", train_fn=gated)
    jobs.start(FakeDataset(), *_cfgs(1))
    assert gated.started.wait(TIMEOUT)
    with pytest.raises(JobBusyError, match="already running"):
        jobs.time_steps(FakeDataset(), *_cfgs(5))
    gated.step_gate.release()
    assert jobs.wait(TIMEOUT).state == "finished"


# ----------------------------------------------------------------- live ETA
def _steps(*segments, start=1, t0=0.0):
    """``[(step, end time), ...]``: the first step ends at ``t0``, then each ``(n, seconds)`` segment adds n
    steps of that many seconds."""
    ends, step, t = [(start, t0)], start, t0
    for n, seconds in segments:
        for _ in range(n):
            step, t = step + 1, t + seconds
            ends.append((step, t))
    return ends


def test_eta_waits_for_a_few_timed_steps_and_never_uses_the_warm_up_step():
    from pogdiff.runs.jobs import ETA_MIN_STEPS, estimate_eta

    assert ETA_MIN_STEPS == 3
    assert estimate_eta([(1, 30.0)], 300) == (None, None, False)  # step 1 alone (set-up, warm-up): estimating
    assert estimate_eta(_steps((2, 1.3), t0=30.0), 300) == (None, None, False)  # 2 timed steps: still estimating
    left, rate, untimed = estimate_eta(_steps((3, 1.3), t0=30.0), 300)  # step 4: 3 steps of 1.3 s after the first
    assert rate == pytest.approx(1.3) and left == pytest.approx(1.3 * 296) and not untimed


def test_eta_follows_the_latest_steps_rate():
    from pogdiff.runs.jobs import ETA_WINDOW, estimate_eta

    ends = _steps((30, 0.5), (ETA_WINDOW, 2.0))  # the machine got busy: steps went from 0.5 s to 2 s
    left, rate, _ = estimate_eta(ends, 100)
    assert ends[-1][0] == 51 and rate == pytest.approx(2.0) and left == pytest.approx(2.0 * 49)
    left, rate, _ = estimate_eta(_steps((30, 0.5), (10, 2.0)), 100)  # half the window at each rate
    assert rate == pytest.approx(1.25) and left == pytest.approx(1.25 * 59)


def test_eta_counts_the_previews_still_to_come_at_their_measured_time():
    from pogdiff.runs.jobs import estimate_eta

    ends = _steps((9, 1.0))  # step 10 of 300, previews every 50, none made yet
    left, rate, untimed = estimate_eta(ends, 300, preview_every=50)
    assert rate == pytest.approx(1.0) and left == pytest.approx(290) and untimed  # shown as "+ previews"
    ends = _steps((49, 1.0), (1, 1.0 + 12.0), (9, 1.0))  # the step-50 preview took 12 s; now at step 60
    left, rate, untimed = estimate_eta(ends, 300, previews=[(50, 12.0)], preview_every=50)
    assert rate == pytest.approx(1.0) and not untimed  # the preview is not read as slow steps
    assert left == pytest.approx(240 * 1.0 + 5 * 12.0)  # steps 100, 150, ..., 300 still preview


def test_the_live_eta_of_a_job_says_estimating_at_first_and_is_zero_at_the_end(tmp_path):
    fake = FakeTrain(gated=True)
    jobs = JobManager(tmp_path, train_fn=fake)
    jobs.start(FakeDataset(), *_cfgs(6), run_name="eta")
    seen = []
    for step in range(1, 7):
        fake.step_gate.release()
        for _ in range(200):
            if jobs.status().step >= step:
                break
            threading.Event().wait(0.01)
        seen.append(jobs.status().eta_seconds)
    assert seen[:3] == [None, None, None] and all(e is not None and e >= 0 for e in seen[3:])
    assert jobs.wait(TIMEOUT).eta_seconds == 0.0


def test_scratch_folders_are_never_listed_as_runs(tmp_path):
    from pogdiff.training.run_folder import update_record

    jobs = JobManager(tmp_path, train_fn=FakeTrain())
    jobs.start(FakeDataset(), *_cfgs(2), run_name="real")
    jobs.wait(5)
    for name in (".timing-abc", "real-copy"):
        folder = tmp_path / name
        (folder / "checkpoint-000002").mkdir(parents=True)
        (folder / "checkpoint-000002" / "configs.json").write_text("{}")
        update_record(folder, state="running", steps_done=2)
    assert sorted(r.name for r in jobs.runs.list_runs()) == ["real", "real-copy"]
    assert [r.state for r in jobs.runs.list_runs() if r.name == "real-copy"] == ["interrupted"]


def test_the_record_holds_the_trainers_fields_and_the_job_managers(tmp_path):
    """run.json is one record written by two hands: what the trainer writes survives the job's end."""
    from pogdiff.training.run_folder import read_record, update_record

    fake = FakeTrain()

    def trainer_like(**kwargs):
        update_record(kwargs["run_dir"], state="running", pid=4242, fingerprint={"method": "pogdiff"})
        result = fake(**kwargs)
        update_record(kwargs["run_dir"], state="finished", steps_done=result.steps_done, pid=4242)
        return result

    jobs = JobManager(tmp_path, train_fn=trainer_like)
    jobs.start(FakeDataset(), *_cfgs(3), run_name="both", owner="someone")
    jobs.wait(5)
    record = read_record(tmp_path / "both")
    assert (record["pid"], record["fingerprint"]) == (4242, {"method": "pogdiff"})  # the trainer's
    assert (record["name"], record["state"], record["steps_done"]) == ("both", "finished", 3)  # the job manager's
    assert record["owner"] and record["owner"] != "someone"  # stored as a digest only
