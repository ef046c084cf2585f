"""A shared server's quotas and visitors: the checks, the session registry, and the Studio's use of them."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import pytest

import app
from pogdiff.server import quotas
from pogdiff.runs.jobs import JobManager
from pogdiff.server.quotas import QUOTA_TITLE, VISITORS_TITLE, QuotaError, Quotas
from pogdiff.ui import Studio
from pogdiff.ui.sessions import SessionRegistry, VisitorLimitError
from tests.fakes import FakeTrain, noop_progress, tiny_set, train_form


def visitor(sid: str):
    """A stand-in for gradio's request of browser session ``sid``."""
    return SimpleNamespace(session_hash=sid, username=None)


@pytest.fixture(autouse=True)
def upload_folder(tmp_path, monkeypatch):
    """gradio's upload folder, where a visitor's files arrive (the Studio reads uploads only from there)."""
    folder = tmp_path / "gradio-uploads"
    monkeypatch.setattr("gradio.utils.get_upload_folder", lambda: str(folder))
    return folder


def uploaded(folder: Path, name: str = "h1", counts=None) -> list[str]:
    """A small set as gradio keeps an upload: in a folder of its own inside the upload folder."""
    return [str(p) for p in sorted(tiny_set(folder / name, counts).iterdir())]


def studio_with(tmp_path, **changes) -> Studio:
    return Studio(tmp_path / "runs", shipped_dir=tmp_path / "shipped", device="cpu",
                  jobs=JobManager(tmp_path / "runs", train_fn=FakeTrain()), quotas=Quotas(**changes))


# ------------------------------------------------------------------------------------- pure checks
def test_folder_bytes_counts_files_skips_links_and_named_folders(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.bin").write_bytes(b"\0" * 100)
    (tmp_path / "uploads").mkdir()
    (tmp_path / "uploads" / "y.bin").write_bytes(b"\0" * 1000)
    (tmp_path / "link").symlink_to(tmp_path / "uploads" / "y.bin")
    assert quotas.folder_bytes(tmp_path) == 1100
    assert quotas.folder_bytes(tmp_path, skip=("uploads",)) == 100
    assert quotas.folder_bytes(tmp_path / "missing") == 0


def test_each_quota_refuses_in_words_and_zero_means_no_limit():
    quotas.check_session_upload(100 * quotas.MB, 100 * quotas.MB, 200)  # exactly at the limit: fine
    with pytest.raises(QuotaError, match="one visitor session may upload 200 MB"):
        quotas.check_session_upload(150 * quotas.MB, 51 * quotas.MB, 200)
    quotas.check_session_upload(10**12, 10**12, 0)
    with pytest.raises(QuotaError, match="space for uploaded sets is full.*never deleted early"):
        quotas.check_upload_store(1999 * quotas.MB, 2 * quotas.MB, 2000)
    with pytest.raises(QuotaError, match="You keep 5 runs.*limit per visitor is 5.*Delete run"):
        quotas.check_runs(5, 0, per_visitor=5, limit_mb=0)
    with pytest.raises(QuotaError, match="runs folder is full.*never deleted"):
        quotas.check_runs(0, 5000 * quotas.MB, per_visitor=5, limit_mb=5000)
    quotas.check_runs(4, 4999 * quotas.MB, per_visitor=5, limit_mb=5000)
    quotas.check_runs(99, 10**15, per_visitor=0, limit_mb=0)


def test_every_quota_is_an_app_flag_and_bad_values_are_refused(capsys):
    args = app.parse_args(["--max-visitors", "7", "--upload-store-mb", "0", "--generation-concurrency", "2"])
    assert args.quotas == dataclasses.replace(quotas.QUOTAS, max_visitors=7, upload_store_mb=0.0,
                                              generation_concurrency=2)
    assert app.parse_args([]).quotas == quotas.QUOTAS
    for bad in (["--generation-concurrency", "0"], ["--runs-per-visitor", "-1"]):
        with pytest.raises(SystemExit):
            app.parse_args(bad)
        assert "must be at least" in capsys.readouterr().err


def test_readme_lists_every_quota_flag_with_its_default():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Limits and safety"):readme.index("## Status and limitations")]
    for f in dataclasses.fields(Quotas):
        row = next((line for line in section.splitlines()
                    if line.startswith("| ") and f"`{f.metadata['flag']}`" in line), None)
        assert row is not None, f.metadata["flag"]
        assert f"{f.default:g}" in row, (f.metadata["flag"], row)


# ------------------------------------------------------------------------------------- the registry
def test_the_registry_caps_visitors_and_expires_the_idle_ones():
    now = [0.0]
    reg = SessionRegistry(2, idle_seconds=60, clock=lambda: now[0])
    reg.admit("a")
    reg.hold("a", "demo")
    now[0] = 30
    reg.admit("b")
    reg.hold("b", "upload-1", upload=("upload-1", 10), temp_files=["/tmp/x"])
    with pytest.raises(VisitorLimitError, match="serving 2 visitors"):
        reg.admit("c")
    assert reg.refused == 1 and reg.held_keys() == {"demo", "upload-1"} and reg.temp_files_held() == {"/tmp/x"}
    now[0] = 65  # a: idle 65 s, b: 35 s
    assert [s.sid for s in reg.expire()] == ["a"]
    reg.admit("c")  # the freed place
    assert reg.count() == 2 and reg.end("b").uploads == {"upload-1": 10} and reg.end("b") is None
    assert reg.ended == 2 and reg.held_keys() == set()


# ------------------------------------------------------------------------------------- the Studio
def test_a_visitor_past_the_cap_is_refused_and_a_closed_tab_frees_its_place_and_data(tmp_path, upload_folder):
    studio = studio_with(tmp_path, max_visitors=2)
    files = uploaded(upload_folder)
    key = studio.data.load_upload(files, visitor("a"), progress=noop_progress)[0]
    studio.data.load_upload(files, visitor("b"), progress=noop_progress)
    with pytest.raises(gr.Error, match="serving 2 visitors") as info:
        studio.data.load_upload(files, visitor("c"), progress=noop_progress)
    assert info.value.title == VISITORS_TITLE
    assert studio.sessions.usage()["visitors"] == 2 and key in studio.datasets.loaded
    studio.sessions.end_session(visitor("a"))
    assert key in studio.datasets.loaded  # b still works on it
    studio.sessions.end_session(visitor("b"))
    assert studio.sessions.usage()["visitors"] == 0 and not studio.datasets.loaded
    files = uploaded(upload_folder)  # gradio's copies went with the last visitor who handed them in
    studio.data.load_upload(files, visitor("c"), progress=noop_progress)  # a place is free again
    assert studio.datasets.bundle(key).key == key  # and the set reloads from the upload store


def test_python_callers_are_not_visitors(tmp_path):
    studio = studio_with(tmp_path, max_visitors=1)
    files = [str(p) for p in tiny_set(tmp_path / "set").iterdir()]
    for _ in range(3):
        studio.data.load_upload(files, progress=noop_progress)
    assert studio.sessions.registry.count() == 0


def test_idle_visitors_are_ended_on_the_next_poll(tmp_path, upload_folder):
    studio = studio_with(tmp_path, session_idle_minutes=1)
    now = [0.0]
    studio.sessions.registry._clock = lambda: now[0]
    files = uploaded(upload_folder)
    studio.data.load_upload(files, visitor("a"), progress=noop_progress)
    now[0] = 61
    studio.train.poll(-1)
    assert studio.sessions.registry.count() == 0 and not studio.datasets.loaded


def test_upload_quotas_refuse_in_words_and_remove_the_refused_copies(tmp_path, upload_folder):
    first = tiny_set(upload_folder / "h1")
    second = tiny_set(upload_folder / "h2", counts={"Cy Dee": 3, "Di Eve": 2})
    size = quotas.folder_bytes(first)
    studio = studio_with(tmp_path, upload_mb_per_session=1.5 * size / quotas.MB)
    files = [str(p) for p in sorted(first.iterdir())]
    studio.data.load_upload(files, visitor("a"), progress=noop_progress)
    studio.data.load_upload(files, visitor("a"), progress=noop_progress)  # the same set again costs nothing
    with pytest.raises(gr.Error, match="one visitor session may upload") as info:
        studio.data.load_upload([str(p) for p in sorted(second.iterdir())], visitor("a"), progress=noop_progress)
    assert info.value.title == QUOTA_TITLE
    assert not second.exists()  # the refused upload's copies are gone
    assert all(Path(f).exists() for f in files)  # the loaded one's stay while its visitor is here
    studio.sessions.end_session(visitor("a"))
    assert not any(Path(f).exists() for f in files)  # gradio's copies go when the tab closes
    assert (studio.datasets.upload_store).is_dir() and any(studio.datasets.upload_store.iterdir())  # the stored set stays

    full = studio_with(tmp_path / "other", upload_store_mb=0.5 * size / quotas.MB)
    again = tiny_set(tmp_path / "again")
    with pytest.raises(gr.Error, match="space for uploaded sets is full"):
        full.data.load_upload([str(p) for p in again.iterdir()], progress=noop_progress)


def test_runs_quotas_refuse_a_new_run_and_a_visitor_may_delete_only_their_own(tmp_path, upload_folder):
    studio = studio_with(tmp_path, runs_per_visitor=1)
    files = uploaded(upload_folder)
    a, b = visitor("a"), visitor("b")
    key = studio.data.load_upload(files, a, progress=noop_progress)[0]
    studio.train.start_run(key, train_form(), a)
    assert studio.jobs.wait(10).state == "finished"
    with pytest.raises(gr.Error, match="You keep 1 runs") as info:
        studio.train.start_run(key, train_form(), a)
    assert info.value.title == QUOTA_TITLE
    name = studio.jobs.runs.list_runs()[0].name
    with pytest.raises(gr.Error, match="another visitor"):
        studio.train_runs.delete_run(name, b)
    studio.train.start_run(key, train_form(), b)  # b's own quota is untouched
    assert studio.jobs.wait(10).state == "finished"
    studio.train_runs.delete_run(name, a)
    assert not (studio.runs_dir / name).exists() and len(studio.jobs.runs.list_runs()) == 1
    studio.train.start_run(key, train_form(), a)  # room again
    assert studio.jobs.wait(10).state == "finished"
    with pytest.raises(gr.Error, match="not a run name"):
        studio.train_runs.delete_run("../runs", a)

    tight = studio_with(tmp_path / "tight", runs_dir_mb=1e-9)
    key = tight.data.load_upload(files, progress=noop_progress)[0]
    tight.train.start_run(key, train_form())
    tight.jobs.wait(10)
    with pytest.raises(gr.Error, match="runs folder is full"):
        tight.train.start_run(key, train_form())


def test_queue_settings_of_the_page(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "spaces", None)  # not a ZeroGPU Space
    studio = studio_with(tmp_path, generation_concurrency=1)
    demo = app.build_demo(studio)
    fns = {f.api_name: f for f in demo.fns.values()}
    compare, metrics = fns["compare"], fns["metrics"]
    assert compare.concurrency_limit == metrics.concurrency_limit == 1
    assert compare.concurrency_id != metrics.concurrency_id  # a Compare never waits behind a metrics run
    for cheap in ("poll", "class_gallery", "server_usage"):
        assert fns[cheap].queue is False, cheap
    assert any(t[1] == "unload" for f in demo.fns.values() for t in f.targets)
    md, data = studio.sessions.server_usage()
    assert "visitors now" in md and data["max_visitors"] == studio.quotas.max_visitors


def test_usage_counts_disk(tmp_path, upload_folder):
    studio = studio_with(tmp_path)
    studio.data.load_upload(uploaded(upload_folder), visitor("a"), progress=noop_progress)
    u = studio.sessions.usage(visitor("a"))
    assert u["upload_store_mb"] > 0 and u["your_upload_mb"] > 0 and u["your_runs"] == 0 and u["visitors"] == 1
    assert os.path.isdir(studio.datasets.upload_store)


def test_argparse_types_follow_the_defaults():
    p = argparse.ArgumentParser()
    quotas.add_arguments(p)
    args = p.parse_args(["--max-visitors", "3", "--session-idle-minutes", "0.5"])
    assert quotas.from_args(args).max_visitors == 3 and quotas.from_args(args).session_idle_minutes == 0.5


def test_a_set_that_did_not_load_keeps_its_copies_until_its_visitor_leaves(tmp_path, upload_folder):
    import zipfile

    studio = studio_with(tmp_path)
    (upload_folder / "h3").mkdir(parents=True)
    bad = upload_folder / "h3" / "bad.zip"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("notes.md", "no images here")
    for _ in range(2):  # the same files again: the same report, not "upload missing"
        with pytest.raises(gr.Error, match="(?i)image"):
            studio.data.load_upload([str(bad)], visitor("a"), progress=noop_progress)
    assert bad.exists()
    studio.sessions.end_session(visitor("a"))
    assert not bad.exists()
