"""Pure helpers of pogdiff.ui and the Studio callbacks that need no model."""

from __future__ import annotations

import json
import re
import time
import zipfile

import gradio as gr
import numpy as np
import pandas as pd
import pytest

from pogdiff import ui
from pogdiff.ui import shared
from pogdiff.config import DataConfig, PsiConfig
from pogdiff.runs.jobs import JobManager, JobStatus
from pogdiff.runs.store import RunInfo

from tests.fakes import SHAPES, FakeTrain, kohya_zip, noop_progress, tiny_set, train_form
from pogdiff.ui.train_form import form_values
from pogdiff.ui import views

CFG = DataConfig()


def test_format_seconds():
    assert views.format_seconds(None) == "—"
    assert views.format_seconds(float("nan")) == "—"
    assert views.format_seconds(4.4) == "4s"
    assert views.format_seconds(75.2) == "1m 15s"
    assert views.format_seconds(3 * 3600 + 61) == "3h 01m"


@pytest.mark.parametrize("count,shot", [(1, "few"), (4, "few"), (5, "medium"), (20, "medium"), (21, "many")])
def test_class_table_buckets_follow_the_data_layer(count, shot):
    table = views.class_counts_table(["a"] * count, CFG)
    assert table["shot"].tolist() == [shot]


def test_loss_frame_is_long_and_skips_non_loss_columns():
    history = [
        {"step": 1, "loss": 1.0, "mse": 0.8, "pog": 0.2, "lr": 1e-4, "psi_mean": 0.3, "seconds_per_step": 0.1},
        {"step": 2, "loss": 0.9, "mse": 0.7, "pog": float("nan"), "lr": 1e-4},
    ]
    frame = views.loss_frame(history)
    assert list(frame.columns) == ["step", "term", "value"]
    assert list(frame["term"]) == ["loss", "loss", "mse", "mse", "pog"]  # TERM_ORDER, NaN dropped
    assert frame.loc[frame.term == "mse", "value"].tolist() == [0.8, 0.7]
    empty = views.loss_frame([])
    assert empty.empty and str(empty["step"].dtype) == "int64" and str(empty["value"].dtype) == "float64"
    plot = gr.LinePlot(x="step", y="value", color="term")
    assert plot.postprocess(empty).datatypes == {"step": "quantitative", "term": "nominal", "value": "quantitative"}


def test_status_markdown_and_progress_for_each_state():
    idle = JobStatus()
    assert "Idle" in views.status_markdown(idle) and "No training job" in views.progress_html(idle)
    running = JobStatus(state="running", run_name="r1", method="pogdiff", step=30, max_steps=120,
                        seconds_per_step=0.5, eta_seconds=45, started_at=0.0)
    html = views.progress_html(running)
    assert "width:25.0%" in html and "step 30 / 120" in html and "ETA 45s" in html
    failed = JobStatus(state="failed", run_name="r1", method="cbdm", step=3, max_steps=9,
                       error="ValueError: bad lr", traceback="Traceback ...\nValueError: bad lr")
    md = views.status_markdown(failed)
    assert "failed" in md and "`ValueError: bad lr`" in md and "```text" in md
    done = JobStatus(state="finished", run_name="r1", method="baseline", step=7, max_steps=10, stopped=True,
                     last_checkpoint="runs/r1/checkpoint-000007", started_at=0.0, finished_at=65.0)
    md = views.status_markdown(done)
    assert md.startswith("**Stopped**") and "7 of 10" in md and "1m 05s" in md and "checkpoint-000007" in md


def test_report_markdown_uses_the_data_layer_report():
    from pogdiff.data.validation import ValidationReport

    assert views.report_markdown(None) == ""
    report = ValidationReport()
    assert "Validation passed" in views.report_markdown(report)
    report.warning("few", "a.png", "only one image of class a", "add a second image")
    md = views.report_markdown(report)
    assert "only one image of class a" in md and "add a second image" in md


def test_upscale_and_gallery_items():
    img = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    big = views.upscale(img, 8)
    assert big.shape == (8, 12, 3) and big[3, 5].tolist() == img[0, 1].tolist()
    assert views.upscale(np.zeros((200, 200, 3), np.uint8), 96).shape == (200, 200, 3)
    items = views.gallery_items(np.zeros((2, 32, 32, 3), np.uint8), ["a", "b"])
    assert [c for _, c in items] == ["a", "b"] and items[0][0].shape == (96, 96, 3)


def test_class_counts_table_and_summary():
    subjects = ["a"] * 25 + ["b"] * 6 + ["c"] * 2 + ["d"]
    table = views.class_counts_table(subjects, CFG)
    assert table.to_dict("list") == {"subject": ["a", "b", "c", "d"], "count": [25, 6, 2, 1],
                                     "shot": ["many", "medium", "few", "few"]}
    md = views.summary_markdown(table, len(subjects), {"single_image_classes": ["d"], "n_many": 1})
    assert "34 images · 4 classes · imbalance ratio 25:1" in md
    assert "**few**: 2 classes / 3 images" in md and "single image (d)" in md


def test_runs_frame(tmp_path):
    run = RunInfo(name="r", run_dir=tmp_path, checkpoint=tmp_path / "checkpoint-000010", state="finished",
                  method="pogdiff", steps_done=10, max_steps=10, stopped=False, finished_at=1.0, model_cfg={},
                  train_cfg={"batch_size": 8, "learning_rate": 1e-4, "psi": {"psi_max": 2.0}},
                  dataset={"num_samples": 30, "root": "/somewhere/demo-abc/train"})
    frame = views.runs_frame([run])
    finished = time.strftime("%Y-%m-%d %H:%M", time.localtime(1.0))
    assert frame.iloc[0].to_dict() == {"run": "r", "method": "pogdiff", "state": "finished", "steps": "10/10",
                                       "batch": 8, "lr": 1e-4, "psi_max": 2.0, "data": "train", "images": 30,
                                       "finished": finished, "checkpoint": "checkpoint-000010"}
    assert list(views.runs_frame([]).columns)[0] == "run"


def test_short_prompt():
    assert views.short_prompt("a photo of Mira Okafor, smiling") == "Mira Okafor, smiling"
    assert views.short_prompt("portrait of X") == "portrait of X"


# ----------------------------------------------------------------------------- Studio
@pytest.fixture
def studio(tmp_path):
    return ui.Studio(tmp_path / "runs", shipped_dir=tmp_path / "shipped",
                     jobs=JobManager(tmp_path / "runs", train_fn=FakeTrain()), device="cpu")


def test_build_configs_maps_every_option(studio):
    model_cfg, train_cfg = studio.train.build_configs(train_form(method="cbdm", psi_max=2.5, k=7, use_image_sim=False,
                                                           pool="other_class", seed=3))
    assert model_cfg.preset == "tiny"
    assert (train_cfg.method, train_cfg.max_steps, train_cfg.batch_size, train_cfg.seed) == ("cbdm", 4, 2, 3)
    assert train_cfg.psi.psi_max == 2.5 and train_cfg.psi.k == 7
    assert train_cfg.psi.use_image_sim is False and train_cfg.psi.pool == "other_class"
    assert train_cfg.checkpoint_every >= 4  # the last step always writes a checkpoint


@pytest.mark.parametrize("kw,message", [
    (dict(steps=0), "Steps must be a whole number from 1 to 20000"),
    (dict(batch_size=2.5), "Batch size must be a whole number"),
    (dict(lr=0), "Learning rate must be positive"),
    (dict(psi_max=-1), "psi_max must be a finite number >= 0 and <= 10, got -1"),
    (dict(preset="sd15", pretrained=" "), "needs a diffusers model id"),
])
def test_build_configs_rejects_bad_values_with_gr_error(studio, kw, message):
    with pytest.raises(gr.Error, match=message):
        studio.train.build_configs(train_form(**kw))


def test_the_api_endpoints_take_the_forms_fields_by_name(studio, tmp_path):
    """/start_training and /estimate_time take the TrainForm's fields as named parameters (the README's
    API list): positionally, as the Start button sends them, or by name, as an API caller may."""
    import dataclasses
    import inspect

    for endpoint in (studio.train.start_training, studio.train_runs.estimate_time):
        assert list(inspect.signature(endpoint).parameters) == ["key", *ui.TrainForm.names(), "request"]
    key = studio.data.load_upload([str(p) for p in tiny_set(tmp_path / "set").iterdir()], progress=noop_progress)[0]
    studio.train.start_training(key, *train_form(steps=2, run_name="positional").values())
    assert studio.jobs.wait(10).run_name == "positional"
    studio.train.start_training(key, **dataclasses.asdict(train_form(steps=2, run_name="by-name")))
    assert studio.jobs.wait(10).run_name == "by-name"
    with pytest.raises(TypeError):
        studio.train.start_training(key, **dataclasses.asdict(train_form()), same_class=True)  # not a field


def test_sd15_on_cpu_is_refused(studio):
    with pytest.raises(gr.Error, match="needs a GPU"):
        studio.train.start_run(None, train_form(preset="sd15", pretrained="some/model"))


def test_upload_loose_files_then_galleries_and_training_with_fake(studio, tmp_path):
    folder = tiny_set(tmp_path / "set")
    files = [str(p) for p in sorted(folder.iterdir())]
    key, headline, report, table, long_tail, class_dd, gallery = studio.data.load_upload(files, progress=noop_progress)
    assert key.startswith("upload-") and "8 images · 2 classes" in headline
    assert table["subject"].tolist() == ["Ann Lee", "Bo Chan"] and long_tail["rank"].tolist() == [1, 2]
    assert class_dd.value == "Bo Chan" and len(gallery) == 2  # few-shot class first
    assert "8 images" in studio.datasets.dataset_banner(key)
    studio.train.start_run(key, train_form())
    status = studio.jobs.wait(10)
    assert status.state == "finished" and status.preview_captions[0].startswith("a photo of Bo Chan")
    md, html, frame, preview, start, stop, runs, version = studio.train.poll(-1)
    assert "Finished" in md and set(frame["term"]) == {"loss", "mse", "pog"} and len(preview) == 2
    assert start.interactive is True and stop.interactive is False and runs.value
    assert all(isinstance(x, dict) and x.get("__type__") == "update" for x in studio.train.poll(version)[:-1])
    zip_path = studio.train_runs.export_run(runs.value)
    with zipfile.ZipFile(zip_path) as zf:
        assert any(n.endswith("configs.json") for n in zf.namelist())
    with pytest.raises(gr.Error, match="has no UNet weights"):  # the fake run wrote no real weights
        studio.train_runs.export_weights(runs.value)
    a, b, note = studio.compare.compare_choices()
    assert [c[1] for c in a.choices] == [f"run:{runs.value}"] and "not there yet" in note
    assert a.value == b.value == f"run:{runs.value}"
    with pytest.raises(gr.Error, match="evaluator"):
        studio.metrics.compute_metrics(a.value, b.value, progress=noop_progress)


def test_upload_zip_with_errors_raises_the_data_layer_message(studio, tmp_path):
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("notes.md", "no images here")
    with pytest.raises(gr.Error) as info:
        studio.data.load_upload([str(bad)], progress=noop_progress)
    assert "image" in str(info.value).lower()
    with pytest.raises(gr.Error, match="Upload a .zip"):
        studio.data.load_upload(None, progress=noop_progress)


def test_a_set_that_does_not_load_says_why_in_html_for_the_error_pop_up(studio, tmp_path):
    """The error pop-up renders HTML, not Markdown: the report comes as a list, not a table of raw pipes."""
    broken = tmp_path / "broken.zip"
    broken.write_bytes(b"this is not a zip archive")
    with pytest.raises(gr.Error) as info:
        studio.data.load_upload([str(broken)], progress=noop_progress)
    message = info.value.message
    assert "|---" not in message and "**" not in message and "`" not in message
    assert message.startswith("<p>Could not open the archive.</p><p><b>Problems found</b>: 0 of 0 images loaded")
    assert ("<li><b>error</b> <code>corrupt_archive</code> <code>broken.zip</code>: Not a readable zip archive"
            in message)
    assert "<i>Fix:</i> Re-create the archive (e.g. <code>zip -r set.zip folder/</code>)" in message
    many = ui.views.error_report_html("a <b>headline</b>", _report_of(12))
    assert many.startswith("<p>a &lt;b&gt;headline&lt;/b&gt;</p>") and many.count("<li>") == 9
    assert "<li>… and 4 more</li>" in many and "Cannot decode &lt;it&gt;." in many


def _report_of(n):
    from pogdiff.data.validation import Issue, ValidationReport

    return ValidationReport([Issue("error", "bad_image", f"{i}.png", "Cannot decode <it>.", "Re-export it.")
                             for i in range(n)], n_images_found=n)


def test_second_start_is_refused_in_the_ui(tmp_path):
    fake = FakeTrain(gated=True)
    studio = ui.Studio(tmp_path / "runs", shipped_dir=tmp_path / "shipped",
                       jobs=JobManager(tmp_path / "runs", train_fn=fake), device="cpu")
    key = studio.data.load_upload([str(p) for p in tiny_set(tmp_path / "set").iterdir()], progress=noop_progress)[0]
    studio.train.start_run(key, train_form(steps=2))
    with pytest.raises(gr.Error, match="already running"):
        studio.train.start_run(key, train_form(steps=2))
    md, *_ = studio.train.stop_training()
    assert "Stopping" in md
    fake.step_gate.release()
    fake.step_gate.release()
    assert studio.jobs.wait(10).stopped


def test_unknown_dataset_key_and_missing_checkpoint_are_clear(studio):
    with pytest.raises(gr.Error, match="no longer in memory"):
        studio.datasets.bundle("upload-deadbeef")
    with pytest.raises(gr.Error, match="not available"):
        studio.compare.generate_pair("run:nope", "run:nope", ["a photo of x"], "", 1, 3.0, 5, progress=noop_progress)
    with pytest.raises(gr.Error, match="Pick at least one prompt"):
        studio.compare.generate_pair("run:nope", "run:nope", [], " ", 1, 3.0, 5, progress=noop_progress)


def test_precomputed_metrics_need_both_shipped_tables(studio, tmp_path):
    assert all(x.get("__type__") == "update" for x in studio.metrics.precomputed_metrics("shipped:demo-baseline", None))
    for name, acc in (("demo-baseline", 0.2), ("demo-pogdiff", 0.6)):
        folder = studio.shipped_dir / name
        folder.mkdir(parents=True)
        (folder / "configs.json").write_text("{}")  # a checkpoint: the key is in the server's own list
        pd.DataFrame({"subject": ["a", "b"], "train_count": [50, 3], "shot": ["many", "few"],
                      "accuracy": [0.9, acc], "gRecall": [0.5, 0.1], "dino": [0.8, 0.4], "n_gen": [8, 8]}
                     ).to_csv(folder / "per_class.csv", index=False)
    table, fig, md = studio.metrics.precomputed_metrics("shipped:demo-baseline", "shipped:demo-pogdiff")
    # the key columns first: the difference, its interval and the verdict, then A and B
    assert list(table.columns[:7]) == ["subject", "train_count", "accuracy · B−A", "95% interval", "verdict",
                                       "accuracy · demo-baseline", "accuracy · demo-pogdiff"]
    assert table.loc[table.subject == "b", "accuracy · demo-pogdiff"].item() == 0.6
    assert table.loc[table.subject == "b", "verdict"].item() == "no measurable difference"  # 1.6 vs 4.8 of 8
    few = next(line for line in md.splitlines() if line.startswith("| few |"))
    assert few.startswith("| few | 1 | 0.200 | 0.600 | +0.400 | [") and few.endswith("| no measurable difference |")
    assert "excludes 0" in md
    assert fig is not None


def test_app_builds_without_loading_anything_heavy(tmp_path, monkeypatch):
    """Building the UI must not load models, encoders or the demo set."""
    import app

    studio = ui.Studio(tmp_path / "runs", shipped_dir=tmp_path / "shipped", device="cpu")
    demo = app.build_demo(studio)
    assert isinstance(demo, gr.Blocks)
    assert studio.datasets.loaded == {} and studio.sources.models == {} and studio.neighbours.parts == {}
    names = {d.api_name for d in demo.fns.values() if d.api_name}
    assert {"load_demo", "load_upload", "neighbour_map", "neighbours", "search", "start_training",
            "stop_training", "poll", "export_run", "compare", "metrics"} <= names
    args = app.parse_args([])
    assert (args.host, args.port, args.share, args.runs_dir) == ("127.0.0.1", 7860, False, "runs")
    monkeypatch.setenv("SPACE_ID", "user/space")
    assert app.parse_args([]).host == "0.0.0.0"
    opts = app.launch_options(studio, 12)
    assert opts["max_file_size"] == "12mb" and not opts.get("allowed_paths")  # the runs folder is not served


def test_every_event_that_disables_a_button_re_enables_it_when_it_fails(tmp_path):
    """In this gradio version ``.then`` does not run after an error; a ``.failure`` step must."""
    import app

    demo = app.build_demo(ui.Studio(tmp_path / "runs", shipped_dir=tmp_path / "shipped", device="cpu"))
    fns = dict(demo.fns)
    busy = {i: f for i, f in fns.items() if f.fn in (shared.disable_two, shared.disable)}
    assert len(busy) == 5  # demo set, upload, start training, compare, metrics
    for busy_id, step in busy.items():
        disabled = {o._id for o in step.outputs}
        (main_id,) = [i for i, f in fns.items() if f.trigger_after == busy_id]
        assert fns[main_id].api_name in {"load_demo", "load_upload", "start_training", "compare", "metrics"}
        recover = [f for f in fns.values() if f.trigger_after == main_id and f.trigger_only_on_failure]
        assert len(recover) == 1, fns[main_id].api_name
        values = recover[0].fn()
        values = values if isinstance(values, tuple) else (values,)
        updates = {o._id: v for o, v in zip(recover[0].outputs, values)}
        assert all(getattr(updates[i], "interactive", None) is True for i in disabled), fns[main_id].api_name


def test_runs_named_by_the_user_are_checked_and_listed(tmp_path):
    studio = ui.Studio(tmp_path / "runs", shipped_dir=tmp_path / "shipped",
                       jobs=JobManager(tmp_path / "runs", train_fn=FakeTrain()), device="cpu")
    key = studio.data.load_upload([str(p) for p in tiny_set(tmp_path / "set").iterdir()], progress=noop_progress)[0]
    with pytest.raises(gr.Error, match="is not a run name"):
        studio.train.start_run(key, train_form(steps=2, run_name="../outside"))
    studio.train.start_run(key, train_form(steps=2, run_name=" my-first.run "))
    assert studio.jobs.wait(10).run_name == "my-first.run" and (tmp_path / "runs" / "my-first.run").is_dir()
    with pytest.raises(gr.Error, match="a run named 'my-first.run' exists already"):
        studio.train.start_run(key, train_form(steps=2, run_name="my-first.run"))
    frame = studio.train_runs.runs_table()
    row = frame[frame["run"] == "my-first.run"].iloc[0]
    assert row["method"] == "pogdiff" and row["steps"] == "2/2" and row["images"] == 8
    assert row["data"] == key  # the stored upload's folder
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d", row["finished"])
    studio.train.start_run(key, train_form(steps=2))  # empty name: a dated one, as before
    assert re.fullmatch(r"\d{8}-\d{6}-pogdiff", studio.jobs.wait(10).run_name)


def test_a_started_run_empties_the_run_name_box(tmp_path):
    """Once Start succeeded, the name belongs to that run: the Run name box empties, so a second Start
    (another method, say) gets a dated name instead of 'a run named ... exists already', and the form
    note's "the run name is left empty" holds."""
    import app

    studio = ui.Studio(tmp_path / "runs", shipped_dir=tmp_path / "shipped", device="cpu")
    demo = app.build_demo(studio)
    fns = list(demo.fns.values())
    start = next(d for d in fns if d.api_name == "start_training")
    name_box = next(b for b in demo.blocks.values() if isinstance(b, gr.Textbox) and b.label == "Run name (optional)")
    clear = [d for d in fns if getattr(d.fn, "__name__", "") == "empty_text"]
    assert len(clear) == 1 and [o._id for o in clear[0].outputs] == [name_box._id]
    assert clear[0].trigger_after == start._id and clear[0].trigger_only_on_success  # not after a refused start
    assert clear[0].fn() == ""


def test_train_from_scratch_skips_the_shipped_base(tmp_path):
    fake = FakeTrain()
    shipped = tmp_path / "shipped"
    (shipped / "base-tiny").mkdir(parents=True)
    (shipped / "base-tiny" / "configs.json").write_text("{}")
    studio = ui.Studio(tmp_path / "runs", shipped_dir=shipped, jobs=JobManager(tmp_path / "runs", train_fn=fake),
                       device="cpu")
    key = studio.data.load_upload([str(p) for p in tiny_set(tmp_path / "set").iterdir()], progress=noop_progress)[0]
    studio.train.start_run(key, train_form(steps=2))
    studio.jobs.wait(10)
    assert fake.kwargs["base_checkpoint"] == shipped / "base-tiny"  # the default: fine-tune the face base
    studio.train.start_run(key, train_form(steps=2, from_scratch=True))
    studio.jobs.wait(10)
    assert fake.kwargs["base_checkpoint"] is None
    with pytest.raises(gr.Error, match="Train from scratch"):
        studio.train.start_run(key, train_form(steps=2, from_scratch="maybe"))


# ------------------------------------------------------------- Train tab: form, previews, time estimate
def _studio_with_base(tmp_path, fake=None):
    shipped = tmp_path / "shipped"
    (shipped / "base-tiny").mkdir(parents=True)
    (shipped / "base-tiny" / "configs.json").write_text("{}")
    studio = ui.Studio(tmp_path / "runs", shipped_dir=shipped,
                       jobs=JobManager(tmp_path / "runs", train_fn=fake or FakeTrain()), device="cpu")
    key = studio.data.load_upload([str(p) for p in tiny_set(tmp_path / "set").iterdir()], progress=noop_progress)[0]
    return studio, key


def test_the_form_after_a_reload_shows_the_last_jobs_settings(tmp_path):
    studio, key = _studio_with_base(tmp_path)
    assert all(isinstance(v, dict) and v.get("__type__") == "update" for v in studio.train_runs.restore_train_form())  # no run
    options = dict(method="cbdm", preset="tiny", pretrained="", steps=4, batch_size=3, lr=3e-4, psi_max=2.5, k=7,
                   use_density=False, use_image_sim=False, use_text_sim=True, pool="same_class", sample_every=2,
                   seed=3)
    studio.train.start_training(key, *options.values(), "restored", True)
    studio.jobs.wait(10)
    *values, note = studio.train_runs.restore_train_form()
    restored = dict(zip(ui.TrainForm.RESTORED, values))
    assert restored.pop("base").value == "scratch"  # Start from: the run began from a random UNet
    pretrained = restored.pop("pretrained")
    assert pretrained.visible is False and pretrained.value == ""
    assert (restored.pop("balance"), restored.pop("loss_weights")) == ("method", "")  # the method's batches
    assert restored == {k: v for k, v in options.items() if k != "pretrained"}
    assert "run **restored** (finished)" in note
    studio.train.start_run(key, train_form(steps=2))  # the shipped base: from_scratch comes back False
    studio.jobs.wait(10)
    assert dict(zip(ui.TrainForm.RESTORED, studio.train_runs.restore_train_form()))["base"].value == "shipped"


def test_form_values_need_the_saved_configs():
    assert form_values({"name": "x"}) is None
    assert form_values({"train_cfg": {"method": "nonsense", "max_steps": 3}, "model_cfg": {}}) is None
    values = form_values({"train_cfg": {"method": "baseline", "max_steps": 3}, "model_cfg": {"preset": "sd15",
                             "pretrained": "org/model"}, "base_checkpoint": ""})
    assert (values["preset"], values["pretrained"], values["from_scratch"], values["pool"]) == \
        ("sd15", "org/model", False, PsiConfig().pool)


def test_preview_history_with_a_step_slider(tmp_path):
    studio, key = _studio_with_base(tmp_path)
    slider, items, note = studio.train_runs.preview_history("")
    assert slider.interactive is False and items == [] and "No previews saved" in note
    studio.train.start_run(key, train_form(steps=6, sample_every=2, run_name="with-previews"))
    studio.jobs.wait(10)
    slider, items, note = studio.train_runs.preview_history("")  # the current job
    assert (slider.minimum, slider.maximum, slider.step, slider.value) == (2, 6, 2, 6)
    assert [c for _, c in items] == [f"step 6 · {c}" for c in studio.train.preview_captions(studio.datasets.bundle(key))]
    assert "Step **6**" in note and "steps 2, 4, 6" in note
    items, note = studio.train_runs.preview_at("with-previews", 3)  # a tie picks the earlier step
    assert items[0][1].startswith("step 2 · ") and int(items[0][0][0, 0, 0]) == 2  # FakeTrain's pixel value
    assert studio.train_runs.preview_history("with-previews")[0].value == 6
    choices = studio.train_runs.preview_runs().choices
    assert choices[0] == ("current or last job", "") and ("with-previews", "with-previews") in choices
    with pytest.raises(gr.Error, match="is not a run name"):
        studio.train_runs.preview_history("../outside")


def test_time_estimate_before_start_is_measured(tmp_path):
    studio, key = _studio_with_base(tmp_path)
    assert "recorded its step time yet" in studio.train_runs.recorded_estimate("pogdiff", "tiny", 300, 2)
    md = studio.train_runs.estimate_run(key, train_form(steps=300))
    assert "for 300 steps" in md and "measured just now by timing 2 real steps" in md and "CPU cores" in md
    assert studio.jobs.runs.list_runs() == []  # the trial keeps nothing
    studio.train.start_run(key, train_form(steps=4))
    studio.jobs.wait(10)
    md = studio.train_runs.recorded_estimate("pogdiff", "tiny", 300, 2)  # FakeTrain reports 0.01 s/step: 3 s for 300
    assert md.startswith("About **3s** for 300 steps: 0.01 s/step") and "over 4 steps" in md
    assert "recorded its step time yet" in studio.train_runs.recorded_estimate("baseline", "tiny", 300, 2)
    assert "No time estimate: Steps must be a whole number" in studio.train_runs.recorded_estimate("pogdiff", "tiny", 0, 2)


def test_estimate_markdown_adds_the_set_up_to_the_steps():
    from pogdiff.runs.store import StepTime

    md = views.estimate_markdown(StepTime(0.5, 2, "trial", 0.0, setup_seconds=10.0), 100, where="2 CPU cores")
    assert md.startswith("About **1m 00s** for 100 steps: 0.50 s/step") and "(2 CPU cores)" in md


def test_changing_a_or_b_never_leaves_another_pairs_metrics_on_screen(studio, tmp_path):
    for name in ("demo-baseline", "demo-pogdiff"):
        folder = studio.shipped_dir / name
        folder.mkdir(parents=True)
        (folder / "configs.json").write_text("{}")
        pd.DataFrame({"subject": ["a"], "train_count": [3], "shot": ["few"], "accuracy": [0.5]}
                     ).to_csv(folder / "per_class.csv", index=False)
    table, fig, md = studio.metrics.metrics_on_choice("shipped:demo-baseline", "shipped:demo-pogdiff")
    assert len(table) == 1 and fig is not None and "Precomputed" in md  # a shipped pair: its own numbers
    table, fig, md = studio.metrics.metrics_on_choice("shipped:demo-baseline", "run:not-there")
    assert len(table) == 0 and fig is None and "press **Compute metrics**" in md  # cleared, not kept


# ------------------------------------------------------------------ Data tab: class source
def test_a_flat_kohya_zip_loads_its_tag_classes_with_their_counts(studio, tmp_path):
    key, headline, report, table, long_tail, class_dd, gallery = studio.data.load_upload(
        str(kohya_zip(tmp_path / "shapes.zip")), progress=noop_progress)
    assert dict(zip(table["subject"], table["count"])) == SHAPES  # not split by background, not clustered
    assert "19 images · 5 classes" in headline
    assert "**Classes from:** first tag (auto: the captions are tags (19 of 19 comma-separated; 18 of 19" in headline
    assert "classes_clustered" not in report and "Class source" in headline
    assert class_dd.value == "green triangle" and studio.data.class_source_of(key) == "auto"  # the first few-shot class
    with pytest.raises(gr.Error, match="does not read 'a photo of X, ...'") as refused:  # another source, refused
        studio.data.reload_classes(key, "template", progress=noop_progress)
    assert "&lt;subject&gt;" in str(refused.value) and "<subject>" not in str(refused.value)
    assert (studio.datasets.upload_store / key).is_dir()  # the refused source keeps the upload that loaded
    assert studio.datasets.bundle(key).ds.class_source == "first_tag"


def test_the_class_source_choice_reloads_the_set_and_survives_a_restart(studio, tmp_path):
    files = [str(p) for p in tiny_set(tmp_path / "set").iterdir()]
    key = studio.data.load_upload(files, progress=noop_progress)[0]
    assert studio.datasets.bundle(key).ds.class_source == "column"
    tags_key, headline, _, table, *_ = studio.data.reload_classes(key, "first_tag", progress=noop_progress)
    assert tags_key == f"{key}~first_tag" and studio.data.class_source_of(tags_key) == "first_tag"
    assert table["subject"].tolist() == ["a photo of Ann Lee", "a photo of Bo Chan"]
    assert "**Classes from:** first tag (chosen: first tag)" in headline
    assert studio.data.reload_classes(tags_key, "auto", progress=noop_progress)[0] == key
    assert studio.data.load_upload(files, None, "first_tag", progress=noop_progress)[0] == tags_key
    bundle = studio.datasets.bundle(tags_key)
    assert studio.datasets.dataset_at(bundle, 16).subjects == bundle.subjects  # another size keeps the class source
    restarted = ui.Studio(tmp_path / "runs", shipped_dir=tmp_path / "shipped", device="cpu")
    assert restarted.data.restore_dataset(tags_key)[3]["subject"].tolist() == ["a photo of Ann Lee", "a photo of Bo Chan"]
    assert all(isinstance(x, dict) for x in restarted.data.reload_classes(None, "cluster", progress=noop_progress))
    with pytest.raises(gr.Error, match="Class source must be one of"):
        studio.data.reload_classes(key, "../tags", progress=noop_progress)


def test_the_form_note_follows_the_job_when_it_ends(tmp_path):
    fake = FakeTrain(gated=True)
    studio, key = _studio_with_base(tmp_path, fake)
    studio.train.start_run(key, train_form(steps=2, run_name="live"))
    *_, note = studio.train_runs.restore_train_form()  # a page load while the job runs
    assert "run **live** (running)" in note
    fake.step_gate.release(2)
    assert studio.jobs.wait(10).state == "finished"
    assert "run **live** (finished)" in studio.train_runs.train_form_note()  # what the page shows once the job ended
    meta = json.loads((tmp_path / "runs" / "live" / "run.json").read_text())
    assert "run **gone** (interrupted)" in studio.train_runs.form_note({**meta, "name": "gone", "state": "running"})


def test_the_progress_label_says_estimating_until_the_eta_is_known():
    running = JobStatus(state="running", run_name="r", method="pogdiff", step=1, max_steps=300, started_at=0.0,
                        seconds_per_step=0.52, eta_seconds=None)
    assert "ETA estimating…" in views.progress_html(running) and "0.52 s/step" in views.progress_html(running)
    later = JobStatus(state="running", run_name="r", method="pogdiff", step=10, max_steps=300, started_at=0.0,
                      seconds_per_step=0.52, recent_seconds_per_step=1.3, eta_seconds=377.0, eta_untimed_previews=True)
    assert "1.30 s/step" in views.progress_html(later) and "ETA 6m 17s + previews" in views.progress_html(later)


def test_start_from_offers_the_shipped_base_scratch_and_own_runs_and_trains_from_the_choice(tmp_path):
    fake = FakeTrain()
    studio, key = _studio_with_base(tmp_path, fake)
    assert [v for _, v in studio.train.base_choices()] == ["shipped", "scratch"]  # no run yet
    studio.train.start_run(key, train_form(steps=2, run_name="first", base="shipped"))
    studio.jobs.wait(10)
    assert fake.kwargs["base_checkpoint"] == tmp_path / "shipped" / "base-tiny"
    assert [v for _, v in studio.train.base_choices()] == ["shipped", "scratch", "run:first"]
    first_ckpt = studio.jobs.runs.get_run("first").checkpoint
    studio.train.start_run(key, train_form(steps=2, run_name="second", base="run:first"))  # what the Train tab sends
    studio.jobs.wait(10)
    assert fake.kwargs["base_checkpoint"] == first_ckpt and first_ckpt.name == "checkpoint-000002"
    assert json.loads((tmp_path / "runs" / "second" / "run.json").read_text())["base_checkpoint"] == str(first_ckpt)
    assert dict(zip(ui.TrainForm.RESTORED, studio.train_runs.restore_train_form()))["base"].value == "run:first"
    studio.train.start_run(key, train_form(steps=2, run_name="third", base="scratch"))
    studio.jobs.wait(10)
    assert fake.kwargs["base_checkpoint"] is None
    dd = studio.train.base_options("run:gone")  # a choice that is no longer offered falls back to the first
    assert dd.value == "shipped" and ("run second (pogdiff, 2 steps)", "run:second") in dd.choices
    for bad, message in (("run:nope", "no finished run with a checkpoint named 'nope'"),
                         ("run:../x", "is not a run name"), ("elsewhere", "Start from must be 'shipped', 'scratch'"),
                         ("run:first", "contradict")):
        with pytest.raises(gr.Error, match=message):
            studio.train.start_run(key, train_form(steps=2, from_scratch=bad == "run:first", base=bad))


def test_a_run_of_another_visitor_or_another_size_is_no_base(tmp_path):
    from types import SimpleNamespace

    A, B = SimpleNamespace(username=None, session_hash="a"), SimpleNamespace(username=None, session_hash="b")
    fake = FakeTrain()
    studio, key = _studio_with_base(tmp_path, fake)
    studio.train.start_run(key, train_form(steps=2, run_name="theirs"), A)
    studio.jobs.wait(10)
    assert "run:theirs" in [v for _, v in studio.train.base_choices(A)]
    assert "run:theirs" not in [v for _, v in studio.train.base_choices(B)]
    with pytest.raises(gr.Error, match="started by another visitor"):
        studio.train.start_run(key, train_form(steps=2, base="run:theirs"), B)
    meta_path = tmp_path / "runs" / "theirs" / "run.json"
    meta = json.loads(meta_path.read_text())
    meta["model_cfg"]["resolution"] = 64
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(gr.Error, match=r"cannot start a tiny run at 32 px"):
        studio.train.start_run(key, train_form(steps=2, base="run:theirs"), A)


def test_layout_keeps_the_plot_title_the_report_levels_and_a_metrics_download(tmp_path):
    """The metrics figure has no component label over its title and the per-class metrics table does
    not share its row; the validation table's level and code columns do not wrap letter by letter; the
    per-class metrics table feeds a CSV download."""
    import re

    import app

    studio = ui.Studio(tmp_path / "runs", shipped_dir=tmp_path / "shipped", device="cpu")
    demo = app.build_demo(studio)
    by_id = {b.elem_id: b for b in demo.blocks.values() if getattr(b, "elem_id", None)}
    assert by_id["pg-metrics-plot"].show_label is False
    # the per-class metrics table is not squeezed into a row beside the figure (its key columns ran
    # off its right edge there); it takes the tab's width
    above, block = [], by_id["pg-metrics-table"]
    while block.parent is not None:
        block = block.parent
        above.append(block)
    assert by_id["pg-metrics-plot"].parent not in above and not any(isinstance(b, gr.Row) for b in above)
    assert isinstance(by_id["pg-report"], gr.Markdown)
    css = re.sub(r"\s+", " ", app.CSS)
    assert "#pg-report td:nth-child(-n+2) {white-space: nowrap; min-width: 5.5em;}" in css
    downloads = [b for b in demo.blocks.values() if isinstance(b, gr.DownloadButton)]
    assert len(downloads) == 1 and "CSV" in downloads[0].label
    wired = [d for d in demo.fns.values() if getattr(d.fn, "__name__", "") == "metrics_csv"]
    assert len(wired) == 1 and [o._id for o in wired[0].outputs] == [downloads[0]._id]


def test_the_budget_advice_quotes_the_measured_curve_per_set_and_budget():
    from pogdiff.ui.views import budget_advice

    block = lambda a, b: {"methods": {"baseline": {"few_acc": [a, a]}, "pogdiff": {"few_acc": [b, None]}}}  # noqa: E731
    curve = {"demo": {"budgets": [300, 1000], "by_budget": {"300": block(0.1, 0.3), "1000": block(0.5, 0.9)}}}
    text = budget_advice(curve, 250)
    assert "demo — 300 steps: 10% plain, 30% pogdiff; 1000 steps: 50% plain, 90% pogdiff" in text
    assert "You asked for 250 steps" in text and "face model" in text
    assert budget_advice(None, 10) == "" and budget_advice({"demo": {"budgets": [], "by_budget": {}}}, 10) == ""


def test_the_method_note_lists_every_method_and_reads_its_figures_from_the_summary(tmp_path):
    from pogdiff.config import METHODS
    from pogdiff.ui.train_tab import METHOD_INFO, method_info

    assert all(f"{m}:" in METHOD_INFO for m in METHODS)  # t2h included
    few = {"ratio_of_means": 1.0354, "bootstrap_ci95": [1.0028, 1.0879]}
    summary = {"demo": {"comparisons": {"pogdiff_vs_pogdiff_no_pog": {"few": few}}},
               "families": {"comparisons": {"pogdiff_vs_t2h": {"few": {**few, "ratio_of_means": 0.97}}}}}
    path = tmp_path / "summary.json"
    path.write_text(json.dumps(summary))
    text = method_info(path)
    assert text.startswith(METHOD_INFO)
    assert "the PoG term (pogdiff over the same batches without it): 1.04x [1.00, 1.09] on demo" in text
    assert "pogdiff over t2h: 0.97x [1.00, 1.09] on families" in text
    # no summary, or one without these comparisons: the note without figures
    assert method_info(tmp_path / "missing.json") == METHOD_INFO
    path.write_text(json.dumps({"demo": {"comparisons": {}}}))
    assert method_info(path) == METHOD_INFO and not re.search(r"\d\.\d\dx", METHOD_INFO)
