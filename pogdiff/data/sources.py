"""Where a user's set is read from: a folder or a zip, seen as relative POSIX paths -> bytes.

Every entry is checked before it is read (unsafe names, links, sizes, pixel counts, compression
ratios; README "Limits and safety"); problems go to the validation report.
"""

from __future__ import annotations

import io
import logging
import os
import re
import stat
import unicodedata
import warnings
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import IO

from PIL import Image

from ..config import DataConfig
from .validation import DatasetError, ValidationReport

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

# --- sources: a folder or a zip, seen as relative POSIX paths -> bytes -------------------------


class FileSource:
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
                    report_too_many_pixels(path, *size, config, report)
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


def report_too_many_pixels(path: str, w: int, h: int, config: DataConfig, report: ValidationReport) -> None:
    """Record that an image of ``w x h`` pixels is over the limit and skipped."""
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


def nfc_name(path: str) -> str:
    """``path`` in Unicode NFC (how names are compared: a zip from macOS spells them NFD)."""
    return unicodedata.normalize("NFC", path)


def _is_ignored(path: str) -> bool:
    parts = PurePosixPath(path).parts
    return any(p in IGNORED_DIRS or p.startswith(".") for p in parts[:-1]) or (
        parts[-1] in IGNORED_NAMES or parts[-1].startswith(".")
    )


def unsafe_reason(name: str) -> str | None:
    """Why a member path is unsafe to use (zip-slip), or None."""
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        return "is an absolute path"
    if ".." in re.split(r"[\\/]", name):
        return "climbs out of the archive with '..'"
    return None


def open_folder(root: Path, config: DataConfig, report: ValidationReport) -> FileSource:
    """The files of a folder, walked with the safety checks (links out, sizes, counts) reported."""
    files: dict[str, Callable[[], IO[bytes]]] = {}
    spelled: dict[str, str] = {}
    real_root = root.resolve()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in IGNORED_DIRS and not d.startswith("."))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            rel = nfc_name(path.relative_to(root).as_posix())
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
    return FileSource(files)


def open_zip(path: Path, config: DataConfig, report: ValidationReport) -> FileSource:
    """The members of a zip, with the safety checks (zip-slip, sizes, ratios, counts) reported."""
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
        name = nfc_name(raw)
        if _check_member(member, name, config, report) and not _is_ignored(name):
            if name in files:
                if raw != spelled[name]:
                    _report_normalisation_clash(raw, spelled[name], report)
                else:
                    report.error("duplicate_file_name", name, "The archive holds this path twice; the first copy is used.",
                                 "Remove the duplicate from the archive.")
                continue
            files[name], spelled[name] = (lambda m=member: archive.open(m)), raw
    return FileSource(files)


def _report_normalisation_clash(raw: str, first: str, report: ValidationReport) -> None:
    """Two names that are the same text in different Unicode normalisation (NFC / NFD)."""
    report.error("duplicate_file_name", nfc_name(raw),
                 f"Two files have this name, spelled differently only in Unicode normalisation (NFC and NFD, "
                 f"e.g. an accent stored as one or two code points: {ascii(first)} and {ascii(raw)}); "
                 "the first is used, the other skipped.",
                 "Rename one of the two files (they look identical, and macOS and Windows treat them as one).")


def _check_member(member: zipfile.ZipInfo, name: str, config: DataConfig, report: ValidationReport) -> bool:
    reason = unsafe_reason(member.filename)
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


def strip_single_top_folder(source: FileSource) -> str:
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
