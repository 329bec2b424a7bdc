"""docs/CONFIG.md is the generated config reference: it must not go stale."""
from pipeline.config import PROJECT_ROOT, config_reference


def test_committed_config_reference_matches_the_config_types():
    committed = (PROJECT_ROOT / "docs" / "CONFIG.md").read_text(encoding="utf-8")
    assert committed == config_reference() + "\n", (
        "docs/CONFIG.md is stale: regenerate it with `python -m pipeline config-docs > docs/CONFIG.md`")
