"""The stage graph: registration, selection, cache keys."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest

from ion.errors import UserError
from pipeline.graph import STAGE_NAMES, build_graph, cache_keys, registered_names, registered_stages, select_stages
from stages.contract import RuntimeConfig
from tests.pipeline import fake_stages
from tests.pipeline.fake_stages import Alpha, Beta, FakeConfig

PROJECT = Path(__file__).resolve().parents[2]


def changed(before: dict[str, str], after: dict[str, str]) -> set[str]:
    return {name for name in before if before[name] != after[name]}


def test_key_is_sha256_of_name_version_reads_upstream_keys_code_and_inputs():
    cfg = FakeConfig()
    keys = cache_keys(fake_stages.stages(), cfg)
    # The fake stages live outside the project packages: no modules to fingerprint, no path fields.
    material = {"stage": "two", "version": "1", "reads": {"beta": '{"b":0.5,"label":null}'},
                "upstream": {"one": keys["one"]}, "code": hashlib.sha256(b"").hexdigest(), "inputs": {}}
    assert keys["two"] == hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


def test_keys_change_exactly_when_a_read_value_changes():
    stages = fake_stages.stages()
    base = cache_keys(stages, FakeConfig())
    assert cache_keys(stages, FakeConfig()) == base  # deterministic
    assert len(set(base.values())) == 3
    # `one` reads seed and alpha: it and everything downstream change.
    assert changed(base, cache_keys(stages, FakeConfig(alpha=Alpha(a=2)))) == {"one", "two", "three"}
    assert changed(base, cache_keys(stages, FakeConfig(seed=1))) == {"one", "two", "three"}
    # `two` reads beta: `one` keeps its key.
    assert changed(base, cache_keys(stages, FakeConfig(beta=Beta(label="x")))) == {"two", "three"}
    # Nobody reads gamma, name or runtime.
    assert changed(base, cache_keys(stages, FakeConfig(gamma=Alpha(a=5)))) == set()
    assert changed(base, cache_keys(stages, FakeConfig(name="other"))) == set()
    assert changed(base, cache_keys(stages, FakeConfig(runtime=RuntimeConfig(num_workers=7, device="cpu")))) == set()


def test_version_bump_changes_the_stage_and_downstream():
    base = cache_keys(fake_stages.stages(), FakeConfig())
    bumped = cache_keys(fake_stages.stages(version_of_two="2"), FakeConfig())
    assert changed(base, bumped) == {"two", "three"}


def test_select_stages():
    stages = fake_stages.stages()
    assert [s.name for s in select_stages(stages, "all")] == ["one", "two", "three"]
    assert [s.name for s in select_stages(stages, "three, one")] == ["one", "three"]  # pipeline order
    with pytest.raises(UserError) as err:
        select_stages(stages, "one,tune")
    assert str(err.value) == "--stages one,tune: unknown stage 'tune' (known stages: one, two, three; or all)"
    with pytest.raises(UserError, match="name at least one stage"):
        select_stages(stages, " , ")


def test_graph_rejects_bad_stage_modules():
    one, two, three = fake_stages.modules()
    with pytest.raises(TypeError, match="consumes \\['one'\\], which are not registered before it"):
        build_graph([two, one])
    with pytest.raises(TypeError, match="registered twice"):
        build_graph([one, one])
    del three.VERSION
    with pytest.raises(TypeError, match="lacks VERSION"):
        build_graph([one, two, three])
    one.READS = ("runtime",)
    with pytest.raises(TypeError, match="READS may not name"):
        build_graph([one])


def test_reads_must_name_config_fields():
    one = fake_stages.modules()[0]
    one.READS = ("nope",)
    with pytest.raises(TypeError, match="READS 'nope', which is not a config field"):
        cache_keys(build_graph([one]), FakeConfig())


def test_registered_stages_are_the_existing_modules_in_pipeline_order():
    names = registered_names()
    assert names == tuple(n for n in STAGE_NAMES if (PROJECT / "stages" / f"{n}.py").is_file())
    assert tuple(s.name for s in registered_stages()) == names


def test_key_ignores_dataclass_identity():
    """Equal configs built differently give equal keys (the key hashes values, not objects)."""
    a = FakeConfig(beta=Beta(b=0.25))
    b = dataclasses.replace(FakeConfig(), beta=dataclasses.replace(Beta(), b=0.25))
    assert cache_keys(fake_stages.stages(), a) == cache_keys(fake_stages.stages(), b)
