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
OUTSIDE_REFERENCES = re.compile(r"\b[Ii]ssues? \d|PROTOTYPE-FINDINGS|DESIGN\.md|\.\./shared/(DESIGN|STYLE)")


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


def test_only_the_adapters_import_ray_and_mlflow():
    adapters = {"pipeline/tracking.py", "pipeline/worker_tracking.py", "pipeline/cluster.py",
                "pipeline/train_adapter.py"}
    importers = set()
    for package in PACKAGES:
        for path in _modules(package):
            text = path.read_text(encoding="utf-8")
            if re.search(r"^\s*(import|from) (ray|mlflow)\b", text, re.M):
                importers.add(str(path.relative_to(ROOT)))
    assert importers - adapters - {"pipeline/mlflow_model.py"} == set()


def test_no_module_is_over_500_lines():
    long = {str(p.relative_to(ROOT)): n for package in (*PACKAGES, "bench") for p in _modules(package)
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert long == {}


def test_code_cites_the_paper_not_documents_outside_the_project():
    cites = []
    for package in (*PACKAGES, "bench", "tests"):
        for path in _modules(package):
            if path == Path(__file__).resolve():
                continue
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if OUTSIDE_REFERENCES.search(line):
                    cites.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert cites == []
