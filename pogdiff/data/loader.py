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

import csv
import io
import json
import logging
import os
import re
import stat
import unicodedata
import warnings
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..config import DataConfig
from .classes import ClassItem, assign_classes, check_class_source, cluster_captions, subject_from_caption
from .validation import DatasetError, ValidationReport

__all__ = ["ImageTextSet", "Sample", "cluster_captions", "load_image_text_set", "subject_from_caption"]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
METADATA_NAMES = ("metadata.jsonl", "metadata.csv")  # in order of preference
MISNAMED_METADATA = ("metadata.json",)
SUBJECT_COLUMNS = ("subject", "class")
REQUIRED_COLUMNS = ("file_name", "text")
COLUMN_ALIASES = {
    "file_name": ("filename", "file", "image", "image_path", "path", "img", "file_path"),
    "text": ("caption", "prompt", "captions", "description", "label_text"),
}
IGNORED_NAMES = frozenset({".DS_Store", "Thumbs.db", "desktop.ini"})
IGNORED_DIRS = frozenset({"__MACOSX"})
# Compression ratios are only checked for members this large (small files compress well).
RATIO_CHECK_MIN_BYTES = 1 << 20
# Per-file byte limit: 8 bytes per allowed pixel (16-bit RGBA, uncompressed) but at least 1 MiB.
BYTES_PER_PIXEL_BOUND = 8
MIN_FILE_LIMIT = 1 << 20
READ_CHUNK = 1 << 20
# An image's header is looked for in its first bytes, so that its size is known before the rest is read.
HEADER_BYTES = 64 << 10
# Errors that reading a damaged member raises (bad CRC, broken or truncated deflate stream).
READ_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError)
# Characters that print as nothing. Zero-width spaces, word joiners, BOMs and soft hyphens are removed
# from captions; joiners and direction marks (meaningful in some scripts) are kept, but a caption of
# nothing else counts as blank.
ZERO_WIDTH_RE = re.compile("[\u00ad\u180e\u200b\u2060\ufeff]")
INVISIBLE_RE = re.compile("[\u00ad\u180e\u200b-\u200f\u202a-\u202e\u2060-\u2064\ufeff]")
# Large downscales first shrink by an integer factor (box filter) to within 3x of the target.
REDUCING_GAP = 3.0


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


# --- sources: a folder or a zip, seen as relative POSIX paths -> bytes -------------------------


class _Source:
    """Files of a set as ``{relative posix path: opener}``, with the safety checks done.

    Files are streamed: :meth:`read` stops at the per-file limit and reports a damaged file
    instead of raising, so one bad member never fails the whole set.
    """

    def __init__(self, files: dict[str, Callable[[], IO[bytes]]]):
        self.files = files

    def read(self, path: str, config: DataConfig, report: ValidationReport, head: bytes = b"",
             stream: IO[bytes] | None = None) -> bytes | None:
        """The bytes of ``path`` (None when damaged or too large; the report says why)."""
        limit = file_byte_limit(config)
        try:
            if stream is None:
                with self.files[path]() as fh:
                    return _read_limited(fh, head, limit, path, report)
            return _read_limited(stream, head, limit, path, report)
        except READ_ERRORS as exc:
            _report_damaged(path, exc, report)
            return None

    def read_image(self, path: str, config: DataConfig, report: ValidationReport) -> bytes | None:
        """The bytes of an image, after its header showed it within ``config.max_image_pixels``."""
        try:
            with self.files[path]() as fh:
                head = fh.read(HEADER_BYTES)
                size = _header_size(head)
                if size is not None and size[0] * size[1] > config.max_image_pixels:
                    _report_too_many_pixels(path, *size, config, report)
                    return None
                return self.read(path, config, report, head, fh)
        except READ_ERRORS as exc:
            _report_damaged(path, exc, report)
            return None


def file_byte_limit(config: DataConfig) -> int:
    """Largest file read from a set: ``8 * max_image_pixels`` bytes (an uncompressed 16-bit RGBA
    image of the largest allowed size), at least 1 MiB."""
    return max(BYTES_PER_PIXEL_BOUND * config.max_image_pixels, MIN_FILE_LIMIT)


def _read_limited(fh: IO[bytes], head: bytes, limit: int, path: str, report: ValidationReport) -> bytes | None:
    """Read ``fh`` to its end in chunks (after ``head``, already read), stopping past ``limit`` bytes."""
    chunks, total = [head], len(head)
    while total <= limit:
        chunk = fh.read(min(READ_CHUNK, limit + 1 - total))
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        total += len(chunk)
    report.error("file_too_large", path,
                 f"The file is larger than the per-file limit of {limit / 2**20:.1f} MiB; skipped.",
                 "Shrink the file, or raise DataConfig.max_image_pixels (the limit is 8 bytes per allowed pixel).")
    return None


def _report_damaged(path: str, exc: BaseException, report: ValidationReport) -> None:
    report.error("corrupt_file", path, f"The file is damaged and cannot be read ({type(exc).__name__}: {exc}); skipped.",
                 "Re-create the archive from the original files (or copy the file again) and upload it again.")


def _report_too_many_pixels(path: str, w: int, h: int, config: DataConfig, report: ValidationReport) -> None:
    report.error("image_too_large", path,
                 f"The image is {w}x{h} = {w * h:,} pixels; the limit is {config.max_image_pixels:,}; skipped.",
                 "Downscale the image, or raise DataConfig.max_image_pixels.")


def _header_size(head: bytes) -> tuple[int, int] | None:
    """``(width, height)`` from an image's first bytes without decoding it; None when not found there."""
    # PIL's plugins are tried as Image.open does, minus its decompression-bomb check (which raises
    # without saying the size); only the header is parsed.
    Image.init()
    for fmt in Image.ID:
        factory, accept = Image.OPEN[fmt]
        try:
            accepted = accept is None or accept(head[:16])
            if not accepted or isinstance(accepted, str):  # a str is PIL's reason for refusing
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with factory(io.BytesIO(head), "") as im:
                    return im.size
        except Exception:  # noqa: BLE001 - not this format, or the header is cut off: try the next one
            continue
    return None


def _nfc(path: str) -> str:
    return unicodedata.normalize("NFC", path)


def _is_ignored(path: str) -> bool:
    parts = PurePosixPath(path).parts
    return any(p in IGNORED_DIRS or p.startswith(".") for p in parts[:-1]) or (
        parts[-1] in IGNORED_NAMES or parts[-1].startswith(".")
    )


def _unsafe_reason(name: str) -> str | None:
    """Why a member path is unsafe to use (zip-slip), or None."""
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        return "is an absolute path"
    if ".." in re.split(r"[\\/]", name):
        return "climbs out of the archive with '..'"
    return None


def _open_folder(root: Path, config: DataConfig, report: ValidationReport) -> _Source:
    files: dict[str, Callable[[], IO[bytes]]] = {}
    spelled: dict[str, str] = {}
    real_root = root.resolve()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in IGNORED_DIRS and not d.startswith("."))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            rel = _nfc(path.relative_to(root).as_posix())
            if _is_ignored(rel):
                continue
            if path.is_symlink() and not path.resolve().is_relative_to(real_root):
                report.error("unsafe_path", rel, "is a link to a file outside the folder; skipped.",
                             "Copy the file into the folder instead of linking to it.")
                continue
            raw = path.relative_to(root).as_posix()
            if rel in files:
                _report_normalisation_clash(raw, spelled[rel], report)
                continue
            files[rel], spelled[rel] = (lambda p=path: open(p, "rb")), raw
            if len(files) > config.max_files:
                report.error("too_many_files", "", f"The folder holds more than {config.max_files} files.",
                             "Split the set, or raise DataConfig.max_files.")
                raise DatasetError("Refusing to read the folder: too many files.", report)
    return _Source(files)


def _open_zip(path: Path, config: DataConfig, report: ValidationReport) -> _Source:
    size = path.stat().st_size
    if size > config.max_archive_bytes:
        report.error("archive_too_large", path.name,
                     f"The archive is {size / 2**20:.1f} MiB; the limit is {config.max_archive_bytes / 2**20:.1f} MiB.",
                     "Upload a smaller archive (split the set), or raise DataConfig.max_archive_bytes.")
        raise DatasetError("Refusing to open the archive: it is too large.", report)
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        report.error("corrupt_archive", path.name, f"Not a readable zip archive ({exc}).",
                     "Re-create the archive (e.g. `zip -r set.zip folder/`) and upload it again.")
        raise DatasetError("Could not open the archive.", report) from exc
    members = [m for m in archive.infolist() if not m.is_dir()]
    if len(members) > config.max_files:
        report.error("too_many_files", path.name,
                     f"The archive holds {len(members)} files; the limit is {config.max_files}.",
                     "Split the set into smaller archives, or raise DataConfig.max_files.")
        raise DatasetError("Refusing to read the archive: too many files.", report)
    total = sum(m.file_size for m in members)
    if total > config.max_uncompressed_bytes:
        report.error("zip_bomb", path.name,
                     f"The archive unpacks to {total / 2**20:.1f} MiB; the limit is "
                     f"{config.max_uncompressed_bytes / 2**20:.1f} MiB.",
                     "Upload a smaller set, or raise DataConfig.max_uncompressed_bytes if the data is genuine.")
        raise DatasetError("Refusing to read the archive: it unpacks to too much data.", report)
    files: dict[str, Callable[[], IO[bytes]]] = {}
    spelled: dict[str, str] = {}
    for member in members:
        raw = member.filename.replace("\\", "/")
        name = _nfc(raw)
        if _check_member(member, name, config, report) and not _is_ignored(name):
            if name in files:
                if raw != spelled[name]:
                    _report_normalisation_clash(raw, spelled[name], report)
                else:
                    report.error("duplicate_file_name", name, "The archive holds this path twice; the first copy is used.",
                                 "Remove the duplicate from the archive.")
                continue
            files[name], spelled[name] = (lambda m=member: archive.open(m)), raw
    return _Source(files)


def _report_normalisation_clash(raw: str, first: str, report: ValidationReport) -> None:
    """Two names that are the same text in different Unicode normalisation (NFC / NFD)."""
    report.error("duplicate_file_name", _nfc(raw),
                 f"Two files have this name, spelled differently only in Unicode normalisation (NFC and NFD, "
                 f"e.g. an accent stored as one or two code points: {ascii(first)} and {ascii(raw)}); "
                 "the first is used, the other skipped.",
                 "Rename one of the two files (they look identical, and macOS and Windows treat them as one).")


def _check_member(member: zipfile.ZipInfo, name: str, config: DataConfig, report: ValidationReport) -> bool:
    reason = _unsafe_reason(member.filename)
    if reason:
        report.error("unsafe_path", member.filename, f"This archive member {reason}; skipped.",
                     "Re-create the archive from inside the data folder so that every path is relative.")
        return False
    if stat.S_ISLNK(member.external_attr >> 16):
        report.error("unsafe_path", name, "This archive member is a symbolic link; skipped.",
                     "Archive the file itself (`zip` without `--symlinks`).")
        return False
    if member.flag_bits & 0x1:
        report.error("encrypted_file", name, "This archive member is password-protected; skipped.",
                     "Re-create the archive without a password.")
        return False
    ratio = member.file_size / max(member.compress_size, 1)
    if member.file_size >= RATIO_CHECK_MIN_BYTES and ratio > config.max_compression_ratio:
        report.error("zip_bomb", name,
                     f"Compression ratio {ratio:.0f}:1 exceeds the limit of {config.max_compression_ratio:.0f}:1 "
                     "(a zip bomb?); skipped.",
                     "Remove this file, or raise DataConfig.max_compression_ratio if it is genuine.")
        return False
    return True


def _strip_single_top_folder(source: _Source) -> str:
    """Read ``top/...`` as the root when everything sits in one folder that is itself a set.

    A single folder holding only images is kept: it is a class folder. Returns the prefix removed.
    """
    prefix = ""
    while True:
        tops = {p.split("/", 1)[0] for p in source.files}
        if len(tops) != 1 or not all("/" in p for p in source.files):
            return prefix
        top = next(iter(tops))
        inner = [p.split("/", 1)[1] for p in source.files]
        if not any("/" in p or p in METADATA_NAMES + MISNAMED_METADATA or p.endswith(".txt") for p in inner):
            return prefix
        source.files = {p.split("/", 1)[1]: r for p, r in source.files.items()}
        prefix += top + "/"


# --- metadata --------------------------------------------------------------------------------


@dataclass
class _Row:
    where: str  # "metadata.jsonl:12"
    file_name: str  # path inside the set
    text: str
    subject: str | None
    extra: dict[str, Any]


def _parse_records(name: str, data: bytes, report: ValidationReport) -> tuple[list[str], list[tuple[int, dict]]] | None:
    """Column names and ``(line number, record)`` pairs; None when the file cannot be used at all."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        report.error("bad_metadata", name, "The metadata file is not UTF-8 text.", "Save it as UTF-8.")
        return None
    base = PurePosixPath(name).name
    if base.endswith(".csv"):
        return _parse_csv(name, text, report)
    rows = _parse_misnamed_json(name, text, report) if base.endswith(".json") else _parse_jsonl(name, text, report)
    if rows is None:
        return None
    return list(dict.fromkeys(k for _, r in rows for k in r)), rows


def _parse_csv(name: str, text: str, report: ValidationReport) -> tuple[list[str], list[tuple[int, dict]]]:
    """Rows of a CSV; a row that breaks the quoting (e.g. a quote never closed, which would swallow
    every later row into one caption) is reported and skipped, and reading goes on at the next line."""
    lines = io.StringIO(text, newline="").readlines()  # only \n, \r, \r\n end a line, as for csv
    if not lines:
        return [], []
    fieldnames = next(csv.reader(lines[:1]), [])
    rows, start = [], 1  # start: index in ``lines`` of the next row to read
    while start < len(lines):
        reader = csv.DictReader(lines[start:], fieldnames=fieldnames, strict=True)
        done = 0  # physical lines consumed by the rows read so far
        try:
            for record in reader:
                rows.append((start + done + 1, {k: v for k, v in record.items() if k is not None}))
                done = reader.line_num
            break
        except csv.Error as exc:
            bad = start + done + 1  # 1-based line number where the broken row starts
            report.error("bad_metadata", f"{name}:{bad}",
                         f"Unreadable CSV row ({exc}; a quote that is never closed?); line skipped.",
                         'Close the quote on that line, or quote the whole caption ("a, b") and double inner quotes.')
            start = bad
    columns = [c.strip() for c in fieldnames]
    return columns, [(n, {k.strip(): v for k, v in r.items()}) for n, r in rows]


def _parse_jsonl(name: str, text: str, report: ValidationReport) -> list[tuple[int, dict]]:
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            report.error("bad_metadata", f"{name}:{number}", f"Not valid JSON ({exc.msg}); line skipped.",
                         'Write one JSON object per line, e.g. {"file_name": "a.png", "text": "a photo of ..."}.')
            continue
        if not isinstance(record, dict):
            report.error("bad_metadata", f"{name}:{number}", "The line is not a JSON object; skipped.",
                         'Write one JSON object per line, e.g. {"file_name": "a.png", "text": "a photo of ..."}.')
            continue
        rows.append((number, record))
    return rows


def _parse_misnamed_json(name: str, text: str, report: ValidationReport) -> list[tuple[int, dict]] | None:
    fix = ("Rename it to metadata.jsonl and write one JSON object per line "
           '({"file_name": ..., "text": ...}); the Hugging Face imagefolder format reads only that name.')
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        rows = _parse_jsonl(name, text, ValidationReport())
        if rows:
            report.warning("metadata_json", name, "Found metadata.json holding JSON Lines; read it as metadata.jsonl.",
                           fix)
            return rows
        report.error("metadata_json", name, "Found metadata.json, which is not valid JSON; expected metadata.jsonl.",
                     fix)
        return None
    if isinstance(data, list) and all(isinstance(r, dict) for r in data):
        report.warning("metadata_json", name, "Found metadata.json (a JSON list) instead of metadata.jsonl; "
                       "read it as a list of records.", fix)
        return [(i + 1, r) for i, r in enumerate(data)]
    report.error("metadata_json", name, "Found metadata.json, but it is not a list of records; expected metadata.jsonl.",
                 fix)
    return None


def _column_error(name: str, missing: str, columns: list[str], report: ValidationReport) -> None:
    alias = next((c for c in columns if c.lower() in COLUMN_ALIASES[missing]), None)
    found = ", ".join(f"'{c}'" for c in columns) or "none"
    fix = f"Rename the column '{alias}' to '{missing}'." if alias else (
        f"Add a '{missing}' column ({'the image path relative to the metadata file' if missing == 'file_name' else 'the caption'}).")
    report.error("metadata_columns", name,
                 f"The metadata has no '{missing}' column; columns found: {found}. "
                 f"Required: {', '.join(REQUIRED_COLUMNS)} (optional: {', '.join(SUBJECT_COLUMNS)}).", fix)


def _read_metadata(source: _Source, config: DataConfig, report: ValidationReport) -> tuple[dict[str, _Row], bool]:
    """Rows by file path, and whether any metadata file was present."""
    by_dir: dict[str, str] = {}
    for path in sorted(source.files):
        p = PurePosixPath(path)
        if p.name in METADATA_NAMES + MISNAMED_METADATA:
            d = str(p.parent) if str(p.parent) != "." else ""
            pick = by_dir.get(d)
            rank = (METADATA_NAMES + MISNAMED_METADATA).index
            if pick is None or rank(p.name) < rank(PurePosixPath(pick).name):
                if pick is not None:
                    report.warning("metadata_ignored", pick, f"Ignored because {path} is also present.",
                                   "Keep a single metadata file per folder.")
                by_dir[d] = path
            else:
                report.warning("metadata_ignored", path, f"Ignored because {pick} is also present.",
                               "Keep a single metadata file per folder.")
    rows: dict[str, _Row] = {}
    for folder, meta in sorted(by_dir.items()):
        data = source.read(meta, config, report)
        parsed = None if data is None else _parse_records(meta, data, report)
        if parsed is not None:
            _rows_from_records(meta, folder, *parsed, source, rows, report)
    return rows, bool(by_dir)


def _rows_from_records(meta, folder, columns, records, source, rows, report) -> None:
    for required in REQUIRED_COLUMNS:
        if (records or columns) and required not in columns:
            _column_error(meta, required, columns, report)
            return
    subject_col = next((c for c in SUBJECT_COLUMNS if c in columns), None)
    first_line: dict[str, tuple[str, str]] = {}
    for number, record in records:
        where = f"{meta}:{number}"
        raw = record.get("file_name")
        if raw is not None and not isinstance(raw, str):
            report.error("bad_metadata", where, f"file_name is a {type(raw).__name__}, not text; skipped.",
                         'Write the image path as a JSON string, e.g. "file_name": "a.png".')
            continue
        if raw is None or not str(raw).strip():
            report.error("missing_file_name", where, "The line has no file_name; skipped.",
                         "Give the image path relative to the metadata file.")
            continue
        raw = str(raw).strip().replace("\\", "/")
        reason = _unsafe_reason(raw)
        if reason:
            report.error("unsafe_path", where, f"file_name '{raw}' {reason}; skipped.",
                         "Use a path relative to the metadata file, without '..'.")
            continue
        path = _nfc(str(PurePosixPath(folder, raw.removeprefix("./"))))
        if path in first_line:
            _report_listed_again(where, raw, *first_line[path], report)
            continue
        first_line[path] = (where, raw)
        text = _row_text(record.get("text"), raw, where, report)
        if text is None:
            rows[path] = _Row(where, path, "", None, {})
            continue
        if path not in source.files:
            report.error("caption_for_missing_file", where, f"'{raw}' is listed, but there is no such file in the set.",
                         "Add the image, or delete the line (check spelling and sub-folder).")
            continue
        if not text:
            report.error("empty_caption", where, f"The caption of '{raw}' is empty; image skipped.",
                         "Write a caption in the 'text' column.")
            rows[path] = _Row(where, path, "", None, {})
            continue
        subject = record.get(subject_col) if subject_col else None
        subject = str(subject).strip() if subject is not None and str(subject).strip() else None
        extra = {k: v for k, v in record.items() if k not in ("file_name", "text", *SUBJECT_COLUMNS)}
        rows[path] = _Row(where, path, text, subject, extra)
        if subject_col and subject is None:
            report.warning("missing_subject", where, f"'{raw}' has no {subject_col}; it is derived from the caption.",
                           f"Fill in the '{subject_col}' column.")


def _report_listed_again(where: str, raw: str, first_where: str, first_raw: str, report: ValidationReport) -> None:
    if raw != first_raw and _nfc(raw) == _nfc(first_raw):
        message = (f"'{raw}' is the same name as '{first_raw}' (at {first_where}) in a different Unicode "
                   f"normalisation (NFC / NFD: {ascii(first_raw)} vs {ascii(raw)}); the first caption is used.")
    else:
        message = f"'{raw}' is listed again (first at {first_where}); the first caption is used."
    report.error("duplicate_file_name", where, message,
                 "Keep one line per image (put several captions in separate copies of the image).")


def _row_text(value: Any, raw: str, where: str, report: ValidationReport) -> str | None:
    """The cleaned caption of a metadata row ("" when missing or blank); None (reported) when not text."""
    if value is None:
        return ""
    if not isinstance(value, str):
        report.error("bad_caption", where, f"The caption of '{raw}' is a {type(value).__name__}, not text; image skipped.",
                     'Write the caption as a JSON string, e.g. "text": "a photo of ...".')
        return None
    return clean_caption(value)


def clean_caption(text: str) -> str:
    """Strip whitespace and zero-width characters; ``""`` when nothing visible is left."""
    text = ZERO_WIDTH_RE.sub("", text).strip()
    return text if INVISIBLE_RE.sub("", text).strip() else ""


# --- images ----------------------------------------------------------------------------------


def _decode_image(data: bytes, where: str, config: DataConfig, report: ValidationReport) -> np.ndarray | None:
    """Bytes -> uint8 ``[R, R, 3]``: EXIF-upright, RGB, centre-cropped square, LANCZOS-resized."""
    fix = "Re-export the image as PNG or JPEG, or remove it."
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            w, h = im.size
            if w * h > config.max_image_pixels:
                _report_too_many_pixels(where, w, h, config, report)
                return None
            if im.format == "JPEG":
                im.draft("RGB", (config.resolution * 2, config.resolution * 2))
            im.load()
            im = ImageOps.exif_transpose(im)
            im = _to_rgb(im)
    except Image.DecompressionBombError:
        report.error("image_too_large", where, "The image is too large to decode safely; skipped.",
                     "Downscale the image, or raise DataConfig.max_image_pixels.")
        return None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        report.error("corrupt_image", where, f"Cannot decode the image ({type(exc).__name__}: {exc}); skipped.", fix)
        return None
    return np.asarray(_centre_square(im, config.resolution), dtype=np.uint8)


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
    prefix = _strip_single_top_folder(src)
    if prefix:
        logger.info("reading %s from its top folder %s", source, prefix)
    pending = _collect(src, config, report)
    samples, images = [], []
    for item in pending:
        data = src.read_image(item.path, config, report)
        array = None if data is None else _decode_image(data, item.path, config, report)
        if array is not None:
            samples.append(Sample(item.path, item.text, item.subject or "", item.extra))
            images.append(array)
    _raise_if_empty(source, samples, report)
    caption_from = {p.path: p.caption_from for p in pending}
    items = [ClassItem(s.file_name, s.text, s.subject or None, caption_from[s.file_name]) for s in samples]
    subjects, class_source = assign_classes(items, config, report, encoder)
    kept = [i for i, subject in enumerate(subjects) if subject is not None]
    for i in kept:
        samples[i].subject = subjects[i]
    samples, images = [samples[i] for i in kept], [images[i] for i in kept]
    _raise_if_empty(source, samples, report)
    _warn_small_classes(samples, report)
    logger.info("loaded %s: %s; classes from %s", Path(source).name, report.summary(), class_source)
    return ImageTextSet(str(source), samples, np.stack(images), report, class_source, config.class_source)


def _raise_if_empty(source: str | Path, samples: list[Sample], report: ValidationReport) -> None:
    report.n_images_loaded = len(samples)
    if samples:
        return
    what = "no images found" if report.n_images_found == 0 else "none of the images could be used"
    if report.n_images_found == 0:
        report.error("empty_set", "", "The set contains no images (png, jpg, jpeg, webp, bmp, gif, tif).",
                     "Upload a folder or .zip with images and captions (see the accepted layouts).")
    raise DatasetError(f"Cannot load '{Path(source).name}': {what}.", report)


def _open(path: Path, config: DataConfig, report: ValidationReport) -> _Source:
    if not path.exists():
        report.error("not_found", str(path.name), "No such file or folder.", "Check the path.")
        raise DatasetError(f"Cannot load '{path}': it does not exist.", report)
    if path.is_dir():
        return _open_folder(path, config, report)
    if zipfile.is_zipfile(path) or path.suffix.lower() == ".zip":
        return _open_zip(path, config, report)
    report.error("unsupported_source", path.name, "Expected a folder or a .zip archive.",
                 "Put the images and captions in a folder and upload it, or zip that folder.")
    raise DatasetError(f"Cannot load '{path.name}': not a folder or a .zip archive.", report)


def _collect(src: _Source, config: DataConfig, report: ValidationReport) -> list[_Pending]:
    """Match every image with its caption; report files that cannot be used."""
    rows, has_metadata = _read_metadata(src, config, report)
    metadata_broken = has_metadata and not rows and any(i.code in ("metadata_columns", "metadata_json") for i in report.errors)
    images = [p for p in sorted(src.files) if PurePosixPath(p).suffix.lower() in IMAGE_EXTENSIONS]
    image_set = set(images)
    stems = {str(PurePosixPath(p).with_suffix("")) for p in images}
    _check_other_files(src, image_set, rows, stems, report)
    _check_case_duplicates(images, report)
    report.n_images_found = len(images)
    pending = []
    for path in images:
        row = rows.get(path)
        if row is not None:
            if row.text:
                pending.append(_Pending(path, row.text, row.subject, row.extra, "metadata"))
            continue
        item = _caption_without_row(src, path, config, has_metadata, metadata_broken, report)
        if item is not None:
            pending.append(item)
    return pending


def _caption_without_row(src, path, config, has_metadata, metadata_broken, report) -> _Pending | None:
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


def _check_other_files(src, image_set, rows, stems, report) -> None:
    for path in sorted(src.files):
        p = PurePosixPath(path)
        if path in image_set or p.name in METADATA_NAMES + MISNAMED_METADATA:
            continue
        if p.suffix.lower() == ".txt":
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
