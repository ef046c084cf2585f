"""What the Gradio app binds its buttons to: the :class:`Studio` and pure helpers.

``app.py`` only lays out components; every callback is a method of :class:`Studio`, which keeps
the server-side state (loaded datasets, neighbour tables, loaded models, the training
:class:`~pogdiff.jobs.JobManager`). Nothing heavy happens at import or construction time: the
demo set, the text encoder and the models are built on first use.

The helpers at the top (``loss_frame``, ``status_markdown``, ...) are pure functions of plain
data, so they are tested without a browser.
"""

from __future__ import annotations

import dataclasses
from html import escape as html_escape
import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from pogdiff import safety  # noqa: E402
from pogdiff.constants import REPO_ROOT, SHIPPED_DIR, SHOT_COLOURS  # noqa: E402,F401
from pogdiff.compare_views import (  # noqa: E402
    MAX_REAL_IMAGES,
    CompareState,
    ResultCache,
    delta_table,
    difference_view,
    parse_typed_prompts,
    points_in_band,
    real_examples,
    round_sig,
    size_bin,
    size_colour_map,
    subject_for_prompt,
    thumbnail_markdown,
)
from pogdiff.config import (  # noqa: E402
    LIMITS,
    METHODS,
    PRESETS,
    DataConfig,
    Limits,
    PsiConfig,
    SampleConfig,
    configs_from_options,
    model_preset,
    train_preset,
)
from pogdiff.data.stats import shot_bucket  # noqa: E402
from pogdiff.neighbours import POOLS  # noqa: E402
from pogdiff.jobs import JobBusyError, JobManager, JobStatus, RunInfo  # noqa: E402

logger = logging.getLogger(__name__)

DEMO_KEY = "demo"
SHOTS = ("many", "medium", "few")
WEAK_MARK = "⚠ weak"  # a class the user-data judge cannot score reliably
THUMB_PX = 96  # gallery thumbnails are upscaled (nearest) to at least this many pixels
SLIDER_PX = 256  # the before/after slider shows one pair this large
MAX_CACHED_DATASETS = 4
MAX_CACHED_MODELS = 2
MAX_GALLERY = 48
SHIPPED_RUNS = {"baseline": "demo-baseline", "pogdiff": "demo-pogdiff"}
TERM_ORDER = ("loss", "mse", "pog", "cbdm")
COLOUR_BY = ("shot bucket", "class frequency")
MAX_KEY_CHARS = 64  # dataset keys are "demo" or "upload-<12 hex>"
UPLOAD_TMP_PREFIX = ".incoming-"  # an upload being copied into the upload store
UPLOAD_STORE = "uploads"  # under the runs folder: uploaded sets by content hash (README "Limits and safety")
UPLOAD_KEY_RE = r"upload-[0-9a-f]{16}"
EXPORT_TMP_PREFIX = "pogdiff-export-"  # one folder per exported zip handed to a client
STALE_UPLOAD_SECONDS = 600  # a start-up sweep removes upload folders left older than this
HUB_ID_RE = r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*"


# ================================================================================ pure helpers
def format_seconds(seconds: float | None) -> str:
    """``75.2 -> '1m 15s'``; None or NaN -> an em dash."""
    if seconds is None or not math.isfinite(seconds):
        return "—"
    seconds = int(round(max(0.0, seconds)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    if h:
        return f"{h}h {m:02d}m"
    if m:
        return f"{m}m {s:02d}s"
    return f"{s}s"


def loss_frame(history: Sequence[dict[str, float]], terms: Sequence[str] | None = None) -> pd.DataFrame:
    """Long table ``step, term, value`` of the loss terms, for a ``gr.LinePlot(color="term")``."""
    rows = []
    skip = {"step", "lr", "psi_mean", "psi_active", "seconds_per_step"}
    for h in history:
        for key, value in h.items():
            if key in skip or (terms is not None and key not in terms):
                continue
            if value is not None and math.isfinite(value):
                rows.append((int(h["step"]), key, float(value)))
    # Typed columns even when empty: the plot keeps the axis types of its first frame.
    frame = pd.DataFrame({
        "step": pd.Series([r[0] for r in rows], dtype="int64"),
        "term": pd.Series([r[1] for r in rows], dtype=object),
        "value": pd.Series([r[2] for r in rows], dtype="float64"),
    })
    order = {t: i for i, t in enumerate(TERM_ORDER)}
    return frame.sort_values(["term", "step"], key=lambda s: s.map(order) if s.name == "term" else s,
                             kind="stable").reset_index(drop=True)


def progress_html(status: JobStatus) -> str:
    """A progress bar with step counter, speed and ETA."""
    pct = 100.0 * status.progress
    colour = {"failed": "#dc2626", "stopping": "#f59e0b"}.get(status.state, "#2563eb")
    if status.state == "idle":
        label = "No training job yet."
    else:
        speed = f"{status.seconds_per_step:.2f} s/step" if status.seconds_per_step else "warming up"
        label = f"step {status.step} / {status.max_steps} · {pct:.0f}% · {speed}"
        if status.busy:
            label += f" · ETA {format_seconds(status.eta_seconds)}"
        label += f" · elapsed {format_seconds(status.elapsed_seconds)}"
    return (
        '<div class="pg-progress"><div class="pg-progress-track">'
        f'<div class="pg-progress-fill" style="width:{pct:.1f}%;background:{colour}"></div></div>'
        f'<div class="pg-progress-label">{label}</div>{pogdiff_activity_html(status.history)}</div>'
    )


def pogdiff_activity_html(history: Sequence[dict[str, float]]) -> str:
    """PoGDiff's activity in the latest steps (mean psi, rows with a neighbour pass, PoG share of
    the loss) and the plain-words warning when it behaves like plain fine-tuning; '' otherwise."""
    from pogdiff.training import INACTIVE_WINDOW, pogdiff_inactive_warning

    rows = [h for h in history if "pog_share" in h and "pog" in h]
    if not rows:
        return ""
    recent = rows[-INACTIVE_WINDOW:]
    share = float(np.mean([h["pog_share"] for h in recent]))
    psi = float(np.mean([h.get("psi_mean", 0.0) for h in recent]))
    active = float(np.mean([h.get("psi_active", 0.0) for h in recent]))
    line = (f"PoGDiff, last {len(recent)} steps: mean psi {psi:.3f} · neighbour pass on {100 * active:.0f}% "
            f"of rows · PoG term {100 * share:.2f}% of the loss")
    warning = pogdiff_inactive_warning([h["pog_share"] for h in recent], [h.get("psi_mean", 0.0) for h in recent])
    html = f'<div class="pg-progress-label">{line}</div>'
    if warning:
        html += f'<div class="pg-warning" style="color:#b45309;font-weight:600">⚠ {html_escape(warning)}</div>'
    return html


def status_markdown(status: JobStatus) -> str:
    """One headline about the job, with the error and traceback summary when it failed."""
    if status.state == "idle":
        return "**Idle.** Choose the options and press **Start training**."
    name = f"`{status.run_name}` ({status.method})"
    if status.state == "running":
        return f"**Training** {name}. Another browser tab sees this same job."
    why = f" ({status.stop_reason})" if status.stop_reason and status.stop_reason != "requested" else ""
    if status.state == "stopping":
        return f"**Stopping**{why} {name} after the current step; the last checkpoint is kept."
    if status.state == "failed":
        tb = f"\n\n```text\n{status.traceback}\n```" if status.traceback else ""
        return f"**Training failed** {name} at step {status.step}.\n\n`{status.error}`{tb}"
    how = f"Stopped{why}" if status.stopped else "Finished"
    ckpt = f" Checkpoint: `{Path(status.last_checkpoint).name}`." if status.last_checkpoint else ""
    return (f"**{how}** {name} after {status.step} of {status.max_steps} steps in "
            f"{format_seconds(status.elapsed_seconds)}.{ckpt} Download it below or compare it in **Compare**.")


def report_markdown(report: Any) -> str:
    """The validation report of the data layer as markdown, with a friendly 'all good' line."""
    if report is None:
        return ""
    issues = list(getattr(report, "issues", []) or [])
    if not issues:
        return "**Validation passed**: no errors, no warnings."
    to_md = getattr(report, "to_markdown", None)
    if callable(to_md):
        return to_md()
    lines = []
    for issue in issues:
        icon = "**error**" if issue.level == "error" else "*warning*"
        fix = f" — *fix:* {issue.fix}" if getattr(issue, "fix", "") else ""
        lines.append(f"- {icon} `{issue.where}` {issue.message}{fix}")
    return "\n".join(lines)


def upscale(image: np.ndarray, min_px: int = THUMB_PX) -> np.ndarray:
    """Nearest-neighbour upscale of a uint8 ``[H, W, 3]`` image so its short side is >= ``min_px``."""
    factor = max(1, -(-min_px // max(1, min(image.shape[:2]))))
    if factor == 1:
        return image
    return np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)


def class_counts_table(subjects: Sequence[str], config: DataConfig) -> pd.DataFrame:
    """``subject, count, shot`` sorted by count (descending) then name."""
    counts = pd.Series(list(subjects), dtype=object).value_counts()
    table = pd.DataFrame({"subject": counts.index.astype(str), "count": counts.values.astype(int)})
    table["shot"] = [shot_bucket(int(c), config) for c in table["count"]]
    return table.sort_values(["count", "subject"], ascending=[False, True]).reset_index(drop=True)


def summary_markdown(table: pd.DataFrame, n_images: int, extra: dict[str, Any] | None = None) -> str:
    """Headline numbers: images, classes, the many/medium/few split and the imbalance ratio."""
    n_classes = len(table)
    by_shot = table.groupby("shot")["count"].agg(["size", "sum"]) if n_classes else None
    parts = []
    for shot in SHOTS:
        if by_shot is not None and shot in by_shot.index:
            n_cls, n_img = int(by_shot.loc[shot, "size"]), int(by_shot.loc[shot, "sum"])
            parts.append(f"**{shot}**: {n_cls} classes / {n_img} images")
        else:
            parts.append(f"**{shot}**: 0 classes")
    ratio = (table["count"].max() / max(1, table["count"].min())) if n_classes else float("nan")
    text = (f"### {n_images} images · {n_classes} classes · imbalance ratio {ratio:.0f}:1\n"
            + " · ".join(parts))
    single = list((extra or {}).get("single_image_classes") or [])
    if single:
        names = ", ".join(single[:8]) + (" …" if len(single) > 8 else "")
        text += (f"\n\n**Note:** {len(single)} class(es) with a single image ({names}): they cannot borrow from a "
                 "same-subject neighbour (s_img needs two images of a class).")
    if extra:
        skip = {"n_images", "n_classes", "images", "classes", "imbalance_ratio", "n_many", "n_medium", "n_few"}
        items = [f"{k.replace('_', ' ')}: {_fmt(v)}" for k, v in extra.items()
                 if k not in skip and not isinstance(v, (dict, list, tuple))]
        if items:
            text += "\n\n<small>" + " · ".join(items) + "</small>"
    return text


def short_prompt(prompt: str) -> str:
    """``'a photo of Mira Okafor, smiling' -> 'Mira Okafor, smiling'`` for grid labels."""
    for prefix in ("a photo of ", "a picture of ", "an image of "):
        if prompt.lower().startswith(prefix):
            return prompt[len(prefix):]
    return prompt


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def runs_frame(runs: Sequence[RunInfo]) -> pd.DataFrame:
    """One row per finished run for the runs table."""
    rows = []
    for r in runs:
        psi = (r.train_cfg.get("psi") or {}) if r.method == "pogdiff" else {}
        rows.append({
            "run": r.name,
            "method": r.method,
            "state": "stopped" if r.stopped else r.state,
            "steps": f"{r.steps_done}/{r.max_steps}",
            "batch": r.train_cfg.get("batch_size", ""),
            "lr": r.train_cfg.get("learning_rate", ""),
            "psi_max": psi.get("psi_max", ""),
            "data": Path(str(r.dataset.get("root", ""))).name or "",
            "images": r.dataset.get("num_samples", ""),
            "finished": time.strftime("%Y-%m-%d %H:%M", time.localtime(r.finished_at)) if r.finished_at else "",
            "checkpoint": r.checkpoint.name,
        })
    columns = ["run", "method", "state", "steps", "batch", "lr", "psi_max", "data", "images", "finished", "checkpoint"]
    return pd.DataFrame(rows, columns=columns)


def gallery_items(
    images: np.ndarray, captions: Sequence[str], *, min_px: int = THUMB_PX
) -> list[tuple[np.ndarray, str]]:
    """``[(upscaled image, caption), ...]`` for a ``gr.Gallery``."""
    return [(upscale(np.asarray(img), min_px), str(cap)) for img, cap in zip(images, captions)]


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _arg(check: Callable, *args: Any) -> Any:
    """Run one :mod:`pogdiff.safety` check; its ValueError becomes a ``gr.Error`` for the client."""
    try:
        return check(*args)
    except ValueError as exc:
        raise gr.Error(str(exc), title="Invalid input") from exc


def upload_key(paths: Sequence[Path]) -> str:
    """``upload-<16 hex>``: a hash of the uploaded files' names and contents (order-free)."""
    digest = hashlib.sha256()
    for p in sorted(paths, key=lambda p: p.name):
        digest.update(p.name.encode() + b"\0")
        with open(p, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        digest.update(b"\0")
    return f"upload-{digest.hexdigest()[:16]}"


def request_owner(request: gr.Request | None) -> str:
    """Who a request comes from: the logged-in user, else the browser session; ``local`` for Python calls."""
    if request is None:
        return "local"
    username = getattr(request, "username", None)
    if username:
        return f"user:{username}"
    return f"session:{getattr(request, 'session_hash', None) or 'anonymous'}"


def clean_temp_folders(older_than_s: float, *, prefixes: Sequence[str] = (EXPORT_TMP_PREFIX,),
                       root: str | Path | None = None) -> int:
    """Remove the app's leftover temp folders (exported zips handed out) older than ``older_than_s``."""
    root = Path(root or tempfile.gettempdir())
    return sum(safety.remove_old_dirs(root, prefix, older_than_s) for prefix in prefixes)


# ================================================================================ state
@dataclass
class DatasetBundle:
    """A loaded image-text set with everything derived from it, built lazily."""

    key: str
    name: str
    ds: Any  # pogdiff.data.ImageTextSet
    table: pd.DataFrame
    summary: dict[str, Any]
    lock: threading.Lock = field(default_factory=threading.Lock)
    # The Neighbours tab's view, prepared by pogdiff.prepare for the preset in view_preset:
    pooled: np.ndarray | None = None  # [N, D] L2-normalised caption vectors of the preset's encoder
    coords: np.ndarray | None = None  # [N, 2] PCA of pooled
    image_feats: np.ndarray | None = None  # [N, F] the features behind s_img
    x0: Any = None  # [N, ...] the images in the preset's diffusion space
    view_preset: str | None = None
    view_encoder: Any = None  # the preset's caption encoder (for free-text search)
    tables: dict[tuple, Any] = field(default_factory=dict)  # PsiConfig fields -> NeighbourTable
    at_resolution: dict[int, Any] = field(default_factory=dict)  # the set reloaded at a model's size
    judge: Any = None  # pogdiff.judge.UserJudge of this set's classes, fitted on first use

    @property
    def subjects(self) -> list[str]:
        return list(self.ds.subjects)

    @property
    def captions(self) -> list[str]:
        return list(self.ds.captions)

    def count_of(self) -> dict[str, int]:
        return dict(zip(self.table["subject"], self.table["count"].astype(int)))

    def few_shot_subjects(self) -> list[str]:
        return list(self.table.loc[self.table["shot"] == "few", "subject"])


@dataclass
class Source:
    """A model checkpoint the Compare tab can load."""

    key: str
    label: str
    checkpoint: Path
    metrics_csv: Path | None = None  # per_class.csv shipped beside a demo checkpoint


class Studio:
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
        key = _arg(safety.text, "dataset key", key, MAX_KEY_CHARS) or DEMO_KEY
        with self._lock:
            found = self._datasets.get(key)
        if found is not None:
            return found
        if key == DEMO_KEY:
            return self._load_demo_bundle()
        if re.fullmatch(UPLOAD_KEY_RE, key) and safety.is_inside(self.upload_store, key) \
                and (self.upload_store / key).is_dir():
            return self._load_stored(key, safety.resolve_inside(self.upload_store, key))
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

    def _load_demo_bundle(self) -> DatasetBundle:
        from pogdiff.data import load_image_text_set

        ds = load_image_text_set(self.demo_root() / "train", self.data_config)
        return self._remember(self._make_bundle(DEMO_KEY, "built-in demo set (train split)", ds))

    def _eval_set(self):
        from pogdiff.data import load_image_text_set

        return load_image_text_set(self.demo_root() / "eval", self.data_config)

    # ============================================================================ Data tab
    def load_demo(self, progress: gr.Progress = gr.Progress()) -> tuple:
        """Build (first time, cached on disk) and load the built-in long-tailed demo set."""
        progress(0.1, desc="Building the demo set (first time only)…")
        bundle = self._load_demo_bundle()
        return self._data_outputs(bundle)

    def load_upload(self, files: Sequence[str] | str | None, request: gr.Request = None,
                    progress: gr.Progress = gr.Progress()) -> tuple:
        """Validate and load an uploaded .zip, or several files (images + metadata / captions).

        Through the app (``request`` set) only files inside gradio's upload folder are read.
        """
        if not files:
            raise gr.Error("Upload a .zip, or several images with a metadata.jsonl / metadata.csv or "
                           ".txt captions, first.", title="Nothing uploaded")
        names = [files] if isinstance(files, (str, Path)) else files
        if not isinstance(names, (list, tuple)):
            raise gr.Error(f"Expected uploaded files, got {type(files).__name__}.", title="Invalid input")
        if len(names) > self.limits.max_upload_files:
            raise gr.Error(f"{len(names)} files uploaded; at most {self.limits.max_upload_files} are accepted. "
                           "Put them in one .zip.", title="Too many files")
        paths = [Path(_arg(safety.text, "uploaded file", str(f) if isinstance(f, Path) else f, 4096)) for f in names]
        if request is not None:
            from gradio.utils import get_upload_folder

            upload_root = get_upload_folder()
            paths = [_arg(safety.resolve_inside, upload_root, p if p.is_absolute() else Path("/") / p)
                     for p in paths]
        missing = [p.name for p in paths if not p.is_file()]
        if missing:
            raise gr.Error(f"Uploaded file(s) not found: {missing[:5]}. Upload them again.", title="Upload missing")
        if len(paths) > 1 and any(p.suffix.lower() == ".zip" for p in paths):
            zips = [p.name for p in paths if p.suffix.lower() == ".zip"]
            raise gr.Error(f"Upload one .zip on its own, or loose files without a .zip (got {zips}).",
                           title="Mixed upload")
        progress(0.05, desc="Hashing the upload…")
        key = upload_key(paths)
        with self._lock:
            known = self._datasets.get(key)
        if known is not None:
            return self._data_outputs(known)
        store = self._store_upload(key, paths)
        progress(0.1, desc="Reading and validating…")
        try:
            bundle = self._load_stored(key, store)
        except gr.Error:
            shutil.rmtree(store, ignore_errors=True)  # keep only sets that loaded
            raise
        return self._data_outputs(bundle)

    # ------------------------------------------------------------------ uploads kept by content hash
    @property
    def upload_store(self) -> Path:
        """Uploaded sets that loaded, one folder per content hash, so a page reload can restore them."""
        return self.runs_dir / UPLOAD_STORE

    def _store_upload(self, key: str, paths: Sequence[Path]) -> Path:
        store = self.upload_store / key
        if store.is_dir():
            os.utime(store)  # in use again: it expires upload_max_age_hours from now
            return store
        self.upload_store.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=UPLOAD_TMP_PREFIX, dir=self.upload_store))
        try:
            for p in paths:
                shutil.copyfile(p, tmp / p.name)
            tmp.rename(store)
        except OSError:
            if not store.is_dir():
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # gone after the rename, or a loser of a race
        self.clean_leftovers()
        return store

    def browser_secret(self) -> str:
        """The key the browser's saved dataset id is encrypted with; kept in the runs folder so it survives restarts."""
        import secrets

        path = self.runs_dir / ".browser-secret"
        try:
            return path.read_text().strip()
        except OSError:
            self.runs_dir.mkdir(parents=True, exist_ok=True)
            path.write_text(secrets.token_hex(32))
            path.chmod(0o600)
            return path.read_text().strip()

    def clean_leftovers(self) -> int:
        """Half-copied uploads (left by a crash), expired uploads and expired exported zips; how many went."""
        max_age = 3600.0 * self.limits.upload_max_age_hours
        return (safety.remove_old_dirs(self.upload_store, UPLOAD_TMP_PREFIX, STALE_UPLOAD_SECONDS)
                + safety.remove_old_dirs(self.upload_store, "upload-", max_age)
                + clean_temp_folders(max_age))

    def _load_stored(self, key: str, store: Path) -> DatasetBundle:
        from pogdiff.data import DatasetError, load_image_text_set

        files = sorted(p for p in store.iterdir() if p.is_file())
        if len(files) == 1 and files[0].suffix.lower() == ".zip":
            source, name = files[0], files[0].name
        else:
            source, name = store, f"{len(files)} uploaded files"
        try:
            ds = load_image_text_set(source, self.data_config)
        except DatasetError as exc:
            report = getattr(exc, "report", None)
            details = report_markdown(report) if report is not None else ""
            raise gr.Error(f"{exc}\n\n{details}".strip(), title="The dataset did not validate",
                           print_exception=False) from exc
        return self._remember(self._make_bundle(key, name, ds))

    def dataset_at(self, bundle: DatasetBundle, resolution: int):
        """The bundle's set at ``resolution`` px, for a model of that size (README "Training options").

        The Data tab loads images at the tiny preset's size; a model of another size (sd15: 512 px)
        gets the set reloaded from its files (the demo's, or the stored upload's), not upscaled
        from the small copy. Kept per bundle (the latest size only).
        """
        if bundle.ds.images.shape[1] == resolution:
            return bundle.ds
        from pogdiff.data import load_image_text_set

        with bundle.lock:
            ds = bundle.at_resolution.get(resolution)
            if ds is None:
                if bundle.key == DEMO_KEY:
                    source = self.demo_root() / "train"
                else:
                    store = self.upload_store / bundle.key
                    if not store.is_dir():
                        raise gr.Error("The uploaded files of this dataset are gone (expired); upload them again.",
                                       title="Upload missing")
                    files = sorted(p for p in store.iterdir() if p.is_file())
                    source = files[0] if len(files) == 1 and files[0].suffix.lower() == ".zip" else store
                cfg = dataclasses.replace(self.data_config, resolution=resolution)
                ds = load_image_text_set(source, cfg)
                bundle.at_resolution = {resolution: ds}
        return ds

    def restore_dataset(self, key: Any) -> tuple:
        """Page load: bring back the dataset this browser loaded before (its key is kept in the browser).

        Only a well-formed key is looked up, inside the upload store; anything else changes nothing.
        """
        if not isinstance(key, str) or not (key == DEMO_KEY or re.fullmatch(UPLOAD_KEY_RE, key)):
            return (gr.skip(),) * 7
        try:
            return self._data_outputs(self.bundle(key))
        except gr.Error:
            logger.info("dataset %s could not be restored", key)
            return (gr.skip(),) * 7

    def _data_outputs(self, bundle: DatasetBundle) -> tuple:
        """key, headline, report, class table, long-tail frame, class dropdown, class gallery."""
        subjects = list(bundle.table["subject"])
        first_few = bundle.few_shot_subjects()
        chosen = first_few[0] if first_few else (subjects[0] if subjects else None)
        headline = (f"**Loaded:** {bundle.name}\n\n"
                    + summary_markdown(bundle.table, len(bundle.captions), bundle.summary))
        rows = bundle.table[["subject", "count", "shot"]].itertuples(index=False)
        choices = [(f"{s} ({c} · {sh})", s) for s, c, sh in rows]
        return (
            bundle.key,
            headline,
            report_markdown(bundle.ds.report),
            bundle.table,
            self.long_tail_frame(bundle),
            gr.Dropdown(choices=choices, value=chosen, interactive=True),
            self.class_gallery(bundle.key, chosen),
        )

    @staticmethod
    def long_tail_frame(bundle: DatasetBundle) -> pd.DataFrame:
        """``rank, subject, count, shot``: one bar per class, most frequent first."""
        frame = bundle.table[["subject", "count", "shot"]].copy()
        frame.insert(0, "rank", np.arange(1, len(frame) + 1))
        return frame

    def class_gallery(self, key: str | None, subject: str | None) -> list[tuple[np.ndarray, str]]:
        """Every image of one class (up to MAX_GALLERY) with its caption."""
        subject = _arg(safety.text, "class", subject, self.limits.max_text_chars)
        if not subject:
            return []
        bundle = self.bundle(key)
        rows = [i for i, s in enumerate(bundle.subjects) if s == subject][:MAX_GALLERY]
        return gallery_items(bundle.ds.images[rows], [bundle.captions[i] for i in rows])

    def dataset_banner(self, key: str | None) -> str:
        """One line naming the dataset the session works on (for the Neighbours / Train tabs)."""
        key = _arg(safety.text, "dataset key", key, MAX_KEY_CHARS)
        with self._lock:
            bundle = self._datasets.get(key or DEMO_KEY)
        if bundle is None:
            return ("Working on the **built-in demo set** (load another one in the **Data** tab)."
                    if not key or key == DEMO_KEY else "Load a dataset in the **Data** tab.")
        return (f"Working on **{bundle.name}**: {len(bundle.captions)} images, {len(bundle.table)} classes, "
                f"{len(bundle.few_shot_subjects())} few-shot.")

    # ======================================================================= Neighbours tab
    def view_preset(self, preset: str | None) -> str:
        """The preset whose preparation the Neighbours tab shows: the Train tab's choice, except
        sd15 on a server without a GPU (it cannot train there), which shows the tiny preset."""
        preset = _arg(safety.choice, "Model preset", preset or "tiny", PRESETS)
        return "tiny" if preset == "sd15" and not self.on_gpu else preset

    def _embed(self, bundle: DatasetBundle, preset: str = "tiny") -> None:
        """Prepare ``bundle`` for the Neighbours tab exactly as training prepares it for ``preset``
        (:func:`pogdiff.prepare.prepare_data`: same caption encoder, same image features, same cache)."""
        with bundle.lock:
            if bundle.pooled is not None and bundle.view_preset == preset:
                return
            from pogdiff import prepare
            from pogdiff.neighbours import pca_2d

            model_cfg = model_preset(preset)  # sd15: the preset's default model id (its CLIP and VAE)
            parts = self._encoder_parts(model_cfg)
            data = prepare.prepare_data(self.dataset_at(bundle, model_cfg.resolution), parts, PsiConfig(),
                                        cache_dir=self.runs_dir / "cache", need_table=False)
            bundle.pooled = data.text.pooled.numpy().astype(np.float32)
            bundle.coords = np.asarray(pca_2d(bundle.pooled), dtype=np.float32)
            bundle.image_feats = data.image_feats
            bundle.x0 = data.x0
            bundle.view_preset, bundle.view_encoder = preset, parts.text_encoder
            bundle.tables = {}

    def _encoder_parts(self, model_cfg):
        from pogdiff import prepare

        if self._view_encoder is not None:  # an injected encoder (tests), for pixel presets
            return prepare.EncoderParts(text_encoder=self._view_encoder)

        with self._lock:
            key = (model_cfg.preset, model_cfg.pretrained, model_cfg.text_encoder, model_cfg.max_caption_tokens)
            parts = self._parts.get(key)
        if parts is None:
            parts = prepare.encoder_parts(model_cfg, device=self.device)
            with self._lock:
                self._parts = {key: parts}  # keep one preset's encoders
        return parts

    def _psi_table(self, bundle: DatasetBundle, psi: PsiConfig, preset: str = "tiny"):
        self._embed(bundle, preset)
        cache_key = tuple(sorted(dataclasses.asdict(psi).items()))
        with bundle.lock:
            table = bundle.tables.get(cache_key)
            if table is None:
                from pogdiff.prepare import neighbour_table

                table = neighbour_table(bundle.pooled, bundle.image_feats, psi, bundle.subjects, clean=bundle.x0,
                                        cache_dir=self.runs_dir / "cache")
                bundle.tables = {cache_key: table}  # keep the latest only
        return table

    def neighbour_map(self, key: str | None, colour_by: str, preset: str | None = "tiny",
                      progress: gr.Progress = gr.Progress()) -> tuple:
        """2-D PCA map of caption embeddings + the caption chooser, prepared as training prepares
        the data for ``preset`` (the Train tab's choice)."""
        colour_by = _arg(safety.choice, "Colour by", colour_by, COLOUR_BY)
        preset = self.view_preset(preset)
        bundle = self.bundle(key)
        if len(bundle.captions) < 2:
            raise gr.Error("The neighbour map needs at least two captions.")
        progress(0.2, desc=f"Encoding captions with the {preset} preset's encoder (first time only)…")
        self._embed(bundle, preset)
        frame = self.map_frame(bundle)
        choices = self.caption_choices(bundle)
        few = [i for i, s in enumerate(bundle.subjects) if s in set(bundle.few_shot_subjects())]
        chosen = few[0] if few else 0
        encoder = "MiniLM caption vectors and pixel features" if preset == "tiny" else \
            "CLIP caption vectors and VAE-latent features"
        return (
            self._scatter(frame, colour_by),
            gr.Dropdown(choices=choices, value=chosen, interactive=True),
            self.dataset_banner(bundle.key) + f" Neighbours and psi as training computes them for the **{preset}** "
            f"preset ({encoder}; the Train tab's preset chooses).",
        )

    def recolour(self, key: str | None, colour_by: str):
        colour_by = _arg(safety.choice, "Colour by", colour_by, COLOUR_BY)
        bundle = self.bundle(key)
        if bundle.coords is None:
            return gr.skip()
        return self._scatter(self.map_frame(bundle), colour_by)

    @staticmethod
    def _scatter(frame: pd.DataFrame, colour_by: str):
        if colour_by == "class frequency":
            # binned class sizes with dark colours: a one-image class is never near-white
            return gr.ScatterPlot(value=frame, color="class size bin", color_map=size_colour_map())
        return gr.ScatterPlot(value=frame, color="shot", color_map=SHOT_COLOURS)

    @staticmethod
    def map_frame(bundle: DatasetBundle) -> pd.DataFrame:
        """One row per caption: rounded coordinates (3 significant digits, as the tooltips show them),
        shot bucket, class size and its bin; the largest classes first so the rarest are drawn on top."""
        counts = bundle.count_of()
        shots = dict(zip(bundle.table["subject"], bundle.table["shot"]))
        frame = pd.DataFrame({
            "x": [round_sig(v) for v in bundle.coords[:, 0]], "y": [round_sig(v) for v in bundle.coords[:, 1]],
            "shot": [shots[s] for s in bundle.subjects],
            "class size": [counts[s] for s in bundle.subjects],
            "class size bin": [size_bin(counts[s]) for s in bundle.subjects],
            "subject": bundle.subjects, "caption": bundle.captions, "row": np.arange(len(bundle.subjects)),
        })
        return frame.sort_values(["class size", "row"], ascending=[False, True], kind="stable").reset_index(drop=True)

    POINT_COLUMNS = ["subject", "class size", "caption", "x", "y", "row"]

    def map_points(self, key: str | None) -> pd.DataFrame:
        """Every point of the map as a table row, rarest class first (a click on a row picks it)."""
        bundle = self.bundle(key)
        if bundle.coords is None:
            return pd.DataFrame(columns=self.POINT_COLUMNS)
        frame = self.map_frame(bundle)
        return frame.sort_values(["class size", "row"], kind="stable")[self.POINT_COLUMNS].reset_index(drop=True)

    def map_band(self, key: str | None, evt: gr.SelectData) -> tuple:
        """A band brushed on the map (the plot reports its x interval, not a point): its points,
        rarest first, and the rarest one picked."""
        bundle = self.bundle(key)
        if bundle.coords is None:
            return gr.skip(), gr.skip()
        try:
            band = points_in_band(self.map_frame(bundle), evt.index)
        except ValueError as exc:
            logger.info("ignored a map selection: %s", exc)
            return gr.skip(), gr.skip()
        if band.empty:
            return band[self.POINT_COLUMNS], gr.skip()
        return band[self.POINT_COLUMNS], int(band.iloc[0]["row"])

    @staticmethod
    def caption_choices(bundle: DatasetBundle) -> list[tuple[str, int]]:
        counts = bundle.count_of()
        return [(f"{c}  [{counts[s]} img]", i) for i, (c, s) in enumerate(zip(bundle.captions, bundle.subjects))]

    def neighbours_of(
        self, key: str | None, row: int | None, k: int, psi_max: float, pool: str, preset: str | None = "tiny",
    ) -> tuple[str, pd.DataFrame, list]:
        """The k nearest captions of one caption, with similarity, psi and its factors, from the
        neighbour table training builds for ``preset`` with these settings."""
        preset = self.view_preset(preset)
        if row is None or row == "":
            return "Pick a caption above.", pd.DataFrame(), []
        bundle = self.bundle(key)
        row = _arg(safety.whole_number, "caption index", row, 0, len(bundle.captions) - 1)
        L = self.limits
        psi_cfg = PsiConfig(k=_arg(safety.whole_number, "k (neighbours)", k, 1, L.max_k),
                            psi_max=_arg(safety.real_number, "psi_max", psi_max, 0.0, L.max_psi_max),
                            pool=_arg(safety.choice, "Neighbour pool", pool, POOLS))
        table = self._psi_table(bundle, psi_cfg, preset)
        counts = bundle.count_of()
        subj = bundle.subjects[row]
        w = float(np.asarray(table.w_density).reshape(len(bundle.captions), -1)[row].mean())
        rows = []
        for j in range(table.indices.shape[1]):
            nb = int(table.indices[row, j])
            if nb < 0:
                continue
            rows.append({
                "image": thumbnail_markdown(bundle.ds.images[nb]),
                "rank": j + 1, "caption": bundle.captions[nb], "subject": bundle.subjects[nb],
                "class size": counts[bundle.subjects[nb]],
                "s_txt": float(table.s_txt[row, j]), "s_img": float(table.s_img[row, j]),
                "w_density": w, "psi": float(table.psi[row, j]),
                "p(draw)": float(table.probs[row, j]),
                "informative": bool(table.psi[row, j] > psi_cfg.psi_threshold and bundle.subjects[nb] != subj),
                "row": nb,
            })
        for r in rows:  # 3 significant digits, as the tooltips
            for col in ("s_txt", "s_img", "w_density", "psi", "p(draw)"):
                r[col] = round_sig(r[col])
        frame = pd.DataFrame(rows, columns=["image", "rank", "caption", "subject", "class size", "s_txt",
                                            "s_img", "w_density", "psi", "p(draw)", "informative", "row"])
        images = [bundle.ds.images[row]] + [bundle.ds.images[r] for r in frame["row"]]
        labels = [f"query · {bundle.captions[row]}"] + [
            f"#{r.rank} psi={r.psi:.2f} · {r.caption}" for r in frame.itertuples()
        ]
        mean_psi = float(frame["psi"].mean()) if len(frame) else 0.0
        head = (f"**{bundle.captions[row]}** — subject *{subj}* with {counts[subj]} training images "
                f"({shot_bucket(counts[subj], self.data_config)}-shot). w_density = **{w:.3f}**, "
                f"mean psi over its {len(frame)} neighbours = **{mean_psi:.3f}**. "
                "psi = psi_max × w_density × s_img × s_txt: how much this sample borrows from each neighbour. "
                + ("**Its neighbours are informative**: at least one shows another subject with psi above "
                   f"{psi_cfg.psi_threshold:g}." if frame["informative"].any() else
                   "**No informative neighbour**: every neighbour either is a rewording of the same subject "
                   "(it predicts what this caption predicts) or has psi below "
                   f"{psi_cfg.psi_threshold:g}, so PoGDiff leaves this caption's target as it is. "
                   "Try the 'other_class' pool."))
        return head, frame, gallery_items(np.stack(images), labels)

    def hop(self, key: str | None, frame: pd.DataFrame, evt: gr.SelectData):
        """Clicking a neighbour row makes it the query."""
        try:
            row_idx = evt.index[0] if isinstance(evt.index, (list, tuple)) else int(evt.index)
            return int(pd.DataFrame(frame).iloc[row_idx]["row"])
        except (KeyError, IndexError, ValueError, TypeError):
            return gr.skip()

    def search(self, key: str | None, query: str, k: int, preset: str | None = "tiny") -> tuple[pd.DataFrame, list]:
        """Nearest training captions of a free-text query (cosine of the preset's caption vectors)."""
        preset = self.view_preset(preset)
        query = _arg(safety.text, "Query", query, self.limits.max_text_chars).strip()
        k = _arg(safety.whole_number, "k (neighbours)", k, 1, self.limits.max_k)
        if not query:
            raise gr.Error("Type a caption to search for, e.g. 'a photo of someone smiling, wearing glasses'.")
        bundle = self.bundle(key)
        self._embed(bundle, preset)
        from pogdiff.neighbours import knn

        q = bundle.view_encoder.encode([query]).pooled
        q = q.detach().cpu().numpy() if hasattr(q, "detach") else np.asarray(q)
        k = max(1, min(int(k), len(bundle.captions)))
        sims, idx = knn(bundle.pooled, k, exclude_self=False, queries=q.astype(np.float32))
        counts = bundle.count_of()
        rows = [{"rank": j + 1, "similarity": round(float(sims[0, j]), 3), "caption": bundle.captions[int(i)],
                 "subject": bundle.subjects[int(i)], "class size": counts[bundle.subjects[int(i)]], "row": int(i)}
                for j, i in enumerate(idx[0]) if int(i) >= 0]
        frame = pd.DataFrame(rows, columns=["rank", "similarity", "caption", "subject", "class size", "row"])
        items = gallery_items(bundle.ds.images[list(frame["row"])],
                              [f"{r.similarity:.2f} · {r.caption}" for r in frame.itertuples()])
        return frame, items

    # ============================================================================ Train tab
    def preset_defaults(self, preset: str) -> tuple:
        """Batch size, learning rate and model-id visibility for a preset."""
        preset = _arg(safety.choice, "Model preset", preset, PRESETS)
        cfg = train_preset(preset)
        model = model_preset(preset)
        return (
            gr.Number(value=cfg.batch_size),
            gr.Number(value=cfg.learning_rate),
            gr.Textbox(visible=preset == "sd15", value=model.pretrained if preset == "sd15" else ""),
        )

    def build_configs(
        self, method: str, preset: str, pretrained: str, steps: float, batch_size: float, lr: float,
        psi_max: float, k: float, use_density: bool, use_image_sim: bool, use_text_sim: bool,
        pool: str, sample_every: float, seed: float,
    ):
        """UI values -> (ModelConfig, TrainConfig); gr.Error naming any bad value.

        Every value is checked on the server against :attr:`limits` (README "Limits and safety").
        """
        L = self.limits
        method = _arg(safety.choice, "Method", method, METHODS)
        preset = _arg(safety.choice, "Model preset", preset, PRESETS)
        pretrained = _arg(safety.text, "Model id", pretrained, L.max_text_chars)
        steps_i = _arg(safety.whole_number, "Steps", steps, 1, L.max_steps)
        batch_i = _arg(safety.whole_number, "Batch size", batch_size, 1, L.max_batch_size)
        k_i = _arg(safety.whole_number, "k (neighbours)", k, 1, L.max_k)
        every = _arg(safety.whole_number, "Preview every", sample_every or 0, 0, L.max_steps)
        seed_i = _arg(safety.whole_number, "Seed", seed or 0, 0, L.max_seed)
        if lr is not None and not isinstance(lr, bool) and isinstance(lr, (int, float)) and lr <= 0:
            raise gr.Error(f"Learning rate must be positive, got {lr!r}.", title="Invalid input")
        lr = _arg(safety.real_number, "Learning rate", lr, 0.0, L.max_learning_rate, True)
        flags = [_arg(safety.flag, n, v) for n, v in (("w_density", use_density), ("s_img", use_image_sim),
                                                      ("s_txt", use_text_sim))]
        use_density, use_image_sim, use_text_sim = flags
        pool = _arg(safety.choice, "Neighbour pool", pool, POOLS)
        overrides = {}
        if preset == "sd15":
            if not (pretrained or "").strip():
                raise gr.Error("The sd15 preset needs a diffusers model id or a local folder.")
            overrides["pretrained"] = self._pretrained(pretrained.strip())
        try:  # psi_max and every other value: checked once, by configs_from_options
            return configs_from_options(
                method=method, preset=preset, pretrained=overrides.get("pretrained"), steps=steps_i,
                batch_size=batch_i, lr=float(lr), seed=seed_i, sample_every=every,
                psi_max=psi_max,
                k=k_i, use_density=bool(use_density), use_image_sim=bool(use_image_sim),
                use_text_sim=bool(use_text_sim), neighbour_pool=str(pool),
                checkpoint_every=max(train_preset(preset).checkpoint_every, steps_i),
                warmup_steps=min(train_preset(preset).warmup_steps, max(0, steps_i // 10)), limits=L,
            )
        except ValueError as exc:
            raise gr.Error(str(exc), title="Invalid input") from exc

    def _pretrained(self, value: str) -> str:
        """A hub id (``org/name``); a local folder only in single-user mode."""
        import re

        if self.single_user or re.fullmatch(HUB_ID_RE, value) and not Path(value).exists():
            return value
        raise gr.Error(f"{value!r} is not a Hugging Face model id (org/name). Local folders are accepted only "
                       "when the server runs in single-user mode (python app.py --single-user).",
                       title="Invalid input")

    def base_checkpoint(self, preset: str) -> Path | None:
        base = self.shipped_dir / "base-tiny"
        return base if preset == "tiny" and (base / "configs.json").exists() else None

    def preview_captions(self, bundle: DatasetBundle, n: int = 4) -> list[str]:
        """One training caption for each of the ``n`` rarest classes."""
        rare = list(bundle.table.sort_values(["count", "subject"])["subject"][:n])
        first = {}
        for cap, s in zip(bundle.captions, bundle.subjects):
            first.setdefault(s, cap)
        return [first[s] for s in rare]

    def start_training(
        self, key: str | None, method: str, preset: str, pretrained: str, steps: float, batch_size: float,
        lr: float, psi_max: float, k: float, use_density: bool, use_image_sim: bool, use_text_sim: bool,
        pool: str, sample_every: float, seed: float, run_name: str = "", from_scratch: bool = False,
        request: gr.Request = None,
    ) -> tuple:
        """Start a background training job owned by the requesting session; the Timer shows its progress.

        ``run_name`` (optional) names the run folder; empty gives a dated name. ``from_scratch``
        trains the tiny preset from a random UNet instead of the shipped face base.
        """
        from_scratch = _arg(safety.flag, "Train from scratch", False if from_scratch is None else from_scratch)
        run_name = _arg(safety.text, "Run name", run_name or "", self.limits.max_text_chars).strip()
        if run_name:
            run_name = _arg(safety.check_run_name, run_name)
        model_cfg, train_cfg = self.build_configs(method, preset, pretrained, steps, batch_size, lr, psi_max, k,
                                                  use_density, use_image_sim, use_text_sim, pool,
                                                  sample_every, seed)
        if train_cfg.method == "pogdiff" and not (train_cfg.psi.use_density or train_cfg.psi.use_image_sim
                                                   or train_cfg.psi.use_text_sim) and train_cfg.psi.psi_max > 0:
            gr.Warning("All psi factors are off: every sample borrows psi_max from its neighbour.")
        if model_cfg.preset == "sd15" and not self.on_gpu:
            raise gr.Error("The sd15 preset needs a GPU; this server has none. Use the tiny preset on CPU.")
        bundle = self.bundle(key)
        from pogdiff.training import check_train_config

        try:
            check_train_config(train_cfg, len(bundle.captions))
        except ValueError as exc:
            raise gr.Error(str(exc), title="Invalid training options") from exc
        base = None if from_scratch else self.base_checkpoint(model_cfg.preset)
        dataset = self.dataset_at(bundle, model_cfg.resolution)  # sd15: the set at 512 px
        try:
            self.jobs.start(
                dataset, model_cfg, train_cfg, base_checkpoint=base,
                preview_captions=self.preview_captions(bundle) if train_cfg.sample_every else None,
                cache_dir=self.runs_dir / "cache", owner=request_owner(request), run_name=run_name or None,
            )
        except JobBusyError as exc:
            raise gr.Error(str(exc), title="Busy") from exc
        except ValueError as exc:
            raise gr.Error(str(exc), title="Cannot start") from exc
        if base is None and model_cfg.preset == "tiny" and not from_scratch:
            gr.Info("No shipped base checkpoint (checkpoints/base-tiny) yet: training starts from a random UNet.")
        return self.poll(-1, request)

    def resume_training(self, key: str | None, name: str | None, request: gr.Request = None) -> tuple:
        """Continue an interrupted or stopped run of this server on the loaded dataset."""
        if not name:
            raise gr.Error("Pick an interrupted or stopped run in the list first.", title="No run")
        try:
            info = self.jobs.get_run(name)
        except ValueError as exc:
            raise gr.Error(str(exc), title="No such run") from exc
        if not self.may_control(info.owner, request):
            raise gr.Error("This run was started by another visitor: you can compare it but not resume it.",
                           title="Not your run")
        bundle = self.bundle(key)
        resolution = int((info.model_cfg or {}).get("resolution") or bundle.ds.images.shape[1])
        try:
            self.jobs.resume(info, self.dataset_at(bundle, resolution), owner=request_owner(request),
                             cache_dir=self.runs_dir / "cache")
        except JobBusyError as exc:
            raise gr.Error(str(exc), title="Busy") from exc
        except ValueError as exc:
            raise gr.Error(str(exc), title="Cannot resume") from exc
        return self.poll(-1, request)

    def stop_training(self, request: gr.Request = None) -> tuple:
        """Stop the running job: only its owner may, unless the server is single-user."""
        status = self.jobs.status()
        if status.busy and not self.may_control(status.owner, request):
            raise gr.Error("This training job was started by another visitor: you can watch it but not stop it.",
                           title="Not your job")
        if not self.jobs.stop():
            gr.Info("No training job is running.")
        return self.poll(-1, request)

    def poll(self, seen_version: int | None = None, request: gr.Request = None) -> tuple:
        """Timer tick: status, progress, loss curve, previews, button states, runs (when changed).

        Returns ``gr.skip()`` for every output when nothing changed since ``seen_version``.
        """
        s = self.jobs.status()
        if not isinstance(seen_version, int) or isinstance(seen_version, bool):
            seen_version = -1
        if seen_version is not None and seen_version >= 0 and s.version == seen_version:
            return (gr.skip(),) * 8
        runs_changed = seen_version is None or seen_version < 0 or (not s.busy and s.version != seen_version)
        preview = (gallery_items(s.preview_images, [f"step {s.preview_step} · {c}" for c in s.preview_captions],
                                 min_px=128)
                   if s.preview_images is not None else [])
        loss = loss_frame(s.history)
        return (
            status_markdown(s),
            progress_html(s),
            loss if len(loss) else None,  # an empty frame would freeze the plot's colour scale
            preview,
            gr.Button(interactive=not s.busy),
            gr.Button(interactive=s.state == "running" and self.may_control(s.owner, request)),
            self.runs_update() if runs_changed else gr.skip(),
            s.version,
        )

    def runs_update(self):
        runs = self.jobs.list_runs()
        return gr.Dropdown(choices=[(f"{r.name} · {r.method} · {r.steps_done} steps", r.name) for r in runs],
                           value=runs[0].name if runs else None)

    def runs_table(self) -> pd.DataFrame:
        return runs_frame(self.jobs.list_runs())

    def export_run(self, name: str | None, request: gr.Request = None) -> str:
        """Path of a zip of the run's last checkpoint (weights + configs) and its run.json.

        ``name`` is a run folder name, nothing else; runs started by another visitor are not
        exported unless the server is single-user. The zip handed back is a copy in a fresh temp
        folder, so the runs folder itself is never served.
        """
        if not name:
            raise gr.Error("Pick a finished run first.")
        name = _arg(safety.check_run_name, name)
        try:
            info = self.jobs.get_run(name)
            if not self.may_control(info.owner, request):
                raise gr.Error(f"Run {name!r} was started by another visitor; only they can download it.",
                               title="Not your run")
            zip_path = self.jobs.export_zip(info)
        except ValueError as exc:
            raise gr.Error(str(exc)) from exc
        self.clean_leftovers()
        out = Path(tempfile.mkdtemp(prefix=EXPORT_TMP_PREFIX)) / zip_path.name
        shutil.copyfile(zip_path, out)
        return str(out)

    def export_weights(self, name: str | None, request: gr.Request = None) -> str:
        """Path of the run's weights alone (fp16 UNet for tiny, LoRA for sd15), in a fresh temp folder."""
        if not name:
            raise gr.Error("Pick a finished run first.")
        name = _arg(safety.check_run_name, name)
        try:
            info = self.jobs.get_run(name)
            if not self.may_control(info.owner, request):
                raise gr.Error(f"Run {name!r} was started by another visitor; only they can download it.",
                               title="Not your run")
            path = self.jobs.export_weights(info)
        except ValueError as exc:
            raise gr.Error(str(exc)) from exc
        self.clean_leftovers()
        out = Path(tempfile.mkdtemp(prefix=EXPORT_TMP_PREFIX)) / path.name
        shutil.copyfile(path, out)
        return str(out)

    # ---------------------------------------------------------------- Train tab: form, previews, time
    TRAIN_FORM = ("method", "preset", "pretrained", "steps", "batch_size", "lr", "psi_max", "k", "use_density",
                  "use_image_sim", "use_text_sim", "pool", "sample_every", "seed", "from_scratch")

    def restore_train_form(self) -> tuple:
        """The Train form's values (:attr:`TRAIN_FORM` order) as the running or last job set them (its
        ``run.json``), then a note naming that run; ``gr.skip()`` for all when there is no readable run."""
        meta = self.jobs.run_meta()
        values = form_values(meta, base_available=self.base_checkpoint("tiny") is not None) if meta else None
        if values is None:
            return (gr.skip(),) * (len(self.TRAIN_FORM) + 1)
        out = [values[f] for f in self.TRAIN_FORM]
        out[self.TRAIN_FORM.index("pretrained")] = gr.Textbox(value=values["pretrained"],
                                                              visible=values["preset"] == "sd15")
        state = "running" if self.jobs.status().busy and self.jobs.current() is not None else meta.get("state", "")
        note = f"The form shows the settings of run **{meta.get('name', '?')}** ({state}); the run name is left empty."
        return (*out, note)

    def _previews(self, name: str | None):
        name = _arg(safety.text, "Run", name or "", self.limits.max_text_chars).strip()
        if name:
            name = _arg(safety.check_run_name, name)
        try:
            return self.jobs.previews(name or None)
        except ValueError as exc:  # a folder outside the runs folder
            raise gr.Error(str(exc), title="No such run") from exc

    def preview_runs(self):
        """Choices of the preview history: the current (or last) job, then every run with a checkpoint."""
        runs = self.jobs.list_runs()
        return gr.Dropdown(choices=[("current or last job", "")] + [(r.name, r.name) for r in runs], value="")

    def preview_history(self, name: str | None = None) -> tuple:
        """Step slider over run ``name``'s saved previews (empty: the current or last job), the newest
        preview's images, and a line saying what is shown."""
        previews = self._previews(name)
        if not previews:
            return (gr.Slider(minimum=0, maximum=1, value=0, step=1, interactive=False, label="Preview step"), [],
                    "No previews saved for this run (Preview every = 0, or no preview step reached yet).")
        steps = [p.step for p in previews]
        gap = min((b - a for a, b in zip(steps, steps[1:])), default=1)
        slider = gr.Slider(minimum=steps[0], maximum=max(steps[-1], steps[0] + 1), step=gap, value=steps[-1],
                           interactive=len(steps) > 1, label=f"Preview step ({len(steps)} saved)")
        return slider, preview_items(previews[-1]), preview_note(steps, steps[-1])

    def preview_at(self, name: str | None, step: float) -> tuple:
        """The saved preview nearest to ``step`` (the earlier one on a tie) and its note."""
        previews = self._previews(name)
        if not previews:
            return [], "No previews saved for this run."
        step = _arg(safety.real_number, "Preview step", step if step is not None else 0, 0, float(self.limits.max_steps))
        best = min(previews, key=lambda p: (abs(p.step - step), p.step))
        return preview_items(best), preview_note([p.step for p in previews], best.step)

    def recorded_estimate(self, method: str, preset: str, steps: float, batch_size: float) -> str:
        """A time estimate from the step time the newest run with the same settings recorded, or a line
        saying there is none yet."""
        try:
            method = safety.choice("Method", method, METHODS)
            preset = safety.choice("Model preset", preset, PRESETS)
            steps_i = safety.whole_number("Steps", steps, 1, self.limits.max_steps)
            batch_i = safety.whole_number("Batch size", batch_size, 1, self.limits.max_batch_size)
        except ValueError as exc:
            return f"No time estimate: {exc}"
        found = self.jobs.recorded_step_time(preset=preset, method=method, batch_size=batch_i,
                                             resolution=model_preset(preset).resolution)
        if found is None:
            return (f"No run of this server with {method} / {preset} / batch {batch_i} recorded its step time yet: "
                    "**Estimate time** measures it.")
        return estimate_markdown(found, steps_i)

    def estimate_time(
        self, key: str | None, method: str, preset: str, pretrained: str, steps: float, batch_size: float,
        lr: float, psi_max: float, k: float, use_density: bool, use_image_sim: bool, use_text_sim: bool,
        pool: str, sample_every: float, seed: float, run_name: str = "", from_scratch: bool = False,
        request: gr.Request = None,
    ) -> str:
        """Measure the step time on the loaded data with the form's settings (3 real steps in a scratch
        folder, the last 2 timed) and return the estimate for the whole run. Refused while a job runs."""
        from_scratch = _arg(safety.flag, "Train from scratch", False if from_scratch is None else from_scratch)
        model_cfg, train_cfg = self.build_configs(method, preset, pretrained, steps, batch_size, lr, psi_max, k,
                                                  use_density, use_image_sim, use_text_sim, pool,
                                                  sample_every, seed)
        if model_cfg.preset == "sd15" and not self.on_gpu:
            raise gr.Error("The sd15 preset needs a GPU; this server has none. Use the tiny preset on CPU.")
        bundle = self.bundle(key)
        from pogdiff.training import check_train_config

        try:
            check_train_config(train_cfg, len(bundle.captions))
        except ValueError as exc:
            raise gr.Error(str(exc), title="Invalid training options") from exc
        base = None if from_scratch else self.base_checkpoint(model_cfg.preset)
        try:
            measured = self.jobs.time_steps(self.dataset_at(bundle, model_cfg.resolution), model_cfg, train_cfg,
                                            base_checkpoint=base, cache_dir=self.runs_dir / "cache")
        except JobBusyError as exc:
            raise gr.Error(f"{exc} The estimate is measured with the processor to itself.", title="Busy") from exc
        return estimate_markdown(measured, train_cfg.max_steps, where=self.where())

    def where(self) -> str:
        """The machine in words, for measured figures: device and, on CPU, cores and load average."""
        if self.on_gpu:
            import torch

            return f"GPU {torch.cuda.get_device_name(0)}"
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        return f"{os.cpu_count()} CPU cores, load average {load:.1f} before the trial"

    # ========================================================================== Compare tab
    def sources(self) -> list[Source]:
        """Shipped demo checkpoints first, then finished runs, newest first."""
        found = []
        for method, folder in SHIPPED_RUNS.items():
            ckpt = self._checkpoint_in(self.shipped_dir / folder)
            if ckpt is not None:
                csv = self.shipped_dir / folder / "per_class.csv"
                found.append(Source(f"shipped:{folder}", f"shipped · {folder} ({method}, demo set)", ckpt,
                                    metrics_csv=csv if csv.is_file() else None))
        for run in self.jobs.list_runs():
            found.append(Source(f"run:{run.name}", f"run · {run.name} ({run.method}, {run.steps_done} steps)",
                                run.checkpoint))
        return found

    @staticmethod
    def _checkpoint_in(folder: Path) -> Path | None:
        if (folder / "configs.json").exists():
            return folder
        if folder.is_dir():
            from pogdiff.checkpoints import latest_checkpoint

            found = latest_checkpoint(folder)
            return Path(found) if found else None
        return None

    def shipped_note(self) -> str:
        missing = [f for f in SHIPPED_RUNS.values() if self._checkpoint_in(self.shipped_dir / f) is None]
        if not missing:
            return ("Defaults: the shipped **demo-baseline** and **demo-pogdiff** checkpoints, fine-tuned from the "
                    "same base on the demo set with the same steps and seeds.")
        return ("**Not there yet:** the shipped comparison checkpoints "
                "(`checkpoints/demo-baseline`, `checkpoints/demo-pogdiff`) "
                "are not there yet. Make them with `python -m pogdiff bench quality --ship checkpoints`, "
                "or train two runs in the **Train** tab (method *baseline*, then *pogdiff*, same steps) and pick "
                "them here.")

    def compare_choices(self, current_a: Any = None, current_b: Any = None) -> tuple:
        """Dropdown A, dropdown B (defaults: shipped baseline vs pogdiff) and the note.

        A current choice that is still in the list is kept (a tab switch or refresh keeps A and B).
        """
        sources = self.sources()
        choices = [(s.label, s.key) for s in sources]
        keys = [s.key for s in sources]
        newest = keys[0] if keys else None
        a = "shipped:demo-baseline" if "shipped:demo-baseline" in keys else (keys[1] if len(keys) > 1 else newest)
        b = "shipped:demo-pogdiff" if "shipped:demo-pogdiff" in keys else newest
        a = current_a if isinstance(current_a, str) and current_a in keys else a
        b = current_b if isinstance(current_b, str) and current_b in keys else b
        return (gr.Dropdown(choices=choices, value=a), gr.Dropdown(choices=choices, value=b), self.shipped_note())

    def prompt_choices(self, key: str | None, current: Any = None) -> Any:
        """One prompt per class (rarest first); few-shot ones pre-selected, or the current selection kept."""
        bundle = self.bundle(key)
        template = self.data_config.caption_template
        table = bundle.table.sort_values(["count", "subject"])
        choices = [template.format(subject=s) for s in table["subject"]]
        selected = [template.format(subject=s) for s in table.loc[table["shot"] == "few", "subject"]][:6]
        L = self.limits
        try:
            kept = safety.text_list("Prompts", current, L.max_prompts, L.max_text_chars)
        except ValueError:
            kept = []
        if not any(p in choices for p in kept):  # another dataset was loaded since: its defaults
            kept = []
        return gr.Dropdown(choices=choices, value=kept or selected or choices[:4], multiselect=True,
                           allow_custom_value=True)

    def _source(self, key: str | None) -> Source:
        for s in self.sources():
            if isinstance(key, str) and s.key == key:
                return s
        key = key[:80] if isinstance(key, str) else key
        raise gr.Error(f"Checkpoint {key!r} is not available. {self.shipped_note() if not key else ''}".strip(),
                       title="Pick two checkpoints")

    def _model(self, source: Source):
        cache_key = f"{source.checkpoint}:{source.checkpoint.stat().st_mtime if source.checkpoint.exists() else 0}"
        with self._lock:
            model = self._models.get(cache_key)
            if model is not None:
                self._models.move_to_end(cache_key)
                return model
        from pogdiff import checkpoints

        model = checkpoints.load_model(source.checkpoint, device=self.device)
        with self._lock:
            self._models[cache_key] = model
            while len(self._models) > MAX_CACHED_MODELS:
                self._models.popitem(last=False)
        return model

    def generate_pair(
        self, key_a: str, key_b: str, prompts: Sequence[str] | None, custom: str, n_seeds: float,
        guidance: float, sample_steps: float, progress: gr.Progress = gr.Progress(), request: gr.Request = None,
    ) -> tuple:
        """Same prompts, same seeds, two checkpoints: a slider for the first pair and two grids.

        The images are also kept for :meth:`pair_views` (real images, difference) of the same session.
        """
        L = self.limits
        prompts = _arg(safety.text_list, "Prompts", prompts, L.max_prompts, L.max_text_chars)
        custom = _arg(safety.text, "Typed prompts", custom, L.max_prompts * (L.max_text_chars + 1))
        typed = _arg(parse_typed_prompts, custom, L.max_prompts, L.max_text_chars)
        captions = [p for p in prompts if p.strip()] + typed
        if not captions:
            raise gr.Error("Pick at least one prompt, or type one.")
        n_seeds = _arg(safety.whole_number, "Seeds per prompt", n_seeds, 1, L.max_seeds)
        guidance = _arg(safety.real_number, "Guidance scale", guidance, 0.0, L.max_guidance)
        sample_steps = _arg(safety.whole_number, "Sampling steps", sample_steps, 1, L.max_sample_steps)
        if len(captions) > L.max_prompts or len(captions) * n_seeds > L.max_images:
            raise gr.Error(f"{len(captions)} prompt(s) × {n_seeds} seed(s) = {len(captions) * n_seeds} images per "
                           f"checkpoint; the limit is {L.max_prompts} prompts and {L.max_images} images.",
                           title="Too many images")
        a, b = self._source(key_a), self._source(key_b)
        seeds = list(range(n_seeds))
        # Grid: one column per prompt, one row per seed.
        all_caps = [c for _ in seeds for c in captions]
        all_seeds = [s for s in seeds for _ in captions]
        cfg = SampleConfig(steps=int(sample_steps), guidance_scale=float(guidance))
        from pogdiff.sampling import generate, image_grid

        outs = []
        for i, src in enumerate((a, b)):
            progress(0.0 + 0.5 * i, desc=f"Loading {src.label}…")
            model = self._model(src)

            def cb(done: int, total: int, i: int = i, src: Source = src) -> None:
                progress(0.5 * i + 0.5 * done / max(1, total), desc=f"Sampling {src.label}")

            outs.append(generate(model, all_caps, all_seeds, cfg, callback=cb))
        labels = [f"{short_prompt(c)} · seed {s}" for c, s in zip(all_caps, all_seeds)]
        grid_scale = max(1, 96 // outs[0].shape[1])
        grids = [image_grid(o, ncols=len(captions), labels=labels, scale=grid_scale) for o in outs]
        pair = (upscale(outs[0][0], SLIDER_PX), upscale(outs[1][0], SLIDER_PX))
        note = (f"Left / first grid: **{a.label}**. Right / second grid: **{b.label}**. "
                f"{len(captions)} prompt(s) × seeds {seeds}; the slider shows *{captions[0]}*, seed 0.")
        with self._lock:
            self._pair_stash[self._stash_key(request)] = dict(
                a=outs[0], b=outs[1], captions=captions, scale=grid_scale, outputs=(pair, grids[0], grids[1], note))
            while len(self._pair_stash) > MAX_CACHED_DATASETS * 4:
                self._pair_stash.popitem(last=False)
        return pair, grids[0], grids[1], note

    def _evaluator_or_error(self):
        with self._lock:
            if self._evaluator is not None:
                return self._evaluator
        folder = self.shipped_dir / "evaluator"
        from pogdiff.evaluator import load_evaluator

        if not folder.exists():
            raise gr.Error("The identity evaluator (checkpoints/evaluator) is not there yet; make it with "
                           "`python -m pogdiff build evaluator`.", title="No evaluator")
        evaluator = load_evaluator(folder)
        with self._lock:
            self._evaluator = evaluator
        return evaluator

    def precomputed_metrics(self, key_a: str | None, key_b: str | None) -> tuple:
        """Per-class tables shipped beside the demo checkpoints (``per_class.csv``), if any."""
        tables = {}
        shipped = {s.key: s for s in self.sources() if s.metrics_csv is not None}  # looked up by id, never a path
        for key in (key_a, key_b):
            source = shipped.get(key) if isinstance(key, str) else None
            if source is not None:
                tables[_short(source)] = pd.read_csv(source.metrics_csv)
        if len(tables) < 2:
            return gr.skip(), gr.skip(), gr.skip()
        return self._metric_outputs(tables, note="Precomputed at build time on the demo evaluation split "
                                                 "(press **Compute metrics** to recompute).")

    def compute_metrics(self, key_a: str, key_b: str, full: bool = False, key: str | None = None,
                        progress: gr.Progress = gr.Progress()) -> tuple:
        """Generate images with each checkpoint and score them per class of the loaded data set.

        On the demo set (``key`` empty or the demo): the demo's held-out captions, judged by the
        shipped evaluator. ``full=False`` (fast, the default): the quality benchmark's protocol, 4
        captions per class, so the shipped demo numbers come out again; ``full=True``: all 8.
        On a user's set: up to 4 (fast) or 8 (full) of each class's own captions, judged by a
        classifier fitted on the set's images, whose held-out reliability is shown per class
        (:mod:`pogdiff.judge`). Results are cached per checkpoint weights, data and mode
        (README "Compare").
        """
        from pogdiff import bench

        a, b = self._source(key_a), self._source(key_b)
        mode = "full" if _arg(safety.flag, "Full evaluation", False if full is None else full) else "fast"
        key = _arg(safety.text, "dataset key", key, MAX_KEY_CHARS) if key is not None else None
        if key and key != DEMO_KEY:
            return self._own_data_metrics(a, b, mode, self.bundle(key), progress)
        evaluator = self._evaluator_or_error()
        progress(0.02, desc="Loading the demo evaluation split…")
        eval_set = bench.metric_eval_set(self._eval_set(), mode)
        counts = self._load_demo_bundle().count_of()
        tables, cached = {}, 0
        for i, src in enumerate((a, b)):
            path = self._metrics_cache_path(src, mode, eval_set)
            if path.is_file():
                tables[_short(src)] = pd.read_csv(path)
                cached += 1
                continue
            progress(0.05 + 0.45 * i, desc=f"Generating and scoring {src.label} ({len(eval_set.captions)} images)…")
            table, _summary, _images = bench.evaluate_model(self._model(src), eval_set, evaluator, counts)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            table.to_csv(tmp, index=False)
            os.replace(tmp, path)
            tables[_short(src)] = table
        progress(1.0, desc="Done")
        per_class = bench.METRIC_MODES[mode]
        what = f"{per_class} held-out captions per class" if per_class else "every held-out caption"
        note = (f"Computed on the demo evaluation split ({mode} mode: {what}, {len(eval_set.captions)} images "
                f"per model, fixed seeds)" + (f"; {cached} of 2 read from the cache." if cached else "."))
        return self._metric_outputs(tables, note=note)

    OWN_PER_CLASS = {"fast": 4, "full": 8}  # captions per class of a user's set that A and B draw

    def judge_for(self, bundle: DatasetBundle, progress: Callable | None = None):
        """The classifier of ``bundle``'s own classes (fitted once per loaded set, kept with it)."""
        from pogdiff.judge import UserJudge

        with bundle.lock:
            if bundle.judge is None:
                if progress is not None:
                    progress(0.03, desc=f"Fitting a judge of the {bundle.ds.classes.__len__()} classes on "
                                        f"{len(bundle.ds)} real images…")
                folder = self.shipped_dir / "evaluator"
                backbone = self._evaluator_or_error() if folder.exists() else None
                try:
                    bundle.judge = UserJudge(backbone=backbone).fit(bundle.ds.images, bundle.subjects)
                except ValueError as exc:
                    raise gr.Error(str(exc), title="Cannot judge this data set") from exc
            return bundle.judge

    def _own_data_metrics(self, a: Source, b: Source, mode: str, bundle: DatasetBundle, progress) -> tuple:
        from pogdiff import bench, judge as judging

        judge = self.judge_for(bundle, progress)
        per_class = self.OWN_PER_CLASS[mode]
        counts = bundle.count_of()
        digest = judging.dataset_digest(bundle.ds.images, bundle.captions, bundle.subjects)
        tables, cached = {}, 0
        n_images = len(judging.prompt_rows(bundle.subjects, per_class))
        for i, src in enumerate((a, b)):
            path = self._metrics_cache_path(src, mode, None, data=digest)
            if path.is_file():
                tables[_short(src)] = pd.read_csv(path)
                cached += 1
                continue
            progress(0.05 + 0.45 * i, desc=f"Generating and judging {src.label} ({n_images} images)…")
            table = judging.score_on_own_data(self._model(src), bundle.ds, judge, counts, per_class=per_class,
                                              sample_cfg=bench.EVAL_SAMPLE, config=self.data_config)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            table.to_csv(tmp, index=False)
            os.replace(tmp, path)
            tables[_short(src)] = table
        progress(1.0, desc="Done")
        note = own_data_note(bundle.name, judge, mode=mode, per_class=per_class, n_images=n_images,
                             cached=cached, other_data=[s.label for s in (a, b) if not self._trained_on(s, bundle)])
        return self._metric_outputs(tables, note=note, reliability=judge.reliability)

    def _trained_on(self, src: Source, bundle: DatasetBundle) -> bool:
        """Was ``src`` trained on a set of ``bundle``'s size and class count (the runs record no more)?"""
        if src.key.startswith("shipped:"):
            return bundle.key == DEMO_KEY
        name = src.key.split(":", 1)[1]
        meta = self.jobs.run_meta(name) or {}
        desc = meta.get("dataset") if isinstance(meta.get("dataset"), dict) else {}
        return (desc.get("num_samples"), desc.get("num_classes")) == (len(bundle.ds), len(bundle.ds.classes))

    def _metrics_cache_path(self, src: Source, mode: str, eval_set, *, data: str = "demo") -> Path:
        from pogdiff import bench
        from pogdiff.config import to_dict

        from pogdiff.judge import JUDGE_VERSION

        what = {"captions": list(eval_set.captions)} if eval_set is not None else \
            {"data": data, "judge": JUDGE_VERSION, "per_class": self.OWN_PER_CLASS[mode]}
        key = hashlib.sha256(json.dumps({"weights": bench.checkpoint_digest(src.checkpoint), "mode": mode,
                                         **what, "sample": to_dict(bench.EVAL_SAMPLE)}, sort_keys=True).encode())
        return self.runs_dir / "cache" / "metrics" / f"{key.hexdigest()[:32]}.csv"

    def _metric_outputs(self, tables: dict[str, pd.DataFrame], *, note: str,
                        reliability: pd.DataFrame | None = None) -> tuple:
        """Per-class delta table (A, B, B − A; rarest first), the two-run figure and the bucket means.

        With a judge's ``reliability`` (user data) the table gets its per-class held-out accuracy and
        a weak mark, and the bucket means are repeated over the classes the judge can score.
        """
        from pogdiff import metrics

        names = list(tables)
        name_a, name_b = (names * 2)[:2]  # A and B may be the same checkpoint
        table_a, table_b = tables[name_a], tables[name_b]
        fig = metrics.paired_frequency_figure(table_a, table_b, (name_a, name_b), config=self.data_config)
        merged = delta_table(table_a, table_b, name_a, name_b).round(3)
        buckets: list[tuple[str, Callable]] = [("all", lambda t: t)]
        buckets += [(shot, lambda t, shot=shot: t[t["shot"] == shot]) for shot in SHOTS]
        if reliability is not None:
            rel = reliability.set_index("subject")
            merged["judge reliability"] = merged["subject"].map(rel["reliability"]).round(3)
            merged["judge"] = np.where(merged["subject"].map(rel["weak"]).fillna(True).astype(bool), WEAK_MARK, "ok")
            strong = set(reliability.loc[~reliability["weak"], "subject"])
            buckets.append(("judge ok", lambda t: t[t["subject"].isin(strong)]))
        lines = [note, "", "| bucket | " + " | ".join(f"accuracy · {n}" for n in names) + " |",
                 "|---|" + "---|" * len(names)]
        for bucket, pick in buckets:
            cells = []
            for name in names:
                part = pick(tables[name])
                cells.append(f"{part['accuracy'].mean():.3f}" if len(part) else "—")
            lines.append(f"| {bucket} | " + " | ".join(cells) + " |")
        outputs = (merged, fig, "\n".join(lines))
        with self._lock:
            self._metric_stash[(name_a, name_b)] = outputs
            while len(self._metric_stash) > MAX_CACHED_MODELS * 4:
                self._metric_stash.popitem(last=False)
        return outputs

    # ------------------------------------------------------------ Compare: beside A and B, kept state
    RESTORE_OUTPUTS = ("run_a", "run_b", "prompts", "custom", "n_seeds", "guidance", "sample_steps",
                       "slider", "grid_a", "grid_b", "pair_md", "real_gallery", "real_md", "diff", "diff_md",
                       "metrics_table", "metrics_plot", "metrics_md")

    def _stash_key(self, request: gr.Request | None) -> str:
        return getattr(request, "session_hash", None) or "local"

    def training_bundles(self, key_a: str | None, key_b: str | None, ds_key: str | None) -> list[DatasetBundle]:
        """Where the real images of a prompted subject are looked up, in order: the dataset this
        browser session loaded, then the demo set when A or B is a shipped demo run (or when the
        session loaded nothing)."""
        shipped = any(isinstance(k, str) and k.startswith("shipped:") for k in (key_a, key_b))
        own = self.bundle(ds_key) if ds_key else None
        found = [own] if own is not None else []
        if (shipped or own is None) and (own is None or own.key != DEMO_KEY):
            found.append(self._load_demo_bundle())
        return found

    def real_panel(self, bundles: Sequence[DatasetBundle], captions: Sequence[str]) -> tuple[list, str]:
        """Training images of each prompt's subject (gallery items) and their counts (markdown).

        A prompt's subject is looked up in ``bundles`` in order; the first that has it is used.
        """
        items, lines, seen = [], [], set()
        template = self.data_config.caption_template
        for caption in captions:
            match = next(((b, s) for b in bundles for s in [subject_for_prompt(caption, b.subjects, template)]
                          if s is not None), None)
            if match is None:
                lines.append(f"- *{caption}*: no training class matches this prompt.")
                continue
            bundle, subject = match
            if (bundle.key, subject) in seen:
                continue
            seen.add((bundle.key, subject))
            images, n = real_examples(bundle.ds.images, bundle.subjects, subject, MAX_REAL_IMAGES)
            shot = shot_bucket(n, self.data_config)
            where = f" in *{bundle.name}*" if len(bundles) > 1 else ""
            lines.append(f"- **{subject}**: {n} training image{'s' if n != 1 else ''} ({shot}-shot){where}")
            items += gallery_items(images, [f"{subject} · {i + 1} of {n}" for i in range(len(images))])
        names = " / ".join(b.name for b in bundles)
        return items, f"**Real training images** ({names}), per prompted subject:\n\n" + "\n".join(lines)

    def pair_views(self, key_a: str | None, key_b: str | None, ds_key: str | None, state: Any,
                   request: gr.Request = None) -> tuple:
        """After Generate: real training images, the |A - B| heatmap and its numbers, the kept state."""
        from pogdiff.sampling import image_grid

        with self._lock:
            last = self._pair_stash.get(self._stash_key(request))
        if last is None:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
        real, real_md = self.real_panel(self.training_bundles(key_a, key_b, ds_key), last["captions"])
        view = difference_view(last["a"], last["b"])
        labels = [f"|A-B| {m:.1f}" for m in view.mean_abs]  # the grid's label font has no U+2212
        diff = image_grid(view.heatmaps, ncols=len(last["captions"]), labels=labels, scale=last["scale"])
        kept = self._state(state)
        kept.token = kept.token or ResultCache.new_token()
        self._results.put(kept.token, pair=last["outputs"], real=(real, real_md), diff=(diff, view.summary()))
        return real, real_md, diff, view.summary(), kept.to_browser()

    def _state(self, raw: Any):
        L = self.limits
        return CompareState.from_browser(raw, max_prompts=L.max_prompts, max_chars=L.max_text_chars) \
            or CompareState()

    def remember_compare(self, key_a: Any, key_b: Any, prompts: Any, custom: Any, n_seeds: Any, guidance: Any,
                         sample_steps: Any, state: Any) -> Any:
        """The Compare choices as the browser keeps them (the results' token is carried over)."""
        L = self.limits
        raw = {**self._state(state).to_browser(), "run_a": key_a, "run_b": key_b,
               "prompts": list(prompts) if isinstance(prompts, (list, tuple)) else [],
               "custom": custom or "", "n_seeds": n_seeds, "guidance": guidance, "sample_steps": sample_steps}
        kept = CompareState.from_browser(raw, max_prompts=L.max_prompts, max_chars=L.max_text_chars)
        return kept.to_browser() if kept is not None else gr.skip()

    def keep_metrics(self, key_a: str | None, key_b: str | None, state: Any) -> Any:
        """After the metrics are shown: keep them with this browser's Compare state."""
        names = tuple(_short(self._source(k)) for k in (key_a, key_b))
        with self._lock:
            outputs = self._metric_stash.get(names)
        if outputs is None:
            return gr.skip()
        kept = self._state(state)
        kept.token = kept.token or ResultCache.new_token()
        self._results.put(kept.token, metrics=outputs)
        return kept.to_browser()

    def load_metrics(self, key_a: str | None, key_b: str | None, state: Any) -> tuple:
        """Page load: the shipped metrics of A and B, unless this browser's kept results have metrics."""
        if "metrics" in self._results.get(self._state(state).token):
            return gr.skip(), gr.skip(), gr.skip()
        return self.precomputed_metrics(key_a, key_b)

    def restore_compare(self, state: Any) -> tuple:
        """Page load: the Compare tab as this browser left it (choices, images, metrics)."""
        L = self.limits
        kept = CompareState.from_browser(state, max_prompts=L.max_prompts, max_chars=L.max_text_chars)
        if kept is None:
            return (gr.skip(),) * len(self.RESTORE_OUTPUTS)
        found = self._results.get(kept.token)
        pair = found.get("pair", (gr.skip(),) * 4)
        real = found.get("real", (gr.skip(),) * 2)
        diff = found.get("diff", (gr.skip(),) * 2)
        metrics = found.get("metrics", (gr.skip(),) * 3)
        return (gr.Dropdown(value=kept.run_a, allow_custom_value=True), gr.Dropdown(value=kept.run_b, allow_custom_value=True),
                gr.Dropdown(value=kept.prompts, multiselect=True, allow_custom_value=True),
                kept.custom, kept.n_seeds, kept.guidance, kept.sample_steps, *pair, *real, *diff, *metrics)


def own_data_note(name: str, judge: Any, *, mode: str, per_class: int, n_images: int, cached: int,
                  other_data: Sequence[str] = ()) -> str:
    """What the user-data metrics are and how far the judge behind them can be trusted."""
    from pogdiff.judge import WEAK_BELOW

    rel = judge.reliability
    checked = rel["reliability"].notna()
    weak = list(rel.loc[rel["weak"], "subject"])
    acc = judge.heldout_accuracy()
    lines = [f"Judged on **{name}**'s own {len(rel)} classes ({mode} mode: up to {per_class} of each class's "
             f"captions, {n_images} images per model, fixed seeds)" + (f"; {cached} of 2 read from the cache."
                                                                        if cached else "."),
             f"The judge is a classifier fitted on this set's {int(rel['n_images'].sum())} real images "
             f"(class-balanced). On real images it did not see, it names the class right **{acc:.0%}** of the time "
             f"(mean over the {int(checked.sum())} classes it could check; chance {1 / len(rel):.0%}); column "
             "*judge reliability* gives it per class."]
    if weak:
        shown = ", ".join(weak[:12]) + (f" and {len(weak) - 12} more" if len(weak) > 12 else "")
        lines.append(f"**Warning — judge too weak for {len(weak)} of {len(rel)} classes** ({shown}): it names "
                     f"fewer than {WEAK_BELOW:.0%} of their held-out real images (or they have one image, "
                     "so it could not be checked). Their accuracy says little; row *judge ok* averages the "
                     "other classes.")
    if acc < WEAK_BELOW:
        lines.append("**The judge is weak on this set as a whole: read these numbers as a rough signal only.**")
    if other_data:
        lines.append("Note: " + " and ".join(other_data) + (" were" if len(other_data) > 1 else " was") +
                     " not trained on this data set (a different size or class count), so the numbers show how "
                     "it draws classes it may never have seen.")
    return "\n\n".join(lines)


def _short(src: Source) -> str:
    return src.key.split(":", 1)[1]


# ======================================================================= Train tab: pure helpers
def form_values(meta: dict[str, Any], *, base_available: bool = True) -> dict[str, Any] | None:
    """The Train form's values (keys of :attr:`Studio.TRAIN_FORM`) from a run's ``run.json``, or None
    when it lacks the saved configs. ``from_scratch`` is True for a tiny run without a base checkpoint
    while one is available (without one every tiny run starts from a random UNet)."""
    train, model = meta.get("train_cfg"), meta.get("model_cfg")
    if not isinstance(train, dict) or not isinstance(model, dict):
        return None
    psi = train.get("psi") if isinstance(train.get("psi"), dict) else {}
    defaults = PsiConfig()
    preset = model.get("preset") if model.get("preset") in PRESETS else "tiny"
    method = train.get("method") if train.get("method") in METHODS else meta.get("method")
    if method not in METHODS or not isinstance(train.get("max_steps"), int):
        return None
    return {
        "method": method, "preset": preset,
        "pretrained": str(model.get("pretrained") or "") if preset == "sd15" else "",
        "steps": train["max_steps"], "batch_size": train.get("batch_size"), "lr": train.get("learning_rate"),
        "psi_max": psi.get("psi_max", defaults.psi_max), "k": psi.get("k", defaults.k),
        "use_density": bool(psi.get("use_density", defaults.use_density)),
        "use_image_sim": bool(psi.get("use_image_sim", defaults.use_image_sim)),
        "use_text_sim": bool(psi.get("use_text_sim", defaults.use_text_sim)),
        "pool": psi.get("pool") if psi.get("pool") in POOLS else defaults.pool,
        "sample_every": train.get("sample_every", 0), "seed": train.get("seed", 0),
        "from_scratch": preset == "tiny" and base_available and not meta.get("base_checkpoint"),
    }


def preview_items(preview: Any) -> list[tuple[np.ndarray, str]]:
    """Gallery items of one saved preview (:class:`pogdiff.jobs.Preview`)."""
    return gallery_items(preview.images, [f"step {preview.step} · {c}" for c in preview.captions], min_px=128)


def preview_note(steps: Sequence[int], shown: int) -> str:
    return f"Step **{shown}** of the saved previews at steps {', '.join(map(str, steps))}."


def estimate_markdown(measured: Any, steps: int, *, where: str = "") -> str:
    """The time estimate of a ``steps``-step run from a :class:`pogdiff.jobs.StepTime`, saying how it was
    measured and what it leaves out."""
    spt = measured.seconds_per_step
    if measured.source == "trial":
        setup = measured.setup_seconds or 0.0
        return (f"About **{format_seconds(setup + spt * steps)}** for {steps} steps: {spt:.2f} s/step, measured "
                f"just now by timing {measured.steps} real steps after a first one with these settings on this data"
                f"{f' ({where})' if where else ''}, plus {format_seconds(setup)} of set-up (model, neighbour table, "
                "first step). Previews and checkpoints add to it; other work on the machine slows it.")
    return (f"About **{format_seconds(spt * steps)}** for {steps} steps: {spt:.2f} s/step, the average that "
            f"{measured.source} recorded over {measured.steps} steps with the same method, preset and batch size "
            "(its previews and checkpoints included). **Estimate time** measures it on the current data.")
