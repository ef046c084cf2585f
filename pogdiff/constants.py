"""One home for the constants several modules share: where the shipped checkpoints live, and the
colours of the many / medium / few-shot buckets (docs/ARCHITECTURE.md). The cache folder's home is
:func:`pogdiff.config.cache_root`; sampling defaults live in :class:`pogdiff.config.SampleConfig`.
"""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
SHIPPED_DIR = REPO_ROOT / "checkpoints"  # base-tiny, evaluator(s), demo-* fine-tunes
DEFAULT_BASE = SHIPPED_DIR / "base-tiny"  # the tiny preset's shipped base checkpoint
BUDGET_CURVE = REPO_ROOT / "results" / "quality" / "budget.json"  # the quality benchmark's budget curve
QUALITY_SUMMARY = REPO_ROOT / "results" / "quality" / "summary.json"  # its paired comparisons at the chosen budget
# Shot buckets, used alike by the app's plots, the long-tail chart and the neighbour map.
SHOT_COLOURS = {"many": "#2563eb", "medium": "#f59e0b", "few": "#dc2626"}
