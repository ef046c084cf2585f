"""The runs folder: every run under it read as a :class:`RunInfo`, listed, found by name, and exported.

A run is a folder under the runs folder with a record (``run.json``, :mod:`pogdiff.training.run_folder`) and
a checkpoint. :class:`RunStore` is the one place that reads them: the Studio's Train, Compare and
metrics views, the job manager and the time estimates all go through it. Every path that comes from
a caller or from a ``run.json`` is resolved (symlinks followed) and used only when it lies inside the
runs folder (README "Limits and safety").
"""

from __future__ import annotations

import dataclasses
import json
import logging
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pogdiff.training.run_folder import RUN_FILE, Preview, find_checkpoint, read_previews
from pogdiff.server.safety import UnsafePathError, check_run_name, resolve_inside

logger = logging.getLogger(__name__)

EXPORTS_DIR = "exports"  # zips and weights handed to a user, beside the runs


@dataclass
class StepTime:
    """A measured training step time: from a trial (``source="trial"``) or a recorded run."""

    seconds_per_step: float
    steps: int  # steps the figure averages over
    source: str  # "trial" or "run <name>"
    measured_at: float | None = None
    setup_seconds: float | None = None  # trial only: start until the end of the first step


@dataclass
class RunInfo:
    """A run folder under the runs folder that holds a checkpoint."""

    name: str
    run_dir: Path
    checkpoint: Path
    state: str  # "finished", "stopped", "failed" or "interrupted" (a record left "running" by a process gone)
    method: str
    steps_done: int
    max_steps: int
    stopped: bool
    finished_at: float | None
    model_cfg: dict[str, Any]
    train_cfg: dict[str, Any]
    dataset: dict[str, Any]
    owner: str = ""  # owner_digest() of whoever started it; "" for runs made outside the app


def describe_dataset(dataset: Any) -> dict[str, Any]:
    """What a run's record says of its data: the folder, the number of images and of classes."""
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


def _maybe_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _read_meta(run_dir: Path) -> dict[str, Any]:
    """``run_dir/run.json``, read only when it lies inside ``run_dir``; ValueError when it is not an object."""
    meta = json.loads(resolve_inside(run_dir, RUN_FILE).read_text())
    if not isinstance(meta, dict):
        raise ValueError(f"{RUN_FILE} is not a JSON object")
    return meta


_WARNED: set[str] = set()  # run folders already reported as unreadable or unsafe


class RunStore:
    """The runs under ``runs_dir``.

    Args:
        runs_dir: the runs folder; every run is a folder directly under it.
        current: the folder of this server's current (running or last) job and whether it is still
            running, or None; the listing leaves a running job out, and :meth:`run_dir` without a
            name means it.
    """

    def __init__(self, runs_dir: str | Path, *, current: Callable[[], tuple[Path, bool] | None] = lambda: None) -> None:
        self.runs_dir = Path(runs_dir)
        self._current = current

    def list_runs(self) -> list[RunInfo]:
        """Runs under ``runs_dir`` that hold a checkpoint, newest first (a running job's excluded)."""
        if not self.runs_dir.is_dir():
            return []
        current = self._current()
        busy_dir = current[0].resolve() if current is not None and current[1] else None
        runs = []
        for meta_path in sorted(self.runs_dir.glob(f"*/{RUN_FILE}")):
            run_dir = meta_path.parent
            if run_dir.name.startswith("."):  # scratch folders (a step-time trial's), never a run
                continue
            if busy_dir is not None and run_dir.resolve() == busy_dir:
                continue
            info = self.read_run(run_dir)
            if info is not None:
                runs.append(info)
        runs.sort(key=lambda r: (r.finished_at or 0.0, r.name), reverse=True)
        return runs

    def get_run(self, run: RunInfo | str | Path) -> RunInfo:
        """Resolve a run by RunInfo or folder name; ValueError when it has no checkpoint.

        A name is a plain folder name (:func:`~pogdiff.server.safety.check_run_name`); a ``Path`` must
        resolve inside ``runs_dir``. Absolute paths, ``..`` and symlinks out are refused.
        """
        if isinstance(run, RunInfo):
            return run
        if isinstance(run, Path):
            run_dir = resolve_inside(self.runs_dir, run.absolute())
            name = run_dir.name
        else:
            name = check_run_name(run)
            run_dir = self.runs_dir / name
        info = self.read_run(run_dir) if name != EXPORTS_DIR else None
        if info is None:
            raise ValueError(f"no finished run with a checkpoint named {name!r}")
        return info

    def read_run(self, run_dir: Path) -> RunInfo | None:
        """The run in ``run_dir``, or None; nothing outside ``runs_dir`` is read or returned."""
        try:
            real_dir = resolve_inside(self.runs_dir, Path(run_dir).absolute())
            check_run_name(run_dir.name)
            meta = _read_meta(real_dir)
            checkpoint = find_checkpoint(real_dir, str(meta.get("last_checkpoint") or ""))
            if checkpoint is None:
                return None
            state = str(meta.get("state", "finished"))
            if state == "running":  # left over from a process that went away mid-run
                state = "interrupted"
            return RunInfo(
                name=run_dir.name, run_dir=real_dir, checkpoint=checkpoint, state=state,
                method=str(meta.get("method", "")), steps_done=int(meta.get("steps_done", 0) or 0),
                max_steps=int(meta.get("max_steps", 0) or 0),
                stopped=bool(meta.get("stopped", False)) or state == "stopped",
                finished_at=_maybe_float(meta.get("finished_at")), model_cfg=_dict(meta.get("model_cfg")),
                train_cfg=_dict(meta.get("train_cfg")), dataset=_dict(meta.get("dataset")),
                owner=str(meta.get("owner") or ""),
            )
        except (OSError, ValueError, TypeError, RuntimeError) as exc:  # UnsafePathError is a ValueError
            if str(run_dir) not in _WARNED:  # once per folder: runs are listed on every poll
                _WARNED.add(str(run_dir))
                logger.warning("ignoring run folder %s: %s", run_dir.name, exc)
            return None

    def run_dir(self, name: str | None) -> Path | None:
        """Run ``name``'s folder (inside ``runs_dir``); without a name, this server's current (running or
        last) job's, else the newest run on disk; None when there is none."""
        if name:
            return resolve_inside(self.runs_dir, (self.runs_dir / check_run_name(name)).absolute())
        current = self._current()
        if current is not None:
            return current[0]
        runs = self.list_runs()
        return runs[0].run_dir if runs else None

    def run_meta(self, name: str | None = None) -> dict[str, Any] | None:
        """The ``run.json`` of run ``name`` (default: see :meth:`run_dir`), or None when unreadable."""
        run_dir = self.run_dir(name)
        if run_dir is None:
            return None
        try:
            return _read_meta(run_dir)
        except (OSError, ValueError) as exc:
            logger.warning("cannot read the settings of run %s: %s", run_dir.name, exc)
            return None

    def previews(self, name: str | None = None) -> list[Preview]:
        """The previews saved in run ``name``'s folder (default: see :meth:`run_dir`), oldest first."""
        run_dir = self.run_dir(name)
        return read_previews(run_dir) if run_dir is not None else []

    def recorded_step_time(self, *, preset: str, method: str, batch_size: int, resolution: int) -> StepTime | None:
        """The average step time that the newest finished or stopped run with these settings recorded
        in its ``run.json`` (previews, checkpoints and the first step included), or None."""
        for info in self.list_runs():
            try:
                meta = _read_meta(info.run_dir)
                spt, timed = meta.get("seconds_per_step"), int(meta.get("timed_steps") or 0)
            except (OSError, ValueError, TypeError):
                continue
            same = (info.model_cfg.get("preset") == preset and info.method == method
                    and info.train_cfg.get("batch_size") == batch_size and info.model_cfg.get("resolution") == resolution)
            if same and isinstance(spt, (int, float)) and spt > 0 and timed >= 2:
                return StepTime(float(spt), timed, f"run {info.name}", info.finished_at)
        return None

    def export_zip(self, run: RunInfo | str | Path) -> Path:
        """Zip a run's last checkpoint (weights + configs) and its ``run.json``; return the zip path."""
        return export_zip(self.runs_dir, self.get_run(run))

    def export_weights(self, run: RunInfo | str | Path) -> Path:
        """The run's trained weights alone (:func:`export_weights`)."""
        return export_weights(self.runs_dir, self.get_run(run))


def export_zip(runs_dir: Path, info: RunInfo) -> Path:
    """Zip a run's last checkpoint (weights + configs) and its ``run.json``; return the zip path."""
    name = check_run_name(info.name)
    run_dir = resolve_inside(runs_dir, info.run_dir)
    out_dir = runs_dir / EXPORTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    out = resolve_inside(runs_dir, (out_dir / f"{name}.zip").absolute())
    checkpoint = resolve_inside(run_dir, info.checkpoint)
    files = sorted(p for p in checkpoint.rglob("*") if p.is_file())
    for path in [*files, run_dir / RUN_FILE]:
        try:
            resolve_inside(run_dir, path)
        except UnsafePathError as exc:
            raise ValueError(f"run {name!r} is not exported: {path.name} links outside its run folder.") from exc
    info = dataclasses.replace(info, name=name, run_dir=run_dir, checkpoint=checkpoint)
    newest = max([p.stat().st_mtime for p in files] + [(info.run_dir / RUN_FILE).stat().st_mtime])
    if out.exists() and out.stat().st_mtime >= newest:
        return out
    tmp = out.with_suffix(".zip.tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.write(info.run_dir / RUN_FILE, f"{info.name}/{RUN_FILE}")
        for path in files:
            zf.write(path, f"{info.name}/{info.checkpoint.name}/{path.relative_to(info.checkpoint)}")
    tmp.replace(out)
    return out


def export_weights(runs_dir: Path, info: RunInfo) -> Path:
    """The run's trained weights alone, without optimizer state: the LoRA file of an sd15 run
    (``load_lora_weights``), or the tiny UNet's weights in float16 with its config in the file's
    metadata. Returns the path of one ``.safetensors`` file under the runs folder's exports."""
    import torch
    from safetensors.torch import load_file, save_file

    name = check_run_name(info.name)
    run_dir = resolve_inside(runs_dir, info.run_dir)
    checkpoint = resolve_inside(run_dir, info.checkpoint)
    unet = resolve_inside(run_dir, checkpoint / "unet")
    out_dir = runs_dir / EXPORTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    lora = unet / "pytorch_lora_weights.safetensors"
    full = unet / "diffusion_pytorch_model.safetensors"
    if lora.is_file():
        out = out_dir / f"{name}-lora.safetensors"
        tensors, metadata = load_file(str(resolve_inside(run_dir, lora))), {"format": "pt", "kind": "lora"}
    elif full.is_file():
        out = out_dir / f"{name}-unet-fp16.safetensors"
        tensors = {k: v.half() if v.is_floating_point() else v
                   for k, v in load_file(str(resolve_inside(run_dir, full))).items()}
        config = unet / "config.json"
        metadata = {"format": "pt", "kind": "unet", "dtype": str(torch.float16),
                    "config": config.read_text() if config.is_file() else "{}"}
    else:
        raise ValueError(f"run {name!r} has no UNet weights in its last checkpoint ({checkpoint.name})")
    tmp = out.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    tmp.replace(out)
    return out
