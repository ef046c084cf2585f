"""Validation results for user image-text sets: one :class:`Issue` per problem found.

Every issue says what is wrong, where (a file inside the set, or ``metadata.jsonl:12`` for a
line), and how to fix it. A set that is partly bad still loads its good part; only a set with
nothing usable left raises :class:`DatasetError`, which carries the full report.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

LEVELS = ("error", "warning", "info")
REPORT_COLUMNS = ("level", "code", "where", "message", "fix")
MAX_ISSUES_IN_ERROR = 8


@dataclass
class Issue:
    """One problem: ``level`` is ``"error"`` (the item was skipped or is wrong), ``"warning"``, or
    ``"info"`` (a note on what loading changed, e.g. images shrunk to the model's size)."""

    level: str
    code: str
    where: str
    message: str
    fix: str

    def __post_init__(self) -> None:
        if self.level not in LEVELS:
            raise ValueError(f"level must be one of {LEVELS}, got {self.level!r}")

    def __str__(self) -> str:
        where = f"{self.where}: " if self.where else ""
        return f"[{self.level}] {where}{self.message} Fix: {self.fix}"


@dataclass
class ValidationReport:
    """All issues of one set, plus how many images were found and loaded."""

    issues: list[Issue] = field(default_factory=list)
    n_images_found: int = 0
    n_images_loaded: int = 0

    def error(self, code: str, where: str, message: str, fix: str) -> None:
        self.issues.append(Issue("error", code, where, message, fix))

    def warning(self, code: str, where: str, message: str, fix: str) -> None:
        self.issues.append(Issue("warning", code, where, message, fix))

    def info(self, code: str, where: str, message: str, fix: str) -> None:
        self.issues.append(Issue("info", code, where, message, fix))

    @property
    def errors(self) -> list[Issue]:
        return [i for i in self.issues if i.level == "error"]

    @property
    def warnings(self) -> list[Issue]:
        return [i for i in self.issues if i.level == "warning"]

    @property
    def notes(self) -> list[Issue]:
        return [i for i in self.issues if i.level == "info"]

    @property
    def ok(self) -> bool:
        """True when there is no error (warnings allowed)."""
        return not self.errors

    def codes(self) -> list[str]:
        return [i.code for i in self.issues]

    def summary(self) -> str:
        notes = f", {len(self.notes)} note(s)" if self.notes else ""
        return (
            f"{self.n_images_loaded} of {self.n_images_found} images loaded; "
            f"{len(self.errors)} error(s), {len(self.warnings)} warning(s){notes}"
        )

    def to_frame(self) -> pd.DataFrame:
        """One row per issue, columns ``level, code, where, message, fix`` (errors first)."""
        rows = [[getattr(i, c) for c in REPORT_COLUMNS] for i in self._sorted()]
        return pd.DataFrame(rows, columns=list(REPORT_COLUMNS))

    def to_markdown(self) -> str:
        """A summary line and, when there are issues, a Markdown table of them."""
        head = ("**OK**: " if self.ok else "**Problems found**: ") + self.summary()
        if not self.issues:
            return head + "\n"
        lines = [head, "", "| level | code | where | problem | how to fix |", "|---|---|---|---|---|"]
        for i in self._sorted():
            cells = [i.level, f"`{i.code}`", f"`{i.where}`" if i.where else "", i.message, i.fix]
            lines.append("| " + " | ".join(_md_cell(c) for c in cells) + " |")
        return "\n".join(lines) + "\n"

    def _sorted(self) -> list[Issue]:
        return sorted(self.issues, key=lambda i: LEVELS.index(i.level))


def _md_cell(text: str) -> str:
    """``text`` for one Markdown table cell: ``|`` and newlines escaped, and ``<`` / ``>`` outside code
    spans written as entities, so that ``'a photo of <subject>'`` is shown, not read as an HTML tag."""
    parts = text.replace("|", "\\|").replace("\n", " ").split("`")
    paired = len(parts) % 2 == 1  # an odd number of backticks opens no code span
    return "`".join(p.replace("<", "&lt;").replace(">", "&gt;") if i % 2 == 0 or not paired else p
                    for i, p in enumerate(parts))


class DatasetError(ValueError):
    """Nothing usable could be loaded; ``.report`` holds every issue found."""

    def __init__(self, headline: str, report: ValidationReport):
        self.headline = headline
        self.report = report
        super().__init__(self._message())

    def _message(self) -> str:
        errors = self.report.errors or self.report.issues
        lines = [self.headline]
        lines += [f"  {issue}" for issue in errors[:MAX_ISSUES_IN_ERROR]]
        if len(errors) > MAX_ISSUES_IN_ERROR:
            lines.append(f"  ... and {len(errors) - MAX_ISSUES_IN_ERROR} more (see .report)")
        return "\n".join(lines)
