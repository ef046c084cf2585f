"""How a shared server is divided among its visitors: quotas on disk, the visitor cap, the queue's
concurrency (README "Limits and safety", "A shared server").

:class:`Quotas` holds every option with a default suited to a free CPU Space (2 cores); ``app.py``
exposes each one as a command-line flag (:func:`add_arguments`, :func:`from_args`). The checks here
are plain functions of sizes and counts: they raise :class:`QuotaError`, whose message says what is
full, by how much, and what the visitor can do. The app shows it as a ``gr.Error`` titled
:data:`QUOTA_TITLE`. Nothing is ever deleted to make room: a full quota refuses the new upload or run.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

MB = 1_000_000

# The titles of the refusals a visitor may meet on a busy server, as gradio shows them (and as
# gradio_client's AppError carries them); the load benchmark counts these as expected refusals.
QUOTA_TITLE = "Quota reached"
VISITORS_TITLE = "Too many visitors"
BUSY_TITLE = "Busy"  # one training job per server
QUEUE_FULL_TEXT = "Queue is full"  # gradio's own refusal when max_size events wait already
REFUSAL_KINDS = {QUOTA_TITLE: "quota reached", VISITORS_TITLE: "too many visitors", BUSY_TITLE: "job running"}


class QuotaError(ValueError):
    """A shared-server quota is reached; the message names it, the usage, and what to do."""


def _option(default, flag: str, help: str):
    return field(default=default, metadata={"flag": flag, "help": help})


@dataclass(frozen=True)
class Quotas:
    """Limits of a server that many visitors share; each is a ``python app.py`` flag."""

    max_visitors: int = _option(
        24, "--max-visitors", "visitors whose data the server holds at once; one more is refused until a "
                              "place frees (a tab closes, or stays idle for --session-idle-minutes)")
    session_idle_minutes: float = _option(
        30.0, "--session-idle-minutes", "a visitor idle this long is ended: their loaded sets and "
                                        "generated images leave memory (an upload reloads from disk on next use)")
    generation_concurrency: int = _option(
        1, "--generation-concurrency", "Compare generations (and, separately, metric computations) that run at "
                                       "the same time; the others wait in the queue, their position shown")
    queue_size: int = _option(64, "--queue-size", "events that may wait in the queue; one more is refused by gradio")
    upload_mb_per_session: float = _option(
        200.0, "--upload-mb-per-session", "MB one visitor session may upload in all (0: no limit)")
    upload_store_mb: float = _option(
        2000.0, "--upload-store-mb", "MB of uploaded sets kept on disk for all visitors (runs/uploads; 0: no limit)")
    runs_per_visitor: int = _option(
        5, "--runs-per-visitor", "runs one visitor may keep on a multi-user server (0: no limit)")
    runs_dir_mb: float = _option(
        5000.0, "--runs-dir-mb", "MB the runs folder may hold, uploads not counted (0: no limit)")


QUOTAS = Quotas()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per :class:`Quotas` field, defaulting to the field's default."""
    for f in dataclasses.fields(Quotas):
        parser.add_argument(f.metadata["flag"], type=type(f.default), default=f.default,
                            help=f"{f.metadata['help']} (default {f.default:g})", dest=f"quota_{f.name}",
                            metavar="N")


def from_args(args: argparse.Namespace) -> Quotas:
    """The :class:`Quotas` of parsed flags; ValueError naming a negative value (or a zero concurrency)."""
    values = {f.name: getattr(args, f"quota_{f.name}") for f in dataclasses.fields(Quotas)}
    for f in dataclasses.fields(Quotas):
        low = 1 if f.name in ("generation_concurrency", "queue_size", "max_visitors") else 0
        if values[f.name] < low:
            raise ValueError(f"{f.metadata['flag']} must be at least {low}, got {values[f.name]:g}")
    return Quotas(**values)


# ------------------------------------------------------------------------------------- sizes
def folder_bytes(root: str | Path, *, skip: tuple[str, ...] = ()) -> int:
    """Bytes of the regular files under ``root`` (symlinks not followed; top-level names in ``skip``
    left out); 0 when it does not exist. A file removed while counting is skipped."""
    total = 0
    root = Path(root)
    if not root.is_dir():
        return 0
    for dirpath, dirnames, filenames in os.walk(root):
        if Path(dirpath) == root:
            dirnames[:] = [d for d in dirnames if d not in skip]
            filenames = [f for f in filenames if f not in skip]
        for name in filenames:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            if not os.path.islink(os.path.join(dirpath, name)):
                total += st.st_size
    return total


def mb(n_bytes: float) -> str:
    """``12.3 MB``."""
    return f"{n_bytes / MB:.1f} MB"


# ------------------------------------------------------------------------------------- checks
def check_session_upload(used: int, new: int, limit_mb: float) -> None:
    """Refuse an upload that takes one session past ``limit_mb`` (0: no limit)."""
    if limit_mb and used + new > limit_mb * MB:
        raise QuotaError(f"This upload ({mb(new)}) would take your session to {mb(used + new)}; one visitor session "
                         f"may upload {limit_mb:g} MB in all on this shared server. Upload a smaller set (fewer or "
                         "smaller images), or run the Studio on your own machine for larger sets.")


def check_upload_store(stored: int, new: int, limit_mb: float) -> None:
    """Refuse an upload that takes the server's upload store past ``limit_mb`` (0: no limit)."""
    if limit_mb and stored + new > limit_mb * MB:
        raise QuotaError(f"The server's space for uploaded sets is full ({mb(stored)} of {limit_mb:g} MB kept, this "
                         f"upload is {mb(new)}). Uploads are kept for a day so that a page reload finds them, and "
                         "are never deleted early to make room: try again later, or use the built-in demo set.")


def check_runs(own_runs: int, runs_bytes: int, *, per_visitor: int, limit_mb: float) -> None:
    """Refuse a new run when the visitor keeps ``per_visitor`` runs already, or when the runs folder
    holds ``limit_mb`` (0: no limit for either). Other visitors' runs are never deleted to make room."""
    if per_visitor and own_runs >= per_visitor:
        raise QuotaError(f"You keep {own_runs} runs on this server, the limit per visitor is {per_visitor}. "
                         "Download what you need (Zip weights + config), then delete one of your runs "
                         "(Train tab, Delete run) to start another.")
    if limit_mb and runs_bytes >= limit_mb * MB:
        raise QuotaError(f"The runs folder is full ({mb(runs_bytes)} of {limit_mb:g} MB). Runs of other visitors "
                         "are never deleted to make room: delete one of your own runs (Train tab, Delete run), "
                         "or try again later.")
