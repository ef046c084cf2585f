"""The Data tab's **Balancing** panel: what a set's own repeats (kohya_ss / OneTrainer) mean in draws
per class beside plain and tempered batches, a note from the quality benchmark's measured numbers,
and per-class loss weights for any set, handed to the Train form (README "Your own data", kohya_ss
and OneTrainer sets). :class:`BalancePanel` holds the callbacks, :func:`build` lays the panel out."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from pogdiff.config import Limits
from pogdiff.constants import QUALITY_SUMMARY
from pogdiff.ui.balance_views import (
    BALANCE_COLUMNS,
    balance_frame,
    parse_loss_weights,
    parse_weights_text,
    verdict_markdown,
    weights_text,
)
from pogdiff.ui.datasets import Datasets
from pogdiff.ui.shared import Shared

EDITOR_COLUMNS = ["class", "loss weight"]


class BalancePanel:
    """Callbacks of the Balancing panel over the page's data sets.

    Args:
        datasets: the page's data sets.
        limits: server-side bounds on every request value.
        summary_path: the quality benchmark's ``summary.json``, whose measured numbers the note quotes.
    """

    def __init__(self, datasets: Datasets, limits: Limits, summary_path: Path = QUALITY_SUMMARY) -> None:
        self.datasets = datasets
        self.limits = limits
        self.summary_path = Path(summary_path)

    def summary(self) -> dict | None:
        try:
            return json.loads(self.summary_path.read_text())
        except (OSError, ValueError):
            return None

    def class_balance(self, key: str | None, loss_weights: str | None = "") -> tuple[str, pd.DataFrame, pd.DataFrame]:
        """The panel for the set ``key``: the note, the per-class table (:data:`BALANCE_COLUMNS`: images,
        repeats, loss weight, draws per epoch, share of draws under the set's repeats, plain and the
        tempered default) and the loss-weight editor, filled from ``loss_weights`` (the Train form's
        ``class=weight; ...``), else the set's own."""
        bundle = self.datasets.bundle(key)
        try:
            given = parse_weights_text(loss_weights, list(bundle.table["subject"])) if loss_weights else None
        except ValueError:
            given = None  # the Train form's text is checked when a run starts
        frame = balance_frame(bundle.ds, given)
        editor = frame[["class", "loss weight"]].copy()
        return verdict_markdown(bundle.ds, self.summary()), frame, editor

    def use_loss_weights(self, key: str | None, editor: Any) -> tuple[str, pd.DataFrame, str]:
        """The edited loss weights as the Train form's ``class=weight; ...`` (classes of weight 1 left
        out), the per-class table with them and a line saying what training will do with them."""
        bundle = self.datasets.bundle(key)
        try:
            weights = parse_loss_weights(editor, list(bundle.table["subject"]))
        except ValueError as exc:
            raise gr.Error(str(exc), title="Invalid loss weight") from exc
        text = weights_text(weights)
        note = (f"Loss weights for training: **{text}** (in the Train tab's *Class loss weights*; every other class 1)."
                if weights else "Every class weighs 1: training uses no class loss weights.")
        return text, balance_frame(bundle.ds, weights), note


PANEL_HELP = ("How often each class is drawn. kohya_ss and OneTrainer users balance by hand: `<repeats>_<name>` "
              "folders, a `dataset_config.toml` or a OneTrainer `concepts.json` in the upload give each class its "
              "repeats, and an epoch draws a class `images x repeats` times. The table puts that beside plain "
              "batches and the tempered default; the Train tab's *Class balance* trains with either. Loss weights "
              "work for any set: edit the column and press the button.")


def build(panel: BalancePanel, shared: Shared) -> None:
    """The panel, inside the Data tab; it follows the session's data set (``shared.dataset``) and writes
    the Train form's class loss weights (``shared.loss_weights``)."""
    with gr.Accordion("Balancing: your repeats, plain and tempered batches, loss weights", open=False):
        gr.Markdown(PANEL_HELP, elem_classes="explain")
        verdict = gr.Markdown("", elem_id="pg-balance-note")
        table = gr.Dataframe(headers=BALANCE_COLUMNS, label="Share of draws per class", interactive=False,
                             max_height=320)
        with gr.Row():
            editor = gr.Dataframe(headers=EDITOR_COLUMNS, label="Class loss weights (edit the second column)",
                                  interactive=True, max_height=320, scale=2)
            with gr.Column(scale=1):
                use_btn = gr.Button("Use these loss weights for training", size="sm")
                note = gr.Markdown("", elem_classes="explain")
    # cheap: counts and a small JSON file, never queued behind a generation
    shared.dataset.change(panel.class_balance, [shared.dataset, shared.loss_weights], [verdict, table, editor],
                          api_name="class_balance", queue=False)
    use_btn.click(panel.use_loss_weights, [shared.dataset, editor], [shared.loss_weights, table, note],
                  api_name="use_loss_weights", queue=False)
