"""The Data tab: its layout and events (:func:`build`) and its callbacks (:class:`DataTab`, a mixin of
:class:`pogdiff.ui.Studio`)."""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
import pandas as pd

from pogdiff.server import safety
from pogdiff.constants import SHOT_COLOURS
from pogdiff.data.classes import CLASS_SOURCES, DEFAULT_CLASS_SOURCE
from pogdiff.ui.downloads import clean_temp_folders
from pogdiff.ui.shared import Shared, disable_two, enable_two, same
from pogdiff.ui.state import DatasetBundle
from pogdiff.ui.views import (
    DATASET_KEY_RE,
    DEMO_KEY,
    MAX_GALLERY,
    MAX_KEY_CHARS,
    STALE_UPLOAD_SECONDS,
    UPLOAD_STORE,
    UPLOAD_TMP_PREFIX,
    checked_input,
    class_source_choices,
    class_source_markdown,
    dataset_key,
    error_report_html,
    gallery_items,
    report_markdown,
    split_dataset_key,
    summary_markdown,
    upload_key,
)


logger = logging.getLogger(__name__)


class DataTab:
    """Load the demo or an upload, keep uploads by content hash, show classes and the long tail."""

    # ============================================================================ Data tab
    def load_demo(self, class_source: str = DEFAULT_CLASS_SOURCE, progress: gr.Progress = gr.Progress(),
                  request: gr.Request = None) -> tuple:
        """Build (first time, cached on disk) and load the built-in long-tailed demo set, its classes from
        ``class_source`` (README "Your own data")."""
        source = self._class_source_arg(class_source)
        self._admit(request)  # a visitor past the server's cap is refused (pogdiff.ui.sessions)
        progress(0.1, desc="Building the demo set (first time only)…")
        bundle = self._load_demo_bundle() if source == DEFAULT_CLASS_SOURCE else self._load_demo_bundle(source)
        self._hold(request, bundle.key)
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
        self._admit(request)
        progress(0.05, desc="Hashing the upload…")
        base = upload_key(paths)
        key = dataset_key(base, source)
        upload = (base, self._check_upload(request, base, paths))  # quotas (pogdiff.ui.sessions)
        # gradio's copies of the files stay until this visitor leaves (a failed set can be loaded again)
        self._hold(request, None, temp_files=[str(p) for p in paths] if request is not None else [])
        with self._lock:
            known = self._datasets.get(key)
        if known is not None:
            self._hold(request, key, upload=upload)
            return self._data_outputs(known)
        fresh = not (self.upload_store / base).is_dir()
        store = self._store_upload(base, paths)
        progress(0.1, desc="Reading and validating…")
        try:
            bundle = self._load_stored(key, store)
        except gr.Error:
            if fresh:
                shutil.rmtree(store, ignore_errors=True)  # keep only sets that loaded
            raise
        self._hold(request, key, upload=upload)
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
        self._admit(request)
        bundle = self.bundle(dataset_key(split_dataset_key(key)[0], source))
        self._hold(request, bundle.key)
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
        source, name = self._stored_source(store)
        ds = self._read_set(source, split_dataset_key(key)[1])
        return self._remember(self._make_bundle(key, name, ds))

    @staticmethod
    def _stored_source(store: Path) -> tuple[Path, str]:
        """What a stored upload is read from (its one .zip, or the folder of loose files) and its name."""
        files = sorted(p for p in store.iterdir() if p.is_file())
        if len(files) == 1 and files[0].suffix.lower() == ".zip":
            return files[0], files[0].name
        return store, f"{len(files)} uploaded files"

    def _read_set(self, source: Path, class_source: str, resolution: int | None = None):
        """``load_image_text_set`` with this server's DataConfig, ``class_source`` and (optionally) another
        resolution; a set that does not validate becomes a ``gr.Error`` carrying its report."""
        from pogdiff.data import DatasetError, load_image_text_set

        changes = {"class_source": class_source, **({"resolution": resolution} if resolution else {})}
        try:
            return load_image_text_set(source, dataclasses.replace(self.data_config, **changes))
        except DatasetError as exc:
            # the pop-up shows HTML: the report as a list (as Markdown its table came out as raw pipes)
            raise gr.Error(error_report_html(getattr(exc, "headline", str(exc)), getattr(exc, "report", None)),
                           title="The dataset did not validate", print_exception=False) from exc

    def dataset_at(self, bundle: DatasetBundle, resolution: int):
        """The bundle's set at ``resolution`` px, for a model of that size (README "Training options").

        The Data tab loads images at the tiny preset's size; a model of another size (sd15: 512 px)
        gets the set reloaded from its files (the demo's, or the stored upload's), with the same class
        source, not upscaled from the small copy. Kept per bundle (the latest size only).
        """
        if bundle.ds.images.shape[1] == resolution:
            return bundle.ds
        base, class_source = split_dataset_key(bundle.key)
        with bundle.lock:
            ds = bundle.at_resolution.get(resolution)
            if ds is None:
                if base == DEMO_KEY:
                    source = self.demo_root() / "train"
                else:
                    store = self.upload_store / base
                    if not store.is_dir():
                        raise gr.Error("The uploaded files of this dataset are gone (expired); upload them again.",
                                       title="Upload missing")
                    source = self._stored_source(store)[0]
                ds = self._read_set(source, class_source, resolution)
                bundle.at_resolution = {resolution: ds}
        return ds

    def restore_dataset(self, key: Any, request: gr.Request = None) -> tuple:
        """Page load: bring back the dataset this browser loaded before (its key is kept in the browser).

        Only a well-formed key is looked up, inside the upload store; anything else changes nothing.
        """
        if not isinstance(key, str) or not re.fullmatch(DATASET_KEY_RE, key):
            return (gr.skip(),) * 7
        try:
            self._admit(request)
            bundle = self.bundle(key)
            self._hold(request, bundle.key)
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
        subject = checked_input(safety.text, "class", subject, self.limits.max_text_chars)
        if not subject:
            return []
        bundle = self.bundle(key)
        rows = [i for i, s in enumerate(bundle.subjects) if s == subject][:MAX_GALLERY]
        return gallery_items(bundle.ds.images[rows], [bundle.captions[i] for i in rows])

    def dataset_banner(self, key: str | None) -> str:
        """One line naming the dataset the session works on (for the Neighbours / Train tabs)."""
        key = checked_input(safety.text, "dataset key", key, MAX_KEY_CHARS)
        with self._lock:
            bundle = self._datasets.get(key or DEMO_KEY)
        if bundle is None:
            return ("Working on the **built-in demo set** (load another one in the **Data** tab)."
                    if not key or key == DEMO_KEY else "Load a dataset in the **Data** tab.")
        return (f"Working on **{bundle.name}**: {len(bundle.captions)} images, {len(bundle.table)} classes, "
                f"{len(bundle.few_shot_subjects())} few-shot.")


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


def build(studio: DataTab, shared: Shared) -> gr.Tab:
    """The Data tab: upload or demo set, class source, validation report, long tail, class samples.

    ``studio`` is the :class:`~pogdiff.ui.studio.Studio`, of which this tab's class is one mixin."""
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

    data_outputs = [ds_key, summary_md, report_md, class_table, long_tail, class_dd, class_gallery]
    buttons = [demo_btn, load_btn]
    for btn, fn, inputs, name in ((demo_btn, studio.load_demo, [class_src], "load_demo"),
                                  (load_btn, studio.load_upload, [upload, class_src], "load_upload")):
        loading = (btn.click(disable_two, None, buttons, queue=False, api_visibility="private")
                   .then(fn, inputs, data_outputs, api_name=name))
        loading.failure(enable_two, None, buttons, queue=False, api_visibility="private")
        loading.then(enable_two, None, buttons, queue=False, api_visibility="private")
    # cheap reads of memory: never queued behind a generation (queue=False)
    class_dd.change(studio.class_gallery, [ds_key, class_dd], class_gallery, api_name="class_gallery", queue=False,
                    concurrency_limit=None)
    # Another class source reloads the loaded set; a refused one puts the choice back.
    reloading = class_src.input(studio.reload_classes, [ds_key, class_src], data_outputs, api_name="class_source")
    reloading.failure(studio.class_source_of, ds_key, class_src, api_visibility="private")
    # The browser keeps the key of every set loaded (the other tabs follow ds_key too) ...
    ds_key.change(same, ds_key, saved_key, queue=False, api_visibility="private")
    # ... and a page load brings that set back.
    (shared.page.load(studio.restore_dataset, saved_key, data_outputs, api_visibility="private")
     .then(studio.class_source_of, ds_key, class_src, api_visibility="private"))
    return tab
