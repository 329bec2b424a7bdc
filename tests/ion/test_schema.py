"""The generic YAML -> frozen dataclass loader: validation, messages, extends, overrides."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import pytest
import yaml

from ion.errors import UserError
from ion.schema import Origin, apply_override, build, canonical_json, flatten, read_layered, section_json, to_yaml
from pipeline.config.docs import config_reference


@dataclass(frozen=True)
class Phase:
    lr_start: float = field(default=0.005, metadata={"help": "learning rate at the start", "min": 0.0})
    iters: int = field(default=10, metadata={"help": "iterations", "min": 1})


@dataclass(frozen=True)
class Context:
    kind: Literal["none", "irnn"] = field(default="irnn", metadata={"help": "context module"})
    dropout: float = field(default=0.0, metadata={"help": "dropout", "min": 0.0, "max": 1.0})


@dataclass(frozen=True)
class Train:
    phases: tuple[Phase, ...] = field(default=(Phase(), Phase(lr_start=0.001)), metadata={"help": "phases"})
    sizes: tuple[int, ...] = field(default=(1, 2), metadata={"help": "sizes", "min": 1})
    pair: tuple[float, float] = field(default=(0.2, 0.8), metadata={"help": "a range", "min": 0.0, "max": 1.0})
    counts: dict[str, int] = field(default_factory=dict, metadata={"help": "counts", "min": 0})
    context: Context = field(default_factory=Context, metadata={"help": "context"})
    note: Optional[str] = field(default=None, metadata={"help": "a note"})
    weights: Optional[str] = field(default=None, metadata={"help": "weights file", "path": True})
    flip: bool = field(default=True, metadata={"help": "flip"})

    def __post_init__(self) -> None:
        if self.pair[0] > self.pair[1]:
            raise ValueError(f"pair: low {self.pair[0]} > high {self.pair[1]} (swap them)")


@dataclass(frozen=True)
class Root:
    name: str = field(default="t", metadata={"help": "name"})
    seed: int = field(default=0, metadata={"help": "seed", "min": 0})
    train: Train = field(default_factory=Train, metadata={"help": "training"})


@dataclass(frozen=True)
class NoHelp:
    x: int = 1


@dataclass(frozen=True)
class Top:
    s: NoHelp = field(default_factory=NoHelp, metadata={"help": "s"})


def load(path: Path) -> Root:
    return build(Root, read_layered(path), origin=Origin(label=path.name, base_dir=path.parent))


@pytest.fixture()
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def error_of(path: Path) -> str:
    with pytest.raises(UserError) as err:
        load(path)
    return str(err.value)


def test_empty_file_gives_defaults(in_tmp):
    assert load(write(in_tmp / "c.yaml", "")) == Root()


def test_values_are_typed(in_tmp):
    cfg = load(write(in_tmp / "c.yaml", """
name: run1
train:
  phases: [{lr_start: 1, iters: 3}, {lr_start: 1e-3}]
  sizes: [4, 5, 6]
  pair: [0, 1]
  counts: {a: 1, b: 2}
  context: {kind: none}
  note: hello
  flip: false
"""))
    assert cfg == Root(name="run1", train=Train(
        phases=(Phase(lr_start=1.0, iters=3), Phase(lr_start=0.001)), sizes=(4, 5, 6), pair=(0.0, 1.0),
        counts={"a": 1, "b": 2}, context=Context(kind="none"), note="hello", flip=False))
    assert type(cfg.train.phases[0].lr_start) is float and type(cfg.train.pair[0]) is float


@pytest.mark.parametrize("text, message", [
    ("nmae: x", "c.yaml: nmae: unknown key (did you mean 'name'? known keys of the top level: name, seed, train)"),
    ("train: {contxt: {}}",
     "c.yaml: train.contxt: unknown key (did you mean 'context'? known keys of train: phases, sizes, pair, "
     "counts, context, note, weights, flip)"),
    ("train: {phases: [{}, {lr_strat: 1}]}",
     "c.yaml: train.phases[1].lr_strat: unknown key (did you mean 'lr_start'? known keys of train.phases[1]: "
     "lr_start, iters)"),
    ("train: {phases: [{}, {lr_start: -1}]}",
     "c.yaml: train.phases[1].lr_start: expected a number >= 0.0, got -1 (fix the value or drop the key to use "
     "0.005)"),
    ("seed: -3", "c.yaml: seed: expected an integer >= 0, got -3 (fix the value or drop the key to use 0)"),
    ("seed: 1.5", "c.yaml: seed: expected an integer >= 0, got 1.5 (fix the value or drop the key to use 0)"),
    ("seed: {a: [1]}", 'c.yaml: seed: expected an integer >= 0, got {"a": [1]} (fix the value or drop the key to '
                       'use 0)'),
    ("seed: true", "c.yaml: seed: expected an integer >= 0, got true (fix the value or drop the key to use 0)"),
    ("name: 5", 'c.yaml: name: expected a string, got 5 (fix the value or drop the key to use "t")'),
    ("train: {flip: 1}", "c.yaml: train.flip: expected true or false, got 1 (fix the value or drop the key to use "
                         "true)"),
    ("train: {context: {kind: conv}}",
     'c.yaml: train.context.kind: expected one of "none", "irnn", got "conv" (fix the value or drop the key to '
     'use "irnn")'),
    ("train: {context: {dropout: 1.5}}",
     "c.yaml: train.context.dropout: expected a number >= 0.0 and <= 1.0, got 1.5 (fix the value or drop the key "
     "to use 0.0)"),
    ("train: {sizes: 3}", "c.yaml: train.sizes: expected a list of (an integer), got 3 (fix the value or drop the "
                          "key to use [1, 2])"),
    ("train: {sizes: [1, 0]}", "c.yaml: train.sizes[1]: expected an integer >= 1, got 0 (fix the value or drop "
                               "the key to use [1, 2])"),
    ("train: {pair: [0.1]}", "c.yaml: train.pair: expected a list of 2 items (a number; a number), got [0.1] "
                             "(fix the value or drop the key to use [0.2, 0.8])"),
    ("train: {counts: {a: -1}}", "c.yaml: train.counts.a: expected an integer >= 0, got -1 (fix the value or drop "
                                 "the key to use {})"),
    ("train: {context: 3}", "c.yaml: train.context: expected a mapping with keys kind, dropout, got 3 (fix the "
                            "value or drop the key to use {\"kind\": \"irnn\", \"dropout\": 0.0})"),
    ("train: {pair: [0.9, 0.1]}", "c.yaml: train: pair: low 0.9 > high 0.1 (swap them)"),
    ("train: {phases: [{lr_start: .nan}]}",
     "c.yaml: train.phases[0].lr_start: expected a number >= 0.0, got NaN (fix the value or drop the key to use "
     "0.005)"),
])
def test_bad_values_name_file_and_key(in_tmp, text, message):
    assert error_of(write(in_tmp / "c.yaml", text)) == message


def test_top_level_must_be_a_mapping(in_tmp):
    assert error_of(write(in_tmp / "c.yaml", "- a\n- b\n")).startswith(
        "c.yaml: expected a mapping of config sections at the top level, got list")


def test_yaml_syntax_error_names_file_and_line(in_tmp):
    message = error_of(write(in_tmp / "c.yaml", "name: a\ntrain: {phases: [\n"))
    assert message.startswith("c.yaml: not valid YAML (line 3, column 1)")


def test_duplicate_key_is_an_error(in_tmp):
    message = error_of(write(in_tmp / "c.yaml", "seed: 1\nname: a\nseed: 2\n"))
    assert message.startswith("c.yaml: not valid YAML (line 3, column 1): found duplicate key 'seed' (first at line 1)")


def test_missing_file(in_tmp):
    assert error_of(in_tmp / "nope.yaml") == "nope.yaml: no such config file (check the path given to --config)"


def test_path_fields_resolve_against_the_config_file(in_tmp):
    cfg = load(write(in_tmp / "sub" / "c.yaml", "train: {weights: ../w/vgg.pt}"))
    assert cfg.train.weights == str(in_tmp / "w" / "vgg.pt")
    absolute = load(write(in_tmp / "sub" / "d.yaml", "train: {weights: /data/vgg.pt}"))
    assert absolute.train.weights == "/data/vgg.pt"


def test_extends_merges_sections_and_keeps_each_files_directory(in_tmp):
    write(in_tmp / "base" / "base.yaml", "seed: 3\ntrain: {weights: w.pt, sizes: [7], context: {kind: none}}\n")
    cfg = load(write(in_tmp / "child.yaml", "extends: base/base.yaml\ntrain: {sizes: [8, 9], flip: false}\n"))
    assert cfg.seed == 3
    assert cfg.train.sizes == (8, 9)  # lists replace, they do not merge
    assert cfg.train.flip is False and cfg.train.context.kind == "none"
    assert cfg.train.weights == str(in_tmp / "base" / "w.pt")


def test_extends_errors_name_the_file_that_states_the_value(in_tmp):
    write(in_tmp / "base.yaml", "seed: -1\n")
    message = error_of(write(in_tmp / "child.yaml", "extends: base.yaml\nname: x\n"))
    assert message == "base.yaml: seed: expected an integer >= 0, got -1 (fix the value or drop the key to use 0)"


def test_extends_cycle_and_missing_parent(in_tmp):
    write(in_tmp / "a.yaml", "extends: b.yaml\n")
    write(in_tmp / "b.yaml", "extends: a.yaml\n")
    assert error_of(in_tmp / "a.yaml") == ("a.yaml: `extends` forms a cycle: a.yaml -> b.yaml -> a.yaml "
                                           "(remove one of the `extends` keys)")
    write(in_tmp / "c.yaml", "extends: gone.yaml\n")
    assert error_of(in_tmp / "c.yaml") == ("gone.yaml: no such config file (check the path given to --config "
                                           "or to extends in c.yaml)")


def test_overrides_set_nested_values_and_validate(in_tmp):
    cfg = Root()
    cfg = apply_override(cfg, "train.phases[1].lr_start=0.02")
    cfg = apply_override(cfg, "train.context.kind=none")
    cfg = apply_override(cfg, "train.sizes=[3, 4]")
    cfg = apply_override(cfg, "train.counts.cat=5")
    cfg = apply_override(cfg, "train.weights=w.pt")
    cfg = apply_override(cfg, "seed=7")
    assert cfg == Root(seed=7, train=Train(phases=(Phase(), Phase(lr_start=0.02)), sizes=(3, 4),
                                           counts={"cat": 5}, context=Context(kind="none"),
                                           weights=str(in_tmp / "w.pt")))


@pytest.mark.parametrize("text, message", [
    ("train.phases[1].lr_start=-2", "-o train.phases[1].lr_start=-2: train.phases[1].lr_start: expected a number "
                                    ">= 0.0, got -2 (fix the value or drop the -o to use 0.005)"),
    ("train.lr=abc", "-o train.lr=abc: train.lr: unknown key (known keys of train: phases, sizes, pair, counts, "
                     "context, note, weights, flip)"),
    ("train.phases[5].iters=1", "-o train.phases[5].iters=1: train.phases[5]: index out of range (train.phases "
                                "has 2 items)"),
    ("train.flip.x=1", "-o train.flip.x=1: train.flip.x: train.flip is true or false, it has no keys to set"),
    ("train.note.x=1", "-o train.note.x=1: train.note is null: set it whole (e.g. -o train.note={...}) instead "
                       "of one key below it"),
    ("seed", "-o seed: expected KEY=VALUE, e.g. -o train.phases[0].lr_start=0.01"),
    ("train..x=1", "-o train..x=1: 'train..x' is not a dotted key (write section.key or section.list[0].key)"),
    ("train.pair=[0.9, 0.1]", "-o train.pair=[0.9, 0.1]: train: pair: low 0.9 > high 0.1 (swap them)"),
    ("seed=[1", "-o seed=[1: not valid YAML (line 1, column 3): expected ',' or ']', but got '<stream end>'"),
])
def test_bad_overrides_name_the_override(text, message):
    with pytest.raises(UserError) as err:
        apply_override(Root(), text)
    assert str(err.value) == message


def test_canonical_json_is_stable_and_sorted():
    a = Train(counts={"b": 1, "a": 2})
    b = Train(counts={"a": 2, "b": 1})
    assert canonical_json(a) == canonical_json(b)
    assert canonical_json(Phase()) == '{"iters":10,"lr_start":0.005}'
    assert section_json(Root(seed=4), "seed") == "4"


def test_yaml_round_trip(in_tmp):
    cfg = Root(name="rt", train=Train(phases=(Phase(iters=4),), counts={"x": 1}, note="n"))
    assert load(write(in_tmp / "rt.yaml", to_yaml(cfg))) == cfg


def test_flatten_gives_dotted_keys():
    flat = flatten({"train": Train(phases=(Phase(),))})
    assert flat["train.phases[0].lr_start"] == 0.005
    assert flat["train.sizes"] == [1, 2]
    assert flat["train.context.kind"] == "irnn"
    assert flat["train.counts"] == {}


def test_config_reference_lists_every_field_with_help_and_bounds():
    text = config_reference(Root)
    assert "| `seed` | an integer | `0` | >= 0 | seed |" in text
    assert "| `phases[].lr_start` | a number | `0.005` | >= 0.0 | learning rate at the start |" in text
    assert "| `context.dropout` | a number | `0.0` | >= 0.0 and <= 1.0 | dropout |" in text
    assert "| `weights` | a string or null | `null` |  | weights file (relative to the config file) |" in text
    with pytest.raises(TypeError, match="NoHelp.x has no metadata"):
        config_reference(Top)


def test_yaml_float_exponent_without_dot(in_tmp):
    assert load(write(in_tmp / "c.yaml", "train: {context: {dropout: 5e-1}}")).train.context.dropout == 0.5
    assert yaml.safe_load("x: 5e-1")["x"] == "5e-1"  # the PyYAML quirk the loader works around
