"""`python -m pipeline ablations`: the shipped ablation configs, the
table built from evaluate's metrics.json, and one real run of two smoke-sized variants."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ion.schema import to_plain
from pipeline.cli import main
from pipeline.commands.ablations import (
    ABLATIONS_DIR,
    EXPERIMENT,
    build_rows,
    config_changes,
    format_markdown,
    table_metrics,
)
from pipeline.config import DEFAULT_CONFIG, PROJECT_ROOT, AblationConfig, load_config
from pipeline.graph import cache_keys, registered_stages
from tests.helpers import copy_artifact

SMOKE = PROJECT_ROOT / "configs" / "smoke.yaml"
ABLATION_FILES = sorted(ABLATIONS_DIR.glob("*.yaml"))
VGG16_CONV5_CHANNELS = 512


# ----------------------------------------------------------------------------- the shipped configs


def _expected_model_changes(default) -> dict[str, dict[str, object]]:
    """Variant -> the model leaves it sets (dotted under model); every other model leaf is the default's."""
    from ion.modeling.backbone import scaled_channels

    # The reference is the default without its segmentation loss; every other variant
    # extends the reference and changes one thing; seg-loss puts the loss back.
    off = {"seg_loss_weight": 0.0}
    return {
        "irnn-identity": off,
        # The IRNN read out as the paper has it, without what the default adds to let
        # the small model learn (running means, identity input, directions pooled apart).
        "irnn-paper": {**off, "context.state_norm": "none", "context.input_init": "random",
                       "context.pool_from_both": "false", "context.pool_directions": "concat"},
        "none": {**off, "context.kind": "none",
                 "pool_from": [name for name in default.model.pool_from if name != "context"]},
        # As wide as the IRNN's output (conv5's channels), not the paper's 512 on full VGG16;
        # pooled from the top conv only, as Table 7 does.
        "conv3": {**off, "context.kind": "conv3", "context.pool_from_both": "false",
                  "context.channels": scaled_channels(VGG16_CONV5_CHANNELS, default.model.width)},
        "global": {**off, "context.kind": "global"},
        "irnn-learned": {**off, "context.recurrent": "learned"},
        "no-l2-norm": {**off, "norm": "none"},
        "seg-loss": {},  # the default itself
        # Table 5, with the segmentation loss as the table has it.
        "t5-channel-learned": {},
        "t5-channel-fixed": {"scale_mode": "fixed"},
        "t5-blob-learned": {"norm": "blob", "fuse": "false"},
        "t5-blob-fixed": {"norm": "blob", "fuse": "false", "scale_mode": "fixed"},
        # Table 7 (b), and (a)'s seg-loss pair.
        "t7-conv5": {**off, "context.kind": "conv5", "context.pool_from_both": "false",
                     "context.channels": scaled_channels(256, default.model.width)},
        "t7-conv3-seg": {"context.kind": "conv3", "context.pool_from_both": "false",
                         "context.channels": scaled_channels(VGG16_CONV5_CHANNELS, default.model.width)},
        # Table 8: IRNN depth.
        "t8-layers1": {"context.layers": 1},
        "t8-layers2": {},
        "t8-layers3": {"context.layers": 3},
        "unshared-input": {"context.input_to_hidden": "per_direction"},  # Sec. 3.2
        # Table 10.
        "t10-lr-then-ud": {"context.variant": "lr_then_ud"},
        "t10-pool-both": {"context.pool_directions": "concat"},
        "t10-conv67": {"conv67": "true", "pool_from": ["conv3", "conv4", "conv5", "conv7", "context"]},
        # Table 9: hidden units (the paper's 128..1024 at width 0.25) x Whh.
        **{f"t9-hidden{h}-{rec}": {**({"context.hidden": h} if h != 128 else {}), "context.input_init": "random",
                                   **({"context.recurrent": "learned"} if rec == "learned" else {})}
           for h in (32, 64, 128, 256) for rec in ("learned", "identity")},
    }


def test_every_table_row_of_the_issue_has_a_config():
    names = {load_config(path).name for path in ABLATION_FILES}
    default = load_config(DEFAULT_CONFIG)
    assert names == {f"ablation-{v}" for v in _expected_model_changes(default)}


@pytest.mark.parametrize("path", ABLATION_FILES, ids=lambda p: p.stem)
def test_ablation_config_changes_only_its_model_keys(path):
    default, cfg = load_config(DEFAULT_CONFIG), load_config(path)
    variant = path.stem.replace("_", "-")
    assert cfg.name == f"ablation-{variant}"
    # Everything but the name and the model is the default's: same seed, data, proposals,
    # training schedule, tuning and evaluation (and the same workdir, so one shared store).
    for f in dataclasses.fields(cfg):
        if f.name not in ("name", "model", "ablation"):
            assert to_plain(getattr(cfg, f.name)) == to_plain(getattr(default, f.name)), f.name
    stages = registered_stages()
    keys, default_keys = cache_keys(stages, cfg), cache_keys(stages, default)
    assert keys["data"] == default_keys["data"] and keys["proposals"] == default_keys["proposals"]

    wanted = _expected_model_changes(default)[variant]
    changes = config_changes(cfg, default)
    assert changes == sorted(f"model.{k}: {_yaml_flow(v)}" for k, v in wanted.items()), (
        f"{path.name} should change exactly {wanted} in the default's model")
    assert (keys["train"] == default_keys["train"]) == (not wanted)


def test_every_ablation_config_names_its_paper_row():
    for path in ABLATION_FILES:
        ablation = load_config(path).ablation
        assert ablation.row, path.name
        if ablation.table is not None:
            assert 4 <= ablation.table <= 10, path.name
            if path.stem.startswith("t"):
                assert path.stem.startswith(f"t{ablation.table}_"), path.name
    tables = {load_config(path).ablation.table for path in ABLATION_FILES}
    assert tables >= {4, 5, 6, 7, 8, 9, 10}


def test_tables_option_selects_configs(tmp_path, capsys):
    from pipeline.commands.ablations import load_variants, parse_tables, pick_reference, select_tables

    variants = load_variants(ABLATION_FILES, [], tmp_path)
    ref = pick_reference(variants, None)
    chosen = select_tables(variants, parse_tables("8"), ref)
    assert [v.name for v in chosen] == ["irnn-identity", "t8-layers1", "t8-layers2", "t8-layers3"]
    assert main(["ablations", "--tables", "3", "--workdir", str(tmp_path)]) == 2
    assert "no config reproduces a row of those tables" in capsys.readouterr().err
    assert main(["ablations", "--tables", "five", "--workdir", str(tmp_path)]) == 2
    assert "expected paper table numbers" in capsys.readouterr().err


def _yaml_flow(value) -> str:
    return "[" + ", ".join(value) + "]" if isinstance(value, list) else str(value)


# ----------------------------------------------------------------------------- the table


def _entry(ap, ap50, aps, context=None):
    entry = {"stats": {"AP": ap, "AP50": ap50, "AP75": 0.0, "APs": aps, "APm": 0.0, "APl": -1.0},
             "per_category_ap": {}, "per_size_ap": {}}
    if context is not None:
        entry["context_AP"], entry["context_AP50"] = context
    return entry


SETTINGS = {"final": {"candidates": "flip", "nms_iou": 0.45, "score_thresh": 0.05, "max_dets": 100, "vote_iou": 0.8},
            "no_flip": {"candidates": "plain", "nms_iou": 0.45, "score_thresh": 0.05, "max_dets": 100,
                        "vote_iou": 0.8},
            "no_voting": {"candidates": "flip", "nms_iou": 0.45, "score_thresh": 0.05, "max_dets": 100,
                          "vote_iou": None},
            "baseline": {"candidates": "round1", "nms_iou": 0.3, "vote_iou": None}}


def test_table_from_metrics_files():
    metrics = {
        "none": {"final": _entry(0.15, 0.4, -1.0, (0.1, 0.25))},
        "irnn-identity": {"final": _entry(0.1875, 0.4371, 0.19249, (0.30001, 0.5)),
                          "no_flip": _entry(0.153, 0.41, 0.17, (0.28, 0.47)),
                          "no_voting": _entry(0.156, 0.42, 0.18, (0.29, 0.48)),
                          "baseline": _entry(0.123, 0.35, 0.14, (0.2, 0.4)),
                          "settings": SETTINGS},
        "no-l2-norm": {"final": _entry(0.0, 0.0, 0.0)},  # a split without context classes
    }
    changes = {"irnn-identity": [], "none": ["model.context.kind: none", "model.pool_from: [conv3, conv4, conv5]"],
               "no-l2-norm": ["model.norm: none"]}
    papers = {"irnn-identity": AblationConfig(table=7, row="(d) 2x stacked 4-dir IRNN", paper_map=75.6),
              "none": AblationConfig(table=6, row="C3 C4 C5", paper_map=75.1)}
    rows = build_rows(metrics, changes, "irnn-identity", papers)
    assert format_markdown(rows, "irnn-identity") == (
        "Test-split COCO AP (AP@[.5:.95]), AP50, APs (small objects) and the mean AP / AP50 of the context "
        "classes. Variant rows: the evaluate stage's final setting (flip TTA, tuned NMS, box voting). "
        "Rows \"irnn-identity, ...\": the reference run's evaluate settings with one test-time step off. "
        "\"paper\": the table and row of Bell et al. 2016 the config reproduces and its VOC07 test mAP (%).\n"
        "\n"
        "| row | differs from irnn-identity | paper | paper mAP | AP | AP50 | APs | context AP | context AP50 |\n"
        "|---|---|---|---:|---:|---:|---:|---:|---:|\n"
        "| irnn-identity | (reference) | T7 (d) 2x stacked 4-dir IRNN | 75.6 | 0.188 | 0.437 | 0.192 | 0.300 | "
        "0.500 |\n"
        "| none | model.context.kind: none; model.pool_from: [conv3, conv4, conv5] | T6 C3 C4 C5 | 75.1 | 0.150 | "
        "0.400 | n/a | 0.100 | 0.250 |\n"
        "| no-l2-norm | model.norm: none |  |  | 0.000 | 0.000 | 0.000 | n/a | n/a |\n"
        "| irnn-identity, no flip | test: no flip TTA (unflipped candidates) |  |  | 0.153 | 0.410 | 0.170 | "
        "0.280 | 0.470 |\n"
        "| irnn-identity, no voting | test: no box voting |  |  | 0.156 | 0.420 | 0.180 | 0.290 | 0.480 |\n"
        "| irnn-identity, one round, plain NMS 0.3 | test: one round of box regression, plain NMS 0.3, no tuning, "
        "no flip, no voting |  |  | 0.123 | 0.350 | 0.140 | 0.200 | 0.400 |\n")
    logged = table_metrics(rows)
    assert logged["irnn-identity/AP"] == 0.1875 and logged["irnn-identity/baseline/context_AP50"] == 0.4
    assert logged["none/context_AP"] == 0.1
    assert "none/APs" not in logged and "no-l2-norm/context_AP" not in logged  # COCO's -1, and absent
    assert len(logged) == 6 * 5 - 3


# ----------------------------------------------------------------------------- the command


def test_unknown_config_path_exits_2(tmp_path, capsys):
    missing = tmp_path / "nope.yaml"
    assert main(["ablations", "--configs", str(ABLATION_FILES[0]), str(missing), "--workdir", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"error: {missing}: no such config file (check the paths given to --configs)\n"
    assert list(tmp_path.iterdir()) == []


def test_two_configs_with_one_name_exit_2(tmp_path, capsys):
    copy = tmp_path / "copy.yaml"
    copy.write_text(f"extends: {ABLATION_FILES[0]}\n")
    assert main(["ablations", "--configs", str(ABLATION_FILES[0]), str(copy), "--workdir", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {copy} and ") and "give each ablation config its own name" in err


def _variant(tmp_path: Path, name: str, body: str = "") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"extends: {SMOKE}\nname: ablation-{name}\n{body}")
    return path


def test_ablations_command_end_to_end(smoke_run, tmp_path, workdir):
    """Two smoke-sized variants through the real CLI: both run, share data and proposals,
    and the table lands in the workdir and in MLflow."""
    from mlflow import MlflowClient

    # The variants change the model only: the smoke run's data and proposals are cache hits.
    for stage in ("data", "proposals"):
        copy_artifact(smoke_run.dirs[stage], workdir / "artifacts" / stage)

    configs = [_variant(tmp_path, "irnn-identity"), _variant(tmp_path, "global", "model:\n  context: {kind: global}\n")]
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    proc = subprocess.run([sys.executable, "-m", "pipeline", "ablations", "--configs", *map(str, configs),
                           "--workdir", str(workdir)], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr

    table = json.loads((workdir / "ablations.json").read_text())
    assert table["reference"] == "irnn-identity"
    assert [r["row"] for r in table["rows"]] == ["irnn-identity", "global", "irnn-identity, no flip",
                                                 "irnn-identity, no voting",
                                                 "irnn-identity, one round, plain NMS 0.3"]
    for row in table["rows"]:
        assert all(isinstance(row["values"][k], float) for k in ("AP", "AP50", "APs", "context_AP", "context_AP50"))
    assert table["rows"][1]["changes"] == ["model.context.kind: global"]
    md = (workdir / "ablations.md").read_text()
    assert md in proc.stdout
    assert "\n| global | model.context.kind: global | " in md

    # The second variant reused the first one's data and proposals outputs.
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    second = client.get_experiment_by_name("ablation-global")
    hits = {r.data.tags["stage"]: r.data.tags["cache_hit"]
            for r in client.search_runs([second.experiment_id], filter_string="tags.stage != ''")}
    assert hits == {"data": "true", "proposals": "true", "train": "false", "detect": "false", "tune": "false",
                    "evaluate": "false"}
    assert len(list((workdir / "artifacts" / "data").glob("*/manifest.json"))) == 1

    (run,) = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])
    for row in table["rows"]:
        for column, value in row["values"].items():
            if value >= 0:
                assert run.data.metrics[f"{row['key']}/{column}"] == pytest.approx(value)
    assert {"irnn-identity/AP", "global/AP", "irnn-identity/baseline/AP"} <= set(run.data.metrics)
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"ablations.md", "ablations.json"}
    assert run.data.tags["run.global"] == table["rows"][1]["run_id"]


def test_voc07_column_when_evaluate_reported_it():
    with_voc = {**_entry(0.4, 0.7, 0.2), "voc07_mAP": 0.71}
    metrics = {"irnn-identity": {"final": with_voc}, "none": {"final": _entry(0.3, 0.6, 0.1)}}
    rows = build_rows(metrics, {"none": ["model.context.kind: none"]}, "irnn-identity")
    md = format_markdown(rows, "irnn-identity")
    assert "| AP | AP50 | APs | context AP | context AP50 | VOC07 mAP |" in md
    assert md.splitlines()[-2].endswith("| 0.710 |") and md.splitlines()[-1].endswith("| n/a |")
    assert table_metrics(rows)["irnn-identity/voc07_mAP"] == 0.71
    plain = build_rows({"none": {"final": _entry(0.3, 0.6, 0.1)}}, {}, "none")
    assert "VOC07 mAP |" not in format_markdown(plain, "none")
