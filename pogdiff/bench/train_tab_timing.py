"""Times the Train tab as a visitor uses it: the default run and how long **Stop** takes.

``python -m pogdiff bench train-tab [--steps 300] [--stop-at 10 50 120] [--out FILE.json]``

The run goes through :class:`pogdiff.ui.Studio` exactly as the Start button does (demo set, tiny
preset, the app's default form values), so the figure includes building the neighbour table and the
previews. Stop latency is the time from the stop request to the job's end (its last step finishes
and the final checkpoint is written); the stops land at spread-out steps, one of them on a preview
step, where the preview runs before the stop is seen. README "What you see" quotes the figures
(BENCHMARKS.md "Train tab").
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path

logger = logging.getLogger(__name__)

def _form_default(name: str) -> int:
    from pogdiff.ui.train_form import TrainForm

    return int(getattr(TrainForm(), name))


DEFAULT_STEPS = _form_default("steps")  # the app's default Steps value
DEFAULT_PREVIEW_EVERY = _form_default("sample_every")  # the app's default preview cadence


def _options(steps: int, sample_every: int):
    from pogdiff.ui.train_form import TrainForm

    return TrainForm(steps=steps, sample_every=sample_every)  # the form's other values as the app starts with


def _wait_for_step(studio, step: int, timeout: float) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        s = studio.jobs.status()
        if s.step >= step or not s.busy:
            return
        time.sleep(0.01)
    raise TimeoutError(f"the job did not reach step {step} in {timeout:.0f} s")


def run(steps: int = DEFAULT_STEPS, stop_at: tuple[int, ...] = (10, DEFAULT_PREVIEW_EVERY, 120),
        sample_every: int = DEFAULT_PREVIEW_EVERY) -> dict:
    """The default run's wall time and one Stop latency per ``stop_at`` step (seconds)."""
    from pogdiff.ui import Studio
    from pogdiff.ui.views import DEMO_KEY

    out: dict = {"steps": steps, "sample_every": sample_every, "cpu_count": os.cpu_count(),
                 "load_before": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="pogdiff-bench-train-") as tmp:
        studio = Studio(Path(tmp) / "runs", device="cpu")
        studio.data.load_demo(progress=lambda *a, **k: None)
        t0 = time.perf_counter()
        studio.train.start_run(DEMO_KEY, _options(steps, sample_every))
        status = studio.jobs.wait(timeout=3 * 3600)
        out["default_run_s"] = time.perf_counter() - t0
        out["default_run_state"] = status.state
        out["default_run_error"] = status.error
        out["train_seconds_per_step"] = status.seconds_per_step
        stops = []
        for step in stop_at:
            studio.train.start_run(DEMO_KEY, _options(steps, sample_every))
            _wait_for_step(studio, step, timeout=1800)
            t_stop = time.perf_counter()
            studio.jobs.stop()
            status = studio.jobs.wait(timeout=600)
            stops.append({"stop_requested_after_step": step, "latency_s": time.perf_counter() - t_stop,
                          "steps_done": status.step, "state": status.state, "stopped": status.stopped})
        out["stops"] = stops
    out["load_after"] = os.getloadavg()
    return out


COMMAND = "python -m pogdiff bench train-tab"


def add_parsers(bench) -> None:
    """Register ``train-tab`` under ``python -m pogdiff bench`` (README "Options of the other commands")."""
    p = bench.add_parser("train-tab", help="the Train tab's default run and Stop, timed as a visitor uses them")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="steps of the run (the app's default)")
    p.add_argument("--stop-at", type=int, nargs="*", default=[10, DEFAULT_PREVIEW_EVERY, 120],
                   help="steps after which a stop is requested, one run each")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON file; each run is appended to its \"runs\" list (runs differ with the load)")
    p.set_defaults(fn=main)


def main(args) -> int:
    """``bench train-tab``: print the figures and append them to ``--out``."""
    if not args.verbose:  # the run's own progress lines would bury the figures
        logging.getLogger("pogdiff").setLevel(logging.WARNING)
    result = run(args.steps, tuple(args.stop_at))
    print(json.dumps(result, indent=2, default=str))
    if args.out:
        append_run(args.out, result)
    return 0


def append_run(path: Path, result: dict) -> None:
    """Add ``result`` to the ``runs`` of the JSON file at ``path`` (made when missing)."""
    kept = json.loads(path.read_text()) if path.is_file() else {}
    runs = kept.get("runs", []) if isinstance(kept, dict) else []
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"command": f"{COMMAND} --out {path}",
                                "runs": [*runs, result]}, indent=2, default=str) + "\n")
