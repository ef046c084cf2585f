"""One run folder beside its checkpoints: its record, its training history and its saved previews.

Layout of a run folder (the checkpoint folders themselves: :mod:`pogdiff.model.checkpoints`)::

    run.json            the run's one record: state (running / stopped / finished / failed), steps
                        done, the newest checkpoint, method, configs, data fingerprint; the Studio adds
                        who started it, the data set's description, the base, timings and errors
    history.jsonl       one JSON object per training step, oldest first
    previews/           step_NNNNNN.png (the images side by side) + step_NNNNNN.json (step, captions)
    checkpoint-NNNNNN/  the checkpoints
    replaced-<time>/    what a new run in an old folder set aside

The Trainer and the Studio's job manager both write ``run.json`` by merging their fields into it
(:func:`update_record`), so the file always holds the union of what each knows; reading a run as a
listing entry is :mod:`pogdiff.runs.store`' concern. A run's fingerprint (:func:`run_fingerprint`:
method, preset, base pipeline, the data's hash) is what a resume into the folder must not change.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pogdiff.config import ModelConfig, TrainConfig
from pogdiff.model.checkpoints import STATE_JSON, TMP_PREFIX, json_default, latest_checkpoint, resume_candidates
from pogdiff.server.safety import UnsafePathError, is_inside, resolve_inside

logger = logging.getLogger(__name__)

RUN_FILE = "run.json"
HISTORY_FILE = "history.jsonl"
PREVIEWS_DIR = "previews"
REPLACED_PREFIX = "replaced-"
# run.json's "state": what the Trainer writes; a reader that finds "running" with no live job calls it interrupted.
RUN_STATES = ("running", "stopped", "finished", "failed")

_RECORD_LOCK = threading.Lock()  # one read-merge-write of a run.json at a time in this process


# --- the record ----------------------------------------------------------------------------------


def _as_json(obj: Any) -> Any:
    try:
        return json_default(obj)
    except TypeError:
        return str(obj)  # paths and the like, as text


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON to ``path`` atomically (a temporary file, then a rename);
    values JSON has no type for are written as text."""
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}-{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=_as_json) + "\n")
    os.replace(tmp, path)


def read_record(run_dir: str | Path) -> dict[str, Any] | None:
    """``run_dir/run.json`` as a dict, or None when it is missing, unreadable or not an object."""
    try:
        record = json.loads((Path(run_dir) / RUN_FILE).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def update_record(run_dir: str | Path, **fields: Any) -> dict[str, Any]:
    """Merge ``fields`` into ``run_dir/run.json`` (atomically), stamping ``updated``; returns the record."""
    run_dir = Path(run_dir)
    with _RECORD_LOCK:
        record = read_record(run_dir) or {}
        record.update(fields, updated=time.time())
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_dir / RUN_FILE, record)
    return record


def find_checkpoint(run_dir: Path, recorded: str) -> Path | None:
    """The run's checkpoint folder, resolved inside ``run_dir`` (``run_dir`` itself resolved).

    Only the last component of the recorded ``last_checkpoint`` is used, looked up in ``run_dir``:
    a ``run.json`` cannot point anywhere else. Without one, the newest checkpoint of the folder.
    """
    if recorded:
        candidate = run_dir / Path(recorded).name
        if Path(recorded).name not in ("", ".", "..") and candidate.is_dir():
            try:
                return resolve_inside(run_dir, candidate)
            except UnsafePathError:
                logger.warning("checkpoint %s links outside %s; ignored", candidate.name, run_dir.name)
    try:
        found = latest_checkpoint(run_dir)
    except (OSError, ValueError, KeyError):
        found = None
    if found and is_inside(run_dir, found):
        return Path(found).resolve()
    candidates = sorted(  # a checkpoint written without a trainer state (e.g. by hand): its configs
        (p.parent.resolve() for p in run_dir.rglob("configs.json") if is_inside(run_dir, p)),
        key=lambda p: p.stat().st_mtime,
    )
    return candidates[-1] if candidates else None


def set_aside(run_dir: str | Path) -> Path | None:
    """Move a run folder's checkpoints, history and record into ``replaced-<time>/`` (for a new run
    in an old folder); returns that folder, or None when the folder held no checkpoint and no history
    (a record alone is the new run's own, written by whoever started it)."""
    run_dir = Path(run_dir)
    old = list(resume_candidates(run_dir)) + [p for p in (run_dir / HISTORY_FILE,) if p.exists()]
    if not old:
        return None
    old += [p for p in (run_dir / RUN_FILE,) if p.exists()]
    aside = run_dir / f"{REPLACED_PREFIX}{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"
    aside.mkdir()
    for path in old:
        os.replace(path, aside / path.name)
    logger.warning("new run in %s: the previous checkpoints were moved to %s", run_dir, aside)
    return aside


# --- the run's fingerprint -----------------------------------------------------------------------
FINGERPRINT_KEYS = ("method", "preset", "pretrained", "dataset_hash")


class RunMismatchError(ValueError):
    """The run folder holds a run with another method, preset or data."""


def dataset_hash(dataset) -> str:
    """sha256 (first 16 hex digits) of a set's pixels, captions and subjects."""
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(dataset.images).tobytes())
    for text in (*dataset.captions, "\x00", *dataset.subjects):
        digest.update(text.encode() + b"\x00")
    return digest.hexdigest()[:16]


def run_fingerprint(dataset, model_cfg: ModelConfig, train_cfg: TrainConfig) -> dict:
    """What a resume must not change: method, preset, pretrained pipeline and the data's hash
    (``data`` and ``n_images`` are kept for the message only)."""
    return {
        "method": train_cfg.method, "preset": model_cfg.preset, "pretrained": model_cfg.pretrained,
        "dataset_hash": dataset_hash(dataset), "n_images": len(dataset.captions),
        "data": str(getattr(dataset, "root", "")),
    }


def check_same_run(run_dir: Path, saved: dict, now: dict) -> None:
    """Refuse to resume when a fingerprint field differs, naming each difference."""
    diffs = [f"{k} {saved[k]!r} in the run folder, {now[k]!r} now" for k in FINGERPRINT_KEYS
             if k in saved and saved[k] != now.get(k)]
    if diffs:
        hint = ""
        if any(k.startswith("dataset") for k in FINGERPRINT_KEYS if k in saved and saved[k] != now.get(k)):
            hint = f" (run data: {saved.get('data', '?')}, {saved.get('n_images', '?')} images; now: {now.get('data')}, {now.get('n_images')} images)"
        raise RunMismatchError(
            f"{run_dir} holds another run: {'; '.join(diffs)}{hint}. Resuming would mix them: start a new "
            "run (--no-resume, or resume=False, moves the old checkpoints aside) or choose another run folder"
        )


# --- training history ----------------------------------------------------------------------------


def _history_line(row: dict[str, Any]) -> str:
    return json.dumps(row, sort_keys=True, default=json_default) + "\n"


def append_history(run_dir: str | Path, rows: list[dict[str, Any]]) -> None:
    """Append ``rows`` (one dict per step, with a ``step`` key) to ``run_dir/history.jsonl``."""
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    with open(Path(run_dir) / HISTORY_FILE, "a", encoding="utf-8") as f:
        f.writelines(_history_line(r) for r in rows)


def write_history(run_dir: str | Path, rows: list[dict[str, Any]]) -> None:
    """Replace ``run_dir/history.jsonl`` with ``rows`` (atomically)."""
    path = Path(run_dir) / HISTORY_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{TMP_PREFIX}{HISTORY_FILE}-{uuid.uuid4().hex[:8]}")
    tmp.write_text("".join(_history_line(r) for r in rows), encoding="utf-8")
    os.replace(tmp, path)


def read_history(path: str | Path, *, upto: int | None = None) -> list[dict[str, Any]]:
    """The training history of a run folder (or of the run of a checkpoint folder): one dict per
    step, oldest first, steps after ``upto`` left out (a checkpoint folder sets ``upto`` to its
    step). Read from ``history.jsonl``; runs written before the history had its own file keep it
    in ``trainer_state.json``, which is read instead. A line cut short by a killed process is
    skipped with a warning."""
    path = Path(path)
    run_dir = path
    if (path / STATE_JSON).is_file():
        run_dir = path.parent
        step = int(json.loads((path / STATE_JSON).read_text())["step"])
        upto = step if upto is None else min(upto, step)
    rows: list[dict[str, Any]] = []
    file = run_dir / HISTORY_FILE
    if file.is_file():
        for n, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except ValueError:
                logger.warning("%s line %d is not JSON (cut short?); skipped", file, n)
    else:
        ckpt = path if (path / STATE_JSON).is_file() else latest_checkpoint(run_dir)
        if ckpt is not None:
            rows = list(json.loads((ckpt / STATE_JSON).read_text()).get("extra", {}).get("history", []))
    return [r for r in rows if upto is None or int(r["step"]) <= upto]


# --- saved previews ------------------------------------------------------------------------------


@dataclass
class Preview:
    """One saved preview: the images sampled at ``step`` for ``captions``."""

    step: int
    images: np.ndarray  # uint8 [N, H, W, 3]
    captions: list[str]


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
    write_json(folder / f"{stem}.json", {"step": int(step), "captions": [str(c) for c in captions],
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
        try:  # by name: a relative run folder's glob results already start with the folder
            meta = json.loads(resolve_inside(folder, meta_path.name).read_text())
            png = resolve_inside(folder, meta_path.with_suffix(".png").name)
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
