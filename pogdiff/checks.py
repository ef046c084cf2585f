"""Checks of config values that refuse a bad one naming it and what is allowed (used by the
dataclasses of :mod:`pogdiff.config` and :func:`pogdiff.config.configs_from_options`)."""

from __future__ import annotations

import math
import numbers
from typing import Any


def check_number(name: str, value: Any, *, low: float | None = None, high: float | None = None,
                 low_inclusive: bool = True, high_inclusive: bool = True) -> None:
    """Refuse a config number that is not a finite real in the allowed range, naming it."""
    allowed = " and ".join(
        part for part in (
            None if low is None else f"{'>=' if low_inclusive else '>'} {low:g}",
            None if high is None else f"{'<=' if high_inclusive else '<'} {high:g}",
        ) if part
    )
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value >= low if low_inclusive else value > low
    if ok and high is not None:
        ok = value <= high if high_inclusive else value < high
    if not ok:
        raise ValueError(f"{name} must be a finite number{' ' + allowed if allowed else ''}, got {value!r}")


def check_whole(name: str, value: Any, *, low: int | None = None, high: int | None = None) -> None:
    """Refuse a config count that is not a whole number in the allowed range, naming it."""
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if not ok or (low is not None and value < low) or (high is not None and value > high):
        allowed = " and ".join(p for p in (None if low is None else f">= {low}", None if high is None else f"<= {high}")
                               if p)
        raise ValueError(f"{name} must be {allowed + ', ' if allowed else ''}a whole number; got {value!r}")


def check_class_numbers(name: str, value: Any) -> None:
    """Refuse a per-class table that is not ``{class name: finite number > 0}``, naming the entry."""
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a table of class name -> number, got {value!r}")
    for key, number in value.items():
        if not isinstance(key, str) or not key.strip():
            raise ValueError(f"{name}: a class name must be a non-empty text, got {key!r}")
        check_number(f"{name}[{key!r}]", number, low=0.0, low_inclusive=False)


def check_choice(name: str, value: Any, choices: tuple[str, ...], *, article: str | None = None) -> None:
    """Refuse a config value that is not one of ``choices``, naming it and listing the choices."""
    if value not in choices:
        lead = f"{article} {value!r}" if article else f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}"
        raise ValueError(f"{lead}; choose one of {', '.join(choices)}" if article else lead)
