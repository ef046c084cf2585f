"""Load a user's image-text set from a folder or a ``.zip``, validating it on the way.

Layouts (they can be mixed; per image the first that applies gives the caption):

1. ``metadata.jsonl`` or ``metadata.csv`` with ``file_name`` and ``text`` columns and an optional
   ``subject`` (or ``class``) column: the Hugging Face ``imagefolder`` convention. A metadata
   file in a sub-folder describes the images below that sub-folder; other columns are kept in
   :attr:`Sample.extra`.
2. A ``.txt`` caption beside each image (``cat_01.png`` + ``cat_01.txt``).
3. Class sub-folders (``cats/x.png``): the caption is ``config.caption_template`` with the folder
   name as ``{subject}`` (underscores and dashes read as spaces).

Classes come from ``config.class_source`` ("auto", "column", "folder", "first_tag", "template",
"cluster"; see :mod:`pogdiff.data.classes`); the source used is ``ImageTextSet.class_source``.

A zip is never extracted to disk: members are streamed from :mod:`zipfile` after the archive
size, the number of files, the uncompressed total, per-member compression ratios and member paths
(``../``, absolute paths, links) have been checked against :class:`DataConfig`. Each file is read
in chunks up to :func:`file_byte_limit`, an image only after its header (first 64 KiB) showed it
within ``max_image_pixels``; a damaged member is reported and skipped (README "Data loading: bad
input"). A zip whose content sits in one top folder is read as if that folder were the root.
"""

from __future__ import annotations

import io
import logging
import re
import warnings
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..config import DataConfig
from .classes import ClassItem, assign_classes, check_class_source, cluster_captions, subject_from_caption
from .validation import DatasetError, ValidationReport
from .metadata import read_metadata, clean_caption
from .trainer_configs import KOHYA_TOML, ONETRAINER_CONCEPTS, SOURCE_NAMES, TrainerConfig, class_weights, find_trainer_config
from .sources import (
    IMAGE_EXTENSIONS,
    METADATA_NAMES,
    MISNAMED_METADATA,
    REDUCING_GAP,
    open_folder,
    open_zip,
    report_too_many_pixels,
    FileSource,
    strip_single_top_folder,
)

__all__ = ["ImageTextSet", "Sample", "cluster_captions", "load_image_text_set", "subject_from_caption"]

logger = logging.getLogger(__name__)

@dataclass
class Sample:
    """One image-text pair: ``file_name`` is the path inside the set (POSIX separators)."""

    file_name: str
    text: str
    subject: str
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class ImageTextSet:
    """A loaded set. ``images``: uint8 ``[N, H, W, 3]`` at ``config.resolution``, one per sample."""

    root: str
    samples: list[Sample]
    images: np.ndarray
    report: ValidationReport
    # The class source used ("column" | "folder" | "first_tag" | "template" | "cluster") and the one
    # asked for in DataConfig.class_source ("auto" or one of those); see pogdiff/data/classes.py.
    class_source: str
    class_source_requested: str = "auto"
    class_source_reason: str = ""  # why that source was used ("auto: the captions are tags (...)")
    # A kohya / OneTrainer config found in the upload (pogdiff/data/trainer_configs.py): its source
    # ("kohya_folders", "kohya_toml", "onetrainer" or "") and, per class, images, repeats, draw
    # weight, share of the draws and loss weight. Empty when the classes did not come from it.
    trainer_config: str = ""
    class_weights: dict[str, dict] = field(default_factory=dict)

    @property
    def subjects(self) -> list[str]:
        return [s.subject for s in self.samples]

    @property
    def classes(self) -> list[str]:
        return sorted(set(self.subjects))

    @property
    def captions(self) -> list[str]:
        return [s.text for s in self.samples]

    def __len__(self) -> int:
        return len(self.samples)


# --- images ----------------------------------------------------------------------------------


def _decode_image(data: bytes, where: str, config: DataConfig,
                  report: ValidationReport) -> tuple[np.ndarray | None, tuple[int, int] | None]:
    """Bytes -> uint8 ``[R, R, 3]`` (EXIF-upright, RGB, centre-cropped square, LANCZOS-resized) and the
    image's size in its file ``(width, height)``; ``(None, None)`` when it cannot be used (reported)."""
    fix = "Re-export the image as PNG or JPEG, or remove it."
    name = PurePosixPath(where).name
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            w, h = im.size
            if w * h > config.max_image_pixels:
                report_too_many_pixels(where, w, h, config, report)
                return None, None
            if im.format == "JPEG":
                im.draft("RGB", (config.resolution * 2, config.resolution * 2))
            im.load()
            im = ImageOps.exif_transpose(im)
            im = _to_rgb(im)
    except Image.DecompressionBombError:
        report.error("image_too_large", where, "The image is too large to decode safely; skipped.",
                     "Downscale the image, or raise DataConfig.max_image_pixels.")
        return None, None
    except UnidentifiedImageError:
        report.error("corrupt_image", where,
                     f"Cannot decode the image '{name}': its content is in none of the image formats read here "
                     f"({', '.join(sorted(e.lstrip('.') for e in IMAGE_EXTENSIONS))}), whatever its name says; "
                     f"{_first_bytes(data)}; skipped.",
                     "Check that the file opens in an image viewer. " + fix)
        return None, None
    except (OSError, SyntaxError, ValueError) as exc:
        detail = re.sub(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>", f"'{name}'", str(exc))
        report.error("corrupt_image", where,
                     f"Cannot decode the image '{name}': the file is damaged ({type(exc).__name__}: {detail}); "
                     "skipped.", fix)
        return None, None
    return np.asarray(_centre_square(im, config.resolution), dtype=np.uint8), (w, h)


def _first_bytes(data: bytes, n: int = 24) -> str:
    """What a file that is not an image starts with, in words."""
    if not data:
        return "the file is empty"
    head = data[:n]
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and text.isprintable():
        return f"it starts with the text {text!r}" + ("..." if len(data) > n else "")
    return f"it starts with the bytes {head[:8].hex(' ')}"


def _note_resized(sizes: list[tuple[int, int]], resolution: int, report: ValidationReport,
                  max_listed: int = 5) -> None:
    """One ``images_resized`` note: how many loaded images were shrunk to the model's size, from which sizes."""
    shrunk = Counter(size for size in sizes if min(size) > resolution)
    if not shrunk:
        return
    n = sum(shrunk.values())
    ordered = sorted(shrunk.items(), key=lambda kv: (-kv[0][0] * kv[0][1], kv[0]))
    listed = [f"{c} from {w}x{h}" for (w, h), c in ordered[:max_listed]]
    if len(ordered) > max_listed:
        listed.append(f"{sum(c for _, c in ordered[max_listed:])} from {len(ordered) - max_listed} other sizes")
    cropped = sum(c for (w, h), c in shrunk.items() if w != h)
    crop = f"; {cropped} of them not square, so centre-cropped to a square first" if cropped else ""
    report.info("images_resized", "",
                f"{n} of {len(sizes)} image(s) were shrunk to {resolution}x{resolution} px ({', '.join(listed)}){crop}.",
                f"Nothing to fix: training uses {resolution}x{resolution} px images, so larger files add no detail "
                "(smaller ones upload faster).")


def _centre_square(im: Image.Image, resolution: int) -> Image.Image:
    """Crop the largest centred square, then resize it (LANCZOS) to ``resolution``."""
    w, h = im.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    square = im.crop((left, top, left + side, top + side))
    if side == resolution:
        return square
    return square.resize((resolution, resolution), Image.Resampling.LANCZOS, reducing_gap=REDUCING_GAP)


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; transparency is composited on white, 16-bit and float are rescaled."""
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        arr = np.asarray(im, dtype=np.float64)
        top = 1.0 if im.mode == "F" and arr.max(initial=0) <= 1.0 else (255.0 if arr.max(initial=0) <= 255 else 65535.0)
        im = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im if im.mode == "RGB" else im.convert("RGB")


# --- classes ---------------------------------------------------------------------------------


def _folder_caption_subject(path: str) -> str:
    return re.sub(r"[_\-]+", " ", PurePosixPath(path).parent.name).strip()


# --- the loader ------------------------------------------------------------------------------


@dataclass
class _Pending:
    path: str
    text: str
    subject: str | None  # from a column
    extra: dict[str, Any]
    caption_from: str  # "metadata" | "sidecar" | "folder"
    concept: str | None = None  # the class a kohya / OneTrainer config gives the image


def load_image_text_set(source: str | Path, config: DataConfig = DataConfig(), *,
                        encoder: Any = None) -> ImageTextSet:
    """Read, validate and normalise a folder or ``.zip`` image-text set.

    Good images load even when others are bad; every problem is in ``result.report``.
    Raises :class:`DatasetError` (with the report) only when no usable image is left.
    Classes come from ``config.class_source`` (:mod:`pogdiff.data.classes`); ``encoder`` embeds
    the captions when they are clustered (default: the shared MiniLM).
    """
    check_class_source(config.class_source)
    report = ValidationReport()
    src = _open(Path(source), config, report)
    prefix = strip_single_top_folder(src)
    if prefix:
        logger.info("reading %s from its top folder %s", source, prefix)
    pending, trainer = _collect(src, config, report)
    samples, images, sizes = [], [], []
    for item in pending:
        data = src.read_image(item.path, config, report)
        array, size = (None, None) if data is None else _decode_image(data, item.path, config, report)
        if array is not None:
            samples.append(Sample(item.path, item.text, item.subject or "", item.extra))
            images.append(array)
            sizes.append(size)
    _raise_if_empty(source, samples, report)
    caption_from = {p.path: p.caption_from for p in pending}
    concept = {p.path: p.concept for p in pending}
    items = [ClassItem(s.file_name, s.text, s.subject or None, caption_from[s.file_name], concept[s.file_name])
             for s in samples]
    subjects, class_source, reason = assign_classes(items, config, report, encoder)
    kept = [i for i, subject in enumerate(subjects) if subject is not None]
    for i in kept:
        samples[i].subject = subjects[i]
    samples, images = [samples[i] for i in kept], [images[i] for i in kept]
    _raise_if_empty(source, samples, report)
    _note_resized([sizes[i] for i in kept], config.resolution, report)
    _warn_small_classes(samples, report)
    logger.info("loaded %s: %s; classes from %s", Path(source).name, report.summary(), class_source)
    weights = {}
    if trainer is not None and class_source == "folder":
        folders = Counter(c.folder for c in (trainer.concept_of(s.file_name) for s in samples) if c is not None)
        weights = class_weights(trainer, dict(folders))
        if config.class_source == "auto":
            reason = f"auto: {SOURCE_NAMES[trainer.source]} give each image's class and how often it is drawn"
    return ImageTextSet(str(source), samples, np.stack(images), report, class_source, config.class_source, reason,
                        trainer.source if weights else "", weights)


def _raise_if_empty(source: str | Path, samples: list[Sample], report: ValidationReport) -> None:
    report.n_images_loaded = len(samples)
    if samples:
        return
    what = "no images found" if report.n_images_found == 0 else "none of the images could be used"
    if report.n_images_found == 0:
        report.error("empty_set", "", "The set contains no images (png, jpg, jpeg, webp, bmp, gif, tif).",
                     "Upload a folder or .zip with images and captions (see the accepted layouts).")
    raise DatasetError(f"Cannot load '{Path(source).name}': {what}.", report)


def _open(path: Path, config: DataConfig, report: ValidationReport) -> FileSource:
    if not path.exists():
        report.error("not_found", str(path.name), "No such file or folder.", "Check the path.")
        raise DatasetError(f"Cannot load '{path}': it does not exist.", report)
    if path.is_dir():
        return open_folder(path, config, report)
    if zipfile.is_zipfile(path) or path.suffix.lower() == ".zip":
        return open_zip(path, config, report)
    report.error("unsupported_source", path.name, "Expected a folder or a .zip archive.",
                 "Put the images and captions in a folder and upload it, or zip that folder.")
    raise DatasetError(f"Cannot load '{path.name}': not a folder or a .zip archive.", report)


def _collect(src: FileSource, config: DataConfig, report: ValidationReport) -> tuple[list[_Pending], TrainerConfig | None]:
    """Match every image with its caption (and its kohya / OneTrainer concept); report files that
    cannot be used."""
    rows, has_metadata = read_metadata(src, config, report)
    metadata_broken = has_metadata and not rows and any(i.code in ("metadata_columns", "metadata_json") for i in report.errors)
    images = [p for p in sorted(src.files) if PurePosixPath(p).suffix.lower() in IMAGE_EXTENSIONS]
    trainer = find_trainer_config(src.files, images, lambda p: _text(src, p, config, report), report)
    image_set = set(images)
    stems = {str(PurePosixPath(p).with_suffix("")) for p in images}
    caption_exts = {".txt"} | {c.caption_extension for c in (trainer.concepts if trainer else [])}
    _check_other_files(src, image_set, rows, stems, report, caption_exts)
    _check_case_duplicates(images, report)
    report.n_images_found = len(images)
    pending = []
    for path in images:
        concept = trainer.concept_of(path) if trainer else None
        if trainer is not None and concept is None:  # kohya / OneTrainer would not train it
            if not any(path.startswith(f + "/") for f in trainer.ignored):
                report.warning("not_in_concept", path, f"The image is in no folder of the {SOURCE_NAMES[trainer.source]}; "
                               "its trainer would not train it, so it is skipped.", "Add its folder to the config, "
                               "or move the image into one of the folders it names.")
            continue
        row = rows.get(path)
        if row is not None:
            if row.text:
                pending.append(_Pending(path, row.text, row.subject, row.extra, "metadata",
                                        concept.name if concept else None))
            continue
        item = _caption_without_row(src, path, config, has_metadata, metadata_broken, report,
                                    concept.caption_extension if concept else ".txt")
        if item is not None:
            if concept is not None:
                item.concept = concept.name
                if item.caption_from == "folder":  # kohya captions an image without a caption file by its class tokens
                    item.text = concept.name
            pending.append(item)
    return pending, trainer


def _text(src: FileSource, path: str, config: DataConfig, report: ValidationReport) -> str | None:
    data = src.read(path, config, report)
    if data is None:
        return None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        report.error("bad_config_file", path, "The file is not UTF-8 text; not read.", "Save it as UTF-8.")
        return None


def _caption_without_row(src, path, config, has_metadata, metadata_broken, report,
                         caption_ext: str = ".txt") -> _Pending | None:
    sidecar = str(PurePosixPath(path).with_suffix(caption_ext))
    if sidecar not in src.files and caption_ext != ".txt":
        sidecar = str(PurePosixPath(path).with_suffix(".txt"))
    if sidecar in src.files:
        data = src.read(sidecar, config, report)
        if data is None:
            return None
        try:
            text = clean_caption(data.decode("utf-8-sig"))
        except UnicodeDecodeError:
            report.error("bad_caption", sidecar, "The caption file is not UTF-8 text; image skipped.",
                         "Save the .txt caption as UTF-8.")
            return None
        if not text:
            report.error("empty_caption", sidecar, f"The caption of '{path}' is empty; image skipped.",
                         "Write the caption into the .txt file.")
            return None
        return _Pending(path, text, None, {}, "sidecar")
    if metadata_broken:
        return None  # the metadata error already explains why nothing has a caption
    if has_metadata:
        report.error("missing_caption", path, "The image is not listed in the metadata; skipped.",
                     f'Add a line {{"file_name": "{PurePosixPath(path).name}", "text": "..."}} to the metadata.')
        return None
    if "/" in path:
        subject = _folder_caption_subject(path)
        return _Pending(path, config.caption_template.format(subject=subject), None, {}, "folder")
    report.error("missing_caption", path, "The image has no caption; skipped.",
                 f"Add '{PurePosixPath(path).stem}.txt' with its caption beside it, a metadata.jsonl, "
                 "or move the images into class sub-folders.")
    return None


def _check_other_files(src, image_set, rows, stems, report, caption_exts=frozenset({".txt"})) -> None:
    for path in sorted(src.files):
        p = PurePosixPath(path)
        if path in image_set or p.name in METADATA_NAMES + MISNAMED_METADATA or path in (KOHYA_TOML, ONETRAINER_CONCEPTS):
            continue
        if p.suffix.lower() in caption_exts:
            if str(p.with_suffix("")) not in stems and p.stem.lower() not in ("readme", "license", "licence"):
                report.warning("caption_for_missing_file", path, f"Caption file without an image named '{p.stem}.*'.",
                               "Add the image with the same name, or delete the caption file.")
            continue
        if path in rows:  # listed in the metadata but not an image
            report.error("non_image_file", path, f"Listed in the metadata but '{p.suffix}' is not an image type; skipped.",
                         f"Convert it to PNG or JPEG ({', '.join(sorted(IMAGE_EXTENSIONS))}).")
            continue
        report.warning("non_image_file", path, f"Not an image or caption file ('{p.suffix or 'no extension'}'); ignored.",
                       f"Remove it, or convert it to one of {', '.join(sorted(IMAGE_EXTENSIONS))}.")


def _check_case_duplicates(images: list[str], report: ValidationReport) -> None:
    seen: dict[str, str] = {}
    for path in images:
        key = path.casefold()
        if key in seen:
            report.warning("duplicate_file_name", path,
                           f"Differs from '{seen[key]}' only in upper/lower case; both are loaded, but they clash "
                           "on Windows and macOS.", "Rename one of the two files.")
        else:
            seen[key] = path


def _warn_small_classes(samples: list[Sample], report: ValidationReport) -> None:
    counts = Counter(s.subject for s in samples)
    for s in samples:
        if counts[s.subject] == 1:
            report.warning("single_image_class", s.file_name,
                           f"Class '{s.subject}' has a single image; PoGDiff needs >= 2 images per class to borrow "
                           "strength between them (this image can only use neighbours of other classes).",
                           "Add at least one more image of this class, or merge it with a related class.")
