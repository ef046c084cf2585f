"""Visitors of a shared server (:class:`Sessions`): who holds what in memory, the visitor cap, idle and
closed sessions freed, upload and run quotas, who may control a run, and the page's usage panel.

A *visitor* is a browser session (``gr.Request.session_hash``) from its first load or generation until
its tab closes (gradio's ``unload`` event, :meth:`Sessions.end_session`) or it stays idle for
``Quotas.session_idle_minutes``. Ending a visitor frees what it held: the data sets no other visitor
holds, its last generated pair, and the temporary copies gradio made of its uploads (an uploaded set
stays in the upload store, so a page reload still finds it). Calls from Python (no request) are not
visitors and are never refused by these limits, except the shared disk quotas. README "Limits and safety".
"""

from __future__ import annotations

import ctypes
import gc
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr

from pogdiff.server import quotas
from pogdiff.server import safety
from pogdiff.runs.store import RunStore
from pogdiff.server.quotas import QUOTA_TITLE, VISITORS_TITLE, QuotaError, Quotas
from pogdiff.ui.datasets import Datasets
from pogdiff.ui.shared import Shared
from pogdiff.ui.views import MAX_CACHED_DATASETS, UPLOAD_STORE, request_owner


logger = logging.getLogger(__name__)


class VisitorLimitError(RuntimeError):
    """Every visitor place is taken by an active session."""


@dataclass
class Session:
    """What one visitor holds on the server."""

    sid: str
    last_seen: float
    keys: set[str] = field(default_factory=set)  # data set keys this visitor works on
    uploads: dict[str, int] = field(default_factory=dict)  # upload key -> bytes handed in
    temp_files: set[str] = field(default_factory=set)  # gradio's cached copies of its uploads


class SessionRegistry:
    """The visitors a server holds, at most ``max_sessions``; thread-safe.

    ``idle_seconds``: a visitor not seen for this long is handed back by :meth:`expire`.
    """

    def __init__(self, max_sessions: int, idle_seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_sessions = max_sessions
        self.idle_seconds = idle_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._sessions: dict[str, Session] = {}
        self.ended = 0  # sessions ended so far (closed or idle)
        self.refused = 0  # admissions refused by the cap

    def admit(self, sid: str) -> Session:
        """The visitor ``sid`` (seen now); a new one only while a place is free.

        Raises:
            VisitorLimitError: ``max_sessions`` other visitors are active.
        """
        with self._lock:
            found = self._sessions.get(sid)
            if found is None:
                if len(self._sessions) >= self.max_sessions:
                    self.refused += 1
                    raise VisitorLimitError(
                        f"The Studio is serving {len(self._sessions)} visitors, its limit on this server. "
                        f"A place frees when a visitor closes their tab or after "
                        f"{self.idle_seconds / 60:g} idle minutes: try again in a few minutes.")
                found = self._sessions[sid] = Session(sid, self._clock())
            found.last_seen = self._clock()
            return found

    def get(self, sid: str | None) -> Session | None:
        with self._lock:
            return self._sessions.get(sid) if sid else None

    def hold(self, sid: str, key: str | None, *, upload: tuple[str, int] | None = None,
             temp_files: Iterable[str] = ()) -> None:
        """Record that ``sid`` works on data set ``key`` (None: none), handed in ``upload`` = (upload key,
        bytes) and ``temp_files`` (gradio's copies of its files)."""
        with self._lock:
            s = self._sessions.get(sid)
            if s is None:
                return
            if key is not None:
                s.keys.add(key)
            if upload is not None:
                s.uploads[upload[0]] = upload[1]
            s.temp_files.update(temp_files)
            s.last_seen = self._clock()

    def end(self, sid: str | None) -> Session | None:
        """Forget ``sid``; its record, or None when it held nothing."""
        with self._lock:
            s = self._sessions.pop(sid, None) if sid else None
            self.ended += s is not None
            return s

    def expire(self) -> list[Session]:
        """Forget and return the visitors idle for ``idle_seconds`` or more."""
        now = self._clock()
        with self._lock:
            gone = [s for s in self._sessions.values() if now - s.last_seen >= self.idle_seconds]
            for s in gone:
                del self._sessions[s.sid]
            self.ended += len(gone)
            return gone

    def held_keys(self) -> set[str]:
        with self._lock:
            return {k for s in self._sessions.values() for k in s.keys}

    def temp_files_held(self) -> set[str]:
        with self._lock:
            return {f for s in self._sessions.values() for f in s.temp_files}

    def count(self) -> int:
        with self._lock:
            return len(self._sessions)


def session_id(request: gr.Request | None) -> str | None:
    """The browser session of a request; None for a call from Python (no request)."""
    if request is None:
        return None
    return getattr(request, "session_hash", None) or None


def pair_key(request: gr.Request | None) -> str:
    """Where a visitor's last generated pair is kept: its session, or ``local`` for Python calls."""
    return getattr(request, "session_hash", None) or "local"


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the system (glibc), so the server's RSS
    follows what it holds."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


class Sessions:
    """The visitor cap, what each visitor holds, quotas, who may control a run, and the usage panel.

    Args:
        registry: the visitors now (:class:`SessionRegistry`).
        datasets: the page's data sets; a set no remaining visitor holds leaves memory.
        runs: the runs folder's records (whose runs a visitor keeps).
        runs_dir: the runs folder (its size, under ``Quotas.runs_dir_mb``).
        quotas: how the server is shared (:mod:`pogdiff.server.quotas`).
        single_user: every visitor may stop and export every job (one person on localhost). Off: a job
            belongs to the session (or logged-in user) that started it; others watch.
    """

    def __init__(self, registry: SessionRegistry, datasets: Datasets, runs: RunStore, runs_dir: str | Path,
                 quotas: Quotas, *, single_user: bool = False) -> None:
        self.registry = registry
        self.datasets = datasets
        self.runs = runs
        self.runs_dir = Path(runs_dir)
        self.quotas = quotas
        self.single_user = single_user
        self._lock = threading.Lock()
        self.pairs: OrderedDict[str, dict] = OrderedDict()  # the last generated pair of each visitor

    def may_control(self, owner: str, request: gr.Request | None) -> bool:
        """May this request stop, resume, export or delete a job or run whose ``owner`` digest is given?"""
        return self.single_user or not owner or safety.owner_digest(request_owner(request)) == owner

    # ------------------------------------------------------------------ what each visitor holds
    def keep_pair(self, request: gr.Request | None, pair: dict) -> None:
        """Keep the images the Compare tab generated last for this visitor (Python calls share one place)."""
        with self._lock:
            self.pairs[pair_key(request)] = pair
            while len(self.pairs) > MAX_CACHED_DATASETS * 4:
                self.pairs.popitem(last=False)

    def last_pair(self, request: gr.Request | None) -> dict | None:
        with self._lock:
            return self.pairs.get(pair_key(request))

    def admit(self, request: gr.Request | None) -> Session | None:
        """The visitor making ``request`` (None for Python calls); gr.Error when every place is taken."""
        sid = session_id(request)
        if sid is None:
            return None
        self.sweep_idle()
        try:
            return self.registry.admit(sid)
        except VisitorLimitError as exc:
            raise gr.Error(str(exc), title=VISITORS_TITLE, print_exception=False) from exc

    def hold(self, request: gr.Request | None, key: str | None, **kwargs: Any) -> None:
        sid = session_id(request)
        if sid is not None:
            self.registry.hold(sid, key, **kwargs)

    def end_session(self, request: gr.Request = None) -> None:
        """A tab closed (gradio's ``unload``): free what its visitor held."""
        self.release([s for s in [self.registry.end(session_id(request))] if s is not None])

    def sweep_idle(self) -> int:
        """End the visitors idle for ``Quotas.session_idle_minutes``; how many."""
        gone = self.registry.expire()
        self.release(gone)
        return len(gone)

    def release(self, gone: Sequence[Session]) -> None:
        if not gone:
            return
        held = self.registry.held_keys()
        with self._lock:
            for s in gone:
                self.pairs.pop(s.sid, None)
        dropped = self.datasets.drop_unheld(held)
        self.remove_temp_uploads({f for s in gone for f in s.temp_files})
        logger.info("%d visitor session(s) ended; %d data set(s) left memory; %d visitor(s) remain",
                    len(gone), dropped, self.registry.count())
        release_memory()

    def remove_temp_uploads(self, paths: Iterable[str]) -> None:
        """Delete gradio's cached copies of uploads that no remaining visitor handed in (gradio keeps
        one folder per content hash, shared by visitors who upload the same file)."""
        from gradio.utils import get_upload_folder

        root, kept = Path(get_upload_folder()), self.registry.temp_files_held()
        for p in set(paths) - kept:
            if not safety.is_inside(root, p):
                continue
            path = Path(p).resolve()
            try:
                path.unlink(missing_ok=True)
                if path.parent != root.resolve() and not any(path.parent.iterdir()):
                    path.parent.rmdir()
            except OSError:
                logger.debug("could not remove the upload copy %s", path, exc_info=True)

    # ------------------------------------------------------------------ quotas
    def check_upload(self, request: gr.Request | None, base: str, paths: Sequence[Path]) -> int:
        """Bytes of an upload that fits the session's and the server's quotas; gr.Error (its temporary
        copies removed) when it does not."""
        new = sum(p.stat().st_size for p in paths)
        s = self.registry.get(session_id(request))
        try:
            if s is not None and base not in s.uploads:
                quotas.check_session_upload(sum(s.uploads.values()), new, self.quotas.upload_mb_per_session)
            if not (self.datasets.upload_store / base).is_dir():
                if self.quotas.upload_store_mb:
                    self.datasets.clean_leftovers()
                quotas.check_upload_store(quotas.folder_bytes(self.datasets.upload_store), new, self.quotas.upload_store_mb)
        except QuotaError as exc:
            if request is not None:
                self.remove_temp_uploads(str(p) for p in paths)
            raise gr.Error(str(exc), title=QUOTA_TITLE, print_exception=False) from exc
        return new

    def own_runs(self, request: gr.Request | None) -> list:
        owner = safety.owner_digest(request_owner(request))
        return [r for r in self.runs.list_runs() if r.owner == owner]

    def check_runs(self, request: gr.Request | None) -> None:
        """Before a new run: the visitor's count of kept runs and the runs folder's size."""
        own = 0 if self.single_user or request is None else len(self.own_runs(request))
        try:
            quotas.check_runs(own, self.runs_bytes(), per_visitor=self.quotas.runs_per_visitor,
                              limit_mb=self.quotas.runs_dir_mb)
        except QuotaError as exc:
            raise gr.Error(str(exc), title=QUOTA_TITLE, print_exception=False) from exc

    def runs_bytes(self) -> int:
        """Bytes in the runs folder, the upload store not counted (it has its own quota)."""
        return quotas.folder_bytes(self.runs_dir, skip=(UPLOAD_STORE,))

    # ------------------------------------------------------------------ the usage panel
    def usage(self, request: gr.Request | None = None) -> dict[str, Any]:
        """What this server holds now against its limits (the page's usage panel and ``/server_usage``)."""
        self.sweep_idle()
        q = self.quotas
        s = self.registry.get(session_id(request))
        datasets = self.datasets.count()
        with self._lock:
            stash = len(self.pairs)
        return {
            "visitors": self.registry.count(), "max_visitors": q.max_visitors,
            "sessions_ended": self.registry.ended, "visitors_refused": self.registry.refused,
            "datasets_in_memory": datasets, "generated_pairs_in_memory": stash,
            "your_upload_mb": round(sum(s.uploads.values()) / quotas.MB, 2) if s else 0.0,
            "upload_mb_per_session": q.upload_mb_per_session,
            "upload_store_mb": round(quotas.folder_bytes(self.datasets.upload_store) / quotas.MB, 2),
            "upload_store_limit_mb": q.upload_store_mb,
            "your_runs": len(self.own_runs(request)) if request is not None and not self.single_user else None,
            "runs_per_visitor": q.runs_per_visitor,
            "runs_dir_mb": round(self.runs_bytes() / quotas.MB, 2), "runs_dir_limit_mb": q.runs_dir_mb,
            "generation_concurrency": q.generation_concurrency, "queue_size": q.queue_size,
        }

    def server_usage(self, request: gr.Request = None) -> tuple[str, dict[str, Any]]:
        """The usage panel in words, and the same figures as data."""
        u = self.usage(request)

        def limit(value: float, unit: str = "") -> str:
            return f"{value:g}{unit}" if value else "no limit"

        runs = "—" if u["your_runs"] is None else f"{u['your_runs']} of {limit(u['runs_per_visitor'])}"
        rows = [
            ("visitors now", f"{u['visitors']} of {u['max_visitors']}",
             "one more is refused until a tab closes or idles"),
            ("your uploads", f"{u['your_upload_mb']:g} MB of {limit(u['upload_mb_per_session'], ' MB')}",
             "an upload past it is refused"),
            ("uploaded sets kept (all visitors)",
             f"{u['upload_store_mb']:g} MB of {limit(u['upload_store_limit_mb'], ' MB')}", "new uploads refused when full"),
            ("your runs", runs, "a new run is refused at the limit: delete one of yours"),
            ("runs folder", f"{u['runs_dir_mb']:g} MB of {limit(u['runs_dir_limit_mb'], ' MB')}",
             "new runs refused when full; nobody's runs are deleted"),
            ("Compare / metrics", f"{u['generation_concurrency']} at a time each",
             "the others wait in the queue, their position shown"),
        ]
        table = "\n".join(f"| {a} | {b} | {c} |" for a, b, c in rows)
        return ("| limit | now | when reached |\n|---|---|---|\n" + table), u


SERVER_HELP = ("This Studio is shared: these limits keep it usable for everyone (README \"Limits and safety\"). "
               "A refusal says which limit was reached.")


def build(sessions: Sessions, shared: Shared) -> None:
    """The page's **Server limits and usage** panel (below the tabs) and the end-of-session hook."""
    with gr.Accordion("Server limits and usage", open=False):
        gr.Markdown(SERVER_HELP, elem_classes="explain")
        usage_md = gr.Markdown("")
        usage_json = gr.JSON(visible=False)
        refresh = gr.Button("Refresh", size="sm")
    cheap = dict(queue=False, concurrency_limit=None)  # a read of counters: never behind a generation
    refresh.click(sessions.server_usage, None, [usage_md, usage_json], api_name="server_usage", **cheap)
    shared.page.load(sessions.server_usage, None, [usage_md, usage_json], api_visibility="private", **cheap)
    shared.page.unload(sessions.end_session)
