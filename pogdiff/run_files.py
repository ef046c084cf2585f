"""Files of a run folder the app reads and writes beside the checkpoints: ``run.json``, the
saved previews (``previews/``), recorded step times (README "What you see").
"""

from __future__ import annotations

import json
import logging
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pogdiff.safety import UnsafePathError, resolve_inside

logger = logging.getLogger(__name__)

RUN_FILE = "run.json"
TRACEBACK_LINES = 12  # lines of the traceback kept for the UI


@dataclass
class StepTime:
    """A measured training step time: from a trial (``source="trial"``) or a recorded run."""

    seconds_per_step: float
    steps: int  # steps the figure averages over
    source: str  # "trial" or "run <name>"
    measured_at: float | None = None
    setup_seconds: float | None = None  # trial only: start until the end of the first step


@dataclass
class Preview:
    """One saved preview: the images sampled at ``step`` for ``captions``."""

    step: int
    images: np.ndarray  # uint8 [N, H, W, 3]
    captions: list[str]


PREVIEWS_DIR = "previews"


def save_preview(run_dir: str | Path, step: int, images: np.ndarray, captions: Sequence[str]) -> Path:
    """Write ``previews/step_NNNNNN.png`` (the images side by side) and ``step_NNNNNN.json``
    (step, captions, image count) in ``run_dir``; return the PNG path."""
    from PIL import Image

    images = np.asarray(images, dtype=np.uint8)
    if images.ndim != 4 or images.shape[-1] != 3 or len(images) != len(captions):
        raise ValueError(f"a preview needs N images [N, H, W, 3] and N captions, got {images.shape} "
                         f"and {len(captions)} captions")
    folder = Path(run_dir) / PREVIEWS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"step_{int(step):06d}"
    png = folder / f"{stem}.png"
    Image.fromarray(np.concatenate(list(images), axis=1)).save(png)
    _write_json(folder / f"{stem}.json", {"step": int(step), "captions": [str(c) for c in captions],
                                          "n": int(len(images))})
    return png


def read_previews(run_dir: str | Path) -> list[Preview]:
    """The previews :func:`save_preview` wrote in ``run_dir``, by step; unreadable ones are skipped."""
    from PIL import Image

    folder = Path(run_dir) / PREVIEWS_DIR
    if not folder.is_dir():
        return []
    found = []
    for meta_path in sorted(folder.glob("step_*.json")):
        try:
            meta = json.loads(resolve_inside(folder, meta_path).read_text())
            png = resolve_inside(folder, meta_path.with_suffix(".png"))
            with Image.open(png) as im:
                strip = np.asarray(im.convert("RGB"))
            n = int(meta["n"])
            if n < 1 or strip.shape[1] % n:
                raise ValueError(f"{png.name} is {strip.shape[1]} px wide, not {n} equal images")
            images = np.stack(np.split(strip, n, axis=1))
            found.append(Preview(int(meta["step"]), images, [str(c) for c in meta["captions"]][:n]))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            logger.warning("skipping preview %s: %s", meta_path.name, exc)
    return sorted(found, key=lambda p: p.step)


def _find_checkpoint(run_dir: Path, recorded: str) -> Path | None:
    """The run's checkpoint folder, resolved inside ``run_dir`` (``run_dir`` itself resolved).

    Only the last component of the recorded ``last_checkpoint`` is used, looked up in ``run_dir``:
    a ``run.json`` cannot point anywhere else.
    """
    if recorded:
        candidate = run_dir / Path(recorded).name
        if Path(recorded).name not in ("", ".", "..") and candidate.is_dir():
            try:
                return resolve_inside(run_dir, candidate)
            except UnsafePathError:
                logger.warning("checkpoint %s links outside %s; ignored", candidate.name, run_dir.name)
    try:
        from pogdiff.checkpoints import latest_checkpoint

        found = latest_checkpoint(run_dir)
        if found and _inside(run_dir, found):
            return Path(found).resolve()
    except Exception:  # noqa: BLE001 - fall back to a plain folder search below
        logger.debug("latest_checkpoint unavailable for %s", run_dir, exc_info=True)
    candidates = sorted(
        (p.parent.resolve() for p in run_dir.rglob("configs.json") if _inside(run_dir, p)),
        key=lambda p: p.stat().st_mtime,
    )
    return candidates[-1] if candidates else None


def _inside(root: Path, path: str | Path) -> bool:
    try:
        resolve_inside(root, path)
    except (UnsafePathError, OSError, RuntimeError):
        return False
    return True


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _describe_dataset(dataset: Any) -> dict[str, Any]:
    desc: dict[str, Any] = {}
    root = getattr(dataset, "root", None)
    if root is not None:
        desc["root"] = str(root)
    samples = getattr(dataset, "samples", None)
    if samples is not None:
        desc["num_samples"] = len(samples)
    subjects = getattr(dataset, "subjects", None)
    if subjects is not None:
        try:
            desc["num_classes"] = len(set(subjects))
        except TypeError:
            pass
    return desc


def _traceback_summary(error: BaseException) -> str:
    lines = traceback.format_exception(type(error), error, error.__traceback__)
    text = "".join(lines).rstrip().splitlines()
    return "\n".join(text[-TRACEBACK_LINES:])


def _maybe_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    tmp.replace(path)
