"""The Train tab, laid out and bound (:func:`build`).

Its callbacks are :class:`~pogdiff.ui.train_jobs.TrainJobs` (the form to configs, the job) and
:class:`~pogdiff.ui.train_runs.TrainRuns` (runs, downloads, previews, time estimates); the form's fields
travel as one :class:`~pogdiff.ui.train_form.TrainForm`.
"""

from __future__ import annotations

import json
from pathlib import Path

import gradio as gr

from pogdiff.config import METHODS
from pogdiff.constants import QUALITY_SUMMARY
from pogdiff.config import POOLS
from pogdiff.ui.shared import Shared, disable, empty_text, show_file
from pogdiff.ui.train_form import TrainForm
from pogdiff.ui.train_jobs import TrainJobs
from pogdiff.ui.train_runs import TrainRuns
from pogdiff.ui.views import measured_methods_note

TRAIN_HELP = """Fine-tune from the shipped base model with one objective: **baseline** (plain ε-MSE),
**pogdiff**, **cbdm** (class-balancing regulariser), **resample** (class-balanced batches) or **t2h**
(T2H's head-to-tail target transfer). Training runs on the server in the background: the curve and the
previews of rare prompts update live, a page refresh or another tab re-attaches to the same job, and
**Stop** ends it after the current step and keeps its checkpoint. One job runs per server at a time."""

METHOD_INFO = ("baseline: plain fine-tuning · pogdiff: borrow from neighbouring captions, on tempered class-balanced "
               "batches · cbdm: class-balancing regulariser · resample: the same tempered batches, plain loss · t2h: "
               "T2H's head-to-tail target transfer (a row may train on the noise that carries a more frequent class's "
               "image to its noised input), on the same tempered batches (README \"The method\")")


def method_info(summary_path: Path = QUALITY_SUMMARY) -> str:
    """:data:`METHOD_INFO`, then what the quality benchmark measured between the recipes, read from its
    ``summary.json`` (:func:`pogdiff.ui.views.measured_methods_note`); the note alone when there is none."""
    try:
        summary = json.loads(summary_path.read_text())
    except (OSError, ValueError):
        summary = None
    measured = measured_methods_note(summary)
    return f"{METHOD_INFO} — {measured}" if measured else METHOD_INFO


BALANCE_CHOICES = [("the method's batches", "method"), ("your repeats (kohya / OneTrainer)", "from-data")]
BALANCE_INFO = ("the method's: plain rows for baseline and cbdm, tempered class-balanced for the others · your "
                "repeats: each class as often as the set's <repeats>_<name> folders, dataset_config.toml or "
                "concepts.json say (the Data tab's Balancing panel shows the shares)")
BASE_NOTE = ("The shipped base, checkpoints/base-tiny, is a face model pretrained on 40 procedural demo identities "
             "at 32 px: on your own data it starts from faces. From scratch (a random UNet) needs many more steps. "
             "One of your tiny runs: a new run fine-tunes its last checkpoint on the loaded data.")


def _form(training: TrainJobs, shared: Shared) -> TrainForm:
    """The form's components (left column), laid out; ``shared.preset`` is rendered here."""
    start = TrainForm()
    L = training.limits
    method = gr.Radio(list(METHODS), value=start.method, label="Method", info=method_info())
    preset = shared.preset.render()
    pretrained = gr.Textbox(label="Model id or local folder (sd15)", visible=False,
                            info="A diffusers Stable Diffusion 1.x/2.x pipeline: hub id or path.")
    with gr.Row():
        steps = gr.Number(value=start.steps, precision=0, minimum=1, maximum=L.max_steps, label="Steps",
                          info="Optimisation steps; on the embedded sets the rare subjects come out from ~1000 "
                               "(README \"Results\").")
        batch_size = gr.Number(value=start.batch_size, precision=0, minimum=1, maximum=L.max_batch_size,
                               label="Batch size", info="Images per step.")
    with gr.Row():
        lr = gr.Number(value=start.lr, label="Learning rate", info="AdamW learning rate after a short warm-up.")
        seed = gr.Number(value=start.seed, precision=0, minimum=0, label="Seed", info="Same seed, same run.")
    sample_every = gr.Number(value=start.sample_every, precision=0, minimum=0, label="Preview every (steps)",
                             info="Sample the rarest classes' prompts this often; 0 = never.")
    run_name = gr.Textbox(start.run_name, label="Run name (optional)", max_lines=1,
                          info="Letters, digits, '.', '_' and '-'; empty: a dated name.")
    base = gr.Dropdown(choices=training.base_choices(), value=training.base_choices()[0][1],
                       label="Start from (tiny preset)", info=BASE_NOTE, elem_id="pg-base")
    # /start_training's from_scratch, kept for API callers (the form uses Start from)
    from_scratch = gr.Checkbox(start.from_scratch, visible=False, label="Train from scratch")
    balance = gr.Radio(BALANCE_CHOICES, value=start.balance, label="Class balance", info=BALANCE_INFO)
    loss_weights = shared.loss_weights.render()
    with gr.Accordion("psi options (pogdiff)", open=False):
        psi_max = gr.Slider(0.0, 5.0, value=start.psi_max, step=0.1, label="psi_max",
                            info="Largest weight a sample gives to its neighbour's prediction.")
        k = gr.Slider(1, 20, value=start.k, step=1, label="k (neighbours)",
                      info="Neighbours drawn from, by caption similarity.")
        use_density = gr.Checkbox(value=start.use_density, label="w_density",
                                  info="Rare classes borrow more, frequent ones ~0.")
        use_image_sim = gr.Checkbox(value=start.use_image_sim, label="s_img",
                                    info="Only borrow from neighbours whose image looks alike.")
        use_text_sim = gr.Checkbox(value=start.use_text_sim, label="s_txt", info="Scale by caption similarity.")
        pool = gr.Dropdown(choices=list(POOLS), value=start.pool, label="Neighbour pool",
                           info="Where neighbours come from (README 'The method').")
    return TrainForm(method=method, preset=preset, pretrained=pretrained, steps=steps, batch_size=batch_size, lr=lr,
                     psi_max=psi_max, k=k, use_density=use_density, use_image_sim=use_image_sim,
                     use_text_sim=use_text_sim, pool=pool, sample_every=sample_every, seed=seed, run_name=run_name,
                     from_scratch=from_scratch, base=base, balance=balance, loss_weights=loss_weights)


def build(training: TrainJobs, runs: TrainRuns, shared: Shared) -> gr.Tab:
    """The Train tab: the form and the live job (status, loss curve, previews) of ``training``; the preview
    history and the runs of ``runs``."""
    ds_key, timer = shared.dataset, shared.timer
    with gr.Tab("Train", id="train") as tab:
        seen = gr.State(-1)  # last job version this tab has drawn
        gr.Markdown(TRAIN_HELP, elem_classes="explain")
        banner = gr.Markdown(training.datasets.dataset_banner(None))
        with gr.Row():
            with gr.Column(scale=2, min_width=320):
                form = _form(training, shared)
                with gr.Row():
                    start_btn = gr.Button("Start training", variant="primary")
                    stop_btn = gr.Button("Stop", variant="stop", interactive=False)
                with gr.Row():
                    estimate_btn = gr.Button("Estimate time (times 2 steps)", size="sm", scale=1)
                    estimate_md = gr.Markdown("", elem_classes="explain")
                form_note = gr.Markdown("", elem_classes="explain")
            with gr.Column(scale=3):
                job_md = gr.Markdown("")
                job_progress = gr.HTML("")
                loss_plot = gr.LinePlot(x="step", y="value", color="term", title="Loss terms",
                                        x_title="step", y_title="value", height=300,
                                        tooltip=["step", "term", "value"])
                preview = gr.Gallery(label="Previews: prompts of the rarest classes", columns=4, height=200,
                                     object_fit="contain", fit_columns=False, elem_classes="pixelated")
                with gr.Accordion("Preview history (saved in the run folder)", open=False):
                    with gr.Row():
                        hist_run = gr.Dropdown(label="Previews of", choices=[("current or last job", "")],
                                               value="", scale=3)
                        hist_btn = gr.Button("Refresh", size="sm", scale=1)
                    hist_slider = gr.Slider(0, 1, value=0, step=1, label="Preview step", interactive=False)
                    hist_gallery = gr.Gallery(label="Preview at that step", columns=4, height=200,
                                              object_fit="contain", fit_columns=False, elem_classes="pixelated")
                    hist_md = gr.Markdown("")
        gr.Markdown("### Runs (finished, stopped, interrupted)")
        with gr.Row():
            runs_dd = gr.Dropdown(label="Run", choices=[], scale=3, allow_custom_value=True,
                                  info="Runs of this server that hold a checkpoint, newest first; "
                                       "an interrupted or stopped one can be resumed.")
            resume_btn = gr.Button("Resume", scale=1)
            export_btn = gr.Button("Zip weights + config", scale=1)
            weights_btn = gr.Button("Weights only (.safetensors: fp16 UNet, or LoRA)", scale=1)
            delete_btn = gr.Button("Delete run", variant="stop", size="sm", scale=1)
            zip_file = gr.File(label="Download", scale=2, interactive=False, visible=False)
        runs_table = gr.Dataframe(label="Runs", interactive=False, max_height=240, value=runs.runs_table)

    cheap = dict(queue=False, concurrency_limit=None)  # reads of memory: never behind a generation
    ds_key.change(training.datasets.dataset_banner, ds_key, banner, api_visibility="private", **cheap)
    tab.select(training.datasets.dataset_banner, ds_key, banner, api_visibility="private", **cheap)
    # .input, not .change: restoring a run's form must not reset its batch size and learning rate
    form.preset.input(training.preset_defaults, form.preset, [form.batch_size, form.lr, form.pretrained],
                      api_visibility="private")
    poll_outputs = [job_md, job_progress, loss_plot, preview, start_btn, stop_btn, runs_dd, seen]
    starting = start_btn.click(disable, None, start_btn, queue=False, api_visibility="private").then(
        training.start_training, [ds_key, *form.values()], poll_outputs, api_name="start_training")
    starting.then(training.poll, None, poll_outputs, api_name="poll_after_start", api_visibility="private")
    # the started run holds that name now: a second Start gets a dated name, not a refusal (the form note
    # says the run name is left empty)
    starting.success(empty_text, None, form.run_name, queue=False, api_visibility="private")
    starting.failure(training.poll, None, poll_outputs, api_name="poll_after_refused_start",
                     api_visibility="private")  # the buttons follow the job again
    stop_btn.click(training.stop_training, None, poll_outputs, api_name="stop_training", concurrency_limit=None)
    resuming = resume_btn.click(training.resume_training, [ds_key, runs_dd], poll_outputs, api_name="resume_training")
    resuming.failure(training.poll, None, poll_outputs, api_name="poll_after_refused_resume", api_visibility="private")
    timer.tick(training.poll, seen, poll_outputs, show_progress="hidden", concurrency_limit=None,
               api_name="poll", queue=False)
    runs_dd.change(runs.runs_table, None, runs_table, api_visibility="private", **cheap)
    runs_dd.change(training.base_options, form.base, form.base, api_visibility="private")  # a run that ended can be a base
    # the job's headline changes when it starts, stops or ends: the form note then names the run's state
    job_md.change(runs.train_form_note, None, form_note, api_visibility="private")
    export_btn.click(runs.export_run, runs_dd, zip_file, api_name="export_run").success(
        show_file, None, zip_file, queue=False, api_visibility="private")
    weights_btn.click(runs.export_weights, runs_dd, zip_file, api_name="export_weights").success(
        show_file, None, zip_file, queue=False, api_visibility="private")
    delete_btn.click(runs.delete_run, runs_dd, runs_dd, api_name="delete_run")  # one of your runs (quotas)
    estimate_inputs = form.pick(("method", "preset", "steps", "batch_size"))
    for comp in estimate_inputs:
        comp.change(runs.recorded_estimate, estimate_inputs, estimate_md, api_visibility="private")
    estimate_btn.click(runs.estimate_time, [ds_key, *form.values()], estimate_md, api_name="estimate_time")
    hist_outputs = [hist_slider, hist_gallery, hist_md]
    runs_dd.change(runs.preview_runs, None, hist_run, api_visibility="private").then(
        runs.preview_history, hist_run, hist_outputs, api_visibility="private")
    # a finished run has recorded its step time: the estimate before the next start uses it
    runs_dd.change(runs.recorded_estimate, estimate_inputs, estimate_md, api_visibility="private")
    hist_run.change(runs.preview_history, hist_run, hist_outputs, api_name="preview_history")
    hist_btn.click(runs.preview_history, hist_run, hist_outputs, api_visibility="private")
    hist_slider.release(runs.preview_at, [hist_run, hist_slider], [hist_gallery, hist_md], api_name="preview_at")

    # A page load shows the running or last job and puts that run's settings back into the form.
    shared.page.load(training.poll, None, poll_outputs, api_name="poll_on_load", api_visibility="private")
    (shared.page.load(runs.restore_train_form, None, [*form.pick(TrainForm.RESTORED), form_note],
                      api_visibility="private")
     .then(training.base_options, form.base, form.base, api_visibility="private")  # this visitor's runs
     .then(runs.recorded_estimate, estimate_inputs, estimate_md, api_visibility="private")
     .then(runs.preview_runs, None, hist_run, api_visibility="private"))
    return tab

