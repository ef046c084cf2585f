"""Pure pieces of the Compare tab: what is drawn, computed from plain data.

Everything here takes arrays, tables and strings and returns arrays, tables and strings, so it is
tested without a browser or a model (README "What you see", items 2 and 4):

- the **real training images** of the subject a prompt names, and how many the class had;
- the **difference view**: per-image ``|A - B|`` amplified into a heatmap, with its mean in numbers;
- the **per-class delta table**: A, B and B - A for each metric, rarest classes first;
- **typed prompts**: one per line, validated and length-limited;
- the **Compare state** a browser keeps across page reloads (a JSON-able dict, validated on the way back).

The Neighbours tab's pure pieces are in :mod:`pogdiff.ui.neighbours_views`.
"""

from __future__ import annotations

import logging
import math
import re
import secrets
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)

DIFF_GAIN = 4.0  # |A - B| is multiplied by this before the colour map (small differences become visible)
MAX_REAL_IMAGES = 8  # real training images shown per subject
METRICS = ("accuracy", "gRecall", "dino")
FEW_MARK = "★ few"  # marks few-shot rows of the delta table
STATE_VERSION = 1
TOKEN_RE = r"[0-9a-f]{32}"
CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


# ================================================================================ Compare
def subject_for_prompt(prompt: str, subjects: Sequence[str], template: str = "a photo of {subject}") -> str | None:
    """Which training subject a prompt is about, or ``None``.

    A prompt that starts like the caption template filled with a subject (``a photo of Mira Okafor,
    smiling``) names that subject; otherwise the longest subject name found in the prompt (case
    insensitive, whole words) wins, so free text such as ``red fox in snow`` finds ``red fox``.
    """
    text = " ".join(str(prompt).split()).lower()
    names = sorted({str(s) for s in subjects}, key=len, reverse=True)
    for name in names:
        if text.startswith(template.format(subject=name).lower()):
            return name
    for name in names:
        if name and re.search(rf"(?<!\w){re.escape(name.lower())}(?!\w)", text):
            return name
    return None


TAG_SHARE = 0.6  # captions are tags when at least this share has 2+ comma-separated parts ...
TAG_MAX_WORDS = 4  # ... whose first part is short (a tag, not a sentence) ...
SENTENCE_START = re.compile(r"^(a|an|the)\s+(photo|picture|image|portrait|drawing|painting)\s+of\b", re.I)


def _tags(caption: str) -> list[str]:
    return [t.strip() for t in str(caption).split(",") if t.strip()]


def captions_are_tags(captions: Sequence[str]) -> bool:
    """Are these captions kohya-style tag lists (``red fox, outdoors, photo``) rather than sentences?

    Yes when at least :data:`TAG_SHARE` of them have two or more comma-separated parts whose first
    part is short (at most :data:`TAG_MAX_WORDS` words, not ``a photo of ...``), and the first
    parts repeat across images (fewer distinct first tags than half the captions).
    """
    if not captions:
        return False
    firsts = []
    for caption in captions:
        tags = _tags(caption)
        if len(tags) >= 2 and len(tags[0].split()) <= TAG_MAX_WORDS and not SENTENCE_START.match(tags[0]):
            firsts.append(tags[0].lower())
    return len(firsts) >= TAG_SHARE * len(captions) and len(set(firsts)) <= len(firsts) / 2


def class_prompts(captions: Sequence[str], subjects: Sequence[str],
                  template: str = "a photo of {subject}") -> dict[str, str]:
    """The default Compare prompt of every class, in the style the set was captioned in.

    Tag captions (:func:`captions_are_tags`): the class's most common first tag followed by the
    other tags found in more than half of its captions, most frequent first (ties: where they
    first appear), e.g. ``red fox, outdoors, photo``. Sentence captions: ``template`` filled with
    the class name (``a photo of Vera Dahl``).
    """
    if len(captions) != len(subjects):
        raise ValueError(f"{len(captions)} captions but {len(subjects)} classes")
    names = list(dict.fromkeys(str(s) for s in subjects))
    if not captions_are_tags(captions):
        return {s: template.format(subject=s) for s in names}
    out = {}
    for name in names:
        rows = [_tags(c) for c, s in zip(captions, subjects) if str(s) == name]
        rows = [r for r in rows if r] or [[name]]
        firsts = pd.Series([r[0] for r in rows]).value_counts(sort=True)
        first = firsts.index[0]
        seen: dict[str, list[int]] = {}  # tag -> [captions it is in, first position]
        for r in rows:
            for pos, tag in enumerate(dict.fromkeys(r[1:])):
                if tag.lower() == first.lower():
                    continue
                entry = seen.setdefault(tag, [0, pos])
                entry[0] += 1
                entry[1] = min(entry[1], pos)
        common = sorted((t for t, (n, _) in seen.items() if n > len(rows) / 2), key=lambda t: (-seen[t][0], seen[t][1]))
        out[name] = ", ".join([first, *common])
    return out


def real_examples(images: np.ndarray, subjects: Sequence[str], subject: str | None,
                  limit: int = MAX_REAL_IMAGES) -> tuple[np.ndarray, int]:
    """Up to ``limit`` training images of ``subject`` (in data order) and how many it has in all."""
    rows = [i for i, s in enumerate(subjects) if subject is not None and s == subject]
    images = np.asarray(images)
    picked = images[rows[:limit]] if rows else images[:0]
    return picked, len(rows)


def heat_colours(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (any shape) -> uint8 RGB through matplotlib's ``inferno`` colour map."""
    from matplotlib import colormaps

    lut = (colormaps["inferno"](np.linspace(0.0, 1.0, 256))[:, :3] * 255).round().astype(np.uint8)
    idx = np.clip(np.rint(np.asarray(values, dtype=np.float64) * 255), 0, 255).astype(np.intp)
    return lut[idx]


@dataclass
class DifferenceView:
    """``|A - B|`` of paired images: heatmaps and numbers.

    ``heatmaps``: uint8 ``[N, H, W, 3]``, the per-pixel mean over RGB of ``|A - B| / 255`` times
    ``gain``, clipped to 1 and coloured with ``inferno`` (black = identical).
    ``mean_abs``: per image, the mean of ``|A - B|`` over pixels and channels in 0..255 units.
    """

    heatmaps: np.ndarray
    mean_abs: np.ndarray
    gain: float

    @property
    def overall(self) -> float:
        return float(self.mean_abs.mean()) if self.mean_abs.size else 0.0

    def summary(self) -> str:
        """One sentence with the numbers."""
        if not self.mean_abs.size:
            return "No images to compare."
        return (f"Mean |A − B| = **{self.overall:.2f}** of 255 (**{100 * self.overall / 255:.2f}%**) over "
                f"{self.mean_abs.size} image pair(s); per image from {self.mean_abs.min():.2f} to "
                f"{self.mean_abs.max():.2f}. The heatmap shows |A − B| × {self.gain:g} (black: identical).")


def difference_view(a: np.ndarray, b: np.ndarray, gain: float = DIFF_GAIN) -> DifferenceView:
    """Per-image ``|A - B|`` of two uint8 image stacks ``[N, H, W, 3]`` (or single ``[H, W, 3]``)."""
    a, b = np.asarray(a), np.asarray(b)
    if a.ndim == 3:
        a = a[None]
    if b.ndim == 3:
        b = b[None]
    if a.shape != b.shape or a.ndim != 4 or a.shape[-1] != 3:
        raise ValueError(f"A and B must be image stacks of the same shape [N, H, W, 3]; got {a.shape} and {b.shape}")
    if not gain > 0:
        raise ValueError(f"gain must be > 0, got {gain}")
    diff = np.abs(a.astype(np.float32) - b.astype(np.float32))  # 0..255
    per_image = diff.reshape(len(diff), -1).mean(axis=1).astype(np.float64)
    heat = np.clip(diff.mean(axis=-1) / 255.0 * gain, 0.0, 1.0)
    return DifferenceView(heatmaps=heat_colours(heat), mean_abs=per_image, gain=float(gain))


def delta_table(table_a: pd.DataFrame, table_b: pd.DataFrame, name_a: str = "A", name_b: str = "B",
                metrics: Sequence[str] = METRICS) -> pd.DataFrame:
    """Per-class ``A``, ``B`` and ``B − A`` of each metric both tables have, rarest classes first.

    Both tables are per-class tables (``subject``, ``train_count``, ``shot`` and metric columns, as
    :func:`pogdiff.evaluation.metrics.per_class_table` writes them). Classes missing from one side get NaN.
    The last column, ``few``, marks few-shot rows with ``★ few``.
    """
    keys = ["subject", "train_count", "shot"]
    for name, table in ((name_a, table_a), (name_b, table_b)):
        missing = [k for k in keys if k not in table.columns]
        if missing:
            raise ValueError(f"per-class table {name!r} lacks column(s) {missing}; it needs {keys} and metric columns")
    cols = [m for m in metrics if m in table_a.columns and m in table_b.columns]
    if not cols:
        raise ValueError(f"the two tables share none of the metrics {list(metrics)}; "
                         f"A has {list(table_a.columns)}, B has {list(table_b.columns)}")
    merged = table_a[keys + cols].merge(table_b[keys + cols], on=keys, how="outer", suffixes=(" · A", " · B"))
    out = merged[keys].copy()
    for m in cols:
        out[f"{m} · {name_a}"] = merged[f"{m} · A"]
        out[f"{m} · {name_b}"] = merged[f"{m} · B"]
        out[f"{m} · B−A"] = merged[f"{m} · B"] - merged[f"{m} · A"]
    out["few"] = np.where(out["shot"] == "few", FEW_MARK, "")
    return out.sort_values(["train_count", "subject"], kind="stable").reset_index(drop=True)


INTERVAL = "95% interval"  # column of the B − A interval in the metrics table
VERDICT = "verdict"


def interval_text(low: float, high: float, digits: int = 2) -> str:
    """``[-0.25, 1.00]``; an em dash when either end is missing."""
    if not (np.isfinite(low) and np.isfinite(high)):
        return "—"
    return f"[{low:.{digits}f}, {high:.{digits}f}]"


def verdict_table(table_a: pd.DataFrame, table_b: pd.DataFrame, name_a: str, name_b: str, verdicts: pd.DataFrame,
                  reliability: pd.DataFrame | None = None, metrics: Sequence[str] = METRICS,
                  weak_mark: str = "⚠ weak") -> pd.DataFrame:
    """The Compare tab's per-class metrics table, key columns first (README "Reading B − A").

    Columns, left to right: ``subject``, ``train_count``, ``accuracy · B−A``, ``95% interval``,
    ``verdict`` (from :func:`pogdiff.evaluation.comparison.per_class_verdicts`), with a judge's ``reliability``
    (user data) ``judge reliability`` and ``judge`` (ok / ``weak_mark``), then ``accuracy`` of A and of B,
    ``shot``, ``few``, and A / B / B − A of the other metrics. Rarest classes first.
    """
    from pogdiff.evaluation.comparison import NOT_MEASURED

    merged = delta_table(table_a, table_b, name_a, name_b, metrics)
    by_subject = verdicts.set_index("subject")
    merged[INTERVAL] = [interval_text(by_subject.at[s, "low"], by_subject.at[s, "high"])
                        if s in by_subject.index else "—" for s in merged["subject"]]
    merged[VERDICT] = merged["subject"].map(by_subject["verdict"]).fillna(NOT_MEASURED)
    key = ["subject", "train_count", "accuracy · B−A", INTERVAL, VERDICT]
    if reliability is not None:
        rel = reliability.set_index("subject")
        merged["judge reliability"] = merged["subject"].map(rel["reliability"]).astype(float)
        merged["judge"] = np.where(merged["subject"].map(rel["weak"]).fillna(True).astype(bool), weak_mark, "ok")
        key += ["judge reliability", "judge"]
    key += [f"accuracy · {name_a}", f"accuracy · {name_b}", "shot", "few"]
    key = list(dict.fromkeys(key))  # A and B may be the same run
    return merged[[c for c in key if c in merged.columns] + [c for c in merged.columns if c not in key]]


def bucket_markdown(buckets: pd.DataFrame, names: tuple[str, str]) -> str:
    """The bucket summary of :func:`pogdiff.evaluation.comparison.bucket_verdicts` as a markdown table."""
    lines = [f"| bucket | classes | accuracy · {names[0]} (A) | accuracy · {names[1]} (B) | B − A | {INTERVAL} "
             "| verdict |", "|---|---:|---:|---:|---:|---|---|"]
    for bucket, row in buckets.iterrows():
        if not row["n_classes"]:
            lines.append(f"| {bucket} | 0 | — | — | — | — | — |")
            continue
        lines.append(f"| {bucket} | {int(row['n_classes'])} | {row['a']:.3f} | {row['b']:.3f} | {row['diff']:+.3f} "
                     f"| {interval_text(row['low'], row['high'])} | {row['verdict']} |")
    return "\n".join(lines)


def metrics_csv_frame(table: pd.DataFrame) -> pd.DataFrame:
    """The per-class metrics table as written to CSV: the interval text split into two numeric
    columns (``B−A low``, ``B−A high``) right after it; everything else as shown."""
    frame = pd.DataFrame(table).copy()
    if INTERVAL not in frame.columns:
        return frame
    ends = frame[INTERVAL].astype(str).str.extract(r"^\[(-?[\d.]+), (-?[\d.]+)\]$").astype(float)
    at = list(frame.columns).index(INTERVAL)
    frame = frame.drop(columns=INTERVAL)
    frame.insert(at, "B−A high", ends[1].to_numpy())
    frame.insert(at, "B−A low", ends[0].to_numpy())
    return frame


def parse_typed_prompts(text: Any, max_prompts: int, max_chars: int) -> list[str]:
    """Typed prompts: one per line, blank lines dropped, each at most ``max_chars`` characters."""
    if text is None:
        return []
    if not isinstance(text, str):
        raise ValueError(f"Typed prompts must be text, got {type(text).__name__}.")
    lines = [" ".join(line.split()) for line in text.splitlines()]
    prompts = [line for line in lines if line]
    for i, p in enumerate(prompts, 1):
        if CONTROL_CHARS.search(p):
            raise ValueError(f"Typed prompt {i} contains control characters; type plain text.")
        if len(p) > max_chars:
            raise ValueError(f"Typed prompt {i} is {len(p)} characters long; the limit is {max_chars}. Shorten it.")
    if len(prompts) > max_prompts:
        raise ValueError(f"{len(prompts)} typed prompts; at most {max_prompts} are accepted. Remove some lines.")
    return prompts


# ------------------------------------------------------------------------ state across reloads
@dataclass
class CompareState:
    """What the Compare tab of one browser shows, kept in the browser (``gr.BrowserState``).

    The choices travel as values; generated images and computed metrics stay on the server under
    ``token`` (an unguessable key, see :class:`ResultCache`).
    """

    run_a: str | None = None
    run_b: str | None = None
    prompts: list[str] = field(default_factory=list)
    custom: str = ""
    n_seeds: int = 4
    guidance: float = 3.0
    sample_steps: int = 25
    token: str | None = None

    def to_browser(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, **asdict(self)}

    @classmethod
    def from_browser(cls, raw: Any, *, max_prompts: int, max_chars: int) -> CompareState | None:
        """The state a browser sent back, or ``None`` when it is missing or malformed (never raises)."""
        if not isinstance(raw, dict) or raw.get("version") != STATE_VERSION:
            return None
        try:
            state = cls(
                run_a=_opt_text(raw.get("run_a"), 200), run_b=_opt_text(raw.get("run_b"), 200),
                prompts=[_text(p, max_chars) for p in _list(raw.get("prompts"), max_prompts)],
                custom=_text(raw.get("custom") or "", max_prompts * (max_chars + 1)),
                n_seeds=_whole(raw.get("n_seeds")), guidance=_real(raw.get("guidance")),
                sample_steps=_whole(raw.get("sample_steps")),
                token=raw.get("token") if isinstance(raw.get("token"), str)
                and re.fullmatch(TOKEN_RE, raw["token"]) else None,
            )
        except (TypeError, ValueError) as exc:
            logger.info("ignoring a malformed Compare state from the browser: %s", exc)
            return None
        return state

    @classmethod
    def kept(cls, raw: Any, *, max_prompts: int, max_chars: int) -> CompareState:
        """The state a browser sent back, or a fresh one when it is missing or malformed."""
        return cls.from_browser(raw, max_prompts=max_prompts, max_chars=max_chars) or cls()


def _text(value: Any, max_chars: int) -> str:
    if not isinstance(value, str) or len(value) > max_chars:
        raise ValueError("not a short text")
    return value


def _opt_text(value: Any, max_chars: int) -> str | None:
    return None if value is None else _text(value, max_chars)


def _list(value: Any, max_items: int) -> list:
    if not isinstance(value, list) or len(value) > max_items:
        raise ValueError("not a short list")
    return value


def _whole(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value).is_integer():
        raise ValueError("not a whole number")
    return int(value)


def _real(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError("not a number")
    return float(value)


class ResultCache:
    """A bounded, least-recently-used map from a random token to one browser's Compare results."""

    def __init__(self, max_items: int = 16) -> None:
        self.max_items = max_items
        self._items: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._lock = threading.Lock()  # callbacks of several browsers run in parallel threads

    @staticmethod
    def new_token() -> str:
        return secrets.token_hex(16)

    def put(self, token: str, **values: Any) -> None:
        """Store (or add to) the results under ``token``."""
        with self._lock:
            entry = self._items.pop(token, {})
            entry.update(values)
            self._items[token] = entry
            while len(self._items) > self.max_items:
                self._items.popitem(last=False)

    def get(self, token: str | None) -> dict[str, Any]:
        with self._lock:
            if token is None or token not in self._items:
                return {}
            self._items.move_to_end(token)
            return dict(self._items[token])
