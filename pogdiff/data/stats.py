"""Class statistics of an image-text set: images per class, shot buckets, the long-tail chart."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Union

import pandas as pd

from pogdiff.constants import SHOT_COLOURS

from ..config import DataConfig

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from .loader import ImageTextSet

SHOTS = ("many", "medium", "few")
TABLE_COLUMNS = ("subject", "count", "shot")
MAX_TICK_LABELS = 40

SubjectsLike = Union["ImageTextSet", Sequence[str]]


def shot_bucket(count: int, config: DataConfig = DataConfig()) -> str:
    """``"many"`` if ``count > many_shot_above``, ``"few"`` if ``count < few_shot_below``, else ``"medium"``."""
    if count > config.many_shot_above:
        return "many"
    if count < config.few_shot_below:
        return "few"
    return "medium"


def _subjects(ds_or_subjects: SubjectsLike) -> list[str]:
    subjects = getattr(ds_or_subjects, "subjects", ds_or_subjects)
    if isinstance(subjects, str):
        raise TypeError("expected an ImageTextSet or a sequence of subjects, got a single string")
    return [str(s) for s in subjects]


def class_table(ds_or_subjects: SubjectsLike, config: DataConfig = DataConfig()) -> pd.DataFrame:
    """Images per class: columns ``subject, count, shot``, sorted by count (desc), then subject."""
    counts = Counter(_subjects(ds_or_subjects))
    rows = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    table = pd.DataFrame(rows, columns=["subject", "count"])
    table["count"] = table["count"].astype(int)
    table["shot"] = [shot_bucket(c, config) for c in table["count"]]
    return table.reset_index(drop=True)


def summary(ds_or_subjects: SubjectsLike, config: DataConfig = DataConfig()) -> dict:
    """``n_images, n_classes, imbalance_ratio`` (largest / smallest class), ``n_many, n_medium,
    n_few`` (classes per shot bucket) and ``single_image_classes`` (their names)."""
    table = class_table(ds_or_subjects, config)
    counts = table["count"].to_numpy()
    shots = Counter(table["shot"])
    return {
        "n_images": int(counts.sum()),
        "n_classes": int(len(table)),
        "imbalance_ratio": float(counts.max() / counts.min()) if len(counts) else 0.0,
        "n_many": int(shots["many"]),
        "n_medium": int(shots["medium"]),
        "n_few": int(shots["few"]),
        "single_image_classes": table.loc[table["count"] == 1, "subject"].tolist(),
    }


def long_tail_figure(table: pd.DataFrame, path: str | Path | None = None, *, log_y: bool = False,
                     title: str = "Images per class") -> Figure:
    """Bar chart of ``table`` (from :func:`class_table`), bars coloured by shot bucket.

    A standalone :class:`~matplotlib.figure.Figure` on the Agg canvas: no pyplot state, nothing
    to close, safe in threads and without a display. Saved as PNG when ``path`` is given.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    fig = Figure(figsize=(max(6.0, min(16.0, 0.3 * len(table) + 2)), 4), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    x = range(len(table))
    ax.bar(x, table["count"], color=[SHOT_COLOURS[s] for s in table["shot"]], width=0.85)
    if len(table) <= MAX_TICK_LABELS:
        ax.set_xticks(list(x), [str(s) for s in table["subject"]], rotation=60, ha="right", fontsize=8)
    else:
        ax.set_xticks([])
        ax.set_xlabel(f"{len(table)} classes, sorted by count")
    if log_y:
        ax.set_yscale("log")
    ax.set_ylabel("images")
    ax.set_title(title)
    present = [s for s in SHOTS if s in set(table["shot"])]
    n_per = Counter(table["shot"])
    ax.legend(handles=[Patch(color=SHOT_COLOURS[s], label=f"{s}-shot ({n_per[s]})") for s in present],
              loc="upper right", frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    if path is not None:
        fig.savefig(path, format="png")
    return fig
