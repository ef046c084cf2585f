"""Files the app hands to a browser (an exported run, the per-class metrics as CSV): each is written to
a fresh temp folder of its own, so no folder of the server is ever served, and old ones are swept
(README "Limits and safety")."""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

from pogdiff.server import safety

EXPORT_TMP_PREFIX = "pogdiff-export-"  # one folder per file handed to a client


def download_path(name: str) -> Path:
    """``name`` inside a fresh temp folder of its own (the folder exists; the file is the caller's to write)."""
    return Path(tempfile.mkdtemp(prefix=EXPORT_TMP_PREFIX)) / name


def clean_temp_folders(older_than_s: float, *, prefixes: Sequence[str] = (EXPORT_TMP_PREFIX,),
                       root: str | Path | None = None) -> int:
    """Remove the app's leftover temp folders (files handed out) older than ``older_than_s``; how many went."""
    root = Path(root or tempfile.gettempdir())
    return sum(safety.remove_old_dirs(root, prefix, older_than_s) for prefix in prefixes)
