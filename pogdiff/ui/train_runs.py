"""The Train tab's runs (:class:`TrainRuns`): the runs list, its downloads and Delete run, the form restored
from a run, the preview history and the time estimates."""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from pogdiff.server import safety
from pogdiff.config import METHODS, PRESETS, Limits, model_preset
from pogdiff.runs.jobs import JobBusyError, JobManager
from pogdiff.ui.datasets import Datasets
from pogdiff.ui.downloads import download_path
from pogdiff.ui.sessions import Sessions
from pogdiff.ui.state import Device
from pogdiff.ui.train_jobs import TrainJobs
from pogdiff.ui.train_form import TrainForm, form_endpoint, form_values
from pogdiff.ui.views import (
    checked_input,
    estimate_markdown,
    preview_items,
    preview_note,
    runs_frame,
)

logger = logging.getLogger(__name__)


class TrainRuns:
    """Runs list, exports, Delete run, the form restored on a page load, saved previews, time estimates.

    Args:
        training: the Train tab's job (the form's checks, Start from, the runs dropdown).
        jobs: the server's one background training job, and its runs (``jobs.runs``).
        datasets: the page's data sets (what an estimate is measured on; leftovers swept).
        sessions: the visitors: who may export or delete a run.
        device: where an estimate is measured.
        limits: server-side bounds on every request value (README "Limits and safety").
        runs_dir: the runs folder.
    """

    def __init__(self, training: TrainJobs, jobs: JobManager, datasets: Datasets, sessions: Sessions,
                 device: Device, limits: Limits, runs_dir: str | Path) -> None:
        self.training = training
        self.jobs = jobs
        self.datasets = datasets
        self.sessions = sessions
        self.device = device
        self.limits = limits
        self.runs_dir = Path(runs_dir)

    def runs_table(self) -> pd.DataFrame:
        return runs_frame(self.jobs.runs.list_runs())

    def export_run(self, name: str | None, request: gr.Request = None) -> str:
        """Path of a zip of the run's last checkpoint (weights + configs) and its run.json.

        ``name`` is a run folder name, nothing else; runs started by another visitor are not
        exported unless the server is single-user. The zip handed back is a copy in a fresh temp
        folder, so the runs folder itself is never served.
        """
        return self._hand_out(name, request, self.jobs.runs.export_zip)

    def export_weights(self, name: str | None, request: gr.Request = None) -> str:
        """Path of the run's weights alone (fp16 UNet for tiny, LoRA for sd15), in a fresh temp folder."""
        return self._hand_out(name, request, self.jobs.runs.export_weights)

    def _hand_out(self, name: str | None, request: gr.Request | None, export: Callable[[Any], Path]) -> str:
        """Check the run name and who asks, export the run with ``export`` and return a copy of the
        file in a fresh temp folder (never a path inside the runs folder)."""
        if not name:
            raise gr.Error("Pick a finished run first.")
        name = checked_input(safety.check_run_name, name)
        try:
            info = self.jobs.runs.get_run(name)
            if not self.sessions.may_control(info.owner, request):
                raise gr.Error(f"Run {name!r} was started by another visitor; only they can download it.",
                               title="Not your run")
            path = export(info)
        except ValueError as exc:
            raise gr.Error(str(exc)) from exc
        self.datasets.clean_leftovers()
        out = download_path(path.name)
        shutil.copyfile(path, out)
        return str(out)

    def delete_run(self, name: str | None, request: gr.Request = None):
        """Delete one of your finished runs (its folder, checkpoints included), to make room under the
        quotas; another visitor's run, or the running one, is refused. Returns the refreshed runs list."""
        if not name:
            raise gr.Error("Pick one of your finished runs first.", title="No run")
        name = checked_input(safety.check_run_name, name)
        try:
            info = self.jobs.runs.get_run(name)
        except ValueError as exc:
            raise gr.Error(str(exc), title="No such run") from exc
        if not self.sessions.may_control(info.owner, request):
            raise gr.Error(f"Run {name!r} was started by another visitor; only they can delete it.",
                           title="Not your run")
        status = self.jobs.status()
        if status.busy and status.run_name == name:
            raise gr.Error("This run is training now: stop it first.", title="Busy")
        folder = checked_input(safety.resolve_inside, self.runs_dir, info.run_dir)
        shutil.rmtree(folder)
        logger.info("run %s deleted by its owner", name)
        gr.Info(f"Run {name} deleted.")
        return self.training.runs_update()

    def restore_train_form(self, request: gr.Request = None) -> tuple:
        """The Train form's values (:attr:`TrainForm.RESTORED` order) as the running or last job set them (its
        ``run.json``), then a note naming that run; ``gr.skip()`` for all when there is no readable run."""
        meta = self.jobs.runs.run_meta()
        values = form_values(meta, base_available=self.training.base_checkpoint("tiny") is not None) if meta else None
        if values is None:
            return (gr.skip(),) * (len(TrainForm.RESTORED) + 1)
        values["base"] = self.training.base_of(meta, values, request)
        values["pretrained"] = gr.Textbox(value=values["pretrained"], visible=values["preset"] == "sd15")
        values["base"] = self.training.base_options(values["base"], request)
        out = [values[name] for name in TrainForm.RESTORED]
        return (*out, self.form_note(meta))

    def train_form_note(self) -> str:
        """The note under the Train form, again: the app calls it when a job starts or ends, so the run's
        state it names is the current one (not the "running" of a run that has ended since)."""
        meta = self.jobs.runs.run_meta()
        return self.form_note(meta) if meta else ""

    def form_note(self, meta: dict[str, Any]) -> str:
        """"The form shows the settings of run X (state)": running only while this server's job runs it."""
        name = str(meta.get("name", "?"))
        status, job = self.jobs.status(), self.jobs.current()
        if job is not None and job.name == name and status.busy:
            state = status.state
        else:
            state = str(meta.get("state") or "")
            if state == "running":  # left by a server that went away mid-run
                state = "interrupted"
            elif meta.get("stopped"):
                state = "stopped"
        return f"The form shows the settings of run **{name}** ({state}); the run name is left empty."

    def _previews(self, name: str | None):
        name = checked_input(safety.text, "Run", name or "", self.limits.max_text_chars).strip()
        if name:
            name = checked_input(safety.check_run_name, name)
        try:
            return self.jobs.runs.previews(name or None)
        except ValueError as exc:  # a folder outside the runs folder
            raise gr.Error(str(exc), title="No such run") from exc

    def preview_runs(self):
        """Choices of the preview history: the current (or last) job, then every run with a checkpoint."""
        runs = self.jobs.runs.list_runs()
        return gr.Dropdown(choices=[("current or last job", "")] + [(r.name, r.name) for r in runs], value="")

    def preview_history(self, name: str | None = None) -> tuple:
        """Step slider over run ``name``'s saved previews (empty: the current or last job), the newest
        preview's images, and a line saying what is shown."""
        previews = self._previews(name)
        if not previews:
            return (gr.Slider(minimum=0, maximum=1, value=0, step=1, interactive=False, label="Preview step"), [],
                    "No previews saved for this run (Preview every = 0, or no preview step reached yet).")
        steps = [p.step for p in previews]
        gap = min((b - a for a, b in zip(steps, steps[1:])), default=1)
        slider = gr.Slider(minimum=steps[0], maximum=max(steps[-1], steps[0] + 1), step=gap, value=steps[-1],
                           interactive=len(steps) > 1, label=f"Preview step ({len(steps)} saved)")
        return slider, preview_items(previews[-1]), preview_note(steps, steps[-1])

    def preview_at(self, name: str | None, step: float) -> tuple:
        """The saved preview nearest to ``step`` (the earlier one on a tie) and its note."""
        previews = self._previews(name)
        if not previews:
            return [], "No previews saved for this run."
        step = checked_input(safety.real_number, "Preview step", step if step is not None else 0, 0, float(self.limits.max_steps))
        best = min(previews, key=lambda p: (abs(p.step - step), p.step))
        return preview_items(best), preview_note([p.step for p in previews], best.step)

    def recorded_estimate(self, method: str, preset: str, steps: float, batch_size: float) -> str:
        """A time estimate from the step time the newest run with the same settings recorded, or a line
        saying there is none yet."""
        try:
            method = safety.choice("Method", method, METHODS)
            preset = safety.choice("Model preset", preset, PRESETS)
            steps_i = safety.whole_number("Steps", steps, 1, self.limits.max_steps)
            batch_i = safety.whole_number("Batch size", batch_size, 1, self.limits.max_batch_size)
        except ValueError as exc:
            return f"No time estimate: {exc}"
        found = self.jobs.runs.recorded_step_time(preset=preset, method=method, batch_size=batch_i,
                                             resolution=model_preset(preset).resolution)
        if found is None:
            return (f"No run of this server with {method} / {preset} / batch {batch_i} recorded its step time yet: "
                    "**Estimate time** measures it.\n\n" + measured_budget_note(steps_i))
        return estimate_markdown(found, steps_i) + "\n\n" + measured_budget_note(steps_i)

    def estimate_run(self, key: str | None, form: TrainForm, request: gr.Request = None) -> str:
        """Measure the step time on the loaded data with the form's settings (3 real steps in a scratch
        folder, the last 2 timed) and return the estimate for the whole run. Refused while a job runs."""
        model_cfg, train_cfg, bundle, _, base = self.training.checked_setup(key, form, request)
        try:
            measured = self.jobs.time_steps(self.datasets.dataset_at(bundle, model_cfg.resolution), model_cfg, train_cfg,
                                            base_checkpoint=base, cache_dir=self.runs_dir / "cache")
        except JobBusyError as exc:
            raise gr.Error(f"{exc} The estimate is measured with the processor to itself.", title="Busy") from exc
        return (estimate_markdown(measured, train_cfg.max_steps, where=self.where()) + "\n\n"
                + measured_budget_note(train_cfg.max_steps))

    estimate_time = form_endpoint(estimate_run)  # the API's /estimate_time: the same parameters as /start_training

    def where(self) -> str:
        """The machine in words, for measured figures: device and, on CPU, cores and load average."""
        if self.device.on_gpu:
            import torch

            return f"GPU {torch.cuda.get_device_name(0)}"
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        return f"{os.cpu_count()} CPU cores, load average {load:.1f} before the trial"


def measured_budget_note(steps: int) -> str:
    """:func:`pogdiff.ui.views.budget_advice` from the shipped budget curve ('' when it is absent)."""
    import json

    from pogdiff.constants import BUDGET_CURVE
    from pogdiff.ui.views import budget_advice

    try:
        curve = json.loads(BUDGET_CURVE.read_text())
    except (OSError, ValueError):
        return ""
    return budget_advice(curve, steps)
