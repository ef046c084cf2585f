"""The Data tab's callbacks (a mixin of :class:`pogdiff.ui.Studio`)."""

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

from pogdiff import safety
from pogdiff.ui.state import DatasetBundle
from pogdiff.ui.views import (
    DEMO_KEY,
    MAX_GALLERY,
    MAX_KEY_CHARS,
    STALE_UPLOAD_SECONDS,
    UPLOAD_KEY_RE,
    UPLOAD_STORE,
    UPLOAD_TMP_PREFIX,
    _arg,
    clean_temp_folders,
    gallery_items,
    report_markdown,
    summary_markdown,
    upload_key,
)

logger = logging.getLogger(__name__)



class DataTab:
    """Load the demo or an upload, keep uploads by content hash, show classes and the long tail."""

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
