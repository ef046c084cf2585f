"""The :class:`Studio`: server-side state and every callback of the app, one mixin per concern (each
tab's module, the Train tab's job and runs, and the visitors of a shared server)."""

from __future__ import annotations

import logging
import re
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from pogdiff.server import safety
from pogdiff.config import (
    LIMITS,
    DataConfig,
    Limits,
)
from pogdiff.constants import SHIPPED_DIR
from pogdiff.runs.jobs import JobManager
from pogdiff.server.quotas import QUOTAS, Quotas
from pogdiff.ui.compare_views import ResultCache
from pogdiff.ui.state import DatasetBundle
from pogdiff.ui.views import (
    DATASET_KEY_RE,
    DEMO_KEY,
    MAX_CACHED_DATASETS,
    MAX_KEY_CHARS,
    checked_input,
    class_counts_table,
    dataset_key,
    default_device,
    request_owner,
    split_dataset_key,
)

logger = logging.getLogger(__name__)

from pogdiff.ui.compare_tab import CompareTab
from pogdiff.ui.data_tab import DataTab
from pogdiff.ui.metrics_panel import MetricsPanel
from pogdiff.ui.neighbours_tab import NeighboursTab
from pogdiff.ui.sessions import SessionRegistry, Sessions
from pogdiff.ui.train_jobs import TrainJobs
from pogdiff.ui.train_runs import TrainRuns


class Studio(DataTab, NeighboursTab, TrainJobs, TrainRuns, CompareTab, MetricsPanel, Sessions):
    """Server-side state and every callback of the app.

    Args:
        runs_dir: where training runs are written (one folder per run).
        shipped_dir: folder of the shipped checkpoints (``base-tiny``, ``evaluator``,
            ``demo-baseline``, ``demo-pogdiff``).
        jobs: a JobManager to use (tests inject one with a fake train function).
        device: ``"cuda"`` / ``"cpu"``; default: CUDA when available.
        single_user: every visitor may stop and export every job (one person on localhost).
            Off: a job belongs to the session (or logged-in user) that started it; others watch.
        limits: server-side bounds on every request value (README "Limits and safety").
        view_encoder: a caption encoder the Neighbours tab uses instead of the preset's (tests
            inject a cheap one).
        quotas: how the server is shared among visitors: the visitor cap, idle time, disk quotas,
            the queue's concurrency (:mod:`pogdiff.server.quotas`, :mod:`pogdiff.ui.sessions`).
    """

    def __init__(
        self,
        runs_dir: str | Path = "runs",
        *,
        shipped_dir: str | Path = SHIPPED_DIR,
        jobs: JobManager | None = None,
        data_config: DataConfig | None = None,
        device: str | None = None,
        demo_root: str | Path | None = None,
        single_user: bool = False,
        limits: Limits = LIMITS,
        view_encoder: Any = None,
        quotas: Quotas = QUOTAS,
    ) -> None:
        self.runs_dir = Path(runs_dir)
        self.shipped_dir = Path(shipped_dir)
        self.limits = limits
        self.single_user = single_user
        self.jobs = jobs or JobManager(self.runs_dir, max_seconds=60.0 * limits.max_job_minutes or None)
        self.data_config = data_config or DataConfig()
        self._device = device
        self._demo_root = demo_root
        self._lock = threading.Lock()
        self._datasets: OrderedDict[str, DatasetBundle] = OrderedDict()
        self._models: OrderedDict[str, Any] = OrderedDict()
        self._parts: dict[tuple, Any] = {}  # caption encoder (and VAE) of the Neighbours tab's preset
        self._view_encoder = view_encoder
        self._evaluator = None
        self._results = ResultCache()  # Compare results kept for page reloads, by a token the browser holds
        self._pair_stash: OrderedDict[str, dict] = OrderedDict()  # last generated pair per browser session
        self._metric_stash: OrderedDict[tuple, tuple] = OrderedDict()  # last metric outputs per run pair
        self.quotas = quotas
        self.sessions = SessionRegistry(quotas.max_visitors, 60.0 * quotas.session_idle_minutes)

    # ------------------------------------------------------------------ shared lazies
    @property
    def device(self) -> str:
        if self._device is None:
            self._device = default_device()
        return self._device

    @property
    def on_gpu(self) -> bool:
        return self.device.startswith("cuda")

    def demo_root(self) -> Path:
        from pogdiff.data import ensure_demo

        return Path(ensure_demo(root=self._demo_root) if self._demo_root else ensure_demo())

    def _remember(self, bundle: DatasetBundle) -> DatasetBundle:
        with self._lock:
            self._datasets[bundle.key] = bundle
            self._datasets.move_to_end(bundle.key)
            while len(self._datasets) > MAX_CACHED_DATASETS:
                self._datasets.popitem(last=False)
        return bundle

    def may_control(self, owner: str, request: gr.Request | None) -> bool:
        """May this request stop or export a job/run whose ``owner`` digest is given?"""
        return self.single_user or not owner or safety.owner_digest(request_owner(request)) == owner

    def bundle(self, key: str | None) -> DatasetBundle:
        """The dataset of this browser session; the demo set when none was loaded."""
        key = checked_input(safety.text, "dataset key", key, MAX_KEY_CHARS) or DEMO_KEY
        with self._lock:
            found = self._datasets.get(key)
        if found is not None:
            return found
        base, class_source = split_dataset_key(key) if re.fullmatch(DATASET_KEY_RE, key) else ("", "")
        if key == DEMO_KEY:
            return self._load_demo_bundle()
        if base == DEMO_KEY:
            return self._load_demo_bundle(class_source)
        if base and safety.is_inside(self.upload_store, base) and (self.upload_store / base).is_dir():
            return self._load_stored(key, safety.resolve_inside(self.upload_store, base))
        raise gr.Error("That dataset is no longer in memory (the server restarted or loaded others). "
                       "Load it again in the Data tab.", title="Dataset not loaded")

    def _make_bundle(self, key: str, name: str, ds: Any) -> DatasetBundle:
        table = self._class_table(ds)
        try:
            from pogdiff.data import stats

            summary = dict(stats.summary(ds, self.data_config))
        except (ImportError, AttributeError, TypeError) as exc:
            logger.debug("stats.summary unavailable: %s", exc)
            summary = {}
        return DatasetBundle(key=key, name=name, ds=ds, table=table, summary=summary)

    def _class_table(self, ds: Any) -> pd.DataFrame:
        try:
            from pogdiff.data import stats

            table = stats.class_table(ds, self.data_config)
            return table[["subject", "count", "shot"]].reset_index(drop=True)
        except (ImportError, AttributeError, TypeError, KeyError) as exc:
            logger.debug("stats.class_table unavailable: %s", exc)
            return class_counts_table(ds.subjects, self.data_config)

    def _load_demo_bundle(self, class_source: str = "auto") -> DatasetBundle:
        """The demo's train split, its classes from ``class_source`` (key ``demo`` or ``demo~<source>``)."""
        ds = self._read_set(self.demo_root() / "train", class_source)
        return self._remember(self._make_bundle(dataset_key(DEMO_KEY, class_source), "built-in demo set (train split)",
                                                ds))

    def _eval_set(self):
        from pogdiff.data import load_image_text_set

        return load_image_text_set(self.demo_root() / "eval", self.data_config)
