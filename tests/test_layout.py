"""The package layout the design asks for, checked statically: which top-level
package may import which, module size, and comments that give reasons rather
than pointers to documents outside the project."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("ion", "proposals", "stages", "pipeline")
# Each package and the project packages it may import (besides itself).
ALLOWED = {
    "ion": set(),
    "proposals": {"ion"},
    "stages": {"ion", "proposals"},
    "pipeline": {"ion", "proposals", "stages"},
}
MAX_LINES = 500
# Pointers to documents outside the project, and sentences about how the work
# was organised rather than about the software.
OUTSIDE_REFERENCES = re.compile(r"\b[Ii]ssues? \d|\b[Ii]ssue's\b|PROTOTYPE-FINDINGS|DESIGN\.md|STYLE\.md|"
                                r"\.\./shared/\S*\.md|project's sessions")


def _modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def _imported_packages(path: Path) -> set[str]:
    """Top-level project packages `path` imports, anywhere in the file (lazy imports too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found |= {name.split(".")[0] for name in names} & set(PACKAGES)
    return found


@pytest.mark.parametrize("package", PACKAGES)
def test_imports_run_one_way(package):
    wrong = {str(p.relative_to(ROOT)): sorted(_imported_packages(p) - ALLOWED[package] - {package})
             for p in _modules(package)}
    assert {k: v for k, v in wrong.items() if v} == {}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
    """{module: project modules it imports anywhere in its body}; `from X import Y` counts
    as an import of X.Y when that is a module, else of X."""
    paths = {_module_name(p): p for package in PACKAGES for p in _modules(package)}
    graph = {}
    for name, path in paths.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                edges |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                                    + ([base] if base else []))
                for alias in node.names:
                    edges.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in paths else base)
        graph[name] = {e for e in edges if e in paths and e != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph[node]):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_module_imports_itself_in_a_circle():
    assert _cycles(_import_graph()) == []


def test_the_circle_check_finds_a_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_only_the_adapters_import_ray_and_mlflow():
    adapters = {"pipeline/tracking/client.py", "pipeline/tracking/worker.py", "pipeline/cluster/tasks.py",
                "pipeline/cluster/train.py"}
    importers = set()
    for package in PACKAGES:
        for path in _modules(package):
            text = path.read_text(encoding="utf-8")
            if re.search(r"^\s*(import|from) (ray|mlflow)\b", text, re.M):
                importers.add(str(path.relative_to(ROOT)))
    assert importers - adapters - {"pipeline/tracking/model.py", "pipeline/tracking/registry.py"} == set()


def test_no_module_is_over_500_lines():
    long = {str(p.relative_to(ROOT)): n for package in (*PACKAGES, "bench") for p in _modules(package)
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert long == {}


def test_code_and_docs_cite_the_paper_not_documents_outside_the_project():
    cites = []
    documents = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    for path in [p for package in (*PACKAGES, "bench", "tests") for p in _modules(package)] + documents:
        if path == Path(__file__).resolve():
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if OUTSIDE_REFERENCES.search(line):
                cites.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert cites == []
