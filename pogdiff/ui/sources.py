"""The checkpoints the Compare tab can load (:class:`Sources`): the shipped demo runs first, then the
finished runs of this server, and the models loaded from them (the most recently used kept)."""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import gradio as gr

from pogdiff.runs.store import RunStore
from pogdiff.ui.balance_views import balance_label
from pogdiff.ui.state import Device, Source
from pogdiff.ui.views import MAX_CACHED_MODELS, SHIPPED_RUNS


class Sources:
    """Checkpoints by key (``shipped:<folder>``, ``run:<name>``) and the models loaded from them; thread-safe.

    Args:
        shipped_dir: folder of the shipped checkpoints (``demo-*`` fine-tunes, ``base-tiny``, ``evaluator``).
        runs: the runs folder's records.
        device: where a loaded model runs.
    """

    def __init__(self, shipped_dir: str | Path, runs: RunStore, device: Device) -> None:
        self.shipped_dir = Path(shipped_dir)
        self.runs = runs
        self.device = device
        self._lock = threading.Lock()
        self.models: OrderedDict[str, Any] = OrderedDict()

    def shipped_runs(self) -> dict[str, str]:
        """Every shipped demo run (a ``demo-*`` folder of the shipped checkpoints), folder -> method:
        the defaults of :data:`SHIPPED_RUNS` first, then the others by name. The method is the one
        its ``configs.json`` records, else the folder name's suffix."""
        folders = sorted(p.name for p in self.shipped_dir.glob("demo-*") if p.is_dir())
        order = [f for f in SHIPPED_RUNS.values() if f in folders] + [f for f in folders if f not in SHIPPED_RUNS.values()]
        found = {}
        for folder in order:
            method = folder.removeprefix("demo-")
            try:
                train = json.loads((self.shipped_dir / folder / "configs.json").read_text()).get("train")
                method = train.get("method", method) if isinstance(train, dict) else method
            except (OSError, ValueError, AttributeError):
                pass
            found[folder] = str(method)
        return found

    def all(self) -> list[Source]:
        """Every shipped demo checkpoint first (README "Results": baseline, PoGDiff, resampling),
        then finished runs, newest first."""
        found = []
        for folder, method in self.shipped_runs().items():
            ckpt = self.checkpoint_in(self.shipped_dir / folder)
            if ckpt is not None:
                csv = self.shipped_dir / folder / "per_class.csv"
                found.append(Source(f"shipped:{folder}", f"shipped · {folder} ({method}, demo set)", ckpt,
                                    metrics_csv=csv if csv.is_file() else None))
        for run in self.runs.list_runs():
            found.append(Source(f"run:{run.name}", f"run · {run.name} ({run.method}{balance_label(run.train_cfg)}, "
                                f"{run.steps_done} steps)", run.checkpoint))
        return found

    @staticmethod
    def checkpoint_in(folder: Path) -> Path | None:
        """The checkpoint of a shipped folder: the folder itself, or its newest checkpoint; None without one."""
        if (folder / "configs.json").exists():
            return folder
        if folder.is_dir():
            from pogdiff.model.checkpoints import latest_checkpoint

            found = latest_checkpoint(folder)
            return Path(found) if found else None
        return None

    def shipped_note(self) -> str:
        missing = [f for f in SHIPPED_RUNS.values() if self.checkpoint_in(self.shipped_dir / f) is None]
        if not missing:
            return ("Defaults: the shipped **demo-baseline** and **demo-pogdiff** checkpoints, fine-tuned from the "
                    "same base on the demo set with the same steps and seed (1000 steps of batch 16; README \"Results\"); "
                    "every other shipped recipe is listed too.")
        return ("**Not there yet:** the shipped comparison checkpoints "
                "(`checkpoints/demo-baseline`, `checkpoints/demo-pogdiff`) "
                "are not there yet. Make them with `python -m pogdiff bench quality --ship checkpoints`, "
                "or train two runs in the **Train** tab (method *baseline*, then *pogdiff*, same steps) and pick "
                "them here.")

    def find(self, key: str | None) -> Source:
        """The checkpoint ``key`` names (looked up among :meth:`all`, never read as a path); gr.Error otherwise."""
        for s in self.all():
            if isinstance(key, str) and s.key == key:
                return s
        key = key[:80] if isinstance(key, str) else key
        raise gr.Error(f"Checkpoint {key!r} is not available. {self.shipped_note() if not key else ''}".strip(),
                       title="Pick two checkpoints")

    def model(self, source: Source):
        """The model of ``source``, loaded once (kept while it is among the MAX_CACHED_MODELS latest)."""
        cache_key = f"{source.checkpoint}:{source.checkpoint.stat().st_mtime if source.checkpoint.exists() else 0}"
        with self._lock:
            model = self.models.get(cache_key)
            if model is not None:
                self.models.move_to_end(cache_key)
                return model
        from pogdiff.model import checkpoints

        model = checkpoints.load_model(source.checkpoint, device=self.device.name)
        with self._lock:
            self.models[cache_key] = model
            while len(self.models) > MAX_CACHED_MODELS:
                self.models.popitem(last=False)
        return model
