"""The Gradio app's tabs and what their buttons call: the :class:`Studio` and pure helpers.

Each tab module lays out its tab and binds it to the Studio (``build(studio, shared)``):
:mod:`~pogdiff.ui.data_tab`, :mod:`~pogdiff.ui.neighbours_tab`, :mod:`~pogdiff.ui.train_tab`,
:mod:`~pogdiff.ui.compare_tab`; ``app.py`` only assembles them, with the components they share
(:mod:`~pogdiff.ui.shared`). Every callback is a method of :class:`Studio`, which keeps the
server-side state (loaded datasets, neighbour tables, loaded models, the training
:class:`~pogdiff.jobs.JobManager`) and is made of one mixin per concern: ``DataTab``,
``NeighboursTab``, ``CompareTab`` (beside their tab's ``build``), ``TrainJobs`` and ``TrainRuns``
(:mod:`~pogdiff.ui.train_jobs`, :mod:`~pogdiff.ui.train_runs`), ``MetricsPanel``
(:mod:`~pogdiff.ui.metrics_tab`, the Compare tab's metrics). The Train form's fields travel as one
:class:`TrainForm` (:mod:`~pogdiff.ui.train_form`). Pure helpers of plain data, tested without a
browser: :mod:`~pogdiff.ui.views` and :mod:`~pogdiff.ui.compare_views`; :mod:`~pogdiff.ui.state`
holds loaded data sets and checkpoint sources. Nothing heavy happens at import or construction
time: the demo set, the text encoder and the models are built on first use.
"""

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported

from pogdiff.ui.state import DatasetBundle, Source  # noqa: E402
from pogdiff.ui.studio import Studio  # noqa: E402
from pogdiff.ui.train_form import TrainForm, form_values  # noqa: E402
from pogdiff.ui.views import (  # noqa: E402
    COLOUR_BY,
    DEMO_KEY,
    EXPORT_TMP_PREFIX,
    HUB_ID_RE,
    MAX_CACHED_DATASETS,
    MAX_CACHED_MODELS,
    MAX_GALLERY,
    MAX_KEY_CHARS,
    SHIPPED_RUNS,
    SHOTS,
    SLIDER_PX,
    STALE_UPLOAD_SECONDS,
    TERM_ORDER,
    THUMB_PX,
    UPLOAD_KEY_RE,
    UPLOAD_STORE,
    UPLOAD_TMP_PREFIX,
    WEAK_MARK,
    class_counts_table,
    clean_temp_folders,
    default_device,
    estimate_markdown,
    format_seconds,
    gallery_items,
    loss_frame,
    own_data_note,
    pogdiff_activity_html,
    preview_items,
    preview_note,
    progress_html,
    report_markdown,
    request_owner,
    runs_frame,
    short_prompt,
    status_markdown,
    summary_markdown,
    upload_key,
    upscale,
)

__all__ = ["DatasetBundle", "Source", "Studio", "TrainForm", "COLOUR_BY", "DEMO_KEY", "EXPORT_TMP_PREFIX", "HUB_ID_RE", "MAX_CACHED_DATASETS", "MAX_CACHED_MODELS", "MAX_GALLERY", "MAX_KEY_CHARS", "SHIPPED_RUNS", "SHOTS", "SLIDER_PX", "STALE_UPLOAD_SECONDS", "TERM_ORDER", "THUMB_PX", "UPLOAD_KEY_RE", "UPLOAD_STORE", "UPLOAD_TMP_PREFIX", "WEAK_MARK", "class_counts_table", "clean_temp_folders", "default_device", "estimate_markdown", "form_values", "format_seconds", "gallery_items", "loss_frame", "own_data_note", "pogdiff_activity_html", "preview_items", "preview_note", "progress_html", "report_markdown", "request_owner", "runs_frame", "short_prompt", "status_markdown", "summary_markdown", "upload_key", "upscale"]
