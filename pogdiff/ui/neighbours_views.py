"""Pure pieces of the Neighbours tab: the caption map and its table, computed from plain data.

Everything here takes arrays, tables and numbers and returns arrays, tables and strings, so it is
tested without a browser or a model (README "What you see"):

- the **2-D map** of the caption vectors (:func:`pca_2d`);
- **class-size bins** with colours that stay visible for the rarest classes;
- coordinates rounded to 3 significant digits, as the tooltips show them;
- the points of a **brushed band** of the map, and small **thumbnails** for the neighbour table.
"""

from __future__ import annotations

import base64
import io
import math
from typing import Any

import numpy as np
import pandas as pd

# Class-size bins (images in the caption's class), rarest first, and their colours. Every colour keeps a
# relative luminance below 0.5, so even a one-image class is a strong dot on white.
SIZE_BINS = ((1, 1), (2, 3), (4, 7), (8, 15), (16, 31), (32, None))
SIZE_COLOURS = ("#b91c1c", "#ea580c", "#a16207", "#15803d", "#0e7490", "#1e3a8a")
THUMB_MARKDOWN_PX = 48


def pca_2d(vectors: np.ndarray) -> np.ndarray:
    """2-D PCA map via numpy SVD; each axis' sign makes its largest-magnitude loading positive.

    :param vectors: [N x D] array.
    :return: float32 [N x 2] (zero-padded when fewer than 2 components exist).
    """
    x = np.asarray(vectors, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"vectors must be a non-empty [N, D] array, got shape {x.shape}")
    x = x - x.mean(axis=0, keepdims=True)
    u, s, vt = np.linalg.svd(x, full_matrices=False)
    m = min(2, s.size)
    signs = np.sign(vt[np.arange(m), np.abs(vt[:m]).argmax(axis=1)])
    signs[signs == 0] = 1.0
    coords = np.zeros((x.shape[0], 2))
    coords[:, :m] = u[:, :m] * s[:m] * signs
    return coords.astype(np.float32)


def round_sig(value: float, digits: int = 3) -> float:
    """``value`` rounded to ``digits`` significant digits (0 and non-finite values unchanged)."""
    value = float(value)
    if value == 0 or not math.isfinite(value):
        return value
    return round(value, digits - 1 - int(math.floor(math.log10(abs(value)))))


def size_bin(count: int) -> str:
    """The class-size bin label of a class with ``count`` images (``"1 img"``, ``"2–3 img"``, ``"32+ img"``)."""
    for low, high in SIZE_BINS:
        if count >= low and (high is None or count <= high):
            return _bin_label(low, high)
    raise ValueError(f"a class has at least one image, got count={count}")


def _bin_label(low: int, high: int | None) -> str:
    if high is None:
        return f"{low}+ img"
    return f"{low} img" if low == high else f"{low}–{high} img"


def size_colour_map() -> dict[str, str]:
    """Bin label -> colour, rarest bin first (the legend's order)."""
    return {_bin_label(lo, hi): c for (lo, hi), c in zip(SIZE_BINS, SIZE_COLOURS)}


def points_in_band(frame: pd.DataFrame, x_range: Any) -> pd.DataFrame:
    """Rows of a map frame whose ``x`` lies in a brushed ``[x0, x1]`` band, rarest class first.

    The native scatter plot's select event reports the brushed x interval only (not a point), so the
    band's points are listed for a click on one row.
    """
    try:
        x0, x1 = sorted(float(v) for v in x_range)
    except (TypeError, ValueError):
        raise ValueError(f"a brushed band is two numbers [x0, x1], got {x_range!r}") from None
    inside = frame[(frame["x"] >= x0) & (frame["x"] <= x1)]
    return inside.sort_values(["class size", "row"], kind="stable").reset_index(drop=True)


def thumbnail_markdown(image: np.ndarray, px: int = THUMB_MARKDOWN_PX) -> str:
    """A markdown image for a table cell: PNG data URI of ``image`` upscaled (nearest, whole factor)
    until its short side is at least ``px``."""
    from PIL import Image

    img = np.asarray(image, dtype=np.uint8)
    factor = max(1, -(-px // max(1, min(img.shape[:2]))))
    img = np.repeat(np.repeat(img, factor, axis=0), factor, axis=1)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return f"![thumbnail](data:image/png;base64,{base64.b64encode(buf.getvalue()).decode('ascii')})"
