"""Server-side checks of request values: paths kept inside a folder, run names, bounded numbers.

Every public endpoint of the app is callable directly (``gradio_client``, plain HTTP), so the
sliders and dropdowns of the page are no defence: the callbacks of :class:`pogdiff.ui.Studio`
pass every request value through these functions. They raise :class:`ValueError` (the UI turns
it into a ``gr.Error``) with a message that names the value, the bound and how to fix it.
README "Limits and safety" lists every bound.
"""

from __future__ import annotations

import argparse

import hashlib
import logging
import math
import re
import shutil
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

RUN_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class UnsafePathError(ValueError):
    """A path from a request or from a file inside a run points outside the folder it must stay in."""


# ------------------------------------------------------------------------------------- paths
def resolve_inside(root: str | Path, path: str | Path) -> Path:
    """``path`` resolved (symlinks followed; relative paths taken from ``root``), if inside ``root``.

    Raises:
        UnsafePathError: the resolved path is outside the resolved ``root``.
    """
    root_r = Path(root).resolve()
    p = Path(path)
    full = (p if p.is_absolute() else root_r / p).resolve()
    if not full.is_relative_to(root_r):
        raise UnsafePathError(f"{str(path)!r} resolves outside {root_r.name!r}; only files inside it are used.")
    return full


def is_inside(root: str | Path, path: str | Path) -> bool:
    """True when :func:`resolve_inside` accepts ``path``."""
    try:
        resolve_inside(root, path)
    except (UnsafePathError, OSError, RuntimeError):  # RuntimeError: a symlink loop
        return False
    return True


def check_run_name(name: Any) -> str:
    """A run folder name: letters, digits, ``.``, ``_``, ``-``; no separators, no ``..``."""
    if not isinstance(name, str) or not RUN_NAME_RE.fullmatch(name) or ".." in name:
        shown = name if isinstance(name, str) and len(name) < 80 else type(name).__name__
        raise ValueError(f"{shown!r} is not a run name: pick a run from the list (names use letters, digits, "
                         "'.', '_' and '-' only, no folders).")
    return name


def owner_digest(owner: str | None) -> str:
    """A short, one-way id of a job's owner (stored in run.json instead of the session id)."""
    return hashlib.sha256(owner.encode()).hexdigest()[:16] if owner else ""


def remove_old_dirs(root: str | Path, prefix: str, older_than_s: float, *, now: float | None = None) -> int:
    """Delete the folders ``root/<prefix>*`` last modified more than ``older_than_s`` ago; return how many."""
    root = Path(root)
    if not root.is_dir():
        return 0
    now = time.time() if now is None else now
    removed = 0
    for path in root.glob(f"{prefix}*"):
        try:
            if path.is_symlink() or not path.is_dir() or now - path.stat().st_mtime < older_than_s:
                continue
            shutil.rmtree(path)
            removed += 1
        except OSError:
            logger.warning("could not remove %s", path, exc_info=True)
    if removed:
        logger.info("removed %d leftover folder(s) %s* from %s", removed, prefix, root)
    return removed


# ------------------------------------------------------------------------------------- values
def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or value is None:
        raise ValueError(f"{name} must be a number, got {value!r}.")
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise ValueError(f"{name} must be a number, got {value[:40]!r}.") from None
    if not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {type(value).__name__}.")
    if not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite number, got {value!r}.")
    return float(value) if isinstance(value, float) else value


def whole_number(name: str, value: Any, lo: int, hi: int) -> int:
    """An integer in ``[lo, hi]`` (``3.0`` is accepted, ``2.5``, NaN, ``True`` and text are not)."""
    v = _number(name, value)
    if float(v) != int(v) or not lo <= int(v) <= hi:
        raise ValueError(f"{name} must be a whole number from {lo} to {hi}, got {value!r}.")
    return int(v)


def real_number(name: str, value: Any, lo: float, hi: float, lo_open: bool = False) -> float:
    """A finite float in ``[lo, hi]`` (``(lo, hi]`` with ``lo_open``)."""
    v = float(_number(name, value))
    if v > hi or v < lo or (lo_open and v == lo):
        bound = f"{'above' if lo_open else 'from'} {lo:g} {'up to' if lo_open else 'to'} {hi:g}"
        raise ValueError(f"{name} must be {bound}, got {value!r}.")
    return v


def flag(name: str, value: Any) -> bool:
    """A checkbox value: a bool (or None, read as False)."""
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}.")
    return value


def choice(name: str, value: Any, choices: Iterable[str]) -> str:
    """One of ``choices``."""
    choices = tuple(choices)
    if not isinstance(value, str) or value not in choices:
        shown = value[:40] if isinstance(value, str) else value
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {shown!r}.")
    return value


def text(name: str, value: Any, max_chars: int) -> str:
    """A string (None reads as empty) of at most ``max_chars`` characters."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"{name} must be text, got {type(value).__name__}.")
    if len(value) > max_chars:
        raise ValueError(f"{name} is {len(value)} characters long; the limit is {max_chars}.")
    return value


def text_list(name: str, values: Any, max_items: int, max_chars: int) -> list[str]:
    """A list of strings (None reads as empty), at most ``max_items`` of ``max_chars`` each."""
    if values is None:
        return []
    if isinstance(values, str):
        values = [values]
    if not isinstance(values, Sequence):
        raise ValueError(f"{name} must be a list of text, got {type(values).__name__}.")
    if len(values) > max_items:
        raise ValueError(f"{name}: {len(values)} given, at most {max_items} are accepted.")
    return [text(f"{name} item", v, max_chars) for v in values]


def bounded(kind: type, lo: float, hi: float):
    """An argparse ``type`` that refuses values outside ``[lo, hi]`` (README "Limits and safety")."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            what = "a whole number" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not lo <= value <= hi:  # NaN fails this too
            raise argparse.ArgumentTypeError(f"{text} is out of range: allowed {lo:g} to {hi:g} "
                                             "(config.Limits)")
        return value

    parse.__name__ = kind.__name__
    return parse
