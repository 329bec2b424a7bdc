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
outside the workdir (annotations, image and MCG folders, weights). A key holds
what an input contains, never where it lives or when it was touched: a file by
its sha256; a folder by the sha256 of its (relative name, content sha256)
pairs over the files the stage reads, as the field's "files" metadata says
(`_used_files`: an image folder by the images its annotation files name, an
MCG folder by the files of those images), so a stray file beside them, a
`touch`, a copy of the dataset elsewhere or an rsync without -t changes no key.
Hashes are remembered in the workdir against each file's (inode, size, mtime)
(pipeline/cache/input_state.py), so only new or changed files are read. The path
values themselves are masked out of the key's config JSON.
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import hashlib
import json
import os
import stat as stat_module
from pathlib import Path
from typing import Any, Iterable

from ion.schema import canonical_json, to_plain
from pipeline import PROJECT_ROOT
from pipeline.cache.input_state import MISSING, InputState, stat_input, unreadable
from pipeline.cache.store import file_sha256

PROJECT_PACKAGES = ("ion", "proposals", "stages")  # what a stage may import and whose edits it sees
INPUT_MARKER = "(input: keyed by content)"  # a path field's value in a key's config JSON


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


def _coco_images(path: str) -> list[list]:
    """[[image id, file name], ...] of a COCO json (instances or image info); [] when it is not one
    (the data stage then says what is wrong with it)."""
    try:
        with open(path, "rb") as f:
            data = json.load(f)
        return [[int(img["id"]), str(img["file_name"])] for img in data["images"]]
    except OSError as err:
        raise unreadable(path, err) from None
    except (ValueError, KeyError, TypeError):
        return []


def _named_images(section: Any, names: Iterable[str], state: InputState, prefix: str) -> list[list]:
    """The images the annotation files in fields `names` of `section` name, read once per content."""
    images: list[list] = []
    for name in names:
        value = getattr(section, name, None)
        if not isinstance(value, (str, Path)):
            continue
        sha = state.sha256(value, f"{prefix}.{name}")
        if sha != MISSING:
            images.extend(state.derived(sha, "coco_images", lambda v=str(value): _coco_images(v)))
    return images


def _all_files(folder: str, field: str) -> list[str]:
    """Every regular file under `folder` (relative names), symlinked folders followed once."""
    found, seen = [], set()
    for root, dirs, files in os.walk(folder, followlinks=True, onerror=_raise_walk_error(field)):
        real = os.path.realpath(root)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        found.extend(os.path.relpath(os.path.join(root, name), folder) for name in files)
    return found


def _raise_walk_error(field: str):
    def fail(err: OSError) -> None:
        raise unreadable(err.filename, err, field)
    return fail


def _used_files(spec: str, folder: str, section: Any, cfg: Any, state: InputState, key: str) -> list[str]:
    """The files of `folder` a stage reads, by the field's "files" metadata:

    named_by:a,b  the images named by the COCO json in sibling fields a, b;
    mcg           the MCG files of the images of every COCO json data.coco names
                  (the proposals stage's lookup, proposals/mcg.py);
    otherwise     every file under the folder."""
    prefix = key.rpartition(".")[0]
    if spec.startswith("named_by:"):
        return [name for _, name in _named_images(section, spec.split(":", 1)[1].split(","), state, prefix)]
    data = getattr(cfg, "data", None)
    if spec == "mcg" and getattr(data, "source", None) == "coco":
        from proposals.mcg import index_mcg_directory  # scipy and h5py: only when there is MCG to read

        coco = data.coco
        specs = [f.metadata.get("files", "") for f in dataclasses.fields(coco)]
        sources = sorted({source for spec in specs if spec.startswith("named_by:")
                          for source in spec.split(":", 1)[1].split(",")})
        index = index_mcg_directory(folder)
        used = {p for image_id, name in _named_images(coco, sources, state, "data.coco")
                for p in index.candidate_paths(image_id, name)}
        prefix = os.path.join(str(index.directory), "")  # the index's paths start with it
        return [p[len(prefix):] for p in used]
    return _all_files(folder, key)


def folder_fingerprint(folder: str, names: Iterable[str], state: InputState, field: str = "") -> str:
    """sha256 over (relative name, content sha256) of `names` in `folder`: where the folder lives,
    when its files were touched and what else lies in it do not count. The listing behind it is
    kept in `state`, so `status` can name the file that changed."""
    listing: dict[str, str] = {}
    prefix = os.path.join(folder, "")
    for name in sorted(set(names)):
        path = prefix + name
        st = stat_input(path, field)
        if st is None:
            listing[name] = MISSING
        elif not stat_module.S_ISREG(st.st_mode):
            listing[name] = "not a regular file"  # never opened: a FIFO would block
        else:
            listing[name] = state.sha256_of(path, st, field)
    text = "".join(f"{name}\t{sha}\n" for name, sha in sorted(listing.items()))
    fingerprint = f"files={len(listing)} sha256={hashlib.sha256(text.encode('utf-8')).hexdigest()}"
    state.record_listing(fingerprint, listing)
    return fingerprint


def input_fingerprint(path: str | Path, state: InputState | None = None, *, field: str = "",
                      uses: Iterable[str] | None = None) -> str:
    """What a path field's file or folder holds now (module docstring); "missing" if absent.
    `uses`: the folder's files the stage reads (default: all of them)."""
    state = state if state is not None else InputState.open(None)
    st = stat_input(path, field)
    if st is None:
        return MISSING
    if stat_module.S_ISDIR(st.st_mode):
        names = _all_files(str(path), field) if uses is None else uses
        return folder_fingerprint(str(path), names, state, field)
    return f"sha256={state.sha256_of(path, st, field)}"


def _fields_with_sections(obj: Any, prefix: str) -> Iterable[tuple[str, str, Any, str]]:
    """(dotted key, value, owning section, "files" metadata) of every set path field."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            key = f"{prefix}.{f.name}"
            if f.metadata.get("path") and isinstance(value, (str, Path)):
                yield key, str(value), obj, f.metadata.get("files", "")
            else:
                yield from _fields_with_sections(value, key)
    elif isinstance(obj, (tuple, list)):
        for i, value in enumerate(obj):
            yield from _fields_with_sections(value, f"{prefix}[{i}]")


def input_fingerprints(cfg: Any, sections: Iterable[str], state: InputState | None = None
                       ) -> dict[str, dict[str, str]]:
    """{dotted key: {"path", "fingerprint"}} of the path fields in `sections` of `cfg`."""
    state = state if state is not None else InputState.open(None)
    found = {}
    for name in sections:
        for key, value, section, spec in _fields_with_sections(getattr(cfg, name), name):
            st = stat_input(value, key)
            is_folder = st is not None and stat_module.S_ISDIR(st.st_mode)
            uses = _used_files(spec, value, section, cfg, state, key) if is_folder else None
            found[key] = {"path": value, "fingerprint": input_fingerprint(value, state, field=key, uses=uses)}
    return found


def _without_paths(obj: Any) -> Any:
    """The plain form of a config value with every set path field replaced by a marker: a key
    holds the input's content (its fingerprint), not where it lives."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: (INPUT_MARKER if f.metadata.get("path") and isinstance(getattr(obj, f.name), (str, Path))
                         else _without_paths(getattr(obj, f.name))) for f in dataclasses.fields(obj)}
    if isinstance(obj, (tuple, list)):
        return [_without_paths(v) for v in obj]
    return to_plain(obj)


def section_json_without_paths(cfg: Any, name: str) -> str:
    """Canonical JSON of one config section for a cache key (`_without_paths`)."""
    return canonical_json(_without_paths(getattr(cfg, name)))
