"""Data: the procedural identity set, user image-text sets, validation and class statistics."""

from .classes import CLASS_SOURCE_HELP, CLASS_SOURCES, DEFAULT_CLASS_SOURCE, cluster_captions
from .demo import (
    DemoSpec,
    RenderedSet,
    default_demo_dir,
    demo_identities,
    ensure_demo,
    long_tail_counts,
    make_demo_set,
    pretrain_identities,
    render_set,
)
from .identities import (
    ATTRIBUTE_HEADS,
    Attributes,
    Identity,
    attribute_labels,
    caption,
    make_identities,
    sample_attributes,
)
from .render import render
from .loader import ImageTextSet, Sample, load_image_text_set, subject_from_caption
from .stats import class_table, long_tail_figure, shot_bucket, summary
from .validation import DatasetError, Issue, ValidationReport

__all__ = [
    "ATTRIBUTE_HEADS",
    "Attributes",
    "CLASS_SOURCES",
    "CLASS_SOURCE_HELP",
    "DEFAULT_CLASS_SOURCE",
    "DatasetError",
    "DemoSpec",
    "Identity",
    "ImageTextSet",
    "Issue",
    "RenderedSet",
    "Sample",
    "ValidationReport",
    "attribute_labels",
    "caption",
    "class_table",
    "cluster_captions",
    "default_demo_dir",
    "demo_identities",
    "ensure_demo",
    "load_image_text_set",
    "long_tail_counts",
    "long_tail_figure",
    "make_demo_set",
    "make_identities",
    "pretrain_identities",
    "render",
    "render_set",
    "sample_attributes",
    "shot_bucket",
    "subject_from_caption",
    "summary",
]
