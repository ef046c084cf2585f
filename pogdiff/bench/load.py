"""The app under load: many visitors at once while one training job runs (BENCHMARKS.md "Load").

``python -m pogdiff bench load [--visitors 20] [--train-steps 150] [--out results/load.json]``

The app runs as its own process (``python app.py`` on a free port, a fresh runs folder and gradio
cache), so the memory figures are the server's own (psutil). Every visitor is a ``gradio_client``
session of its own, doing what a visitor does: load the demo set (even visitors) or upload a small zip
of their own (odd ones), look at a class's images, open the neighbour map, generate a Compare grid of
the shipped pair, and compute the fast metrics of the shipped pair (an uploading visitor switches to the
demo set for that), while its page polls the training job every second, as the open tab does (from a
second client, so a session of its own that holds nothing); then it closes. One more session trains a short tiny run through ``/start_training``, once with nobody else on
the server and once under the visitors, so its step time is compared in the same invocation.

Each call is timed from submit to result, with its queue wait (submit to gradio's ``process_starts``)
and the queue position gradio reported. An error is a *refusal* when it is one of the documented ones
(queue full, a quota, the visitor cap, the one-job rule: :data:`pogdiff.server.quotas.REFUSAL_KINDS`), and
*unexpected* otherwise.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from pogdiff.bench.visitors import (
    POLL_SECONDS,
    Recorder,
    endpoint_table,
    error_summary,
    small_zip,
    step_time,
    visitor_session,
)

logger = logging.getLogger(__name__)

DEFAULT_VISITORS = 20
DEFAULT_TRAIN_STEPS = 150
DEFAULT_BATCH = 8
APP = Path(__file__).resolve().parents[2] / "app.py"
STEP_RE = re.compile(r"step (\d+) / (\d+)")
ENV_SHOWN = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GRADIO_HEARTBEAT_INTERVAL")


# ------------------------------------------------------------------------------------- the server
class Server:
    """``python app.py`` on a free port, its own runs folder and gradio cache, multi-user; RSS sampled."""

    def __init__(self, root: Path, extra_args: tuple[str, ...] = ()) -> None:
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.root = root
        self.runs_dir, self.gradio_dir = root / "runs", root / "gradio"
        self.url = f"http://127.0.0.1:{self.port}/"
        # app.py turns gradio's analytics off itself (GRADIO_ANALYTICS_ENABLED), before it imports gradio
        env = {**os.environ, "GRADIO_TEMP_DIR": str(self.gradio_dir), "HF_HUB_OFFLINE": "1"}
        cmd = [sys.executable, str(APP), "--host", "127.0.0.1", "--port", str(self.port), "--runs-dir",
               str(self.runs_dir), "--no-single-user", *extra_args]
        self.log = open(root / "server.log", "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT, cwd=str(APP.parent))
        self.rss: list[tuple[float, float]] = []  # (time, MB)
        self._done = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)

    def wait_up(self, timeout: float = 300) -> None:
        import urllib.request

        end = time.time() + timeout
        while time.time() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the app exited with {self.proc.returncode}; see {self.root / 'server.log'}")
            try:
                urllib.request.urlopen(self.url + "config", timeout=5).read()
                self._sampler.start()
                return
            except OSError:
                time.sleep(1)
        raise TimeoutError(f"the app did not answer within {timeout:.0f} s")

    def _sample(self) -> None:
        import psutil

        proc = psutil.Process(self.proc.pid)
        while not self._done.wait(0.5):
            try:
                self.rss.append((time.time(), proc.memory_info().rss / 2**20))
            except psutil.Error:
                return

    def rss_now(self) -> float:
        import psutil

        return round(psutil.Process(self.proc.pid).memory_info().rss / 2**20, 1)

    def peak(self, t_from: float = -math.inf, t_to: float = math.inf) -> float | None:
        inside = [m for t, m in self.rss if t_from <= t <= t_to]
        return round(max(inside), 1) if inside else None

    def disk_mb(self) -> dict[str, float]:
        from pogdiff.server.quotas import MB, folder_bytes

        return {"uploads_store": round(folder_bytes(self.runs_dir / "uploads") / MB, 3),
                "runs_without_uploads": round(folder_bytes(self.runs_dir, skip=("uploads",)) / MB, 3),
                "gradio_cache": round(folder_bytes(self.gradio_dir) / MB, 3)}

    def stop(self) -> None:
        self._done.set()
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


# ------------------------------------------------------------------------------------- training
def start_run(client, rec: Recorder, name: str, steps: int, batch: int) -> None:
    from pogdiff.ui.train_form import TrainForm

    form = dataclasses.replace(TrainForm(), steps=steps, batch_size=batch, sample_every=0, run_name=name, base="shipped")
    values = {k: v for k, v in dataclasses.asdict(form).items()}
    if rec.call(client, "/start_training", **values, who="trainer") is None:
        raise RuntimeError(f"the training run {name} did not start: {rec.calls[-1]['message']}")


def watch_run(client, rec: Recorder, run_dir: Path, timeout: float) -> list[tuple[float, int]]:
    """Poll the job as its page does until its run.json says it ended; the (time, step) samples."""
    samples: list[tuple[float, int]] = []
    end = time.time() + timeout
    while time.time() < end:
        out = rec.call(client, "/poll", who="trainer")
        found = STEP_RE.search(out[1] if out and isinstance(out[1], str) else "")
        if found:
            samples.append((time.time(), int(found.group(1))))
        try:
            if json.loads((run_dir / "run.json").read_text()).get("state") != "running":
                return samples
        except (OSError, ValueError):
            pass
        time.sleep(POLL_SECONDS)
    raise TimeoutError(f"the training run in {run_dir.name} did not end within {timeout:.0f} s")


def run_report(run_dir: Path, steps: int) -> dict[str, Any]:
    """The run's outcome from its run.json, its last checkpoint checked against its manifest."""
    from pogdiff.model import checkpoints

    meta = json.loads((run_dir / "run.json").read_text())
    out = {"state": meta.get("state"), "steps_done": meta.get("steps_done"), "error": meta.get("error") or "",
           "seconds_per_step_run_json": meta.get("seconds_per_step")}
    ckpt = run_dir / Path(str(meta.get("last_checkpoint") or "none")).name
    try:
        checkpoints.verify_checkpoint(ckpt)
        step = int(checkpoints.read_trainer_state(ckpt)["step"])
        out["checkpoint"] = {"name": ckpt.name, "verified": True, "step": step}
    except (OSError, ValueError, KeyError) as exc:  # CheckpointError is a ValueError
        out["checkpoint"] = {"name": ckpt.name, "verified": False, "problem": str(exc)[:300]}
    out["intact"] = bool(out["state"] == "finished" and out["steps_done"] == steps and out["checkpoint"]["verified"]
                         and out["checkpoint"].get("step") == steps)
    return out


def _usage(client, rec: Recorder) -> dict[str, Any]:
    out = rec.call(client, "/server_usage", who="monitor")
    return out[1] if out else {}


def _wait_visitors(client, rec: Recorder, at_most: int, timeout: float) -> tuple[dict[str, Any], float]:
    """Poll the usage until at most ``at_most`` visitors are held (tabs closed: gradio's heartbeat
    notices within its interval); the usage then and the seconds it took."""
    t0 = time.time()
    usage = _usage(client, rec)
    while usage.get("visitors", 0) > at_most and time.time() - t0 < timeout:
        time.sleep(1)
        usage = _usage(client, rec)
    return usage, round(time.time() - t0, 1)


# ------------------------------------------------------------------------------------- the benchmark
def run(visitors: int = DEFAULT_VISITORS, train_steps: int = DEFAULT_TRAIN_STEPS, batch: int = DEFAULT_BATCH,
        ramp_s: float = 10.0, app_args: tuple[str, ...] = ()) -> dict[str, Any]:
    """The whole benchmark (module docstring); the figures as one dict."""
    import random

    from gradio_client import Client

    from pogdiff.server.quotas import QUOTAS

    root = Path(tempfile.mkdtemp(prefix="pogdiff-bench-load-"))
    server = Server(root, tuple(app_args))
    rec, result = Recorder(), {"visitors": visitors, "train_steps": train_steps, "batch_size": batch,
                                "ramp_s": ramp_s, "app_args": list(app_args), "cpu_count": os.cpu_count(),
                                "load_average_start": os.getloadavg(),  # other work on the machine
                                "env": {k: os.environ.get(k) for k in ENV_SHOWN}}  # the server inherits these
    try:
        t0 = time.time()
        server.wait_up()
        result["server_start_s"] = round(time.time() - t0, 1)
        result["rss_mb"] = {"started": server.rss_now()}
        monitor = Client(server.url, verbose=False, analytics_enabled=False)  # reads /server_usage only: never a visitor
        # Warm-up: one visitor loads the models and the caption encoder once, then leaves.
        visitor_session(server.url, rec, "warm-up", metrics=False, poll=False)
        _wait_visitors(monitor, rec, 0, 120)
        result["rss_mb"]["after_warm_up"] = server.rss_now()
        trainer = Client(server.url, verbose=False, analytics_enabled=False)
        rec.call(trainer, "/load_demo", "auto", who="trainer")
        start_run(trainer, rec, "load-idle", train_steps, batch)
        idle_samples = watch_run(trainer, rec, server.runs_dir / "load-idle", 3600)
        idle = run_report(server.runs_dir / "load-idle", train_steps)
        idle["seconds_per_step"] = step_time(idle_samples)
        before = _usage(monitor, rec)
        result["rss_mb"]["before_visitors"] = server.rss_now()
        result["disk_mb_before"] = server.disk_mb()
        # The load: the same run again, and the visitors.
        start_run(trainer, rec, "load-busy", train_steps, batch)
        samples: list[tuple[float, int]] = []
        watcher = threading.Thread(target=lambda: samples.extend(
            watch_run(trainer, rec, server.runs_dir / "load-busy", 3600)), daemon=True)
        watcher.start()
        zips = root / "zips"
        zips.mkdir()
        rng = random.Random(0)
        threads = []
        t_load = time.time()
        for i in range(visitors):
            upload = small_zip(zips / f"visitor-{i:02d}.zip", seed=i) if i % 2 else None

            def go(i=i, upload=upload, delay=rng.uniform(0, ramp_s)):
                time.sleep(delay)
                visitor_session(server.url, rec, f"visitor-{i:02d}", upload=upload)

            threads.append(threading.Thread(target=go, daemon=True))
            threads[-1].start()
        peak_usage: dict[str, int] = {"visitors": 0, "datasets_in_memory": 0}
        disk_peak = server.disk_mb()
        while any(t.is_alive() for t in threads):
            time.sleep(3)
            u = _usage(monitor, rec)
            for k in peak_usage:
                peak_usage[k] = max(peak_usage[k], int(u.get(k) or 0))
            disk_peak = {k: max(v, server.disk_mb()[k]) for k, v in disk_peak.items()}
        t_end = time.time()
        result["load_phase_s"] = round(t_end - t_load, 1)
        result["load_average_end_of_visitors"] = os.getloadavg()
        after, waited = _wait_visitors(monitor, rec, 1, 120)  # the trainer's session stays
        rss = result["rss_mb"]
        rss.update(peak_during_visitors=server.peak(t_load, t_end), after_sessions_ended=server.rss_now())
        # per visitor: what the peak added while all were on, and what stayed once they had gone
        rss["growth_per_session_at_peak"] = round((rss["peak_during_visitors"] - rss["before_visitors"]) / visitors, 1)
        rss["kept_per_session_after_end"] = round((rss["after_sessions_ended"] - rss["before_visitors"]) / visitors, 1)
        result["sessions"] = {
            "before": {k: before.get(k) for k in ("visitors", "datasets_in_memory", "generated_pairs_in_memory")},
            "peak": peak_usage,
            "after_ended": {k: after.get(k) for k in ("visitors", "datasets_in_memory", "generated_pairs_in_memory",
                                                       "sessions_ended", "visitors_refused")},
            "seconds_until_released": waited}
        result["disk_mb_peak"], result["disk_mb_after_sessions"] = disk_peak, server.disk_mb()
        watcher.join(3600)
        busy = run_report(server.runs_dir / "load-busy", train_steps)
        busy["seconds_per_step_whole_run"] = step_time(samples)
        t_job_end = samples[-1][0] if samples else t_end
        busy["seconds_per_step_while_visitors"] = step_time(samples, t_load, min(t_end, t_job_end))
        busy["job_outlasted_visitors"] = t_job_end >= t_end
        result["training"] = {"idle": idle, "under_load": busy}
        if idle["seconds_per_step"] and busy["seconds_per_step_while_visitors"]:
            result["training"]["slowdown_while_visitors"] = round(
                busy["seconds_per_step_while_visitors"] / idle["seconds_per_step"], 2)
        trainer.close()
        final, _ = _wait_visitors(monitor, rec, 0, 120)
        result["rss_mb"]["end"] = server.rss_now()
        result["sessions"]["end"] = {k: final.get(k) for k in ("visitors", "datasets_in_memory")}
        monitor.close()
    except BaseException:
        logger.error("bench load failed; the server's log is in %s", root / "server.log")
        raise
    finally:
        server.stop()
    shutil.rmtree(root, ignore_errors=True)
    calls = [c for c in rec.calls if c["who"].startswith("visitor")]
    result["endpoints"] = endpoint_table(calls)
    result["errors"] = error_summary(calls)
    result["errors_trainer_and_monitor"] = error_summary([c for c in rec.calls if not c["who"].startswith("visitor")])
    result["quotas"] = dataclasses.asdict(QUOTAS)
    result["targets"] = targets(result, visitors)
    return result


def targets(r: dict[str, Any], visitors: int) -> dict[str, Any]:
    """The issue's targets, each with its measured value and whether it is met."""
    from pogdiff.server.quotas import QUOTAS

    conc = QUOTAS.generation_concurrency
    for i, a in enumerate(r["app_args"]):
        if a == "--generation-concurrency":
            conc = int(r["app_args"][i + 1])
    rss = r["rss_mb"]
    compare = r["endpoints"].get("compare", {})
    wait = compare.get("queue_wait_s") if isinstance(compare.get("queue_wait_s"), dict) else {}
    service = compare.get("service_s_max") or 0.0
    bound = math.ceil(max(visitors - 1, 0) / conc) * service  # a compare waits for at most the others' compares
    ended = r["sessions"]["after_ended"]
    return {
        "unexpected_errors": {"value": r["errors"]["unexpected"] + r["errors_trainer_and_monitor"]["unexpected"],
                              "target": 0},
        "training_finished_checkpoint_intact": {"value": r["training"]["under_load"]["intact"]},
        "memory_released": {"visitors_held_after": ended.get("visitors"),
                            "datasets_in_memory_after": ended.get("datasets_in_memory"),
                            "rss_after_vs_before": round(rss["after_sessions_ended"] / rss["before_visitors"], 3),
                            "target": "1 visitor (the trainer) and at most 1 data set held; RSS within 15% of before"},
        "compare_p95_wait": {"value_s": wait.get("p95"), "bound_s": round(bound, 2),
                             "bound": f"ceil((visitors - 1) / {conc}) x the longest Compare service time"},
    } | {"met": {
        "unexpected_errors": r["errors"]["unexpected"] + r["errors_trainer_and_monitor"]["unexpected"] == 0,
        "training": r["training"]["under_load"]["intact"],
        "memory": ended.get("visitors") == 1 and (ended.get("datasets_in_memory") or 0) <= 1
        and rss["after_sessions_ended"] <= 1.15 * rss["before_visitors"],
        "compare_wait": wait.get("p95") is not None and wait["p95"] <= bound,
    }}


COMMAND = "python -m pogdiff bench load"


def add_parsers(bench) -> None:
    """Register ``load`` under ``python -m pogdiff bench`` (README "Options of the other commands")."""
    p = bench.add_parser("load", help="many visitors at once through gradio_client while a training job runs")
    p.add_argument("--visitors", type=int, default=DEFAULT_VISITORS, help="concurrent visitor sessions")
    p.add_argument("--train-steps", type=int, default=DEFAULT_TRAIN_STEPS, help="steps of the training run")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH, help="batch size of the training run")
    p.add_argument("--ramp", type=float, default=10.0, help="visitors arrive at random within this many seconds")
    p.add_argument("--app-args", default="", help="extra options of python app.py, e.g. \"--max-visitors 10\"")
    p.add_argument("--out", type=Path, default=Path("results/load.json"), help="JSON output")
    p.set_defaults(fn=main)


def main(args) -> int:
    """``bench load``: run, print the targets, write ``--out``."""
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request of every visitor otherwise
    result = run(args.visitors, args.train_steps, args.batch_size, args.ramp, tuple(args.app_args.split()))
    result["command"] = (f"{COMMAND} --visitors {args.visitors} --train-steps {args.train_steps} "
                         f"--batch-size {args.batch_size} --out {args.out}")
    from pogdiff.bench.output import machine

    result["machine"] = machine()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, sort_keys=True, default=str) + "\n")
    print(json.dumps(result["targets"], indent=2, default=str))
    return 0 if all(result["targets"]["met"].values()) else 1
