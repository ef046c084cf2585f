"""What the Gradio app binds its buttons to: the :class:`Studio` and pure helpers.

``app.py`` only lays out components; every callback is a method of :class:`Studio`, which keeps
the server-side state (loaded datasets, neighbour tables, loaded models, the training
:class:`~pogdiff.jobs.JobManager`). Nothing heavy happens at import or construction time: the
demo set, the text encoder and the models are built on first use.

The package: :mod:`~pogdiff.ui.studio` (the Studio, one mixin per tab: ``data_tab``,
``neighbours_tab``, ``train_tab``, ``compare_tab``, ``metrics_tab``), :mod:`~pogdiff.ui.state`
(loaded data sets, checkpoint sources) and :mod:`~pogdiff.ui.views` (pure helpers of plain data,
tested without a browser).
"""

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported

from pogdiff.ui.state import DatasetBundle, Source  # noqa: E402
from pogdiff.ui.studio import Studio  # noqa: E402
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
    form_values,
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

__all__ = ["DatasetBundle", "Source", "Studio", "COLOUR_BY", "DEMO_KEY", "EXPORT_TMP_PREFIX", "HUB_ID_RE", "MAX_CACHED_DATASETS", "MAX_CACHED_MODELS", "MAX_GALLERY", "MAX_KEY_CHARS", "SHIPPED_RUNS", "SHOTS", "SLIDER_PX", "STALE_UPLOAD_SECONDS", "TERM_ORDER", "THUMB_PX", "UPLOAD_KEY_RE", "UPLOAD_STORE", "UPLOAD_TMP_PREFIX", "WEAK_MARK", "class_counts_table", "clean_temp_folders", "default_device", "estimate_markdown", "form_values", "format_seconds", "gallery_items", "loss_frame", "own_data_note", "pogdiff_activity_html", "preview_items", "preview_note", "progress_html", "report_markdown", "request_owner", "runs_frame", "short_prompt", "status_markdown", "summary_markdown", "upload_key", "upscale"]
