"""The :class:`Studio`: the page's services, made once per server, and the tabs' controllers over them.

The services are the shared state: the data sets (:class:`~pogdiff.ui.datasets.Datasets`), the training
job and its runs (:class:`~pogdiff.runs.jobs.JobManager`, ``jobs.runs``), the checkpoints Compare loads
(:class:`~pogdiff.ui.sources.Sources`), the visitors (:class:`~pogdiff.ui.sessions.Sessions` over a
:class:`~pogdiff.ui.sessions.SessionRegistry`) and the device. Each controller receives the services it
uses, and each tab module's ``build`` lays out its tab and binds it to its controller.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

from pogdiff.config import LIMITS, DataConfig, Limits
from pogdiff.constants import SHIPPED_DIR
from pogdiff.runs.jobs import JobManager
from pogdiff.server.quotas import QUOTAS, Quotas
from pogdiff.ui.compare_tab import CompareTab
from pogdiff.ui.compare_views import ResultCache
from pogdiff.ui.data_tab import DataTab
from pogdiff.ui.datasets import Datasets
from pogdiff.ui.metrics_panel import MetricsPanel
from pogdiff.ui.neighbours_tab import NeighboursTab
from pogdiff.ui.sessions import SessionRegistry, Sessions
from pogdiff.ui.sources import Sources
from pogdiff.ui.state import Device
from pogdiff.ui.train_jobs import TrainJobs
from pogdiff.ui.train_runs import TrainRuns


class Studio:
    """The page's services and the tabs' controllers, made by composition.

    Services: ``datasets``, ``jobs`` (its runs: ``runs``), ``sources``, ``sessions`` (its registry:
    ``sessions.registry``), ``device``, and ``results`` (what a browser gets back over a page reload).
    Controllers, one per tab or panel: ``data`` (Data), ``neighbours`` (Neighbours), ``train`` and
    ``train_runs`` (Train), ``compare`` and ``metrics`` (Compare), ``sessions`` (the usage panel).

    Args:
        runs_dir: where training runs are written (one folder per run).
        shipped_dir: folder of the shipped checkpoints (``base-tiny``, ``evaluator``,
            ``demo-baseline``, ``demo-pogdiff``).
        jobs: a JobManager to use (tests inject one with a fake train function).
        data_config: how every set is read.
        device: ``"cuda"`` / ``"cpu"``; default: CUDA when available.
        demo_root: where the demo set is built (default: the package's cache).
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
        self.quotas = quotas
        data_config = data_config or DataConfig()
        cache_dir = self.runs_dir / "cache"
        # the services
        self.device = Device(device)
        self.jobs = jobs or JobManager(self.runs_dir, max_seconds=60.0 * limits.max_job_minutes or None)
        self.runs = self.jobs.runs
        self.datasets = Datasets(self.runs_dir, data_config=data_config, limits=limits, demo_root=demo_root)
        self.sources = Sources(self.shipped_dir, self.runs, self.device)
        self.results = ResultCache()  # Compare results kept for page reloads, by a token the browser holds
        registry = SessionRegistry(quotas.max_visitors, 60.0 * quotas.session_idle_minutes)
        self.sessions = Sessions(registry, self.datasets, self.runs, self.runs_dir, quotas, single_user=single_user)
        # the tabs' controllers
        self.data = DataTab(self.datasets, self.sessions, limits)
        self.neighbours = NeighboursTab(self.datasets, self.device, limits, data_config, cache_dir, view_encoder)
        self.train = TrainJobs(self.jobs, self.datasets, self.sessions, self.device, limits, self.runs_dir,
                               self.shipped_dir)
        self.train_runs = TrainRuns(self.train, self.jobs, self.datasets, self.sessions, self.device, limits,
                                    self.runs_dir)
        self.metrics = MetricsPanel(self.sources, self.datasets, self.runs, self.results, self.shipped_dir, cache_dir,
                                    limits, data_config)
        self.compare = CompareTab(self.sources, self.datasets, self.sessions, self.results, limits, data_config)

    def browser_secret(self) -> str:
        """The key the browser's saved dataset id is encrypted with; kept in the runs folder so it survives restarts."""
        path = self.runs_dir / ".browser-secret"
        try:
            return path.read_text().strip()
        except OSError:
            self.runs_dir.mkdir(parents=True, exist_ok=True)
            path.write_text(secrets.token_hex(32))
            path.chmod(0o600)
            return path.read_text().strip()
