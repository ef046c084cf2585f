"""The code reads like its design (docs/ARCHITECTURE.md): app.py only assembles the page, no module grows
past one concept, lower layers import nothing above them, no import circle, no private name crosses a module."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
APP_MAX_LINES = 200
MODULE_MAX_LINES = 500


def _lines(path: Path) -> int:
    return len(path.read_text(encoding="utf-8").splitlines())


def test_app_py_only_assembles_the_tabs():
    assert _lines(REPO / "app.py") <= APP_MAX_LINES


def test_no_module_of_the_package_is_over_the_limit():
    sizes = {p.relative_to(REPO).as_posix(): _lines(p) for p in (REPO / "pogdiff").rglob("*.py")}
    over = {name: n for name, n in sizes.items() if n > MODULE_MAX_LINES}
    assert not over, f"split these modules by concept (at most {MODULE_MAX_LINES} lines each): {over}"


# Layers that import nothing of training, the UI or the benchmarks (docs/ARCHITECTURE.md "Stages, and who may import whom").
LOWER = ("pogdiff.config", "pogdiff.checks", "pogdiff.constants", "pogdiff.server.safety", "pogdiff.method.knn", "pogdiff.method.losses", "pogdiff.model.text",
         "pogdiff.data")


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runtime_imports(path: Path, *, type_only: bool = False) -> list[tuple[str, list[str]]]:
    """``(module, names)`` of every pogdiff import in ``path``, leaving out ``if TYPE_CHECKING:`` blocks unless
    ``type_only``."""
    name = _module_name(path)
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = set() if type_only else {
        id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING"
        for n in ast.walk(node)}
    found = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                package = package[:len(package) - (node.level - 1)]
                module = ".".join([*package, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            if not module.startswith("pogdiff"):
                continue
            folder = REPO.joinpath(*module.split("."))
            submodules = [a.name for a in node.names
                          if (folder / f"{a.name}.py").is_file() or (folder / a.name / "__init__.py").is_file()]
            found += [(f"{module}.{n}", []) for n in submodules]  # from package import module
            names = [a.name for a in node.names if a.name not in submodules]
            if names:
                found.append((module, names))
        elif isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names if a.name.startswith("pogdiff")]
    return found


def _graph(*, type_only: bool = False) -> dict[str, set[str]]:
    return {_module_name(p): {m for m, _ in _runtime_imports(p, type_only=type_only)}
            for p in (REPO / "pogdiff").rglob("*.py")}


def test_lower_layers_import_nothing_above_them():
    def lower(module: str) -> bool:
        return any(module == m or module.startswith(m + ".") for m in LOWER)

    wrong = {m: sorted(d for d in deps if not lower(d)) for m, deps in _graph().items() if lower(m)}
    assert not {m: d for m, d in wrong.items() if d}, wrong


def test_checkpoint_format_knows_nothing_of_run_folders_or_export():
    assert not _graph()["pogdiff.model.checkpoints"] & {"pogdiff.runs.run_folder", "pogdiff.runs.store", "pogdiff.runs.export", "pogdiff.runs.jobs"}


def test_only_the_cli_imports_the_benchmarks():
    users = {m for m, deps in _graph().items() if any(d.startswith("pogdiff.bench") for d in deps)}
    assert {m for m in users if not m.startswith("pogdiff.bench")} == {"pogdiff.cli"}


def test_no_import_circle():
    """Not even through imports made for type hints alone (``if TYPE_CHECKING:``)."""
    graph = _graph(type_only=True)
    state: dict[str, int] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for dep in sorted(graph.get(module, ())):
            if state.get(dep) == 1:
                raise AssertionError("import circle: " + " -> ".join([*path[path.index(dep):], dep]))
            if dep in graph and not state.get(dep):
                visit(dep, [*path, dep])
        state[module] = 2

    for module in sorted(graph):
        if not state.get(module):
            visit(module, [module])


def test_no_private_name_is_imported_from_another_module():
    private = sorted(f"{_module_name(p)} <- {m}.{n}" for p in [*(REPO / "pogdiff").rglob("*.py"), REPO / "app.py"]
                     for m, names in _runtime_imports(p) for n in names if n.startswith("_") and not n.startswith("__"))
    assert not private, private
