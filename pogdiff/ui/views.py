"""Pure helpers of the app: formatting of plain data into tables, markdown, HTML and figures.

Every function here is a function of its arguments (no server state), so it is tested without a
browser. Constants shared by the tabs are at the top."""

from __future__ import annotations

import hashlib
import logging
import math
import re
import time
from collections.abc import Callable, Sequence
from html import escape as html_escape
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
import pandas as pd

from pogdiff.config import DataConfig
from pogdiff.data.classes import CLASS_SOURCE_LABELS, CLASS_SOURCES, DEFAULT_CLASS_SOURCE
from pogdiff.data.stats import shot_bucket
from pogdiff.runs.jobs import JobStatus
from pogdiff.runs.store import RunInfo
from pogdiff.ui.state import Source

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
# A set loaded with a class source other than "auto" has the source in its key: "upload-<16 hex>~first_tag".
CLASS_SOURCE_SEP = "~"
DATASET_KEY_RE = (rf"(?:{DEMO_KEY}|{UPLOAD_KEY_RE})(?:{CLASS_SOURCE_SEP}(?:"
                  + "|".join(s for s in CLASS_SOURCES if s != DEFAULT_CLASS_SOURCE) + "))?")
STALE_UPLOAD_SECONDS = 600  # a start-up sweep removes upload folders left older than this
HUB_ID_RE = r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*"
# The Train form's "Start from" (the tiny preset's base): the shipped base, a random UNet, or a run's checkpoint.
BASE_SHIPPED, BASE_SCRATCH, BASE_RUN_PREFIX = "shipped", "scratch", "run:"
SHIPPED_BASE_LABEL = "shipped base (checkpoints/base-tiny: faces, 32 px)"
SCRATCH_LABEL = "from scratch (a random UNet)"



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
        rate = status.recent_seconds_per_step or status.seconds_per_step
        speed = f"{rate:.2f} s/step" if rate else "warming up"
        label = f"step {status.step} / {status.max_steps} · {pct:.0f}% · {speed}"
        if status.busy:
            label += f" · ETA {eta_text(status)}"
        label += f" · elapsed {format_seconds(status.elapsed_seconds)}"
    return (
        '<div class="pg-progress"><div class="pg-progress-track">'
        f'<div class="pg-progress-fill" style="width:{pct:.1f}%;background:{colour}"></div></div>'
        f'<div class="pg-progress-label">{label}</div>{pogdiff_activity_html(status.history, pool=status.pool or None)}</div>'
    )


def eta_text(status: JobStatus) -> str:
    """The live ETA: "estimating…" until a few steps after the first are timed (:func:`pogdiff.runs.jobs.estimate_eta`),
    then the time left, with "+ previews" while previews are still to come and none was timed yet."""
    if status.eta_seconds is None:
        return "estimating…"
    return format_seconds(status.eta_seconds) + (" + previews" if status.eta_untimed_previews else "")


def pogdiff_activity_html(history: Sequence[dict[str, float]], *, pool: str | None = None) -> str:
    """PoGDiff's activity in the latest steps (mean psi, rows with a neighbour pass, PoG share of
    the loss) and the plain-words warning when it behaves like plain fine-tuning; '' otherwise.
    ``pool``: the run's neighbour pool, which the warning's advice does not suggest again."""
    from pogdiff.method.objectives import INACTIVE_WINDOW, pogdiff_inactive_warning

    rows = [h for h in history if "pog_share" in h and "pog" in h]
    if not rows:
        return ""
    recent = rows[-INACTIVE_WINDOW:]
    share = float(np.mean([h["pog_share"] for h in recent]))
    psi = float(np.mean([h.get("psi_mean", 0.0) for h in recent]))
    active = float(np.mean([h.get("psi_active", 0.0) for h in recent]))
    line = (f"PoGDiff, last {len(recent)} steps: mean psi {psi:.3f} · neighbour pass on {100 * active:.0f}% "
            f"of rows · PoG term {100 * share:.2f}% of the loss")
    warning = pogdiff_inactive_warning([h["pog_share"] for h in recent], [h.get("psi_mean", 0.0) for h in recent],
                                       pool=pool)
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


MAX_ISSUES_IN_POPUP = 8  # issues an error pop-up lists (the rest: "... and N more")


def _code_spans(text: str) -> str:
    """``text`` HTML-escaped, with its `backtick` spans as ``<code>``."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html_escape(text, quote=False))


def error_report_html(headline: str, report: Any) -> str:
    """A set that did not load, for the error pop-up, which shows HTML, not Markdown: the headline,
    the report's summary line and one list item per issue (errors first), each with its fix."""
    head = f"<p>{_code_spans(headline)}</p>"
    if report is None:
        return head
    rows = report.to_frame()
    items = [f"<li><b>{html_escape(r.level)}</b> <code>{html_escape(r.code)}</code>"
             + (f" <code>{html_escape(r.where)}</code>" if r.where else "")
             + f": {_code_spans(r.message)}" + (f" <i>Fix:</i> {_code_spans(r.fix)}" if r.fix else "") + "</li>"
             for r in rows.head(MAX_ISSUES_IN_POPUP).itertuples(index=False)]
    if len(rows) > MAX_ISSUES_IN_POPUP:
        items.append(f"<li>… and {len(rows) - MAX_ISSUES_IN_POPUP} more</li>")
    return f"{head}<p><b>Problems found</b>: {html_escape(report.summary())}</p><ul>{''.join(items)}</ul>"


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


def checked_input(check: Callable, *args: Any) -> Any:
    """Run one :mod:`pogdiff.server.safety` check; its ValueError becomes a ``gr.Error`` for the client."""
    try:
        return check(*args)
    except ValueError as exc:
        raise gr.Error(str(exc), title="Invalid input") from exc


def dataset_key(base: str, class_source: str = DEFAULT_CLASS_SOURCE) -> str:
    """The key of set ``base`` (``demo`` or ``upload-<hash>``) read with ``class_source``: ``base`` itself
    for ``auto``, else ``base~class_source``."""
    return base if class_source == DEFAULT_CLASS_SOURCE else f"{base}{CLASS_SOURCE_SEP}{class_source}"


def split_dataset_key(key: str) -> tuple[str, str]:
    """``"upload-ab12~first_tag"`` -> ``("upload-ab12", "first_tag")``; a key without a source reads ``auto``."""
    base, _, source = key.partition(CLASS_SOURCE_SEP)
    return base, source or DEFAULT_CLASS_SOURCE


def class_source_choices() -> list[tuple[str, str]]:
    """``(label, value)`` pairs of the Data tab's **Class source** choice."""
    return [(CLASS_SOURCE_LABELS[s], s) for s in CLASS_SOURCES]


def class_source_markdown(used: str, reason: str) -> str:
    """Which class source a loaded set used and why, and where to change it (README "Your own data")."""
    why = f" ({html_escape(reason, quote=False)})" if reason else ""
    return (f"**Classes from:** {CLASS_SOURCE_LABELS.get(used, used)}{why}. Another choice of **Class source** "
            "above reloads the set.")


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


# =========================================================== Compare: metrics on own data
def own_data_note(name: str, judge: Any, *, mode: str, per_class: int, n_images: int, cached: int,
                  other_data: Sequence[str] = ()) -> str:
    """What the user-data metrics are and how far the judge behind them can be trusted."""
    from pogdiff.evaluation.user_judge import WEAK_BELOW

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


def source_name(src: Source) -> str:
    """A source's name without its kind (``run:NAME`` -> ``NAME``)."""
    return src.key.split(":", 1)[1]


# ======================================================================= Train tab: pure helpers
def preview_items(preview: Any) -> list[tuple[np.ndarray, str]]:
    """Gallery items of one saved preview (:class:`pogdiff.runs.run_folder.Preview`)."""
    return gallery_items(preview.images, [f"step {preview.step} · {c}" for c in preview.captions], min_px=128)


def preview_note(steps: Sequence[int], shown: int) -> str:
    return f"Step **{shown}** of the saved previews at steps {', '.join(map(str, steps))}."


def budget_advice(curve: dict | None, steps: int) -> str:
    """What the quality benchmark's budget curve (``results/quality/budget.json``) says a run of
    ``steps`` steps can show: few-shot accuracy of plain fine-tuning and of the default recipe at each
    measured budget, per embedded set; '' without a curve. A hint, not a promise: measured at batch
    16 on sets of faces like the shipped base's (README "Results")."""
    if not curve:
        return ""
    parts = []
    for data, block in curve.items():
        cells = []
        for budget in block.get("budgets", []):
            methods = block["by_budget"][str(budget)]["methods"]
            few = {m: [v for v in methods.get(m, {}).get("few_acc", []) if v is not None] for m in ("baseline", "pogdiff")}
            if few["baseline"] and few["pogdiff"]:
                cells.append(f"{budget} steps: {np.mean(few['baseline']):.0%} plain, {np.mean(few['pogdiff']):.0%} pogdiff")
        if cells:
            parts.append(f"{data} — " + "; ".join(cells))
    if not parts:
        return ""
    return ("On the embedded sets (batch 16) the rare subjects' identity accuracy was " + " · ".join(parts)
            + f". You asked for {steps} steps. The tiny base is a face model: on other images expect to need more, "
            "or start from scratch (README \"Results\").")


# Paired comparisons of the quality benchmark the Train form's method note quotes: (summary.json key, what it measures).
MEASURED_PAIRS = (("pogdiff_vs_pogdiff_no_pog", "the PoG term (pogdiff over the same batches without it)"),
                  ("pogdiff_vs_t2h", "pogdiff over t2h"))


def measured_methods_note(summary: dict | None) -> str:
    """What the quality benchmark's ``summary.json`` measured between the recipes, per embedded set: the
    few-shot accuracy ratio of class means with its 95% interval, for each of :data:`MEASURED_PAIRS` it
    holds; '' when it holds none (README "Results")."""
    if not isinstance(summary, dict):
        return ""
    parts = []
    for key, what in MEASURED_PAIRS:
        cells = []
        for data, block in summary.items():
            few = ((block.get("comparisons") or {}).get(key) or {}).get("few") if isinstance(block, dict) else None
            try:
                ratio, (low, high) = float(few["ratio_of_means"]), few.get("hierarchical_ci95") or few["bootstrap_ci95"]
                cells.append(f"{ratio:.2f}x [{float(low):.2f}, {float(high):.2f}] on {data}")
            except (TypeError, KeyError, ValueError):
                continue
        if cells:
            parts.append(f"{what}: " + ", ".join(cells))
    if not parts:
        return ""
    return ("measured few-shot accuracy, ratio of class means with its 95% interval, at the benchmark's budget: "
            + "; ".join(parts) + " (README \"Results\")")


def estimate_markdown(measured: Any, steps: int, *, where: str = "") -> str:
    """The time estimate of a ``steps``-step run from a :class:`pogdiff.runs.store.StepTime`, saying how it was
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
