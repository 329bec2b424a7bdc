"""Fingerprints of what a stage's output depends on beyond its config values:
the project source it runs, and the external files its config names.

Code. A stage's code is its module and every project module (ion, proposals,
stages) it imports, transitively, including imports inside functions (lazy
imports still run), and the package __init__ files on the way. The import
graph is read statically with `ast` from the source files, never by
importing, so `status` costs milliseconds and a module that fails to import
still has a fingerprint. Editing the evaluator then invalidates tune and
evaluate, and leaves the stages that never import it cached.

Inputs. A config field with `"path": True` metadata names a file or folder
outside the workdir (annotations, image and MCG folders, weights). A file
under HASH_LIMIT bytes is fingerprinted by its content; a larger file by size
and mtime; a folder by its file count, total size and newest mtime, found by
one os.scandir walk (cheap for COCO's 120k images: no file is opened).
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import hashlib
import os
from pathlib import Path
from typing import Any, Iterable

from pipeline import PROJECT_ROOT
from pipeline.cache.store import file_sha256

PROJECT_PACKAGES = ("ion", "proposals", "stages")  # what a stage may import and whose edits it sees
HASH_LIMIT = 64 << 20  # files up to 64 MiB are hashed by content


# ----------------------------------------------------------------------------- code


def _module_file(name: str, root: Path) -> Path | None:
    """The source file of project module `name` under `root` (package -> its __init__.py)."""
    if name.split(".")[0] not in PROJECT_PACKAGES:
        return None
    base = root.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imported_names(path: Path, module: str) -> set[str]:
    """Every module name `path` (the source of `module`) imports anywhere in its body;
    for `from X import Y`, both X and X.Y (Y may be a submodule)."""
    tree = ast.parse(path.read_bytes(), filename=str(path))
    is_package = path.name == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - (node.level - 1)] if node.level > 1 else parts
                base = ".".join(parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
    return names


def _with_parents(name: str) -> list[str]:
    """`ion.evaluation.metrics` -> [ion, ion.evaluation, ion.evaluation.metrics]: importing a
    module runs its packages' __init__ files first."""
    parts = name.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


@functools.lru_cache(maxsize=1024)
def _read_module(path: Path, module: str, mtime_ns: int, size: int) -> tuple[str, frozenset[str]]:
    """(sha256, imported names) of one source file; mtime and size key the cache."""
    del mtime_ns, size
    return file_sha256(path), frozenset(_imported_names(path, module))


def _closure(module: str, root: Path) -> tuple[tuple[str, str], ...]:
    seen: dict[str, tuple[Path, str]] = {}
    todo = _with_parents(module)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        path = _module_file(name, root)
        if path is None:
            continue
        stat = path.stat()
        sha, imported = _read_module(path, name, stat.st_mtime_ns, stat.st_size)
        seen[name] = (path, sha)
        for other in imported:
            todo.extend(n for n in _with_parents(other) if n not in seen)
    return tuple(sorted((p.relative_to(root).as_posix(), sha) for p, sha in seen.values()))


def code_modules(module: str, root: Path = PROJECT_ROOT) -> dict[str, str]:
    """{relative path: sha256} of `module` and the project modules it imports, transitively."""
    root = Path(root).resolve()
    return dict(_closure(module, root))


def code_fingerprint(modules: dict[str, str]) -> str:
    """sha256 of the sorted (relative path, file sha256) pairs."""
    text = "\n".join(f"{path} {sha}" for path, sha in sorted(modules.items()))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# ----------------------------------------------------------------------------- input files


def path_fields(obj: Any, prefix: str) -> Iterable[tuple[str, str]]:
    """(dotted key, value) of every set `"path": True` field in a config section, nested sections
    and tuples of sections included."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            key = f"{prefix}.{f.name}"
            if f.metadata.get("path") and isinstance(value, (str, Path)):
                yield key, str(value)
            else:
                yield from path_fields(value, key)
    elif isinstance(obj, (tuple, list)):
        for i, value in enumerate(obj):
            yield from path_fields(value, f"{prefix}[{i}]")


def _tree_summary(folder: str) -> tuple[int, int, int]:
    """(files, total bytes, newest mtime_ns) under `folder`, symlinked folders not followed."""
    count = total = newest = 0
    stack = [folder]
    while stack:
        try:
            entries = os.scandir(stack.pop())
        except OSError:
            continue
        with entries:
            for entry in entries:
                try:
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(entry.path)
                    elif entry.is_file():
                        stat = entry.stat()
                        count += 1
                        total += stat.st_size
                        newest = max(newest, stat.st_mtime_ns)
                except OSError:
                    continue
    return count, total, newest


def input_fingerprint(path: str | Path) -> str:
    """What a path field's file or folder looks like now (module docstring); "missing" if absent."""
    path = Path(path)
    try:
        stat = path.stat()
    except OSError:
        return "missing"
    if path.is_dir():
        count, total, newest = _tree_summary(str(path))
        return f"folder files={count} bytes={total} newest_mtime_ns={newest}"
    if stat.st_size <= HASH_LIMIT:
        return f"sha256={file_sha256(path)}"
    return f"bytes={stat.st_size} mtime_ns={stat.st_mtime_ns}"


def input_fingerprints(cfg: Any, sections: Iterable[str]) -> dict[str, dict[str, str]]:
    """{dotted key: {"path", "fingerprint"}} of the path fields in `sections` of `cfg`."""
    found = {}
    for name in sections:
        for key, value in path_fields(getattr(cfg, name), name):
            found[key] = {"path": value, "fingerprint": input_fingerprint(value)}
    return found
