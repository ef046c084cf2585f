"""Background training jobs for the UI: one job per server, state kept server-side.

The :class:`JobManager` owns at most one running training thread. Every browser tab reads the
same manager, so a page refresh or a second tab re-attaches to the running job: nothing about
the job lives in a browser session. Snapshots (:class:`JobStatus`) are plain copies taken under
the lock, safe to hand to any thread.

A failing ``train()`` marks the job ``failed`` with its message and a traceback summary; the
exception never leaves the worker thread, so the server keeps serving.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pogdiff.training.run_folder import RUN_FILE, save_preview, update_record
from pogdiff.runs.store import RunInfo, RunStore, StepTime, describe_dataset
from pogdiff.server.safety import check_run_name, owner_digest

logger = logging.getLogger(__name__)

STATES = ("idle", "running", "stopping", "finished", "failed")
HISTORY_LIMIT = 4000  # rows kept for the live loss curve; older rows are thinned, never dropped wholesale
# The live ETA (estimate_eta): the rate of the latest ETA_WINDOW steps; none until ETA_MIN_STEPS steps after
# the first one are timed (the first step pays for warm-up and is never used).
ETA_WINDOW = 20
ETA_MIN_STEPS = 3
TRACEBACK_LINES = 12  # lines of a failed job's traceback kept for the UI


def estimate_eta(step_ends: Sequence[tuple[int, float]], max_steps: int, *,
                 previews: Sequence[tuple[int, float]] = (), preview_every: int = 0,
                 window: int = ETA_WINDOW, min_steps: int = ETA_MIN_STEPS) -> tuple[float | None, float | None, bool]:
    """``(seconds left, seconds per step, previews_untimed)`` of a run from the clock times at which its
    steps ended: ``step_ends`` = ``[(step, time), ...]`` in order, the first entry the end of the run's
    first step (its set-up and warm-up come before it and are never extrapolated).

    The step time is the mean over the latest ``window`` steps, without the time ``previews`` (``[(step,
    seconds sampling after that step), ...]``) took; the previews still to come (every ``preview_every``
    steps up to ``max_steps``) are added at their mean measured time. ``(None, None, False)`` until
    ``min_steps`` steps after the first are timed; ``previews_untimed`` is True when previews are still to
    come but none was timed yet (the estimate leaves them out).
    """
    if len(step_ends) < 2:
        return None, None, False
    spent = dict(previews)
    steps, seconds = 0, 0.0
    for (s0, t0), (s1, t1) in reversed(list(zip(step_ends[:-1], step_ends[1:]))):
        if steps >= window:
            break
        steps += s1 - s0
        seconds += (t1 - t0) - sum(v for k, v in spent.items() if s0 <= k < s1)
    if steps < min_steps:
        return None, None, False
    rate = max(seconds, 0.0) / steps
    last = step_ends[-1][0]
    left = rate * max(0, max_steps - last)
    to_come = max(0, max_steps // preview_every - last // preview_every) if preview_every > 0 else 0
    untimed = bool(to_come) and not spent
    if to_come and spent:
        left += to_come * sum(spent.values()) / len(spent)
    return left, rate, untimed


class JobBusyError(RuntimeError):
    """Raised when a training job is requested while another one is running."""


@dataclass
class JobStatus:
    """A snapshot of the training job, safe to read from any thread.

    ``history`` holds one dict per logged step: ``step``, every loss term (``loss``, ``mse``,
    ``pog``, ``cbdm``, ...), ``lr``, ``psi_mean``, ``psi_active``, ``seconds_per_step``.
    ``preview_images`` is ``uint8 [N, H, W, 3]`` or ``None``.
    """

    state: str = "idle"
    run_name: str = ""
    run_dir: str = ""
    method: str = ""
    step: int = 0
    max_steps: int = 0
    eta_seconds: float | None = None  # None while the ETA is being estimated (estimate_eta)
    eta_untimed_previews: bool = False  # previews are still to come, none timed yet: not in eta_seconds
    seconds_per_step: float | None = None  # the trainer's mean since the first step (what run.json records)
    recent_seconds_per_step: float | None = None  # the latest steps' rate behind eta_seconds
    history: list[dict[str, float]] = field(default_factory=list)
    preview_step: int | None = None
    preview_images: np.ndarray | None = None
    preview_captions: list[str] = field(default_factory=list)
    error: str = ""
    traceback: str = ""
    stopped: bool = False
    last_checkpoint: str = ""
    started_at: float | None = None
    finished_at: float | None = None
    owner: str = ""  # owner_digest() of whoever started the job ("" = nobody in particular)
    stop_reason: str = ""  # why a stopped job stopped ("requested", "wall-time limit ...")
    version: int = 0  # bumped on every change, so pollers can skip unchanged frames
    pool: str = ""  # the run's neighbour pool (PoGDiff's advice names only pools not in use)

    @property
    def busy(self) -> bool:
        return self.state in ("running", "stopping")

    @property
    def progress(self) -> float:
        return min(1.0, self.step / self.max_steps) if self.max_steps else 0.0

    @property
    def elapsed_seconds(self) -> float | None:
        if self.started_at is None:
            return None
        return (self.finished_at or time.time()) - self.started_at


class Job:
    """One training run in a daemon thread. Read it through :meth:`JobManager.status`."""

    def __init__(self, name: str, run_dir: Path, status: JobStatus) -> None:
        self.name = name
        self.run_dir = run_dir
        self.stop_event = threading.Event()
        self.done = threading.Event()
        self.thread: threading.Thread | None = None
        self._status = status
        self.preview_every = 0  # steps between previews (0: none), for the ETA
        self.step_ends: list[tuple[int, float]] = []  # (step, monotonic time), the latest ETA_WINDOW + 1
        self.preview_seconds: list[tuple[int, float]] = []  # (step, seconds its preview took)

    def __repr__(self) -> str:
        return f"Job({self.name!r}, state={self._status.state!r}, step={self._status.step})"


def _default_train_fn() -> Callable[..., Any]:
    from pogdiff.training.run import train  # lazy: keeps `import pogdiff.runs.jobs` light

    return train


def _to_dict(cfg: Any) -> dict[str, Any]:
    if cfg is None:
        return {}
    if dataclasses.is_dataclass(cfg):
        from pogdiff.config import to_dict

        return to_dict(cfg)
    return dict(cfg)


def traceback_summary(error: BaseException) -> str:
    """The last :data:`TRACEBACK_LINES` lines of ``error``'s traceback."""
    lines = traceback.format_exception(type(error), error, error.__traceback__)
    return "\n".join("".join(lines).rstrip().splitlines()[-TRACEBACK_LINES:])


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "run"


class JobManager:
    """Runs one training job at a time in a background thread.

    Args:
        runs_dir: every run gets a folder here (``<time>-<method>``) with ``run.json``
            beside the checkpoints that ``train_fn`` writes.
        train_fn: the training function, called with the keyword arguments of
            :func:`pogdiff.training.run.train`. Defaults to it (imported on first use).
        max_seconds: wall time of one job; past it the job is asked to stop (like **Stop**) and
            keeps its checkpoint. None or 0: no limit.

    Every path that comes from a caller or from a ``run.json`` is resolved (symlinks followed) and
    used only when it lies inside ``runs_dir`` (README "Limits and safety").
    """

    def __init__(self, runs_dir: str | Path, *, train_fn: Callable[..., Any] | None = None,
                 max_seconds: float | None = None) -> None:
        self.runs_dir = Path(runs_dir)
        self._train_fn = train_fn
        self.max_seconds = max_seconds
        self._lock = threading.Lock()
        self._job: Job | None = None
        self._timing = False  # a step-time trial (time_steps) holds the CPU/GPU
        self.runs = RunStore(self.runs_dir, current=self._current_dir)

    def _current_dir(self) -> tuple[Path, bool] | None:
        job = self.current()
        return None if job is None else (job.run_dir, job._status.busy)

    # ------------------------------------------------------------------ control
    def start(
        self,
        dataset: Any,
        model_cfg: Any,
        train_cfg: Any,
        *,
        base_checkpoint: str | Path | None = None,
        preview_captions: Sequence[str] | None = None,
        cache_dir: str | Path | None = None,
        name: str | None = None,
        owner: str | None = None,
        run_name: str | None = None,
    ) -> Job:
        """Start training in a daemon thread and return at once.

        ``run_name`` names the run folder exactly (checked like any run name; a taken name is
        refused); without it the folder is ``<date>-<time>-<name or method>``.

        ``owner`` (a session or user id) is stored only as :func:`~pogdiff.server.safety.owner_digest`.

        Raises:
            JobBusyError: a job is already running on this server.
        """
        with self._lock:
            self._refuse_if_busy()
            method = getattr(train_cfg, "method", "run")
            if run_name:
                run_name = check_run_name(run_name)
                if (self.runs_dir / run_name).exists():
                    raise ValueError(f"a run named {run_name!r} exists already: pick another name, or leave the "
                                     "name empty for a dated one")
            else:
                run_name = self._new_run_name(name or method)
            run_dir = self.runs_dir / run_name
            run_dir.mkdir(parents=True, exist_ok=False)
            job = self._new_job(run_name, run_dir, method, train_cfg, owner)
        fields = {
            "name": run_name, "method": method, "state": "running",
            "started_at": job._status.started_at, "max_steps": job._status.max_steps,
            "base_checkpoint": str(base_checkpoint) if base_checkpoint else "", "owner": job._status.owner,
            "dataset": describe_dataset(dataset),
            "model_cfg": _to_dict(model_cfg), "train_cfg": _to_dict(train_cfg),
        }
        return self._launch(job, fields, dataset, model_cfg, train_cfg, base_checkpoint=base_checkpoint,
                            preview_captions=preview_captions, cache_dir=cache_dir)

    def resume(self, run: RunInfo | str, dataset: Any, *, owner: str | None = None,
               cache_dir: str | Path | None = None) -> Job:
        """Continue an interrupted or stopped run from its latest checkpoint, in its own folder.

        The run's saved configs are used; the trainer refuses data that differ from the run's
        (dataset hash), naming what differs.

        Raises:
            JobBusyError: a job is already running on this server.
            ValueError: the run has no checkpoint, or it already finished all its steps.
        """
        from pogdiff.config import ModelConfig, TrainConfig, from_dict

        info = self.runs.get_run(run)
        if info.steps_done >= info.max_steps > 0 and info.state == "finished":
            raise ValueError(f"run {info.name!r} already finished all {info.max_steps} steps; nothing to resume")
        model_cfg = from_dict(ModelConfig, info.model_cfg)
        train_cfg = from_dict(TrainConfig, info.train_cfg)
        base = (self.runs.run_meta(info.name) or {}).get("base_checkpoint") or None
        with self._lock:
            self._refuse_if_busy()
            job = self._new_job(info.name, info.run_dir, train_cfg.method, train_cfg, owner)
        fields = dict(state="running", started_at=job._status.started_at, owner=job._status.owner,
                      finished_at=None, error="", stop_reason="")
        return self._launch(job, fields, dataset, model_cfg, train_cfg, base_checkpoint=base, cache_dir=cache_dir)

    def _refuse_if_busy(self) -> None:
        if self._timing:
            raise JobBusyError("A step-time trial is running (a few steps, to estimate a run's time); "
                               "try again in a few seconds.")
        if self._job is not None and self._job._status.busy:
            current = self._job._status
            raise JobBusyError(
                f"A training job is already running ({current.run_name}, step {current.step} of "
                f"{current.max_steps}). One job runs per server: stop it or wait for it to finish."
            )

    def _new_job(self, run_name: str, run_dir: Path, method: str, train_cfg: Any, owner: str | None) -> Job:
        """The job record of a new or resumed run (call with the lock held)."""
        status = JobStatus(
            state="running", run_name=run_name, run_dir=str(run_dir), method=method,
            max_steps=int(getattr(train_cfg, "max_steps", 0) or 0), started_at=time.time(),
            owner=owner_digest(owner), version=1, pool=str(getattr(getattr(train_cfg, "psi", None), "pool", "") or ""),
        )
        job = Job(run_name, run_dir, status)
        self._job = job
        return job

    def _launch(self, job: Job, fields: dict[str, Any], dataset: Any, model_cfg: Any, train_cfg: Any, *,
                base_checkpoint: str | Path | None = None, preview_captions: Sequence[str] | None = None,
                cache_dir: str | Path | None = None) -> Job:
        run_name, run_dir = job.name, job.run_dir
        update_record(run_dir, **fields)  # the job manager's part of run.json; the Trainer writes its own
        kwargs = dict(
            dataset=dataset, model_cfg=model_cfg, train_cfg=train_cfg, run_dir=run_dir,
            base_checkpoint=base_checkpoint, callback=lambda info: self._on_step(job, info),
            preview_callback=lambda step, images, captions: self._on_preview(job, step, images, captions),
            preview_captions=list(preview_captions) if preview_captions else None,
            stop_event=job.stop_event, cache_dir=cache_dir,
        )
        job.preview_every = int(getattr(train_cfg, "sample_every", 0) or 0) if preview_captions else 0
        job.thread = threading.Thread(
            target=self._run, args=(job, kwargs), name=f"train-{run_name}", daemon=True
        )
        job.thread.start()
        if self.max_seconds:
            timer = threading.Timer(self.max_seconds, self._time_up, args=(job,))
            timer.daemon = True
            timer.start()
        logger.info("started training job %s in %s", run_name, run_dir)
        return job

    def stop(self, reason: str = "requested") -> bool:
        """Ask the running job to stop after its current step; True if there was one."""
        with self._lock:
            job = self._job
            if job is None or job._status.state != "running":
                return False
            job._status.state = "stopping"
            job._status.stop_reason = reason
            job._status.version += 1
            job.stop_event.set()
        logger.info("stop requested for %s (%s)", job.name, reason)
        return True

    def _time_up(self, job: Job) -> None:
        if self.current() is job and not job.done.is_set():
            self.stop(f"wall-time limit of {self.max_seconds / 60:g} min")

    def current(self) -> Job | None:
        """The latest job of this server (running or not), or None."""
        with self._lock:
            return self._job

    def status(self) -> JobStatus:
        """A snapshot of the latest job, or an ``idle`` status when none ran yet."""
        with self._lock:
            if self._job is None:
                return JobStatus()
            s = self._job._status
            return dataclasses.replace(
                s, history=list(s.history), preview_captions=list(s.preview_captions)
            )

    def wait(self, timeout: float | None = None) -> JobStatus:
        """Block until the current job ends (or ``timeout`` seconds pass); return its status."""
        job = self.current()
        if job is not None:
            job.done.wait(timeout)
        return self.status()

    # ------------------------------------------------------------------ worker
    def _run(self, job: Job, kwargs: dict[str, Any]) -> None:
        try:
            train_fn = self._train_fn or _default_train_fn()
            result = train_fn(**kwargs)
        except BaseException as exc:  # noqa: BLE001 - the server must survive any training failure
            logger.exception("training job %s failed", job.name)
            self._finish(job, error=exc)
        else:
            self._finish(job, result=result)
        finally:
            job.done.set()

    def _on_step(self, job: Job, info: Any) -> None:
        row: dict[str, float] = {"step": int(getattr(info, "step", 0))}
        for key, value in (getattr(info, "terms", None) or {}).items():
            row[str(key)] = float(value)
        for key in ("lr", "psi_mean", "psi_active", "pog_share", "transfer_rate", "seconds_per_step"):
            value = getattr(info, key, None)
            if value is not None:
                row[key] = float(value)
        now = time.monotonic()
        with self._lock:
            s = job._status
            s.step = row["step"]
            s.max_steps = int(getattr(info, "max_steps", 0) or s.max_steps)
            job.step_ends = [*job.step_ends[-ETA_WINDOW:], (s.step, now)]
            s.eta_seconds, s.recent_seconds_per_step, s.eta_untimed_previews = estimate_eta(
                job.step_ends, s.max_steps, previews=job.preview_seconds, preview_every=job.preview_every)
            spt = getattr(info, "seconds_per_step", None)
            s.seconds_per_step = None if spt is None else float(spt)
            s.history.append(row)
            if len(s.history) > HISTORY_LIMIT:
                s.history = s.history[::2]
            s.version += 1

    def _on_preview(self, job: Job, step: int, images: np.ndarray, captions: Sequence[str]) -> None:
        images = np.asarray(images, dtype=np.uint8).copy()
        now = time.monotonic()
        with self._lock:
            if job.step_ends and job.step_ends[-1][0] == int(step):  # sampled right after that step ended
                job.preview_seconds.append((int(step), now - job.step_ends[-1][1]))
            s = job._status
            s.preview_step = int(step)
            s.preview_images = images
            s.preview_captions = [str(c) for c in captions]
            s.version += 1
        try:  # the preview history survives the page and the server (README "What you see")
            save_preview(job.run_dir, int(step), images, captions)
        except (OSError, ValueError):
            logger.warning("could not save the step-%s preview of %s", step, job.name, exc_info=True)

    def _finish(
        self, job: Job, *, result: Any = None, error: BaseException | None = None
    ) -> None:
        with self._lock:
            s = job._status
            s.finished_at = time.time()
            s.eta_seconds = 0.0 if error is None else None
            if error is not None:
                s.state = "failed"
                s.error = f"{type(error).__name__}: {error}"
                s.traceback = traceback_summary(error)
            else:
                s.state = "finished"
                s.stopped = bool(getattr(result, "stopped", job.stop_event.is_set()))
                s.step = int(getattr(result, "steps_done", s.step) or s.step)
                checkpoint = getattr(result, "last_checkpoint", None)
                s.last_checkpoint = str(checkpoint) if checkpoint else ""
            s.version += 1
            fields = dict(
                state="stopped" if s.state == "finished" and s.stopped else s.state, stopped=s.stopped,
                steps_done=s.step, finished_at=s.finished_at, error=s.error, last_checkpoint=s.last_checkpoint,
                stop_reason=s.stop_reason,
            )
            if s.seconds_per_step is not None and s.step >= 2:  # what the time estimate of a later run reads
                fields.update(seconds_per_step=s.seconds_per_step, timed_steps=s.step)
        try:
            update_record(job.run_dir, **fields)
        except OSError:
            logger.exception("could not write %s", job.run_dir / RUN_FILE)

    def _new_run_name(self, stem: str) -> str:
        base = f"{time.strftime('%Y%m%d-%H%M%S')}-{_slug(stem)}"
        name, n = base, 1
        while (self.runs_dir / name).exists():
            n += 1
            name = f"{base}-{n}"
        return name

    def time_steps(self, dataset: Any, model_cfg: Any, train_cfg: Any, *, steps: int = 2,
                   base_checkpoint: str | Path | None = None, cache_dir: str | Path | None = None,
                   clock: Callable[[], float] = time.perf_counter) -> StepTime:
        """Train ``steps + 1`` real steps in a scratch folder (no previews, nothing kept) and time the
        last ``steps``: the first step also pays for warm-up. ``setup_seconds`` is the time until the
        first step ended (model, neighbour table, first step).

        Raises:
            JobBusyError: a job or another trial is running (it would share the processor).
        """
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        with self._lock:
            self._refuse_if_busy()
            self._timing = True
        try:
            trial_cfg = dataclasses.replace(train_cfg, max_steps=steps + 1, sample_every=0, warmup_steps=0,
                                            checkpoint_every=steps + 1)
            stamps: list[float] = []
            self.runs_dir.mkdir(parents=True, exist_ok=True)
            t0 = clock()
            with tempfile.TemporaryDirectory(prefix=".timing-", dir=self.runs_dir) as tmp:
                (self._train_fn or _default_train_fn())(
                    dataset=dataset, model_cfg=model_cfg, train_cfg=trial_cfg, run_dir=Path(tmp),
                    base_checkpoint=base_checkpoint, callback=lambda info: stamps.append(clock()),
                    preview_callback=None, preview_captions=None, stop_event=threading.Event(), cache_dir=cache_dir,
                )
        finally:
            with self._lock:
                self._timing = False
        if len(stamps) < steps + 1:
            raise RuntimeError(f"the trial ended after {len(stamps)} of {steps + 1} steps; no step time measured")
        spt = (stamps[steps] - stamps[0]) / steps
        return StepTime(spt, steps, "trial", time.time(), setup_seconds=stamps[0] - t0)
