"""The Train tab's training job (:class:`TrainJobs`): the form's values to configs, the **Start from**
choices, and starting, resuming, stopping and polling the background job."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import gradio as gr

from pogdiff.server import safety
from pogdiff.config import (
    BALANCES,
    METHODS,
    PRESETS,
    Limits,
    configs_from_options,
    model_preset,
    train_preset,
)
from pogdiff.runs.jobs import JobBusyError, JobManager
from pogdiff.config import POOLS
from pogdiff.ui.datasets import Datasets
from pogdiff.ui.sessions import Sessions
from pogdiff.ui.state import DatasetBundle, Device
from pogdiff.ui.train_form import TrainForm, form_endpoint
from pogdiff.ui.views import (
    BASE_RUN_PREFIX,
    BASE_SCRATCH,
    BASE_SHIPPED,
    HUB_ID_RE,
    SCRATCH_LABEL,
    SHIPPED_BASE_LABEL,
    checked_input,
    gallery_items,
    loss_frame,
    progress_html,
    request_owner,
    status_markdown,
)


class TrainJobs:
    """The Train form to configs, Start from, and the job: start, resume, stop, poll.

    Args:
        jobs: the server's one background training job, and its runs (``jobs.runs``).
        datasets: the page's data sets (what a run trains on).
        sessions: the visitors: who may control a run, the runs quotas, idle visitors ended on a poll.
        device: where training runs (sd15 needs a GPU).
        limits: server-side bounds on every request value (README "Limits and safety").
        runs_dir: the runs folder (a run as a base; the preparation's cache).
        shipped_dir: folder of the shipped checkpoints (the tiny base, ``base-tiny``).
    """

    def __init__(self, jobs: JobManager, datasets: Datasets, sessions: Sessions, device: Device, limits: Limits,
                 runs_dir: str | Path, shipped_dir: str | Path) -> None:
        self.jobs = jobs
        self.datasets = datasets
        self.sessions = sessions
        self.device = device
        self.limits = limits
        self.runs_dir = Path(runs_dir)
        self.shipped_dir = Path(shipped_dir)

    def preset_defaults(self, preset: str) -> tuple:
        """Batch size, learning rate and model-id visibility for a preset."""
        preset = checked_input(safety.choice, "Model preset", preset, PRESETS)
        cfg = train_preset(preset)
        model = model_preset(preset)
        return (
            gr.Number(value=cfg.batch_size),
            gr.Number(value=cfg.learning_rate),
            gr.Textbox(visible=preset == "sd15", value=model.pretrained if preset == "sd15" else ""),
        )

    def build_configs(self, form: TrainForm):
        """The form's values -> (ModelConfig, TrainConfig); gr.Error naming any bad value.

        Every value is checked on the server against :attr:`limits` (README "Limits and safety").
        """
        L, f = self.limits, form
        method = checked_input(safety.choice, "Method", f.method, METHODS)
        preset = checked_input(safety.choice, "Model preset", f.preset, PRESETS)
        pretrained = checked_input(safety.text, "Model id", f.pretrained, L.max_text_chars)
        steps_i = checked_input(safety.whole_number, "Steps", f.steps, 1, L.max_steps)
        batch_i = checked_input(safety.whole_number, "Batch size", f.batch_size, 1, L.max_batch_size)
        k_i = checked_input(safety.whole_number, "k (neighbours)", f.k, 1, L.max_k)
        every = checked_input(safety.whole_number, "Preview every", f.sample_every or 0, 0, L.max_steps)
        seed_i = checked_input(safety.whole_number, "Seed", f.seed or 0, 0, L.max_seed)
        lr = f.lr
        if lr is not None and not isinstance(lr, bool) and isinstance(lr, (int, float)) and lr <= 0:
            raise gr.Error(f"Learning rate must be positive, got {lr!r}.", title="Invalid input")
        lr = checked_input(safety.real_number, "Learning rate", lr, 0.0, L.max_learning_rate, True)
        flags = [checked_input(safety.flag, n, v) for n, v in (("w_density", f.use_density), ("s_img", f.use_image_sim),
                                                      ("s_txt", f.use_text_sim))]
        use_density, use_image_sim, use_text_sim = flags
        pool = checked_input(safety.choice, "Neighbour pool", f.pool, POOLS)
        overrides = {}
        if preset == "sd15":
            if not (pretrained or "").strip():
                raise gr.Error("The sd15 preset needs a diffusers model id or a local folder.")
            overrides["pretrained"] = self._pretrained(pretrained.strip())
        try:  # psi_max and every other value: checked once, by configs_from_options
            return configs_from_options(
                method=method, preset=preset, pretrained=overrides.get("pretrained"), steps=steps_i,
                batch_size=batch_i, lr=float(lr), seed=seed_i, sample_every=every,
                psi_max=f.psi_max,
                k=k_i, use_density=bool(use_density), use_image_sim=bool(use_image_sim),
                use_text_sim=bool(use_text_sim), neighbour_pool=str(pool),
                checkpoint_every=max(train_preset(preset).checkpoint_every, steps_i),
                warmup_steps=min(train_preset(preset).warmup_steps, max(0, steps_i // 10)), limits=L,
            )
        except ValueError as exc:
            raise gr.Error(str(exc), title="Invalid input") from exc

    def _pretrained(self, value: str) -> str:
        """A hub id (``org/name``); a local folder only in single-user mode."""
        import re

        if self.sessions.single_user or re.fullmatch(HUB_ID_RE, value) and not Path(value).exists():
            return value
        raise gr.Error(f"{value!r} is not a Hugging Face model id (org/name). Local folders are accepted only "
                       "when the server runs in single-user mode (python app.py --single-user).",
                       title="Invalid input")

    def base_checkpoint(self, preset: str) -> Path | None:
        base = self.shipped_dir / "base-tiny"
        return base if preset == "tiny" and (base / "configs.json").exists() else None

    def base_choices(self, request: gr.Request | None = None) -> list[tuple[str, str]]:
        """The form's **Start from** choices: the shipped tiny base (when there is one), a random UNet, and
        the tiny runs of this server that the requester may control, newest first."""
        choices = [(SHIPPED_BASE_LABEL, BASE_SHIPPED)] if self.base_checkpoint("tiny") is not None else []
        choices.append((SCRATCH_LABEL, BASE_SCRATCH))
        tiny = model_preset("tiny").resolution
        for r in self.jobs.runs.list_runs():
            if r.model_cfg.get("preset") == "tiny" and r.model_cfg.get("resolution", tiny) == tiny \
                    and self.sessions.may_control(r.owner, request):
                choices.append((f"run {r.name} ({r.method}, {r.steps_done} steps)", f"{BASE_RUN_PREFIX}{r.name}"))
        return choices

    def base_options(self, current: str | None = None, request: gr.Request = None):
        """The **Start from** dropdown with fresh choices (a run that ended is offered), keeping ``current``
        while it is still one of them."""
        choices = self.base_choices(request)
        values = [v for _, v in choices]
        return gr.Dropdown(choices=choices, value=current if current in values else values[0])

    def checked_setup(self, key: str | None, form: TrainForm, request: gr.Request | None):
        """The form's run, checked before any work as Start and Estimate time both need it:
        ``(model_cfg, train_cfg, bundle, base choice, base checkpoint)``. Refuses sd15 without a GPU
        and options the loaded set cannot train with, each in words."""
        from_scratch = checked_input(safety.flag, "Train from scratch", False if form.from_scratch is None else form.from_scratch)
        model_cfg, train_cfg = self.build_configs(form)
        if model_cfg.preset == "sd15" and not self.device.on_gpu:
            raise gr.Error("The sd15 preset needs a GPU; this server has none. Use the tiny preset on CPU.")
        bundle = self.datasets.bundle(key)
        train_cfg = self.class_balance(train_cfg, form, bundle)
        from pogdiff.training.setup import check_train_config

        try:
            check_train_config(train_cfg, len(bundle.captions))
        except ValueError as exc:
            raise gr.Error(str(exc), title="Invalid training options") from exc
        choice, base = self.chosen_base(model_cfg, from_scratch, form.base, request)
        return model_cfg, train_cfg, bundle, choice, base

    def class_balance(self, train_cfg: Any, form: TrainForm, bundle: DatasetBundle):
        """``train_cfg`` with the form's **Class balance** and **Class loss weights** on the loaded set:
        ``from-data`` takes the set's repeats (and its loss weights when the form names none); gr.Error
        in words for a set without repeats, a class it lacks or a bad weight."""
        from pogdiff.training.balance import with_data_weights
        from pogdiff.ui.balance_views import parse_weights_text

        balance = checked_input(safety.choice, "Class balance", form.balance or "method", BALANCES)
        text = checked_input(safety.text, "Class loss weights", form.loss_weights or "", 8 * self.limits.max_text_chars)
        try:
            weights = parse_weights_text(text, list(bundle.table["subject"]))
            cfg = dataclasses.replace(train_cfg, balance=balance, class_loss_weights=weights)
            return with_data_weights(cfg, bundle.ds)
        except ValueError as exc:
            raise gr.Error(str(exc), title="Invalid class balance") from exc

    def chosen_base(self, model_cfg: Any, from_scratch: bool, base: str | None,
                    request: gr.Request | None) -> tuple[str, Path | None]:
        """``(choice, checkpoint)`` for the form's **Start from** value ``base`` (``shipped``, ``scratch``,
        ``run:<name>``; empty: shipped, or scratch with ``from_scratch``): the checkpoint to fine-tune,
        None for a random UNet (and for sd15, which starts from its model id)."""
        base = checked_input(safety.text, "Start from", base or "", self.limits.max_text_chars).strip()
        if from_scratch and base not in ("", BASE_SCRATCH):
            raise gr.Error(f"Train from scratch and Start from {base!r} contradict each other: choose one.",
                           title="Invalid input")
        choice = BASE_SCRATCH if from_scratch else (base or BASE_SHIPPED)
        if choice == BASE_SHIPPED:
            return choice, self.base_checkpoint(model_cfg.preset)
        if choice == BASE_SCRATCH:
            return choice, None
        if not choice.startswith(BASE_RUN_PREFIX):
            raise gr.Error(f"Start from must be '{BASE_SHIPPED}', '{BASE_SCRATCH}' or '{BASE_RUN_PREFIX}<run name>'; "
                           f"got {base!r}.", title="Invalid input")
        name = checked_input(safety.check_run_name, choice[len(BASE_RUN_PREFIX):])
        try:
            info = self.jobs.runs.get_run(name)
        except ValueError as exc:
            raise gr.Error(f"{exc}: pick a run in Start from.", title="No such run") from exc
        if not self.sessions.may_control(info.owner, request):
            raise gr.Error(f"Run {name!r} was started by another visitor: start from your own runs, the shipped "
                           "base or from scratch.", title="Not your run")
        trained = (info.model_cfg.get("preset"), info.model_cfg.get("resolution"))
        if model_cfg.preset != "tiny" or trained != ("tiny", model_cfg.resolution):
            raise gr.Error(f"Run {name!r} ({trained[0]}, {trained[1]} px) cannot start a {model_cfg.preset} run at "
                           f"{model_cfg.resolution} px: a run's checkpoint is a base for the tiny preset at the size it "
                           "was trained at. Choose the shipped base or from scratch.", title="Invalid input")
        return choice, info.checkpoint

    def base_of(self, meta: dict[str, Any], values: dict[str, Any], request: gr.Request | None = None) -> str:
        """The **Start from** value a run in ``run.json`` ``meta`` was started with."""
        recorded = str(meta.get("base_checkpoint") or "")
        if values["preset"] != "tiny":
            return BASE_SHIPPED
        if not recorded:
            return BASE_SCRATCH if values["from_scratch"] or self.base_checkpoint("tiny") is None else BASE_SHIPPED
        try:
            inside = safety.resolve_inside(self.runs_dir, Path(recorded).absolute())
        except ValueError:
            return BASE_SHIPPED  # the shipped base (or another folder outside the runs)
        run = inside.relative_to(self.runs_dir.resolve()).parts[0]
        return f"{BASE_RUN_PREFIX}{run}" if any(v == f"{BASE_RUN_PREFIX}{run}" for _, v in self.base_choices(request)) \
            else BASE_SHIPPED

    def preview_captions(self, bundle: DatasetBundle, n: int = 4) -> list[str]:
        """One training caption for each of the ``n`` rarest classes."""
        rare = list(bundle.table.sort_values(["count", "subject"])["subject"][:n])
        first = {}
        for cap, s in zip(bundle.captions, bundle.subjects):
            first.setdefault(s, cap)
        return [first[s] for s in rare]

    def start_run(self, key: str | None, form: TrainForm, request: gr.Request = None) -> tuple:
        """Start a background training job owned by the requesting session; the Timer shows its progress.

        ``run_name`` (optional) names the run folder; empty gives a dated name. ``base`` (the form's
        **Start from**; README "What you see"): ``shipped`` (or empty) fine-tunes the shipped tiny face
        base, ``scratch`` a random UNet, ``run:<name>`` the last checkpoint of one of your tiny runs.
        ``from_scratch`` (kept for API callers) is ``base="scratch"``.
        """
        run_name = checked_input(safety.text, "Run name", form.run_name or "", self.limits.max_text_chars).strip()
        if run_name:
            run_name = checked_input(safety.check_run_name, run_name)
        model_cfg, train_cfg, bundle, choice, base = self.checked_setup(key, form, request)
        if train_cfg.method == "pogdiff" and not (train_cfg.psi.use_density or train_cfg.psi.use_image_sim
                                                   or train_cfg.psi.use_text_sim) and train_cfg.psi.psi_max > 0:
            gr.Warning("All psi factors are off: every sample borrows psi_max from its neighbour.")
        self.sessions.check_runs(request)  # runs kept per visitor, the runs folder's size (pogdiff.ui.sessions)
        dataset = self.datasets.dataset_at(bundle, model_cfg.resolution)  # sd15: the set at 512 px
        try:
            self.jobs.start(
                dataset, model_cfg, train_cfg, base_checkpoint=base,
                preview_captions=self.preview_captions(bundle) if train_cfg.sample_every else None,
                cache_dir=self.runs_dir / "cache", owner=request_owner(request), run_name=run_name or None,
            )
        except JobBusyError as exc:
            raise gr.Error(str(exc), title="Busy") from exc
        except ValueError as exc:
            raise gr.Error(str(exc), title="Cannot start") from exc
        if base is None and model_cfg.preset == "tiny" and choice == BASE_SHIPPED:
            gr.Info("No shipped base checkpoint (checkpoints/base-tiny) yet: training starts from a random UNet.")
        return self.poll(-1, request)

    start_training = form_endpoint(start_run)  # the API's /start_training: the form's fields by name

    def resume_training(self, key: str | None, name: str | None, request: gr.Request = None) -> tuple:
        """Continue an interrupted or stopped run of this server on the loaded dataset."""
        if not name:
            raise gr.Error("Pick an interrupted or stopped run in the list first.", title="No run")
        try:
            info = self.jobs.runs.get_run(name)
        except ValueError as exc:
            raise gr.Error(str(exc), title="No such run") from exc
        if not self.sessions.may_control(info.owner, request):
            raise gr.Error("This run was started by another visitor: you can compare it but not resume it.",
                           title="Not your run")
        bundle = self.datasets.bundle(key)
        resolution = int((info.model_cfg or {}).get("resolution") or bundle.ds.images.shape[1])
        try:
            self.jobs.resume(info, self.datasets.dataset_at(bundle, resolution), owner=request_owner(request),
                             cache_dir=self.runs_dir / "cache")
        except JobBusyError as exc:
            raise gr.Error(str(exc), title="Busy") from exc
        except ValueError as exc:
            raise gr.Error(str(exc), title="Cannot resume") from exc
        return self.poll(-1, request)

    def stop_training(self, request: gr.Request = None) -> tuple:
        """Stop the running job: only its owner may, unless the server is single-user."""
        status = self.jobs.status()
        if status.busy and not self.sessions.may_control(status.owner, request):
            raise gr.Error("This training job was started by another visitor: you can watch it but not stop it.",
                           title="Not your job")
        if not self.jobs.stop():
            gr.Info("No training job is running.")
        return self.poll(-1, request)

    def poll(self, seen_version: int | None = None, request: gr.Request = None) -> tuple:
        """Timer tick: status, progress, loss curve, previews, button states, runs (when changed).

        Returns ``gr.skip()`` for every output when nothing changed since ``seen_version``.
        """
        self.sessions.sweep_idle()  # every open tab polls: visitors idle too long are freed here too
        s = self.jobs.status()
        if not isinstance(seen_version, int) or isinstance(seen_version, bool):
            seen_version = -1
        if seen_version is not None and seen_version >= 0 and s.version == seen_version:
            return (gr.skip(),) * 8
        runs_changed = seen_version is None or seen_version < 0 or (not s.busy and s.version != seen_version)
        preview = (gallery_items(s.preview_images, [f"step {s.preview_step} · {c}" for c in s.preview_captions],
                                 min_px=128)
                   if s.preview_images is not None else [])
        loss = loss_frame(s.history)
        return (
            status_markdown(s),
            progress_html(s),
            loss if len(loss) else None,  # an empty frame would freeze the plot's colour scale
            preview,
            gr.Button(interactive=not s.busy),
            gr.Button(interactive=s.state == "running" and self.sessions.may_control(s.owner, request)),
            self.runs_update() if runs_changed else gr.skip(),
            s.version,
        )

    def runs_update(self):
        runs = self.jobs.runs.list_runs()
        return gr.Dropdown(choices=[(f"{r.name} · {r.method} · {r.steps_done} steps", r.name) for r in runs],
                           value=runs[0].name if runs else None)
