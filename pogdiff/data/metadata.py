"""A user set's metadata file (``metadata.jsonl`` / ``metadata.csv``) and its rows: parsing,
column aliases, captions cleaned, every problem reported with its file and line (README
"Data loading: bad input").
"""

from __future__ import annotations

import csv
import io
import json
import logging
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from ..config import DataConfig
from .sources import (
    COLUMN_ALIASES,
    INVISIBLE_RE,
    METADATA_NAMES,
    MISNAMED_METADATA,
    REQUIRED_COLUMNS,
    SUBJECT_COLUMNS,
    ZERO_WIDTH_RE,
    nfc_name,
    FileSource,
    unsafe_reason,
)
from .validation import ValidationReport

logger = logging.getLogger(__name__)


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


def read_metadata(source: FileSource, config: DataConfig, report: ValidationReport) -> tuple[dict[str, _Row], bool]:
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
        reason = unsafe_reason(raw)
        if reason:
            report.error("unsafe_path", where, f"file_name '{raw}' {reason}; skipped.",
                         "Use a path relative to the metadata file, without '..'.")
            continue
        path = nfc_name(str(PurePosixPath(folder, raw.removeprefix("./"))))
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
    if raw != first_raw and nfc_name(raw) == nfc_name(first_raw):
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
