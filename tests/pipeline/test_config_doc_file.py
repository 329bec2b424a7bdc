"""docs/CONFIG.md is the generated config reference: it must not go stale, and each
section names the file that defines its dataclass."""
import ast
import dataclasses
import re
import typing

from ion.schema import fields_of
from pipeline.config import PROJECT_ROOT, Config, config_reference
from pipeline.config.docs import defined_in


def test_committed_config_reference_matches_the_config_types():
    committed = (PROJECT_ROOT / "docs" / "CONFIG.md").read_text(encoding="utf-8")
    assert committed == config_reference() + "\n", (
        "docs/CONFIG.md is stale: regenerate it with `python -m pipeline config-docs > docs/CONFIG.md`")


def _sections(cls: type) -> set[type]:
    """`cls` and every config dataclass under it (sections, lists of sections)."""
    found = {cls}
    for f, tp in fields_of(cls):
        for candidate in (tp, *typing.get_args(tp)):
            if dataclasses.is_dataclass(candidate) and candidate not in found:
                found |= _sections(candidate)
    return found


def test_each_section_points_at_the_file_that_defines_its_dataclass():
    reference = config_reference()
    for cls in _sections(Config):
        path = PROJECT_ROOT / defined_in(cls)
        defined = {node.name for node in ast.parse(path.read_text(encoding="utf-8")).body
                   if isinstance(node, ast.ClassDef)}
        assert cls.__name__ in defined, f"{defined_in(cls)} does not define {cls.__name__}"
        if cls is not Config:
            assert f"`{cls.__name__}`, {defined_in(cls)}" in reference


def test_files_named_in_config_help_exist():
    named = {path for cls in _sections(Config) for f, _ in fields_of(cls)
             for path in re.findall(r"[\w/]+\.py\b", str(f.metadata.get("help", "")))}
    assert named and {p for p in named if not (PROJECT_ROOT / p).is_file()} == set()
