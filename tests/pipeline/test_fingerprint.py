"""Cache keys that see code and input files (pipeline/cache/fingerprint.py, pipeline/graph.py)."""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Optional

from pipeline.cache.fingerprint import code_modules, input_fingerprint
from pipeline.graph import Stage, cache_keys
from tests.conftest import SHARED

STAGES = ("data", "proposals", "train", "detect", "tune", "evaluate")


def test_the_evaluator_is_in_the_code_of_tune_and_evaluate_only():
    having = {s for s in STAGES if "ion/evaluation/metrics.py" in code_modules(f"stages.{s}")}
    assert having == {"tune", "evaluate"}


def test_selective_search_is_in_the_code_of_the_proposals_stage():
    assert "proposals/selective_search.py" in code_modules("stages.proposals")
    assert "proposals/selective_search.py" not in code_modules("stages.data")
    # Package __init__ files count: importing a module runs them.
    assert {"stages/__init__.py", "proposals/__init__.py"} <= set(code_modules("stages.proposals"))


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_imports_inside_functions_and_relative_imports_count(tmp_path):
    _write(tmp_path / "ion" / "__init__.py", "")
    _write(tmp_path / "ion" / "a.py", "def f():\n    from ion import b\n    return b\n")
    _write(tmp_path / "ion" / "b.py", "from .sub import c\n")
    _write(tmp_path / "ion" / "sub" / "__init__.py", "")
    _write(tmp_path / "ion" / "sub" / "c.py", "import numpy\n")
    _write(tmp_path / "ion" / "unused.py", "")
    before = code_modules("ion.a", root=tmp_path)
    assert set(before) == {"ion/__init__.py", "ion/a.py", "ion/b.py", "ion/sub/__init__.py", "ion/sub/c.py"}
    _write(tmp_path / "ion" / "sub" / "c.py", "import numpy  # edited\n")
    after = code_modules("ion.a", root=tmp_path)
    assert [p for p in before if before[p] != after[p]] == ["ion/sub/c.py"]


@dataclass(frozen=True)
class Files:
    annotations: Optional[str] = field(default=None, metadata={"help": "a file", "path": True})
    images: Optional[str] = field(default=None, metadata={"help": "a folder", "path": True})


@dataclass(frozen=True)
class FilesConfig:
    files: Files = field(default_factory=Files, metadata={"help": "inputs"})


def test_replacing_an_input_file_in_place_changes_the_key(tmp_path):
    annotations, images = tmp_path / "instances.json", tmp_path / "images"
    annotations.write_text('{"images": []}')
    (images / "sub").mkdir(parents=True)
    (images / "sub" / "1.jpg").write_bytes(b"x")
    stage = Stage(name="data", version="1", reads=("files",), upstream=(), run=lambda *a: None)
    cfg = FilesConfig(Files(annotations=str(annotations), images=str(images)))
    key = cache_keys([stage], cfg)["data"]
    assert cache_keys([stage], cfg)["data"] == key
    annotations.write_text('{"images": [1]}')  # same path, new content
    changed = cache_keys([stage], cfg)["data"]
    assert changed != key
    (images / "sub" / "2.jpg").write_bytes(b"y")  # one more image in a subfolder
    assert cache_keys([stage], cfg)["data"] != changed


def test_files_and_folders_are_fingerprinted_by_content(tmp_path):
    big = tmp_path / "weights.pt"
    big.write_bytes(b"0" * 100)
    first = input_fingerprint(big)
    assert first == "sha256=" + hashlib.sha256(b"0" * 100).hexdigest()
    os.utime(big, ns=(1, 1))  # touched: same bytes, same fingerprint
    assert input_fingerprint(big) == first
    assert input_fingerprint(tmp_path / "absent") == "missing"
    assert input_fingerprint(tmp_path).startswith("files=1 sha256=")


def test_replacing_the_coco_annotations_in_place_changes_the_data_key(tmp_path):
    import shutil

    from pipeline.config import load_config
    from pipeline.graph import registered_stages

    source = SHARED / "data" / "coco-mini" / "annotations" / "instances_train2017.json"
    assert source.is_file(), f"{source}: the tests need ../shared beside the checkout"
    annotations = tmp_path / "instances_train2017.json"
    shutil.copy(source, annotations)
    cfg = load_config("coco_mini", [f"data.coco.train_annotations={annotations}"], workdir=tmp_path)
    stages = registered_stages()
    before = cache_keys(stages, cfg)
    annotations.write_bytes(annotations.read_bytes() + b"\n")  # same path, new content
    after = cache_keys(stages, cfg)
    assert {s for s in before if before[s] != after[s]} == set(STAGES)  # data, and through it everything
    assert after["data"] != before["data"]
