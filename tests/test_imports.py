"""The import graph of src/requant flows one way: no cycles, and the lower layers never import the upper ones.

The graph is read from the source (ast), not by importing: every `import` and `from ... import`, at module level
and inside functions, with relative imports resolved. Importing `a.b.c` from outside package `a.b` also runs
`a/__init__` and `a/b/__init__`, so those count as edges too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "requant"


def _module_name(path: Path, src: Path) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules(src: Path = SRC) -> dict[str, Path]:
    return {_module_name(p, src): p for p in sorted((src / PACKAGE).rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.Module) -> list[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import statement with whether it runs at import time (module level, not under TYPE_CHECKING)."""
    found: list[tuple[ast.Import | ast.ImportFrom, bool]] = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.append((child, top))
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) or (
                isinstance(child, ast.If) and _is_type_checking(child)
            ):
                visit(child, False)
            else:
                visit(child, top)

    visit(tree, True)
    return found


def _targets(node: ast.Import | ast.ImportFrom, importer: str, is_pkg: bool, known: set[str]) -> list[str]:
    """The requant modules an import statement loads (the named module, or each imported submodule)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        if node.level:
            base = importer.split(".") if is_pkg else importer.split(".")[:-1]
            base = base[: len(base) - (node.level - 1)]
            mod = ".".join(base + ([node.module] if node.module else []))
        else:
            mod = node.module or ""
        # `from pkg import sub` loads pkg.sub when it is a module, else it reads a name of pkg.
        names = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
    out = []
    for name in names:
        while name and name not in known:  # `import requant.x.y as z` of a name inside a module
            name = name.rpartition(".")[0]
        if name.split(".")[0] == PACKAGE and name:
            out.append(name)
    return out


def import_graph(src: Path = SRC) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(module-level edges, all edges) between requant modules, importer -> imported."""
    modules = _modules(src)
    known = set(modules)
    top: dict[str, set[str]] = {m: set() for m in modules}
    every: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        is_pkg = path.name == "__init__.py"
        for node, at_top in _imports(tree):
            for target in _targets(node, mod, is_pkg, known):
                # the packages above the target that the importer is not already inside run their __init__
                parts = target.split(".")
                chain = [".".join(parts[:i]) for i in range(2, len(parts) + 1)]
                for t in chain:
                    if t == mod or mod.startswith(t + ".") or t not in known:
                        continue
                    every[mod].add(t)
                    if at_top:
                        top[mod].add(t)
    return top, every


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a list of modules (first == last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state:
                found = dfs(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = dfs(node)
            if found:
                return found
    return None


def _in(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def forbidden_edges(graph: dict[str, set[str]], lower: str, uppers: tuple[str, ...]) -> list[tuple[str, str]]:
    """Edges from modules of package `lower` into any of `uppers`."""
    return sorted(
        (a, b) for a, targets in graph.items() if _in(a, lower) for b in targets if any(_in(b, u) for u in uppers)
    )


GRAPH_TOP, GRAPH_ALL = import_graph()

# Lower layer -> the layers above it that it must never import (at module level or inside a function).
RULES = [
    ("requant.format", ("requant.pipeline", "requant.analysis", "requant.cli", "requant.decode", "requant.fused")),
    ("requant.fused", ("requant.pipeline", "requant.analysis", "requant.cli", "requant.decode")),
    ("requant.decode", ("requant.pipeline", "requant.analysis", "requant.cli")),
    ("requant.sensitivity", ("requant.pipeline", "requant.analysis", "requant.cli")),
    ("requant.sparse", ("requant.pipeline", "requant.analysis", "requant.cli", "requant.distributed")),
    ("requant.quantizers", ("requant.pipeline", "requant.analysis", "requant.cli", "requant.format")),
    ("requant.pipeline", ("requant.analysis", "requant.cli")),
    ("requant.analysis", ("requant.cli",)),
]


def test_the_graph_sees_relative_absolute_and_function_level_imports():
    assert "requant.sensitivity" in GRAPH_TOP["requant.pipeline"]  # a package: its __init__
    assert "requant.sensitivity.pqi" in GRAPH_TOP["requant.sensitivity"]
    assert {"requant.sparse", "requant.sparse.adaptive"} <= GRAPH_TOP["requant.pipeline"]  # package and module
    assert "requant.distributed" in GRAPH_TOP["requant.pipeline"]  # `from . import distributed`
    assert "requant.pipeline" in GRAPH_ALL["requant.cli.quantize"]  # imported inside run()
    assert "requant.pipeline" not in GRAPH_TOP["requant.cli.quantize"]


def test_no_import_cycles_at_module_level():
    assert find_cycle(GRAPH_TOP) is None, " -> ".join(find_cycle(GRAPH_TOP) or [])


def test_no_import_cycles_even_through_function_level_imports():
    assert find_cycle(GRAPH_ALL) is None, " -> ".join(find_cycle(GRAPH_ALL) or [])


@pytest.mark.parametrize(("lower", "uppers"), RULES, ids=[r[0] for r in RULES])
def test_lower_layers_never_import_upper_ones(lower, uppers):
    assert forbidden_edges(GRAPH_ALL, lower, uppers) == []


def test_the_checks_fail_on_the_old_layout(tmp_path):
    """A copy of the old wiring (report in sensitivity/ importing the pipeline inside a function, format importing
    the pipeline's result types) is caught by both checks."""
    pkg = tmp_path / PACKAGE
    for rel, text in {
        "__init__.py": "",
        "pipeline.py": "from .sensitivity import pqi\nclass QuantizationResult: ...\n",
        "sensitivity/__init__.py": "from .pqi import x\nfrom .report import run_report\n",
        "sensitivity/pqi.py": "x = 1\n",
        "sensitivity/report.py": "def run_report():\n    from ..pipeline import quantize\n",
        "format/__init__.py": "",
        "format/checkpoint.py": "from ..pipeline import QuantizationResult\n",
        "model.py": "import requant.offload\n",
        "offload.py": "from . import model\n",
    }.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(text)
    top, every = import_graph(tmp_path)
    assert forbidden_edges(every, "requant.sensitivity", ("requant.pipeline",)) == [
        ("requant.sensitivity.report", "requant.pipeline")
    ]
    assert forbidden_edges(every, "requant.format", ("requant.pipeline",)) == [
        ("requant.format.checkpoint", "requant.pipeline")
    ]
    assert find_cycle(top) == ["requant.model", "requant.offload", "requant.model"]
    assert find_cycle(every) is not None
