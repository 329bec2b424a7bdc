"""`pipeline status`: cached / stale / missing / modified per stage."""
from __future__ import annotations

from pipeline.cache.status import format_status, stage_statuses
from pipeline.cache.store import ArtifactStore
from pipeline.graph import cache_keys
from tests.pipeline import fake_stages
from tests.pipeline.fake_stages import Beta, config, run


def states(workdir, cfg, verify=False) -> dict[str, str]:
    return {s.name: s.state for s in stage_statuses(fake_stages.stages(), cfg, ArtifactStore(workdir), verify=verify)}


def test_status_cached_stale_missing(workdir):
    cfg = config(workdir)
    assert states(workdir, cfg) == {"one": "missing", "two": "missing", "three": "missing"}
    report = run(cfg, "one,two")
    assert states(workdir, cfg) == {"one": "cached", "two": "cached", "three": "missing"}
    changed = config(workdir, beta=Beta(b=0.75))
    assert states(workdir, changed) == {"one": "cached", "two": "stale", "three": "missing"}

    store = ArtifactStore(workdir)
    statuses = stage_statuses(fake_stages.stages(), changed, store)
    keys, old = cache_keys(fake_stages.stages(), changed), cache_keys(fake_stages.stages(), cfg)
    assert statuses[0].run_id == report.outcomes[0].run_id
    lines = format_status(statuses, store).splitlines()
    assert lines[0] == f"workdir: {workdir}"
    assert lines[4] == f"one        {keys['one'][:12]}  cached    {report.outcomes[0].run_id}"
    assert lines[5] == f"two        {keys['two'][:12]}  stale     -  (changed: config beta.b)"
    assert keys["two"] != old["two"]
    assert lines[6] == f"three      {keys['three'][:12]}  missing   -"


def test_status_verify_finds_modified_outputs(workdir):
    cfg = config(workdir)
    run(cfg, "one")
    out = ArtifactStore(workdir).path("one", cache_keys(fake_stages.stages(), cfg)["one"])
    assert states(workdir, cfg, verify=True)["one"] == "cached"
    (out / "piece1.json").write_text("{}")
    assert states(workdir, cfg)["one"] == "cached"  # without verify only the manifest is read
    assert states(workdir, cfg, verify=True)["one"] == "modified"


def test_gc_lists_and_deletes_outputs_no_given_config_uses(workdir):
    from pipeline.cache.gc import delete_output, format_unused, unused_outputs

    old, new = config(workdir), config(workdir, beta=Beta(b=0.75))
    run(old, "all")
    run(new, "all")
    store = ArtifactStore(workdir)
    old_keys, new_keys = cache_keys(fake_stages.stages(), old), cache_keys(fake_stages.stages(), new)
    unused = unused_outputs(fake_stages.stages(), [new], store)
    assert {(u.stage, u.key) for u in unused} == {("two", old_keys["two"]), ("three", old_keys["three"])}
    assert "rerun with --yes" in format_unused(unused)
    assert unused_outputs(fake_stages.stages(), [old, new], store) == []  # both configs keep theirs
    assert all(delete_output(u, store) for u in unused)
    assert not store.path("two", old_keys["two"]).exists()
    assert all(store.exists(stage, key) for stage, key in new_keys.items())
    assert unused_outputs(fake_stages.stages(), [new], store) == []


def test_gc_never_touches_what_a_run_builds_or_the_lock_it_holds(workdir):
    from pipeline.cache.gc import delete_output, unused_outputs

    old, new = config(workdir), config(workdir, beta=Beta(b=0.75))
    run(old, "all")
    store = ArtifactStore(workdir)
    key = cache_keys(fake_stages.stages(), old)["two"]
    lock = store.root / "two" / f"{key}.lock"
    with store.locked("two", key):  # a --force run of the old config, building aside as the runner does
        building = store.prepare("two", key, clear=True)
        (building / "piece.json").write_text("{}")
        unused = unused_outputs(fake_stages.stages(), [new], store)
        assert ("two", building) in {(u.stage, u.path) for u in unused}
        assert not any(delete_output(u, store) for u in unused if u.key == key)
        assert (building / "piece.json").is_file() and store.exists("two", key) and lock.is_file()
    # The same run's config given to gc: its unfinished build-aside is kept, so the rerun resumes it.
    assert key not in {u.key for u in unused_outputs(fake_stages.stages(), [old], store) if u.stage == "two"}
    assert all(delete_output(u, store) for u in unused_outputs(fake_stages.stages(), [new], store))
    assert not building.exists() and not store.path("two", key).exists()
    assert lock.is_file()  # released, never deleted: a waiting run may hold the same file
