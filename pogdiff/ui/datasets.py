"""The data sets of the page: the sets loaded in memory (a few, most recently used kept), the built-in
demo set, and the upload store, where uploaded sets that loaded are kept by content hash so a page
reload or a restart can bring them back (README "Your own data", "Limits and safety")."""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from pogdiff.config import DataConfig, Limits
from pogdiff.server import safety
from pogdiff.ui.downloads import clean_temp_folders
from pogdiff.ui.state import DatasetBundle
from pogdiff.ui.views import (
    DATASET_KEY_RE,
    DEMO_KEY,
    MAX_CACHED_DATASETS,
    MAX_KEY_CHARS,
    STALE_UPLOAD_SECONDS,
    UPLOAD_STORE,
    UPLOAD_TMP_PREFIX,
    checked_input,
    class_counts_table,
    dataset_key,
    error_report_html,
    split_dataset_key,
)

logger = logging.getLogger(__name__)


class Datasets:
    """The loaded sets by key (``demo``, ``upload-<hash>``, with ``~<class source>`` when not ``auto``);
    thread-safe.

    Args:
        runs_dir: the runs folder; the upload store is its ``uploads/`` folder.
        data_config: how every set is read (its class source aside).
        limits: server-side bounds (the upload store's expiry).
        demo_root: where the demo set is built (default: the package's cache).
    """

    def __init__(self, runs_dir: str | Path, *, data_config: DataConfig, limits: Limits,
                 demo_root: str | Path | None = None) -> None:
        self.runs_dir = Path(runs_dir)
        self.data_config = data_config
        self.limits = limits
        self._demo_root = demo_root
        self._lock = threading.Lock()
        self.loaded: OrderedDict[str, DatasetBundle] = OrderedDict()

    # ------------------------------------------------------------------ the sets in memory
    def known(self, key: str) -> DatasetBundle | None:
        """The set ``key`` when it is in memory, else None (nothing is loaded)."""
        with self._lock:
            return self.loaded.get(key)

    def count(self) -> int:
        with self._lock:
            return len(self.loaded)

    def remember(self, bundle: DatasetBundle) -> DatasetBundle:
        with self._lock:
            self.loaded[bundle.key] = bundle
            self.loaded.move_to_end(bundle.key)
            while len(self.loaded) > MAX_CACHED_DATASETS:
                self.loaded.popitem(last=False)
        return bundle

    def drop_unheld(self, held: set[str]) -> int:
        """Forget every set whose key is not in ``held`` (no visitor works on it); how many went."""
        with self._lock:
            dropped = [k for k in self.loaded if k not in held]
            for k in dropped:
                del self.loaded[k]
        return len(dropped)

    def bundle(self, key: str | None) -> DatasetBundle:
        """The dataset of this browser session; the demo set when none was loaded."""
        key = checked_input(safety.text, "dataset key", key, MAX_KEY_CHARS) or DEMO_KEY
        found = self.known(key)
        if found is not None:
            return found
        base, class_source = split_dataset_key(key) if re.fullmatch(DATASET_KEY_RE, key) else ("", "")
        if key == DEMO_KEY:
            return self.load_demo()
        if base == DEMO_KEY:
            return self.load_demo(class_source)
        if base and safety.is_inside(self.upload_store, base) and (self.upload_store / base).is_dir():
            return self.load_stored(key, safety.resolve_inside(self.upload_store, base))
        raise gr.Error("That dataset is no longer in memory (the server restarted or loaded others). "
                       "Load it again in the Data tab.", title="Dataset not loaded")

    def dataset_banner(self, key: str | None) -> str:
        """One line naming the dataset the session works on (for the Neighbours / Train tabs)."""
        key = checked_input(safety.text, "dataset key", key, MAX_KEY_CHARS)
        bundle = self.known(key or DEMO_KEY)
        if bundle is None:
            return ("Working on the **built-in demo set** (load another one in the **Data** tab)."
                    if not key or key == DEMO_KEY else "Load a dataset in the **Data** tab.")
        return (f"Working on **{bundle.name}**: {len(bundle.captions)} images, {len(bundle.table)} classes, "
                f"{len(bundle.few_shot_subjects())} few-shot.")

    def make_bundle(self, key: str, name: str, ds: Any) -> DatasetBundle:
        table = self.class_table(ds)
        try:
            from pogdiff.data import stats

            summary = dict(stats.summary(ds, self.data_config))
        except (ImportError, AttributeError, TypeError) as exc:
            logger.debug("stats.summary unavailable: %s", exc)
            summary = {}
        return DatasetBundle(key=key, name=name, ds=ds, table=table, summary=summary)

    def class_table(self, ds: Any) -> pd.DataFrame:
        try:
            from pogdiff.data import stats

            table = stats.class_table(ds, self.data_config)
            return table[["subject", "count", "shot"]].reset_index(drop=True)
        except (ImportError, AttributeError, TypeError, KeyError) as exc:
            logger.debug("stats.class_table unavailable: %s", exc)
            return class_counts_table(ds.subjects, self.data_config)

    # ------------------------------------------------------------------ the demo set
    def demo_root(self) -> Path:
        from pogdiff.data import ensure_demo

        return Path(ensure_demo(root=self._demo_root) if self._demo_root else ensure_demo())

    def load_demo(self, class_source: str = "auto") -> DatasetBundle:
        """The demo's train split, its classes from ``class_source`` (key ``demo`` or ``demo~<source>``)."""
        ds = self.read_set(self.demo_root() / "train", class_source)
        return self.remember(self.make_bundle(dataset_key(DEMO_KEY, class_source), "built-in demo set (train split)",
                                              ds))

    def eval_set(self):
        """The demo's held-out evaluation split."""
        from pogdiff.data import load_image_text_set

        return load_image_text_set(self.demo_root() / "eval", self.data_config)

    # ------------------------------------------------------------------ uploads kept by content hash
    @property
    def upload_store(self) -> Path:
        """Uploaded sets that loaded, one folder per content hash, so a page reload can restore them."""
        return self.runs_dir / UPLOAD_STORE

    def store_upload(self, key: str, paths: Sequence[Path]) -> Path:
        """The upload store's folder of upload ``key``, its files copied there when it is new."""
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

    def clean_leftovers(self) -> int:
        """Half-copied uploads (left by a crash), expired uploads and expired exported zips; how many went."""
        max_age = 3600.0 * self.limits.upload_max_age_hours
        return (safety.remove_old_dirs(self.upload_store, UPLOAD_TMP_PREFIX, STALE_UPLOAD_SECONDS)
                + safety.remove_old_dirs(self.upload_store, "upload-", max_age)
                + clean_temp_folders(max_age))

    def load_stored(self, key: str, store: Path) -> DatasetBundle:
        source, name = self.stored_source(store)
        ds = self.read_set(source, split_dataset_key(key)[1])
        return self.remember(self.make_bundle(key, name, ds))

    @staticmethod
    def stored_source(store: Path) -> tuple[Path, str]:
        """What a stored upload is read from (its one .zip, or the folder of loose files) and its name."""
        files = sorted(p for p in store.iterdir() if p.is_file())
        if len(files) == 1 and files[0].suffix.lower() == ".zip":
            return files[0], files[0].name
        return store, f"{len(files)} uploaded files"

    def read_set(self, source: Path, class_source: str, resolution: int | None = None):
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
                    source = self.stored_source(store)[0]
                ds = self.read_set(source, class_source, resolution)
                bundle.at_resolution = {resolution: ds}
        return ds
