"""Which class each image of a user set belongs to: the class sources of ``DataConfig.class_source``.

- ``"column"``: the ``subject`` / ``class`` column of the metadata (rows without it fall back to
  the caption template, else the whole caption);
- ``"folder"``: the image's sub-folder (images in the root are skipped and reported), or the class
  its folder has in a kohya / OneTrainer config (``10_red circle/`` -> ``red circle``;
  :mod:`pogdiff.data.trainer_configs`);
- ``"first_tag"``: the caption up to its first comma, for tag captions as kohya-style trainers
  write them (``"red fox, outdoors, photo"`` -> ``"red fox"``);
- ``"template"``: the ``{subject}`` of ``DataConfig.caption_template`` (``"a photo of {subject}"``),
  also ``a/an photo/picture/image/portrait of X``, up to the first comma; other captions are skipped;
- ``"cluster"``: k-means (scikit-learn) on the captions' sentence embeddings (MiniLM by default),
  ``DataConfig.derive_clusters`` clusters or ``round(sqrt(n / 2))`` clipped to 2..50; each class
  is named after the caption nearest its centre;
- ``"auto"`` (the default): ``column`` when the metadata has a subject column, else ``folder`` when
  every image sits in a sub-folder and there are two or more of them (or the captions came from
  the folder names), else ``template`` when every caption matches it, else ``first_tag`` when the
  captions are tags (:func:`looks_like_tags`: most of them comma-separated, most first tags shared
  with another image), else ``cluster``.

The source actually used is ``ImageTextSet.class_source``, and why it was chosen
``ImageTextSet.class_source_reason``; the Data tab's **Class source** choice sets
``DataConfig.class_source`` (see README "Your own data").
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

import numpy as np

from ..config import DataConfig
from .validation import ValidationReport

logger = logging.getLogger(__name__)

CLASS_SOURCES = ("auto", "column", "folder", "first_tag", "template", "cluster")
DEFAULT_CLASS_SOURCE = "auto"
CLASS_SOURCE_HELP = {
    "auto": "subject column, else class folders, else the caption template, else the first tag of tag captions, "
            "else clustering",
    "column": "the 'subject' / 'class' column of metadata.jsonl / metadata.csv",
    "folder": "the sub-folder of each image",
    "first_tag": "the caption's first comma-separated tag ('red fox, outdoors' -> 'red fox')",
    "template": "X in captions that read 'a photo of X, ...' (DataConfig.caption_template)",
    "cluster": "k-means clusters of the caption embeddings",
}
# How the page names each source (the Data tab's "Class source" choice).
CLASS_SOURCE_LABELS = {
    "auto": "auto",
    "column": "metadata column",
    "folder": "folders",
    "first_tag": "first tag",
    "template": "template",
    "cluster": "clustering",
}
# Where a fix is made: the page control (the CLI and scripts set DataConfig.class_source).
CLASS_SOURCE_CONTROL = "'Class source' in the Data tab"
# Tag captions (auto -> first_tag): more than this share of the captions hold a comma, and more than
# this share of the images have a first tag that another image has too.
TAG_CAPTION_SHARE = 0.5
REPEATED_TAG_SHARE = 0.5
TEMPLATE_RE = re.compile(r"^\s*an?\s+(?:photo|picture|image|portrait)\s+of\s+([^,]+)", re.IGNORECASE)
MAX_AUTO_CLUSTERS = 50
CLUSTER_NAME_CHARS = 40


@dataclass
class ClassItem:
    """What class derivation sees of one loaded image."""

    file_name: str
    text: str
    column_subject: str | None  # from the metadata's subject / class column
    caption_from: str  # "metadata" | "sidecar" | "folder"
    concept: str | None = None  # the class of its folder in a kohya / OneTrainer config (trainer_configs.py)


def check_class_source(source: str) -> str:
    if source not in CLASS_SOURCES:
        raise ValueError(f"DataConfig.class_source must be one of {', '.join(CLASS_SOURCES)}; got {source!r}.")
    return source


# --- one caption -> one class -----------------------------------------------------------------


def _template_re(template: str) -> re.Pattern | None:
    if template.count("{subject}") != 1:
        return None
    prefix, suffix = template.split("{subject}")

    def literal(text: str) -> str:
        return r"\s+".join(re.escape(word) for word in text.split(" ")) if text else ""

    return re.compile(r"^\s*" + literal(prefix) + r"(?P<subject>[^,]+?)" + literal(suffix) + r"\s*(?:,|\.?\s*$)",
                      re.IGNORECASE)


def subject_from_caption(text: str, template: str = "") -> str | None:
    """``"a photo of Mira Okafor, smiling"`` -> ``"Mira Okafor"``; None when the template does not match.

    ``template`` (e.g. ``DataConfig.caption_template``) is tried first, then ``a/an photo/picture/
    image/portrait of X``.
    """
    pattern = _template_re(template) if template else None
    m = pattern.match(text) if pattern else None
    if m:
        subject = m.group("subject").strip()
    else:
        m = TEMPLATE_RE.match(text)
        if not m:
            return None
        subject = m.group(1).strip().rstrip(".").strip()
    return subject or None


def first_tag(text: str) -> str | None:
    """``"red fox, outdoors, photo"`` -> ``"red fox"``; None when the first tag is empty."""
    tag = text.split(",", 1)[0].strip()
    return tag or None


def folder_subject(path: str) -> str | None:
    """The sub-folder of ``path`` inside the set; None for a file in the root."""
    parent = str(PurePosixPath(path).parent)
    return None if parent == "." else parent


def tag_caption_counts(texts: list[str]) -> tuple[int, int]:
    """``(captions holding a comma, captions whose first tag another caption shares)``."""
    tags = [first_tag(t) for t in texts]
    seen: dict[str, int] = {}
    for tag in tags:
        if tag is not None:
            key = tag.casefold()
            seen[key] = seen.get(key, 0) + 1
    with_comma = sum("," in t for t in texts)
    repeated = sum(tag is not None and seen[tag.casefold()] >= 2 for tag in tags)
    return with_comma, repeated


def looks_like_tags(texts: list[str]) -> bool:
    """Tag captions as kohya-style trainers write them (``"red circle, white background"``): more than
    :data:`TAG_CAPTION_SHARE` of them hold a comma and more than :data:`REPEATED_TAG_SHARE` of them
    start with a tag that another caption starts with too (the class tag)."""
    if not texts:
        return False
    with_comma, repeated = tag_caption_counts(texts)
    return with_comma > TAG_CAPTION_SHARE * len(texts) and repeated > REPEATED_TAG_SHARE * len(texts)


# --- clustering ---------------------------------------------------------------------------------


def auto_cluster_count(n: int) -> int:
    return int(np.clip(round(math.sqrt(n / 2)), 2, MAX_AUTO_CLUSTERS))


def cluster_captions(texts: list[str], n_clusters: int = 0, seed: int = 0, encoder: Any = None) -> list[str]:
    """Class names for free-text captions: k-means (scikit-learn) on their sentence embeddings.

    ``encoder``: anything with ``encode(captions).pooled`` (default: the shared MiniLM of
    :mod:`pogdiff.model.text`). ``n_clusters = 0`` picks ``round(sqrt(n / 2))`` clipped to ``2..50``.
    Clusters are numbered by size (``00`` the largest) and named after the caption nearest the
    centre: ``"cluster 00: a cat on a sofa"``.
    """
    from sklearn.cluster import KMeans

    n = len(texts)
    if n == 0:
        return []
    k = max(1, min(n_clusters or auto_cluster_count(n), n))
    if encoder is None:
        from ..model.text import default_minilm

        encoder = default_minilm()
    x = np.asarray(encoder.encode(list(texts)).pooled, dtype=np.float64)
    x /= np.linalg.norm(x, axis=1, keepdims=True).clip(1e-12)
    k = min(k, len(np.unique(x.round(6), axis=0)))  # k-means cannot make more groups than distinct points
    model = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(x)
    labels = model.labels_
    order = sorted(range(k), key=lambda c: (-(labels == c).sum(), c))
    names = {}
    for rank, c in enumerate(order):
        members = np.flatnonzero(labels == c)
        nearest = members[np.argmin(((x[members] - model.cluster_centers_[c]) ** 2).sum(1))]
        text = " ".join(texts[nearest].split())
        short = text if len(text) <= CLUSTER_NAME_CHARS else text[: CLUSTER_NAME_CHARS - 3].rstrip() + "..."
        names[c] = f"cluster {rank:02d}: {short}"
    return [names[c] for c in labels]


# --- a whole set ----------------------------------------------------------------------------------


def assign_classes(items: list[ClassItem], config: DataConfig, report: ValidationReport,
                   encoder: Any = None) -> tuple[list[str | None], str, str]:
    """One class per item (None: the item has none under this source and is skipped, reported),
    the source used (never ``"auto"``) and why it was used (:func:`choose_class_source`)."""
    source, reason = choose_class_source(items, config)
    other = f"or choose another {CLASS_SOURCE_CONTROL}."
    if source == "column":
        return _by_column(items, config, report), source, reason
    if source == "folder":
        return _per_item(items, lambda it: it.concept or folder_subject(it.file_name), report, "not_in_class_folder",
                         "The image is not in a class sub-folder; skipped (class source: folders).",
                         f"Move it into a sub-folder named after its class, {other}"), source, reason
    if source == "first_tag":
        return _per_item(items, lambda it: first_tag(it.text), report, "no_class_in_caption",
                         "The caption has no first tag (it starts with a comma); skipped (class source: first tag).",
                         f"Start the caption with its class tag, e.g. 'red fox, outdoors, photo', {other}"), \
            source, reason
    if source == "template":
        template = config.caption_template
        return _per_item(items, lambda it: subject_from_caption(it.text, template), report, "no_class_in_caption",
                         f"The caption does not read '{template.format(subject='X')}, ...'; skipped "
                         "(class source: template).",
                         f"Start the caption with '{template.format(subject='<subject>')},', {other}"), source, reason
    names = cluster_captions([it.text for it in items], config.derive_clusters, encoder=encoder)
    if config.class_source == "auto":
        report.warning("classes_clustered", "",
                       f"Classes were derived by clustering the captions into {len(set(names))} groups ({reason}).",
                       f"For exact classes choose {CLASS_SOURCE_CONTROL}: 'first tag' when each caption starts "
                       "with its class tag, 'template' when the captions read "
                       f"'{config.caption_template.format(subject='<subject>')}, ...', 'folders' for one sub-folder "
                       "per class; or add a 'subject' column to metadata.jsonl and choose 'metadata column'.")
    return list(names), "cluster", reason


def choose_class_source(items: list[ClassItem], config: DataConfig) -> tuple[str, str]:
    """The class source to use (``config.class_source``, or what ``"auto"`` picks for ``items``) and a
    sentence saying why."""
    source = check_class_source(config.class_source)
    if source != "auto":
        return source, f"chosen: {CLASS_SOURCE_LABELS[source]}"
    n = len(items)
    if any(it.column_subject for it in items):
        return "column", "auto: the metadata has a 'subject' / 'class' column"
    if all(it.concept for it in items):
        return "folder", "auto: a kohya / OneTrainer config gives every image's class and how often it is drawn"
    folders = {folder_subject(it.file_name) for it in items}
    if None not in folders and any(it.caption_from == "folder" for it in items):
        return "folder", "auto: the captions were made from the sub-folder names"
    if None not in folders and len(folders) >= 2:
        return "folder", f"auto: every image sits in one of {len(folders)} sub-folders"
    template = config.caption_template
    if all(subject_from_caption(it.text, template) for it in items):
        return "template", f"auto: every caption reads '{template.format(subject='X')}, ...'"
    texts = [it.text for it in items]
    with_comma, repeated = tag_caption_counts(texts)
    if looks_like_tags(texts):
        return "first_tag", (f"auto: the captions are tags ({with_comma} of {n} comma-separated; {repeated} of {n} "
                             "start with a tag another caption starts with too)")
    return "cluster", ("auto: no subject column, no class sub-folders, not every caption reads "
                       f"'{template.format(subject='X')}, ...', and the captions are not tags with a repeated first "
                       f"tag ({with_comma} of {n} comma-separated, {repeated} of {n} share their first tag)")


def _by_column(items: list[ClassItem], config: DataConfig, report: ValidationReport) -> list[str | None]:
    if not any(it.column_subject for it in items):
        report.error("no_class_column", "", "The class source is 'metadata column', but no metadata row has a "
                     "'subject' or 'class' value.", "Add a 'subject' column to metadata.jsonl / metadata.csv, or "
                     f"choose another {CLASS_SOURCE_CONTROL}.")
        return [None] * len(items)
    return [it.column_subject or subject_from_caption(it.text, config.caption_template) or it.text for it in items]


def _per_item(items, derive, report: ValidationReport, code: str, message: str, fix: str) -> list[str | None]:
    out = []
    for it in items:
        subject = derive(it)
        if subject is None:
            report.error(code, it.file_name, message, fix)
        out.append(subject)
    return out
