"""The code reads like its design (docs/ARCHITECTURE.md "Stages, and who may import whom"): app.py only
assembles the page, no module grows past one concept, the package is a few modules of its own and its
stages, each stage imports only the stages below it, no import circle (not even through imports for type
hints alone), no private name crosses a module."""

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


TOP_MODULES_MAX = 6  # modules of pogdiff/ itself: the entry points, config, its checks, constants
STAGES_MIN = 6  # sub-packages of pogdiff/, one per stage

# Who may import whom: each stage (a sub-package of pogdiff/) or module of pogdiff/ itself, and what it may
# import besides itself; derived from the imports as they are, and kept so. The table of
# docs/ARCHITECTURE.md "Stages, and who may import whom" says the same. The checkpoint format (model)
# knows no run folder, export or job; only the command line imports the benchmarks.
BELOW_UI = {"checks", "config", "constants", "server", "model", "data", "method", "evaluation", "training", "runs"}
MAY_IMPORT: dict[str, set[str]] = {
    "pogdiff": set(),  # pogdiff/__init__.py
    "constants": set(),
    "checks": set(),
    "config": {"checks"},
    "server": {"config", "constants"},
    "model": {"config", "constants"},
    "data": {"config", "constants"},
    "method": {"config", "constants", "data", "model"},
    "evaluation": {"config", "constants", "data", "model"},
    "training": {"config", "constants", "data", "method", "model", "server"},
    "runs": {"config", "constants", "model", "server", "training"},
    "ui": BELOW_UI,
    "bench": BELOW_UI | {"ui"},
    "cli": BELOW_UI | {"bench"},
    "__main__": {"cli"},
}
# Imports kept across the rules above, each with its reason.
KEPT_EXCEPTIONS = {
    ("pogdiff.data.classes", "pogdiff.model.text"):
        "clustering free-text captions into classes embeds them: the shared caption encoder is the default, "
        "imported when used (a caller may pass its own)",
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, *, type_hints: bool = False) -> list[tuple[str, list[str]]]:
    """``(module, names)`` of every pogdiff import in ``path``; those of ``if TYPE_CHECKING:`` blocks (made for
    type hints alone) only with ``type_hints``."""
    name = _module_name(path)
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = set() if type_hints else {
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


def _graph(*, type_hints: bool = False) -> dict[str, set[str]]:
    return {_module_name(p): {m for m, _ in _imports(p, type_hints=type_hints)}
            for p in (REPO / "pogdiff").rglob("*.py")}


def _stage(module: str) -> str:
    """``pogdiff.training.trainer`` -> ``training``; ``pogdiff.config`` -> ``config``; ``pogdiff`` -> ``pogdiff``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def test_the_package_is_a_few_modules_of_its_own_and_its_stages():
    package = REPO / "pogdiff"
    top = sorted(p.stem for p in package.glob("*.py"))
    stages = sorted(p.name for p in package.iterdir() if (p / "__init__.py").is_file())
    assert len(top) <= TOP_MODULES_MAX, f"modules of pogdiff/ itself: {top}; move one into its stage"
    assert len(stages) >= STAGES_MIN, stages
    placed = set(MAY_IMPORT) - {"pogdiff"}
    assert set(top) - {"__init__"} | set(stages) == placed, "every stage and top module has its row in MAY_IMPORT"


def test_the_stage_rules_have_no_circle():
    order: list[str] = []
    while len(order) < len(MAY_IMPORT):
        ready = [s for s, deps in MAY_IMPORT.items() if s not in order and deps <= set(order)]
        assert ready, f"the rules allow a circle among {sorted(set(MAY_IMPORT) - set(order))}"
        order += sorted(ready)


def test_each_stage_imports_only_what_it_may():
    """Type-only imports count: a stage that names another's types for its hints depends on it."""
    wrong = sorted(f"{m} -> {d}" for m, deps in _graph(type_hints=True).items() for d in deps
                   if _stage(d) != _stage(m) and _stage(d) not in MAY_IMPORT.get(_stage(m), set())
                   and (m, d) not in KEPT_EXCEPTIONS)
    assert not wrong, "imports across the stage rules (MAY_IMPORT; docs/ARCHITECTURE.md):\n" + "\n".join(wrong)


def test_every_kept_exception_is_still_an_import():
    graph = _graph(type_hints=True)
    assert all(d in graph.get(m, set()) for m, d in KEPT_EXCEPTIONS), "drop the exceptions the code no longer needs"


def test_no_import_circle():
    """Not even through imports made for type hints alone (``if TYPE_CHECKING:``)."""
    graph = _graph(type_hints=True)
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
                     for m, names in _imports(p, type_hints=True) for n in names
                     if n.startswith("_") and not n.startswith("__"))
    assert not private, private
