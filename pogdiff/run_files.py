"""Files of a run folder beside its checkpoints: ``run.json`` (read as a :class:`RunInfo`), the
saved previews (``previews/``), recorded step times, and the exports handed to a user (a zip of the
last checkpoint, or its weights alone; README "What you see").
"""

from __future__ import annotations

import dataclasses
import json
import logging
import traceback
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pogdiff.safety import UnsafePathError, check_run_name, resolve_inside

logger = logging.getLogger(__name__)

RUN_FILE = "run.json"
EXPORTS_DIR = "exports"
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


@dataclass
class RunInfo:
    """A run folder under ``runs_dir`` that holds a checkpoint."""

    name: str
    run_dir: Path
    checkpoint: Path
    state: str
    method: str
    steps_done: int
    max_steps: int
    stopped: bool
    finished_at: float | None
    model_cfg: dict[str, Any]
    train_cfg: dict[str, Any]
    dataset: dict[str, Any]
    owner: str = ""  # owner_digest() of whoever started it; "" for runs made outside the app


# ------------------------------------------------------------------------------------- exports
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
