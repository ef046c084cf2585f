"""A short load run: 5 visitors at once through gradio_client (the sessions of ``bench load``) while a
short training job runs, against the app launched in-process so the Studio's own counts can be read.

No unexpected error; the job ends with an intact checkpoint; when the tabs close, every visitor's
session, data set, generated pair and temporary upload copy leaves the server; one visitor more than
the cap is refused in words (BENCHMARKS.md "Load" runs the full 20-visitor version).
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from gradio_client import Client

import app
from pogdiff.model import checkpoints
from pogdiff.bench.visitors import Recorder, error_summary, small_zip, visitor_session
from pogdiff.server.quotas import Quotas
from pogdiff.ui import Studio
from tests.fakes import HashEncoder, free_port

VISITORS = 5


@pytest.fixture
def served(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADIO_HEARTBEAT_INTERVAL", "0.5")  # a closed tab is noticed within a second
    studio = Studio(tmp_path / "runs", device="cpu", view_encoder=HashEncoder(),
                    quotas=Quotas(max_visitors=VISITORS + 1))  # the visitors and the one who trains
    demo = app.build_demo(studio)
    demo.queue(default_concurrency_limit=2, max_size=studio.quotas.queue_size)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                **app.launch_options(studio, 50))
    try:
        yield f"http://127.0.0.1:{port}/", studio
    finally:
        demo.close()


def _until(condition, timeout: float = 20.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.2)
    return condition()


def test_five_visitors_while_a_job_trains_then_everything_they_held_is_freed(served, tmp_path):
    from gradio.utils import get_upload_folder

    url, studio = served
    rec = Recorder()
    trainer = Client(url, verbose=False)
    rec.call(trainer, "/load_demo", "auto", who="trainer")
    rec.call(trainer, "/start_training", method="pogdiff", preset="tiny", pretrained="", steps=6, batch_size=4,
             lr=1e-4, psi_max=1.0, k=5, use_density=True, use_image_sim=True, use_text_sim=True, pool="other_class",
             sample_every=0, seed=0, run_name="under-load", base="shipped", who="trainer")
    peak, done = [0], threading.Event()

    def sample():
        while not done.wait(0.1):
            peak[0] = max(peak[0], studio.sessions.registry.count())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    zips = [small_zip(tmp_path / f"visitor-{i}.zip", seed=i) if i % 2 else None for i in range(VISITORS)]
    threads = [threading.Thread(target=visitor_session, args=(url, rec, f"visitor-{i}"),
                                kwargs=dict(upload=zips[i], metrics=False, compare=(1, 3.0, 5)))
               for i in range(VISITORS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    done.set()
    errors = error_summary(rec.calls)
    assert errors["unexpected"] == 0, errors["unexpected_examples"]
    calls = {c["endpoint"] for c in rec.calls if c["who"].startswith("visitor")}
    assert {"/load_demo", "/load_upload", "/class_gallery", "/neighbour_map", "/compare", "/poll"} <= calls
    assert peak[0] == VISITORS + 1

    # The tabs closed: only the trainer is held, with the one set it loaded.
    assert _until(lambda: studio.sessions.registry.count() == 1), studio.sessions.usage()
    assert set(studio.datasets.loaded) <= {"demo"} and set(studio.sessions.pairs) <= {trainer.session_hash}
    uploads = Path(get_upload_folder())
    assert not [p for p in uploads.rglob("visitor-*.zip")], "gradio's copies of the uploads are removed"

    status = studio.jobs.wait(300)
    assert status.state == "finished", status.error
    meta = json.loads((studio.runs_dir / "under-load" / "run.json").read_text())
    ckpt = studio.runs_dir / "under-load" / Path(meta["last_checkpoint"]).name
    checkpoints.verify_checkpoint(ckpt)
    assert checkpoints.read_trainer_state(ckpt)["step"] == 6
    trainer.close()
    assert _until(lambda: studio.sessions.registry.count() == 0) and not studio.datasets.loaded


def test_one_visitor_past_the_cap_is_refused_in_words(served):
    url, studio = served
    rec = Recorder()
    holding = [Client(url, verbose=False) for _ in range(studio.quotas.max_visitors)]
    for i, c in enumerate(holding):
        rec.call(c, "/load_demo", "auto", who=f"visitor-{i}")
    late = Client(url, verbose=False)
    rec.call(late, "/load_demo", "auto", who="late")
    assert rec.calls[-1]["kind"] == "refusal: too many visitors"
    assert "its limit on this server" in rec.calls[-1]["message"]
    assert error_summary(rec.calls)["unexpected"] == 0
    for c in holding:
        c.close()
    assert _until(lambda: studio.sessions.registry.count() == 0)
    rec.call(late, "/load_demo", "auto", who="late")  # a place is free again
    assert rec.calls[-1]["kind"] == "ok"
    late.close()


def test_a_connection_closed_mid_response_is_retried_once_and_counted():
    from pogdiff.bench.visitors import Recorder, error_summary

    class RemoteProtocolError(Exception):  # the name httpx gives it
        pass

    class Job:
        communicator = None

        def __init__(self, outcome):
            self.outcome = outcome

        def result(self, timeout=None):
            if isinstance(self.outcome, Exception):
                raise self.outcome
            return self.outcome

    class Client:
        def __init__(self, outcomes):
            self.outcomes = list(outcomes)

        def submit(self, *args, api_name=None):
            return Job(self.outcomes.pop(0))

    rec = Recorder()
    assert rec.call(Client([RemoteProtocolError("peer closed"), "ok"]), "/load_demo") == "ok"
    assert rec.call(Client([RemoteProtocolError("peer closed"), RemoteProtocolError("again")]), "/load_demo") is None
    summary = error_summary(rec.calls)
    assert (summary["retried"], summary["unexpected"]) == (2, 1)
    assert [c["kind"] for c in rec.calls] == ["retried: RemoteProtocolError", "ok", "retried: RemoteProtocolError",
                                              "unexpected: RemoteProtocolError"]
