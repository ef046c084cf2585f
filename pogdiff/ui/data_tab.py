"""The Data tab: its callbacks (:class:`DataTab`, over the page's data sets and visitors) and its layout
and events (:func:`build`)."""

from __future__ import annotations

import logging
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
import pandas as pd

from pogdiff.server import safety
from pogdiff.config import Limits
from pogdiff.constants import SHOT_COLOURS
from pogdiff.data.classes import CLASS_SOURCES, DEFAULT_CLASS_SOURCE
from pogdiff.ui.balance_panel import BalancePanel
from pogdiff.ui.balance_panel import build as build_balance_panel
from pogdiff.ui.balance_views import class_table_view
from pogdiff.ui.datasets import Datasets
from pogdiff.ui.sessions import Sessions
from pogdiff.ui.shared import Shared, disable_two, enable_two, same
from pogdiff.ui.state import DatasetBundle
from pogdiff.ui.views import (
    DATASET_KEY_RE,
    MAX_GALLERY,
    MAX_KEY_CHARS,
    checked_input,
    class_source_choices,
    class_source_markdown,
    dataset_key,
    gallery_items,
    report_markdown,
    split_dataset_key,
    summary_markdown,
    upload_key,
)


logger = logging.getLogger(__name__)


class DataTab:
    """Load the demo or an upload (kept by content hash in the upload store), show classes and the long tail.

    Args:
        datasets: the page's data sets, where a loaded set goes.
        sessions: the visitors: who loads, what each holds, the upload quotas.
        limits: server-side bounds on every request value (README "Limits and safety").
    """

    def __init__(self, datasets: Datasets, sessions: Sessions, limits: Limits) -> None:
        self.datasets = datasets
        self.sessions = sessions
        self.limits = limits
        self.balance = BalancePanel(datasets, limits)  # the Balancing panel: repeats, shares, loss weights

    def load_demo(self, class_source: str = DEFAULT_CLASS_SOURCE, progress: gr.Progress = gr.Progress(),
                  request: gr.Request = None) -> tuple:
        """Build (first time, cached on disk) and load the built-in long-tailed demo set, its classes from
        ``class_source`` (README "Your own data")."""
        source = self._class_source_arg(class_source)
        self.sessions.admit(request)  # a visitor past the server's cap is refused (pogdiff.ui.sessions)
        progress(0.1, desc="Building the demo set (first time only)…")
        bundle = self.datasets.load_demo() if source == DEFAULT_CLASS_SOURCE else self.datasets.load_demo(source)
        self.sessions.hold(request, bundle.key)
        return self._data_outputs(bundle)

    def load_upload(self, files: Sequence[str] | str | None, request: gr.Request = None,
                    class_source: str = DEFAULT_CLASS_SOURCE, progress: gr.Progress = gr.Progress()) -> tuple:
        """Validate and load an uploaded .zip, or several files (images + metadata / captions), its classes
        from ``class_source`` (``auto``, ``column``, ``folder``, ``first_tag``, ``template``, ``cluster``;
        README "Your own data").

        Through the app (``request`` set) only files inside gradio's upload folder are read.
        """
        source = self._class_source_arg(class_source)
        if not files:
            raise gr.Error("Upload a .zip, or several images with a metadata.jsonl / metadata.csv or "
                           ".txt captions, first.", title="Nothing uploaded")
        names = [files] if isinstance(files, (str, Path)) else files
        if not isinstance(names, (list, tuple)):
            raise gr.Error(f"Expected uploaded files, got {type(files).__name__}.", title="Invalid input")
        if len(names) > self.limits.max_upload_files:
            raise gr.Error(f"{len(names)} files uploaded; at most {self.limits.max_upload_files} are accepted. "
                           "Put them in one .zip.", title="Too many files")
        paths = [Path(checked_input(safety.text, "uploaded file", str(f) if isinstance(f, Path) else f, 4096)) for f in names]
        if request is not None:
            from gradio.utils import get_upload_folder

            upload_root = get_upload_folder()
            paths = [checked_input(safety.resolve_inside, upload_root, p if p.is_absolute() else Path("/") / p)
                     for p in paths]
        missing = [p.name for p in paths if not p.is_file()]
        if missing:
            raise gr.Error(f"Uploaded file(s) not found: {missing[:5]}. Upload them again.", title="Upload missing")
        if len(paths) > 1 and any(p.suffix.lower() == ".zip" for p in paths):
            zips = [p.name for p in paths if p.suffix.lower() == ".zip"]
            raise gr.Error(f"Upload one .zip on its own, or loose files without a .zip (got {zips}).",
                           title="Mixed upload")
        self.sessions.admit(request)
        progress(0.05, desc="Hashing the upload…")
        base = upload_key(paths)
        key = dataset_key(base, source)
        upload = (base, self.sessions.check_upload(request, base, paths))  # quotas (pogdiff.ui.sessions)
        # gradio's copies of the files stay until this visitor leaves (a failed set can be loaded again)
        self.sessions.hold(request, None, temp_files=[str(p) for p in paths] if request is not None else [])
        known = self.datasets.known(key)
        if known is not None:
            self.sessions.hold(request, key, upload=upload)
            return self._data_outputs(known)
        fresh = not (self.datasets.upload_store / base).is_dir()
        store = self.datasets.store_upload(base, paths)
        progress(0.1, desc="Reading and validating…")
        try:
            bundle = self.datasets.load_stored(key, store)
        except gr.Error:
            if fresh:
                shutil.rmtree(store, ignore_errors=True)  # keep only sets that loaded
            raise
        self.sessions.hold(request, key, upload=upload)
        return self._data_outputs(bundle)

    def reload_classes(self, key: str | None, class_source: str, progress: gr.Progress = gr.Progress(),
                       request: gr.Request = None) -> tuple:
        """The loaded set again, its classes from ``class_source`` (the Data tab's **Class source**);
        ``gr.skip()`` for every output when no set is loaded yet (the choice then applies to the next load)."""
        source = self._class_source_arg(class_source)
        key = checked_input(safety.text, "dataset key", key, MAX_KEY_CHARS)
        if not key:
            return (gr.skip(),) * 7
        progress(0.1, desc="Reading the classes again…")
        self.sessions.admit(request)
        bundle = self.datasets.bundle(dataset_key(split_dataset_key(key)[0], source))
        self.sessions.hold(request, bundle.key)
        return self._data_outputs(bundle)

    @staticmethod
    def class_source_of(key: str | None) -> str:
        """The class source the set ``key`` was loaded with (``auto`` when none is loaded)."""
        if not isinstance(key, str) or not re.fullmatch(DATASET_KEY_RE, key):
            return DEFAULT_CLASS_SOURCE
        return split_dataset_key(key)[1]

    @staticmethod
    def _class_source_arg(class_source: Any) -> str:
        return checked_input(safety.choice, "Class source", DEFAULT_CLASS_SOURCE if class_source is None else class_source,
                    CLASS_SOURCES)


    def restore_dataset(self, key: Any, request: gr.Request = None) -> tuple:
        """Page load: bring back the dataset this browser loaded before (its key is kept in the browser).

        Only a well-formed key is looked up, inside the upload store; anything else changes nothing.
        """
        if not isinstance(key, str) or not re.fullmatch(DATASET_KEY_RE, key):
            return (gr.skip(),) * 7
        try:
            self.sessions.admit(request)
            bundle = self.datasets.bundle(key)
            self.sessions.hold(request, bundle.key)
            return self._data_outputs(bundle)
        except gr.Error:
            logger.info("dataset %s could not be restored", key)
            return (gr.skip(),) * 7

    def _data_outputs(self, bundle: DatasetBundle) -> tuple:
        """key, headline, report, class table, long-tail frame, class dropdown, class gallery."""
        subjects = list(bundle.table["subject"])
        first_few = bundle.few_shot_subjects()
        chosen = first_few[0] if first_few else (subjects[0] if subjects else None)
        headline = (f"**Loaded:** {bundle.name}\n\n"
                    + summary_markdown(bundle.table, len(bundle.captions), bundle.summary) + "\n\n"
                    + class_source_markdown(bundle.ds.class_source, getattr(bundle.ds, "class_source_reason", "")))
        rows = bundle.table[["subject", "count", "shot"]].itertuples(index=False)
        choices = [(f"{s} ({c} · {sh})", s) for s, c, sh in rows]
        return (
            bundle.key,
            headline,
            report_markdown(bundle.ds.report),
            class_table_view(bundle.table, bundle.ds),  # with each class's repeats when the set gives them
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
        subject = checked_input(safety.text, "class", subject, self.limits.max_text_chars)
        if not subject:
            return []
        bundle = self.datasets.bundle(key)
        rows = [i for i, s in enumerate(bundle.subjects) if s == subject][:MAX_GALLERY]
        return gallery_items(bundle.ds.images[rows], [bundle.captions[i] for i in rows])



# ================================================================================ layout
DATA_HELP = """Load an image–text set: a **.zip** (or several loose files) with images and captions in
`metadata.jsonl` / `metadata.csv` (`file_name`, `text`, optional `subject`), `.txt` files beside the
images, or one sub-folder per class, or start with the **built-in demo set**: procedurally drawn
people with a long-tailed number of photos each. The report lists every problem with how to fix it;
the table and chart show how imbalanced the classes are (*many* > 20 images, *few* < 5)."""

CLASS_SOURCE_INFO = ("Where each image's class comes from. auto: the metadata's subject column, else class "
                     "folders, else captions that read 'a photo of X, ...', else the first tag of tag captions "
                     "('red circle, white background' -> red circle), else clustering of the captions. "
                     "Another choice reloads the loaded set.")


def build(data: DataTab, shared: Shared) -> gr.Tab:
    """The Data tab: upload or demo set, class source, validation report, long tail, class samples."""
    ds_key, saved_key = shared.dataset, shared.kept_dataset  # ds_key, kept across page reloads
    with gr.Tab("Data", id="data") as tab:
        gr.Markdown(DATA_HELP, elem_classes="explain")
        with gr.Row():
            with gr.Column(scale=2):
                upload = gr.File(
                    label="Upload a .zip, or several images + metadata.jsonl / .csv / .txt captions",
                    file_count="multiple",
                    file_types=[".zip", "image", ".jsonl", ".csv", ".txt", ".json"],
                    height=140,
                )
                with gr.Row():
                    load_btn = gr.Button("Validate and load upload", variant="primary")
                    demo_btn = gr.Button("Use the built-in demo set", variant="secondary")
                class_src = gr.Radio(class_source_choices(), value="auto", label="Class source",
                                     info=CLASS_SOURCE_INFO, elem_id="pg-class-source")
            with gr.Column(scale=3):
                summary_md = gr.Markdown("No dataset loaded yet. Upload one or use the demo set.")
                with gr.Accordion("Validation report", open=True):
                    report_md = gr.Markdown("", elem_id="pg-report")
        with gr.Row():
            class_table = gr.Dataframe(
                label="Images per class", interactive=False, max_height=360, scale=2,
                headers=["subject", "count", "shot"],
            )
            long_tail = gr.BarPlot(
                x="subject", y="count", color="shot", color_map=SHOT_COLOURS,
                sort="-y", title="Long tail: images per class", x_title="class (most to least frequent)",
                y_title="training images", x_label_angle=-45, height=360, scale=3,
                tooltip=["subject", "count", "shot"],
            )
        class_dd = gr.Dropdown(
            label="Samples of one class", choices=[], filterable=True,
            info="Pick a class to see its images and captions (few-shot classes first in the demo).",
        )
        class_gallery = gr.Gallery(label="Class samples", columns=8, height=300, object_fit="contain",
                                   fit_columns=False, elem_classes="pixelated", allow_preview=True)
        build_balance_panel(data.balance, shared)

    data_outputs = [ds_key, summary_md, report_md, class_table, long_tail, class_dd, class_gallery]
    buttons = [demo_btn, load_btn]
    for btn, fn, inputs, name in ((demo_btn, data.load_demo, [class_src], "load_demo"),
                                  (load_btn, data.load_upload, [upload, class_src], "load_upload")):
        loading = (btn.click(disable_two, None, buttons, queue=False, api_visibility="private")
                   .then(fn, inputs, data_outputs, api_name=name))
        loading.failure(enable_two, None, buttons, queue=False, api_visibility="private")
        loading.then(enable_two, None, buttons, queue=False, api_visibility="private")
    # cheap reads of memory: never queued behind a generation (queue=False)
    class_dd.change(data.class_gallery, [ds_key, class_dd], class_gallery, api_name="class_gallery", queue=False,
                    concurrency_limit=None)
    # Another class source reloads the loaded set; a refused one puts the choice back.
    reloading = class_src.input(data.reload_classes, [ds_key, class_src], data_outputs, api_name="class_source")
    reloading.failure(data.class_source_of, ds_key, class_src, api_visibility="private")
    # The browser keeps the key of every set loaded (the other tabs follow ds_key too) ...
    ds_key.change(same, ds_key, saved_key, queue=False, api_visibility="private")
    # ... and a page load brings that set back.
    (shared.page.load(data.restore_dataset, saved_key, data_outputs, api_visibility="private")
     .then(data.class_source_of, ds_key, class_src, api_visibility="private"))
    return tab
