"""The visitors of ``bench load`` (:mod:`pogdiff.bench.load`): one ``gradio_client`` session each, its
calls recorded (latency, queue wait, queue position, outcome), and the statistics of those calls.

The short load test of the suite (``tests/test_load.py``) drives an in-process app with these same
sessions.
"""

from __future__ import annotations

import io
import math
import threading
import time
import zipfile
from pathlib import Path
from typing import Any

SHIPPED_PAIR = ("shipped:demo-baseline", "shipped:demo-pogdiff")
COMPARE_REQUEST = (2, 3.0, 10)  # seeds per prompt, guidance, sampling steps: the README's API example
POLL_SECONDS = 1.0  # pogdiff.ui.shared.POLL_SECONDS: the open page's job timer


# ------------------------------------------------------------------------------------- calls
RETRIED = {"RemoteProtocolError"}  # transport errors retried once (Recorder.call); the retries are counted
def classify(exc: BaseException) -> str:
    """``refusal: <kind>`` for a documented refusal, else ``unexpected: <type>``."""
    from pogdiff.server.quotas import QUEUE_FULL_TEXT, REFUSAL_KINDS

    if QUEUE_FULL_TEXT.lower() in str(exc).lower():
        return "refusal: queue full"
    title = getattr(exc, "title", None)
    if title in REFUSAL_KINDS:
        return f"refusal: {REFUSAL_KINDS[title]}"
    return f"unexpected: {type(exc).__name__}"


class Recorder:
    """Every call of every visitor: endpoint, outcome, latency, queue wait, queue position."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def add(self, **row: Any) -> None:
        with self._lock:
            self.calls.append(row)

    def call(self, client, api_name: str, *args: Any, who: str = "", timeout: float = 1800, **kwargs: Any):
        """``client.predict`` of ``api_name``, recorded; the result, or None when it raised.

        A connection the server closed mid-response (``httpx.RemoteProtocolError``, seen once in a
        5-visitor run on a loaded machine) is retried once, as a reload would; the retry is recorded
        as a row of kind ``retried: <type>`` (counted in :func:`error_summary`, never hidden), and a
        second failure counts as unexpected."""
        from gradio_client.utils import Status

        t0 = time.time()
        job = client.submit(*args, api_name=api_name, **kwargs)
        result, kind, message = None, "ok", ""
        try:
            result = job.result(timeout=timeout)
        except Exception as exc:  # noqa: BLE001 - every error is classified and counted
            kind, message = classify(exc), str(exc)[:300]
            if type(exc).__name__ in RETRIED:
                self.add(endpoint=api_name, who=who, kind=f"retried: {type(exc).__name__}", message=message,
                         latency_s=time.time() - t0, wait_s=None, position=None, t=t0)
                t0 = time.time()
                job = client.submit(*args, api_name=api_name, **kwargs)
                kind, message = "ok", ""
                try:
                    result = job.result(timeout=timeout)
                except Exception as exc2:  # noqa: BLE001
                    kind, message = classify(exc2), str(exc2)[:300]
        latency = time.time() - t0
        started, rank = None, None
        updates = getattr(job.communicator, "updates", None)
        while updates is not None and not updates.empty():
            u = updates.get_nowait()
            code = getattr(u, "code", None)
            if code == Status.IN_QUEUE and u.rank is not None:
                rank = max(rank or 0, int(u.rank) + 1)  # gradio's rank 0: next in line
            if code == Status.PROCESSING and started is None and u.time is not None:
                started = u.time.timestamp()
        wait = None if started is None else max(0.0, min(latency, started - t0))
        self.add(endpoint=api_name, who=who, kind=kind, message=message, latency_s=latency, wait_s=wait,
                 position=rank, t=t0)
        return result


def small_zip(path: Path, seed: int) -> Path:
    """A flat tag-captioned zip of 19 random 32 px images in 5 classes, different for every ``seed``."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    shapes = {"red circle": 8, "blue square": 5, "green triangle": 3, "yellow star": 2, "purple hexagon": 1}
    with zipfile.ZipFile(path, "w") as zf:
        i = 0
        for shape, n in shapes.items():
            for j in range(n):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buf, "PNG")
                zf.writestr(f"img_{i:03d}.png", buf.getvalue())
                zf.writestr(f"img_{i:03d}.txt", f"{shape}, {('white', 'blue')[j % 2]} background, flat colors")
                i += 1
    return path


def _poll_loop(client, rec: Recorder, who: str, done: threading.Event) -> None:
    while not done.wait(POLL_SECONDS):
        rec.call(client, "/poll", who=who)


def visitor_session(url: str, rec: Recorder, who: str, *, upload: Path | None = None, metrics: bool = True,
                    compare: tuple = COMPARE_REQUEST, neighbour_map: bool = True, poll: bool = True) -> None:
    """One visitor from first call to closed tab (see the module's docstring)."""
    from gradio_client import Client, handle_file

    try:
        client = Client(url, verbose=False, analytics_enabled=False)
        # The page's job timer polls from a client of its own: one gradio_client object submitting from two
        # threads can lose a call when its stream reader closes as the other registers (CancelledError).
        poller_client = Client(url, verbose=False, analytics_enabled=False) if poll else None
    except Exception as exc:  # noqa: BLE001
        rec.add(endpoint="connect", who=who, kind=classify(exc), message=str(exc)[:300], latency_s=0.0,
                wait_s=None, position=None, t=time.time())
        return
    done = threading.Event()
    poller = threading.Thread(target=_poll_loop, args=(poller_client, rec, who, done), daemon=True)
    if poll:
        poller.start()
    try:
        if upload is not None:
            out = rec.call(client, "/load_upload", [handle_file(str(upload))], "auto", who=who)
        else:
            out = rec.call(client, "/load_demo", "auto", who=who)
        rows = (out[2] or {}).get("data") if out else None  # summary, report, class table, ... (no key: a State)
        subject = rows[-1][0] if rows else None  # the rarest class
        if subject:
            rec.call(client, "/class_gallery", subject, who=who)
        if neighbour_map:
            rec.call(client, "/neighbour_map", "shot bucket", "tiny", who=who)
        prompt = "a photo of Omar Castillo" if upload is None or not subject else f"{subject}, white background"
        rec.call(client, "/compare", *SHIPPED_PAIR, [prompt], "", *compare, who=who)
        if metrics:
            if upload is not None:
                rec.call(client, "/load_demo", "auto", who=who)  # the shipped pair is judged on the demo set
            rec.call(client, "/metrics", *SHIPPED_PAIR, False, who=who)
        rec.call(client, "/server_usage", who=who)
    finally:
        done.set()
        if poll:
            poller.join()
            poller_client.close()
        client.close()  # the tab closes: gradio's unload event ends the session on the server


# ------------------------------------------------------------------------------------- statistics
def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    import numpy as np

    return round(float(np.percentile(values, q)), 3)


def endpoint_table(calls: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per endpoint (its api name without the leading ``/``): calls, errors by kind, latency and queue wait
    p50 / p95 / max, largest queue position."""
    out: dict[str, dict[str, Any]] = {}
    for name in sorted({c["endpoint"] for c in calls}):
        rows = [c for c in calls if c["endpoint"] == name]
        lat = [c["latency_s"] for c in rows if c["kind"] == "ok"]
        wait = [c["wait_s"] for c in rows if c["kind"] == "ok" and c["wait_s"] is not None]
        service = [c["latency_s"] - c["wait_s"] for c in rows if c["kind"] == "ok" and c["wait_s"] is not None]
        errors: dict[str, int] = {}
        for c in rows:
            if c["kind"] != "ok":
                errors[c["kind"]] = errors.get(c["kind"], 0) + 1
        positions = [c["position"] for c in rows if c["position"] is not None]
        out[name.lstrip("/")] = {
            "calls": len(rows), "ok": len(lat), "errors": errors,
            "latency_s": {"p50": _pct(lat, 50), "p95": _pct(lat, 95), "max": _pct(lat, 100)},
            "queue_wait_s": {"p50": _pct(wait, 50), "p95": _pct(wait, 95), "max": _pct(wait, 100)}
            if wait else "not queued",
            "service_s_max": _pct(service, 100),
            "max_queue_position": max(positions) if positions else None,
        }
    return out


def error_summary(calls: list[dict[str, Any]]) -> dict[str, Any]:
    unexpected = [c for c in calls if c["kind"].startswith("unexpected")]
    refusals: dict[str, int] = {}
    for c in calls:
        if c["kind"].startswith("refusal"):
            refusals[c["kind"]] = refusals.get(c["kind"], 0) + 1
    retried = sum(1 for c in calls if c["kind"].startswith("retried"))
    return {"unexpected": len(unexpected), "refusals": refusals, "retried": retried,
            "unexpected_examples": [{"endpoint": c["endpoint"].lstrip("/"), "kind": c["kind"], "message": c["message"]}
                                    for c in unexpected[:10]]}


def step_time(samples: list[tuple[float, int]], t_from: float = -math.inf, t_to: float = math.inf) -> float | None:
    """Mean seconds per step between the first and last (time, step) sample inside [t_from, t_to]
    (steps 0 and 1 left out: set-up and warm-up)."""
    inside = [(t, s) for t, s in samples if t_from <= t <= t_to and s >= 2]
    if len(inside) < 2 or inside[-1][1] == inside[0][1]:
        return None
    return round((inside[-1][0] - inside[0][0]) / (inside[-1][1] - inside[0][1]), 4)
