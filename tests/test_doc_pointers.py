"""Every pointer from the code to a section of the project's documents names a heading that exists.

A pointer is a document's name (README, README.md, BENCHMARKS, BENCHMARKS.md or docs/NAME.md), a
space or a line break and a heading in double quotes, as in README "Results", in the comments and strings of
``pogdiff/``, ``app.py`` and ``tests/`` and anywhere in ``scripts/``.

The rule: a pointer names a heading when it is the heading's whole text (``#`` marks and surrounding
spaces left out), or the heading's text begins with the pointer followed by `` (`` or ``:``. A
heading may carry a parenthesis or a subtitle after its name, as ``### Variants (switches of ...)``
or ``## Speed: what PoGDiff costs per step``, and a pointer may leave them out. Nothing else counts:
not a word of a heading, not a bold label in a paragraph, not a heading of another document.
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SOURCES = [*(REPO / "pogdiff").rglob("*.py"), REPO / "app.py", *(REPO / "tests").rglob("*.py"),
           *(p for p in (REPO / "scripts").rglob("*") if p.is_file())]
DOCUMENT = r"README(?:\.md)?|BENCHMARKS(?:\.md)?|docs/[\w-]+\.md"
POINTER = re.compile(rf'\b({DOCUMENT})\s+"([^"\n]+)"')


def _document(name: str) -> Path:
    return REPO / (name if name.endswith(".md") else f"{name}.md")


def _headings(path: Path) -> list[str]:
    text, fenced, found = path.read_text(encoding="utf-8"), False, []
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(r"#{1,6} ", line):
            found.append(line.lstrip("#").strip())
    return found


def names_a_heading(pointer: str, headings: list[str]) -> bool:
    """The rule of the module docstring."""
    return any(h == pointer or h.startswith(pointer + " (") or h.startswith(pointer + ":") for h in headings)


def _texts(path: Path) -> list[str]:
    """Where pointers are looked for: a script's whole text; in Python, each comment and each string
    as the program sees it (implicitly joined literals make one string, so a pointer split over two
    literals is read whole, and an escaped quote is a quote)."""
    text = path.read_text(encoding="utf-8")
    if path.suffix != ".py":
        return [text]
    texts = [t.string for t in tokenize.generate_tokens(io.StringIO(text).readline) if t.type == tokenize.COMMENT]
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            texts.append(node.value)
        elif isinstance(node, ast.JoinedStr):  # an f-string: its literal parts, a field as {}
            texts.append("".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values))
    return texts


def pointers() -> set[tuple[str, str, str]]:
    """``(source file, document, heading)`` of every pointer found."""
    return {(path.relative_to(REPO).as_posix(), doc, heading) for path in SOURCES for text in _texts(path)
            for doc, heading in POINTER.findall(text)}


def test_the_rule_on_examples():
    headings = ["Variants (switches of `PsiConfig`)", "Speed: what PoGDiff costs per step", "Results"]
    assert names_a_heading("Variants", headings) and names_a_heading("Speed", headings)
    assert names_a_heading("Results", headings) and names_a_heading("Speed: what PoGDiff costs per step", headings)
    assert not names_a_heading("Result", headings) and not names_a_heading("switches of", headings)


def test_the_scan_finds_pointers_in_comments_docstrings_and_joined_strings():
    found = pointers()
    assert len(found) > 50
    assert ("pogdiff/method/objectives.py", "README", "Is PoGDiff doing anything?") in found  # joined literals
    assert ("pogdiff/method/knn.py", "BENCHMARKS.md", "Scale") in found  # over a line break
    assert any(src.startswith("tests/") for src, _, _ in found) and any(src == "app.py" for src, _, _ in found)


def test_every_pointer_names_a_heading_that_exists():
    dead = sorted(f'{src}: {doc} "{heading}"' for src, doc, heading in pointers()
                  if not _document(doc).is_file() or not names_a_heading(heading, _headings(_document(doc))))
    assert not dead, "pointers to headings that do not exist:\n" + "\n".join(dead)
