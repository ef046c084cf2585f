"""Attacks as a client would make them: paths, crafted run folders, out-of-range values, other sessions.

Unit tests of the path and value checks first, then the JobManager and Studio with crafted run
folders, then the app itself through gradio_client on a free port (README "Limits and safety").
"""

from __future__ import annotations

import json
import math
import os
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import pandas as pd
import pytest

from pogdiff import cli, ui
from pogdiff.server import safety
from pogdiff.config import LIMITS, ModelConfig, TrainConfig
from pogdiff.runs.jobs import JobManager

from tests.fakes import FakeDataset, FakeTrain, free_port, noop_progress, tiny_set, train_form
from pogdiff.ui import downloads, views

TIMEOUT = 10.0
GRADIO_REFUSES = "greater than maximum|less than minimum|not in the list of choices"  # gradio's own checks
A, B = SimpleNamespace(username=None, session_hash="session-a"), SimpleNamespace(username=None, session_hash="b")


# ----------------------------------------------------------------------------- path helpers
def test_resolve_inside_refuses_absolute_dotdot_and_symlinks_out(tmp_path):
    root, outside = tmp_path / "runs", tmp_path / "outside"
    (root / "r1").mkdir(parents=True)
    outside.mkdir()
    (root / "out-link").symlink_to(outside, target_is_directory=True)
    (root / "in-link").symlink_to(root / "r1", target_is_directory=True)
    assert safety.resolve_inside(root, "r1") == (root / "r1").resolve()
    assert safety.resolve_inside(root, root / "in-link") == (root / "r1").resolve()
    for bad in (str(outside), "../outside", "r1/../../outside", "out-link", root / "out-link" / "x", "/etc/passwd"):
        with pytest.raises(safety.UnsafePathError, match="resolves outside 'runs'"):
            safety.resolve_inside(root, bad)
        assert not safety.is_inside(root, bad)


@pytest.mark.parametrize("name", ["/etc", "../x", "a/b", "..", "a..b", "", ".hidden", "x\\y", "a\x00b", None, 7,
                                  "n" * 200])
def test_check_run_name_refuses_anything_but_a_folder_name(name):
    with pytest.raises(ValueError, match="is not a run name"):
        safety.check_run_name(name)


def test_check_run_name_accepts_the_names_the_app_makes():
    assert safety.check_run_name("20250101-000000-pogdiff-2") == "20250101-000000-pogdiff-2"
    assert safety.check_run_name("demo_baseline.v1") == "demo_baseline.v1"


def test_remove_old_dirs_removes_only_old_prefixed_folders(tmp_path):
    old, new, other = tmp_path / "pogdiff-upload-old", tmp_path / "pogdiff-upload-new", tmp_path / "keep-old"
    for d in (old, new, other):
        d.mkdir()
        (d / "f").write_text("x")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    os.utime(other, (time.time() - 7200, time.time() - 7200))
    assert safety.remove_old_dirs(tmp_path, "pogdiff-upload-", 3600) == 1
    assert not old.exists() and new.exists() and other.exists()


# ----------------------------------------------------------------------------- value checks
@pytest.mark.parametrize("value,message", [
    (0, "from 1 to 256, got 0"), (100000, "from 1 to 256, got 100000"), (2.5, "whole number"),
    (float("nan"), "finite"), (float("inf"), "finite"), ("abc", "must be a number"), (True, "must be a number"),
    (None, "must be a number"), ([3], "must be a number, got list"), ("1e9", "from 1 to 256"),
])
def test_whole_number_bounds(value, message):
    with pytest.raises(ValueError, match=message):
        safety.whole_number("Batch size", value, 1, 256)


def test_numbers_flags_choices_and_text():
    assert safety.whole_number("k", 3.0, 1, 5) == 3 and safety.whole_number("k", "4", 1, 5) == 4
    assert safety.real_number("lr", 1e-4, 0.0, 1.0, True) == 1e-4
    with pytest.raises(ValueError, match="above 0 up to 1"):
        safety.real_number("lr", 0.0, 0.0, 1.0, True)
    with pytest.raises(ValueError, match="finite"):
        safety.real_number("psi_max", -math.inf, 0.0, 10.0)
    assert safety.flag("s_img", None) is False
    with pytest.raises(ValueError, match="true or false"):
        safety.flag("s_img", "yes")
    with pytest.raises(ValueError, match="one of baseline, pogdiff"):
        safety.choice("Method", "../../etc", ("baseline", "pogdiff"))
    with pytest.raises(ValueError, match="limit is 5"):
        safety.text("Query", "x" * 6, 5)
    with pytest.raises(ValueError, match="at most 2"):
        safety.text_list("Prompts", ["a", "b", "c"], 2, 10)
    with pytest.raises(ValueError, match="must be text"):
        safety.text_list("Prompts", [{"path": "/etc/passwd"}], 2, 10)


# ----------------------------------------------------------------------------- crafted runs on disk
def _checkpoint(folder: Path, secret: str | None = None) -> Path:
    (folder / "unet").mkdir(parents=True)
    (folder / "configs.json").write_text("{}")
    (folder / "unet" / "weights.safetensors").write_bytes(b"\0" * 8)
    if secret:
        (folder / "secret.txt").write_text(secret)
    return folder


@pytest.fixture
def crafted(tmp_path):
    """runs/ with one honest run and several crafted ones; outside/ holds secrets."""
    runs, outside = tmp_path / "runs", tmp_path / "outside"
    _checkpoint(outside / "ckpt", secret="TOP-SECRET")
    (outside / "run.json").write_text(json.dumps({"name": "outside", "state": "finished"}))
    honest = runs / "20250101-000000-pogdiff"
    _checkpoint(honest / "checkpoint-000002")
    (honest / "run.json").write_text(json.dumps({"name": honest.name, "state": "finished",
                                                 "last_checkpoint": str(honest / "checkpoint-000002")}))
    evil = runs / "evil"  # run.json pointing at a checkpoint outside, with a traversing name
    evil.mkdir()
    (evil / "run.json").write_text(json.dumps({"name": "../../escaped", "state": "finished",
                                               "last_checkpoint": str(outside / "ckpt")}))
    (runs / "linked").symlink_to(outside, target_is_directory=True)  # a run folder that is a symlink out
    leaky = runs / "leaky"  # an honest-looking checkpoint with a file linking out
    _checkpoint(leaky / "checkpoint-000001")
    (leaky / "checkpoint-000001" / "unet" / "extra.bin").symlink_to(outside / "ckpt" / "secret.txt")
    (leaky / "run.json").write_text(json.dumps({"name": "leaky", "state": "finished"}))
    return SimpleNamespace(runs=runs, outside=outside, honest=honest, tmp=tmp_path)


def _all_files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def test_crafted_run_json_cannot_point_outside(crafted):
    jobs = JobManager(crafted.runs, train_fn=FakeTrain())
    names = sorted(r.name for r in jobs.runs.list_runs())
    assert names == [crafted.honest.name, "leaky"]  # evil has no checkpoint inside; linked is outside
    before = _all_files(crafted.tmp)
    with pytest.raises(ValueError, match="no finished run"):
        jobs.runs.export_zip("evil")
    with pytest.raises(ValueError, match="no finished run"):
        jobs.runs.export_zip("linked")
    with pytest.raises(ValueError, match="links outside its run folder"):
        jobs.runs.export_zip("leaky")
    assert _all_files(crafted.tmp) == before  # nothing was written anywhere


@pytest.mark.parametrize("attack", ["abs-outside", "dotdot", "abs-honest"])
def test_export_by_path_is_refused(crafted, attack):
    jobs = JobManager(crafted.runs, train_fn=FakeTrain())
    target = {"abs-outside": str(crafted.outside), "dotdot": "../outside",
              "abs-honest": str(crafted.honest)}[attack]
    with pytest.raises(ValueError, match="not a run name"):
        jobs.runs.export_zip(target)
    assert not (crafted.runs / "exports").exists() and not (crafted.tmp / "outside.zip").exists()


def test_honest_export_still_works_and_stays_inside(crafted):
    jobs = JobManager(crafted.runs, train_fn=FakeTrain())
    path = jobs.runs.export_zip(crafted.honest.name)
    assert path.resolve().is_relative_to(crafted.runs.resolve())
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
    assert f"{crafted.honest.name}/checkpoint-000002/configs.json" in names
    assert not any("secret" in n for n in names)


def test_studio_export_copies_the_zip_out_of_the_runs_folder(crafted):
    studio = ui.Studio(crafted.runs, shipped_dir=crafted.tmp / "shipped", device="cpu")
    out = Path(studio.train_runs.export_run(crafted.honest.name, A))
    assert out.is_file() and not out.resolve().is_relative_to(crafted.runs.resolve())
    assert out.parent.name.startswith(downloads.EXPORT_TMP_PREFIX)
    for bad in ("evil", "linked", "leaky", str(crafted.outside), "../outside", {"path": "/etc"}):
        with pytest.raises(gr.Error):
            studio.train_runs.export_run(bad, A)


def test_precomputed_metrics_take_no_path(tmp_path):
    studio = ui.Studio(tmp_path / "runs", shipped_dir=tmp_path / "shipped", device="cpu")
    secret = tmp_path / "secret"
    secret.mkdir()
    pd.DataFrame({"subject": ["x"], "train_count": [1], "shot": ["few"], "accuracy": [0.123456]}
                 ).to_csv(secret / "per_class.csv", index=False)
    out = studio.metrics.precomputed_metrics("shipped:../secret", "shipped:../secret/.")
    assert all(isinstance(x, dict) and x.get("__type__") == "update" for x in out)  # nothing read
    out = studio.metrics.precomputed_metrics(str(secret), ["shipped:../secret"])
    assert all(isinstance(x, dict) and x.get("__type__") == "update" for x in out)


# ----------------------------------------------------------------------------- bounds in the Studio
@pytest.fixture
def studio(tmp_path):
    return ui.Studio(tmp_path / "runs", shipped_dir=tmp_path / "shipped",
                     jobs=JobManager(tmp_path / "runs", train_fn=FakeTrain()), device="cpu")


@pytest.mark.parametrize("kw,message", [
    (dict(batch_size=100000), "Batch size must be a whole number from 1 to 256"),
    (dict(steps=1e9), "Steps must be a whole number from 1 to 20000"),
    (dict(steps=float("nan")), "Steps must be a finite number"),
    (dict(steps="abc"), "Steps must be a number"),
    (dict(k=10**6), "k \\(neighbours\\) must be a whole number from 1 to 50"),
    (dict(lr=float("inf")), "Learning rate must be a finite number"),
    (dict(psi_max=1e9), "psi_max must be a finite number >= 0 and <= 10"),
    (dict(seed=-1), "Seed must be a whole number from 0"),
    (dict(sample_every=10**9), "Preview every must be a whole number"),
    (dict(method="../../etc/passwd"), "Method must be one of"),
    (dict(preset="/tmp"), "Model preset must be one of"),
    (dict(use_density="rm -rf"), "w_density must be true or false"),
    (dict(preset="sd15", pretrained="/etc"), "not a Hugging Face model id"),
    (dict(preset="sd15", pretrained="../../secret/model"), "not a Hugging Face model id"),
])
def test_training_options_are_bounded_on_the_server(studio, kw, message):
    with pytest.raises(gr.Error, match=message):
        studio.train.build_configs(train_form(**kw))
    with pytest.raises(gr.Error, match=message):
        studio.train.start_run(None, train_form(**kw))
    assert studio.jobs.current() is None


def test_local_model_folders_only_in_single_user_mode(tmp_path):
    local = ui.Studio(tmp_path / "runs", shipped_dir=tmp_path, device="cpu", single_user=True)
    model_cfg, _ = local.train.build_configs(train_form(preset="sd15", pretrained=str(tmp_path)))
    assert model_cfg.pretrained == str(tmp_path)
    hosted = ui.Studio(tmp_path / "runs", shipped_dir=tmp_path, device="cpu")
    assert hosted.train.build_configs(train_form(preset="sd15", pretrained="org/model"))[0].pretrained == "org/model"


@pytest.mark.parametrize("args,message", [
    (dict(n_seeds=1000), "Seeds per prompt must be a whole number from 1 to 16"),
    (dict(sample_steps=10**9), "Sampling steps must be a whole number from 1 to 100"),
    (dict(guidance=float("nan")), "Guidance scale must be a finite number"),
    (dict(prompts=["a photo of x"] * 17), "Prompts: 17 given, at most 16"),
    (dict(prompts=["x" * 10_000]), "limit is 500"),
    (dict(prompts=["a", "b", "c", "d", "e"], n_seeds=16), "80 images per checkpoint"),
    (dict(key_a="run:../../outside"), "not available"),
    (dict(key_a="/etc/passwd"), "not available"),
    (dict(key_a=["run:x"]), "not available"),
])
def test_compare_values_are_bounded_before_any_model_loads(studio, args, message):
    values = dict(key_a="shipped:demo-baseline", key_b="shipped:demo-baseline", prompts=["a photo of x"], custom="",
                  n_seeds=1, guidance=3.0, sample_steps=5)
    values.update(args)
    with pytest.raises(gr.Error, match=message):
        studio.compare.generate_pair(*values.values(), progress=noop_progress)
    assert studio.sources.models == {}


def test_data_and_neighbour_inputs_are_bounded(studio, tmp_path):
    key = studio.data.load_upload([str(p) for p in tiny_set(tmp_path / "set").iterdir()], progress=noop_progress)[0]
    for args, message in (((key, -1, 3, 1.0, False), "caption index must be a whole number from 0 to 7"),
                          ((key, 0, 10**9, 1.0, False), "k \\(neighbours\\) must be a whole number from 1 to 50"),
                          ((key, 0, 3, float("nan"), False), "psi_max must be a finite number"),
                          ((key, "../0", 3, 1.0, False), "caption index must be a number"),
                          ((["x"], 0, 3, 1.0, False), "dataset key must be text")):
        with pytest.raises(gr.Error, match=message):
            studio.neighbours.neighbours_of(*args)
    with pytest.raises(gr.Error, match="limit is 500"):
        studio.neighbours.search(key, "q" * 5000, 3)
    with pytest.raises(gr.Error, match="Colour by must be one of"):
        studio.neighbours.neighbour_map(key, "/etc/passwd", progress=noop_progress)
    with pytest.raises(gr.Error, match="limit is 64"):
        studio.datasets.dataset_banner("k" * 1000)
    assert studio.neighbours.parts == {}  # refused before any encoding


def test_upload_reads_only_the_upload_folder_and_keeps_only_sets_that_loaded(studio, tmp_path):
    secret = tmp_path / "secret.jsonl"
    secret.write_text("{}\n")
    with pytest.raises(gr.Error, match="resolves outside"):
        studio.data.load_upload([str(secret)], A, progress=noop_progress)
    with pytest.raises(gr.Error, match="2001 files uploaded; at most 2000"):
        studio.data.load_upload(["x"] * (LIMITS.max_upload_files + 1), progress=noop_progress)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "notes.md").write_text("no images")
    with pytest.raises(gr.Error):
        studio.data.load_upload([str(bad / "notes.md")], progress=noop_progress)
    assert not studio.datasets.upload_store.exists() or list(studio.datasets.upload_store.iterdir()) == []
    key = studio.data.load_upload([str(p) for p in tiny_set(tmp_path / "set").iterdir()], progress=noop_progress)[0]
    assert [p.name for p in studio.datasets.upload_store.iterdir()] == [key]  # no half-copied folder is left


def test_a_reload_restores_the_dataset_by_its_content_hash(tmp_path):
    files = [str(p) for p in tiny_set(tmp_path / "set").iterdir()]
    first = ui.Studio(tmp_path / "runs", shipped_dir=tmp_path / "shipped", device="cpu")
    key = first.data.load_upload(files, progress=noop_progress)[0]
    assert key == views.upload_key([Path(f) for f in reversed(files)])  # content, not order or temp paths
    restarted = ui.Studio(tmp_path / "runs", shipped_dir=tmp_path / "shipped", device="cpu")  # nothing in memory
    out = restarted.data.restore_dataset(key)
    assert out[0] == key and "8 images · 2 classes" in out[1]
    assert restarted.datasets.bundle(key).captions == first.datasets.bundle(key).captions
    for bad in ("../runs", "upload-../../x", "upload-" + "0" * 16, f"{key}/..", None, ["x"], "/etc/passwd"):
        assert all(isinstance(x, dict) and x.get("__type__") == "update" for x in restarted.data.restore_dataset(bad))


def test_expired_uploads_and_exports_are_removed(tmp_path):
    import tempfile

    studio = ui.Studio(tmp_path / "runs", shipped_dir=tmp_path / "shipped", device="cpu")
    key = studio.data.load_upload([str(p) for p in tiny_set(tmp_path / "set").iterdir()], progress=noop_progress)[0]
    incoming = studio.datasets.upload_store / f"{views.UPLOAD_TMP_PREFIX}crashed"
    incoming.mkdir()
    export = Path(tempfile.mkdtemp(prefix=downloads.EXPORT_TMP_PREFIX))
    old = time.time() - 3600 * (LIMITS.upload_max_age_hours + 1)
    for folder in (studio.datasets.upload_store / key, incoming, export):
        os.utime(folder, (old, old))
    assert studio.datasets.clean_leftovers() >= 3
    assert not (studio.datasets.upload_store / key).exists() and not incoming.exists() and not export.exists()


# ----------------------------------------------------------------------------- ownership and wall time
def test_a_job_belongs_to_the_session_that_started_it(tmp_path):
    fake = FakeTrain(gated=True)
    studio = ui.Studio(tmp_path / "runs", shipped_dir=tmp_path / "shipped",
                       jobs=JobManager(tmp_path / "runs", train_fn=fake), device="cpu")
    key = studio.data.load_upload([str(p) for p in tiny_set(tmp_path / "set").iterdir()], progress=noop_progress)[0]
    studio.train.start_run(key, train_form(steps=2), A)
    assert studio.train.poll(-1, B)[5].interactive is False and studio.train.poll(-1, A)[5].interactive is True
    with pytest.raises(gr.Error, match="started by another visitor"):
        studio.train.stop_training(B)
    assert studio.jobs.status().state == "running"
    assert "Stopping" in studio.train.stop_training(A)[0]
    fake.step_gate.release()
    run = studio.jobs.wait(TIMEOUT)
    assert run.stopped and run.stop_reason == "requested"
    name = studio.jobs.runs.list_runs()[0].name
    assert "session-a" not in (tmp_path / "runs" / name / "run.json").read_text()  # only a digest is stored
    with pytest.raises(gr.Error, match="started by another visitor"):
        studio.train_runs.export_run(name, B)
    assert Path(studio.train_runs.export_run(name, A)).is_file()
    studio.sessions.single_user = True
    assert Path(studio.train_runs.export_run(name, B)).is_file()


class SlowTrain(FakeTrain):
    """Steps every 10 ms for ever, until its stop_event is set."""

    def __call__(self, *, train_cfg, run_dir, stop_event=None, callback=None, **kwargs):
        step = 0
        while not stop_event.is_set():
            step += 1
            callback(SimpleNamespace(step=step, max_steps=train_cfg.max_steps, terms={"loss": 1.0}))
            time.sleep(0.01)
        return SimpleNamespace(stopped=True, steps_done=step, last_checkpoint=None)


def test_wall_time_limit_stops_a_job(tmp_path):
    jobs = JobManager(tmp_path / "runs", train_fn=SlowTrain(), max_seconds=0.3)
    t0 = time.monotonic()
    jobs.start(FakeDataset(), ModelConfig(), TrainConfig(max_steps=10**9))
    status = jobs.wait(TIMEOUT)
    assert status.state == "finished" and status.stopped and time.monotonic() - t0 < 5
    assert status.stop_reason == "wall-time limit of 0.005 min"
    assert views.status_markdown(status).startswith("**Stopped (wall-time limit of 0.005 min)**")
    assert "wall-time limit" in json.loads((Path(status.run_dir) / "run.json").read_text())["stop_reason"]


# ----------------------------------------------------------------------------- command line and flags
def test_cli_refuses_a_huge_batch_before_loading_data(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(cli, "resolve_data", lambda *a, **k: pytest.fail("data was loaded"))
    for argv, message in ((["--batch-size", "100000"], "--batch-size: 100000 is out of range: allowed 1 to 256"),
                          (["--steps", "1000000000"], "--steps: 1000000000 is out of range"),
                          (["--k", "0"], "--k: 0 is out of range"),
                          (["--steps", "nan"], "expected a whole number")):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["train", "--run-dir", str(tmp_path / "r"), *argv])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["sample", "--checkpoint", "x", "--prompt", "a", "--out", "o.png", "--seeds", *map(str, range(17))])
    assert "17 seeds given, at most 16" in capsys.readouterr().err


def test_single_user_is_the_default_only_on_localhost(monkeypatch):
    import app

    monkeypatch.delenv("SPACE_ID", raising=False)
    assert app.parse_args([]).single_user is True
    assert app.parse_args(["--host", "0.0.0.0"]).single_user is False
    assert app.parse_args(["--share"]).single_user is False
    assert app.parse_args(["--host", "0.0.0.0", "--single-user"]).single_user is True
    assert app.parse_args(["--no-single-user"]).single_user is False
    assert app.parse_args(["--max-job-minutes", "5"]).max_job_minutes == 5.0
    with pytest.raises(SystemExit):
        app.parse_args(["--max-job-minutes", "-1"])


# ----------------------------------------------------------------------------- through gradio_client
@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from gradio_client import Client

    import app

    root = tmp_path_factory.mktemp("attack")
    crafted_runs = root / "runs"
    outside = root / "outside"
    _checkpoint(outside / "ckpt", secret="TOP-SECRET")
    (outside / "run.json").write_text(json.dumps({"name": "outside", "state": "finished"}))
    evil = crafted_runs / "evil"
    evil.mkdir(parents=True)
    (evil / "run.json").write_text(json.dumps({"name": "../../escaped", "state": "finished",
                                               "last_checkpoint": str(outside / "ckpt")}))
    (crafted_runs / "linked").symlink_to(outside, target_is_directory=True)
    fake = FakeTrain(gated=True)
    studio = ui.Studio(crafted_runs, shipped_dir=root / "shipped", device="cpu",
                       jobs=JobManager(crafted_runs, train_fn=fake))
    demo = app.build_demo(studio)
    demo.queue(default_concurrency_limit=2)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                **app.launch_options(studio, 5))
    url = f"http://127.0.0.1:{port}/"
    try:
        yield SimpleNamespace(url=url, studio=studio, fake=fake, root=root, outside=outside,
                              client=lambda: Client(url, verbose=False), set=tiny_set(root / "set"))
    finally:
        demo.close()


def _outside_unchanged(served, before):
    files = {p for p in served.root.rglob("*") if p.is_file() and not p.resolve().is_relative_to(
        (served.root / "runs").resolve()) and "set" not in p.parts}
    assert files == before


def test_client_export_with_paths_reads_and_writes_nothing_outside(served):
    client = served.client()
    before = {p for p in served.root.rglob("*") if p.is_file() and not p.resolve().is_relative_to(
        (served.root / "runs").resolve()) and "set" not in p.parts}
    for name in (str(served.outside), "../outside", "linked", "evil", "/etc/passwd", "../../escaped",
                 str(served.root / "runs" / "evil"), "x" * 5000, "exports"):
        with pytest.raises(Exception, match="not a run name|no finished run"):
            client.predict(name, api_name="/export_run")
    _outside_unchanged(served, before)
    assert not (served.root / "escaped.zip").exists()


def test_client_cannot_download_run_files_directly(served):
    import httpx

    run_json = (served.root / "runs" / "evil" / "run.json").resolve()
    for prefix in ("gradio_api/file=", "file="):
        response = httpx.get(f"{served.url}{prefix}{run_json}", timeout=10)
        assert response.status_code != 200 or "escaped" not in response.text


def test_client_values_out_of_range_are_refused_and_the_server_keeps_serving(served):
    client = served.client()
    bad_training = [("pogdiff", "tiny", "", 10**9, 4, 1e-4, 1.0, 5, True, True, True, "all", 0, 0),
                    ("pogdiff", "tiny", "", 3, 100000, 1e-4, 1.0, 5, True, True, True, "all", 0, 0),
                    ("../x", "tiny", "", 3, 4, 1e-4, 1.0, 5, True, True, True, "all", 0, 0),
                    ("pogdiff", "sd15", "/etc", 3, 4, 1e-4, 1.0, 5, True, True, True, "all", 0, 0)]
    for values in bad_training:
        with pytest.raises(Exception, match="must be|not a Hugging Face|needs a GPU|" + GRADIO_REFUSES):
            client.predict(*values, api_name="/start_training")
    assert served.studio.jobs.current() is None
    with pytest.raises(Exception, match="Seeds per prompt must be|" + GRADIO_REFUSES):
        client.predict("run:x", "run:x", ["a photo of x"], "", 1000, 3.0, 5, api_name="/compare")
    with pytest.raises(Exception, match="Sampling steps must be|" + GRADIO_REFUSES):
        client.predict("run:x", "run:x", ["a photo of x"], "", 1, 3.0, 10**9, api_name="/compare")
    with pytest.raises(Exception, match="not available"):
        client.predict("run:../outside", "run:evil", ["a photo of x"], "", 1, 3.0, 5, api_name="/compare")
    with pytest.raises(Exception, match="not available"):
        client.predict(str(served.outside / "ckpt"), "shipped:../../outside/ckpt", api_name="/metrics")
    with pytest.raises(Exception, match="limit is 500"):
        client.predict("q" * 5000, 4, api_name="/search")
    with pytest.raises(Exception, match="k \\(neighbours\\) must be|" + GRADIO_REFUSES):
        client.predict("a smile", 10**9, api_name="/search")
    with pytest.raises(Exception, match="Colour by must be one of|" + GRADIO_REFUSES):
        client.predict("/etc/passwd", api_name="/neighbour_map")
    with pytest.raises(Exception):  # gradio itself refuses a file that was not uploaded
        client.predict([{"path": str(served.outside / "ckpt" / "secret.txt"), "meta": {"_type": "gradio.FileData"}}],
                       api_name="/load_upload")
    assert isinstance(client.predict(api_name="/poll")[0], str)


def test_client_jobs_belong_to_their_session(served):
    from gradio_client import handle_file

    owner, other = served.client(), served.client()
    owner.predict([handle_file(str(p)) for p in sorted(served.set.iterdir())], api_name="/load_upload")
    out = owner.predict("baseline", "tiny", "", 2, 2, 1e-4, 1.0, 3, True, True, True, "all", 0, 0,
                        api_name="/start_training")
    assert "Training" in out[0]
    with pytest.raises(Exception, match="started by another visitor"):
        other.predict(api_name="/stop_training")
    assert served.studio.jobs.status().state == "running"
    assert "Stopping" in owner.predict(api_name="/stop_training")[0]
    served.fake.step_gate.release()
    status = served.studio.jobs.wait(TIMEOUT)
    assert status.stopped
    name = status.run_name
    with pytest.raises(Exception, match="started by another visitor"):
        other.predict(name, api_name="/export_run")
    path = owner.predict(name, api_name="/export_run")
    with zipfile.ZipFile(path) as zf:
        assert f"{name}/run.json" in zf.namelist()


def _plain_bytes(path: Path) -> bytes:
    """A returned file's bytes, or every member's bytes when it is a zip."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            return b"".join(zf.read(n) for n in zf.namelist())
    return path.read_bytes()


@pytest.mark.slow  # about 35 s: some 250 requests
def test_every_parameter_of_every_endpoint_resists_paths_and_huge_values(served, monkeypatch):
    """Path strings and out-of-range values in every parameter of every public endpoint, one at a time."""
    from gradio_client import Client

    def no_demo():
        raise gr.Error("no demo set in this test")

    monkeypatch.setattr(served.studio.datasets, "load_demo", no_demo)  # nothing valid gets far: no heavy work
    secret = served.outside / "ckpt" / "secret.txt"
    attacks = ["../../outside/ckpt", str(served.outside), "shipped:../outside", 10**12, -(10**12),
               "x" * 20_000, None, {"path": str(secret)}]
    harmless = {"subject": "x", "key_a": "run:none", "key_b": "run:none", "custom": "", "name": "none", "row": 0,
                "query": "x", "pretrained": "", "files": None}
    client = Client(served.url, verbose=False)
    endpoints = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    assert {"/export_run", "/compare", "/metrics", "/load_upload", "/start_training", "/neighbours"} <= set(endpoints)
    before = {p for p in served.root.rglob("*") if p.is_file()} - set((served.root / "runs").rglob("*"))
    calls = 0
    for name, endpoint in sorted(endpoints.items()):
        params = endpoint["parameters"]
        base = [p["parameter_default"] if p.get("parameter_has_default") else harmless.get(p["parameter_name"], "x")
                for p in params]
        cases = [base[:i] + [value] + base[i + 1:] for i in range(len(params)) for value in attacks] or [[]]
        for args in cases:
            t0 = time.monotonic()
            try:
                result = client.submit(*args, api_name=name).result(timeout=30)
            except Exception:  # noqa: BLE001 - a refusal is the expected answer
                result = None
            calls += 1
            assert time.monotonic() - t0 < 30, (name, args)
            for item in (result if isinstance(result, (tuple, list)) else [result]):
                if isinstance(item, str) and len(item) < 4096 and os.path.isfile(item):
                    assert b"TOP-SECRET" not in _plain_bytes(Path(item)), (name, args)
    assert calls > 150
    after = {p for p in served.root.rglob("*") if p.is_file()} - set((served.root / "runs").rglob("*"))
    assert after == before  # nothing written outside the runs folder
    assert not (served.root / "escaped.zip").exists() and served.studio.jobs.current() is None or \
        not served.studio.jobs.status().busy
    assert isinstance(Client(served.url, verbose=False).predict(api_name="/poll")[0], str)  # still serving
