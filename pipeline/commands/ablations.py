"""`python -m pipeline ablations`: the paper's ablations, small.

    python -m pipeline ablations [--configs A.yaml B.yaml ...] [--tables 5,9] [--workdir DIR]
                                 [-o KEY=VALUE ...] [--stages all] [--reference VARIANT]

Runs the stages for each ablation config in turn, exactly as `pipeline run`
does (each config its own MLflow experiment, one shared artifact store, so the
variants share the data and proposals outputs: same seed, same images, same
proposals), then reads each variant's evaluate metrics.json and tabulates the
test AP, AP50, APs and the context classes' AP / AP50:

- one row per config (configs/ablations/*.yaml by default, or those of the
  paper tables named by --tables; a variant is named by its config's `name`
  without the "ablation-" prefix), the reference first (--reference; default
  irnn-identity, the default ION), scored at the evaluate stage's final
  setting (flip TTA, tuned NMS, box voting), beside the paper's number for the
  row the config's `ablation` mapping names (table, row, paper_map: VOC07 test
  mAP of Sec. 5; the small CPU model's numbers are COCO-style AP on the
  synthetic data, so compare orderings and gaps, not values);
- three rows from the reference variant's other evaluate settings
  (stages/evaluate.py): no flip, no voting, and the Appendix's baseline: one
  round of box regression, plain NMS at tune.baseline_nms_iou, no flip, no voting.

The table goes to stdout, <workdir>/ablations.md and ablations.json, and to
MLflow as one run of the experiment "ablations" (metrics `<row key>/AP`, ...,
the two files as artifacts, the variants' run ids as tags).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from ion.errors import UserError
from ion.schema import display_path, flatten
from pipeline.cache.store import ArtifactStore, write_text_atomic
from pipeline.commands.flags import invocation, run_command
from pipeline.config import PROJECT_ROOT, AblationConfig, Config, load_config
from pipeline.execution.stopping import NO_SIGNALS, StopSignals
from pipeline.graph import cache_keys, registered_names, registered_stages, select_names, select_stages

NAME = "ablations"
ABLATIONS_DIR = PROJECT_ROOT / "configs" / "ablations"
NAME_PREFIX = "ablation-"
REFERENCE = "irnn-identity"  # configs/ablations/irnn_identity.yaml: the default ION
EXPERIMENT = "ablations"
TABLE_MD = "ablations.md"
TABLE_JSON = "ablations.json"
METRICS_FILE = "metrics.json"
# Sections a variant may differ in without changing what the rows mean; the
# "changes" column lists every other difference from the reference.
NOT_COMPARED = ("name", "runtime", "ablation")
# (metrics key, column header): stats of stages/evaluate.py's metrics.json.
COLUMNS = (("AP", "AP"), ("AP50", "AP50"), ("APs", "APs"), ("context_AP", "context AP"),
           ("context_AP50", "context AP50"))
_STATS = ("AP", "AP50", "APs")  # under entry["stats"]; the context keys sit beside it
VOC_COLUMN = ("voc07_mAP", "VOC07 mAP")  # shown when the evaluate stage reported it
FINAL = "final"
# The reference's other evaluate settings, in the order shown: (setting, label, what differs).
TEST_TIME_ROWS = (
    ("no_flip", "no flip", "test: no flip TTA (unflipped candidates)"),
    ("no_voting", "no voting", "test: no box voting"),
    ("baseline", "one round, plain NMS {nms_iou:g}",
     "test: one round of box regression, plain NMS {nms_iou:g}, no tuning, no flip, no voting"),
)


@dataclass(frozen=True)
class Variant:
    name: str  # the config's name without NAME_PREFIX: the row label and MLflow key prefix
    path: Path
    cfg: Config


@dataclass(frozen=True)
class Row:
    label: str  # first column
    key: str  # MLflow metric prefix: `<key>/AP`
    changes: list[str]  # "model.norm: none", ...; empty for the reference
    values: dict[str, float | None]  # COLUMNS keys -> value; None: not in metrics.json
    paper: str = ""  # "T7 (d) ...": the paper's table and row (config `ablation`); "" for none
    paper_map: float | None = None  # the paper's VOC07 mAP for that row
    setting: str = FINAL  # the evaluate setting the values come from
    variant: str = ""  # the variant whose metrics.json it reads
    extra: dict[str, Any] = field(default_factory=dict)  # for ablations.json: config, run id, paths


# ----------------------------------------------------------------------------- configs


def default_config_paths() -> list[Path]:
    return sorted(ABLATIONS_DIR.glob("*.yaml"))


def variant_name(config_name: str) -> str:
    return config_name[len(NAME_PREFIX):] if config_name.startswith(NAME_PREFIX) else config_name


def load_variants(paths: Sequence[Path], overrides: Sequence[str], workdir: Path | None) -> list[Variant]:
    """Every config loaded (with the -o overrides), checked to be runnable side by side."""
    if not paths:
        raise UserError(f"no ablation configs: {display_path(ABLATIONS_DIR)} holds no *.yaml "
                        f"(give them with --configs)")
    for path in paths:
        if not Path(path).is_file():
            raise UserError(f"{display_path(path)}: no such config file (check the paths given to --configs)")
    variants = []
    for path in paths:
        cfg = load_config(path, overrides, workdir=workdir)
        variants.append(Variant(name=variant_name(cfg.name), path=Path(path), cfg=cfg))
    seen: dict[str, Path] = {}
    for v in variants:
        if v.name in seen:
            raise UserError(f"{display_path(v.path)} and {display_path(seen[v.name])} are both named "
                            f"{v.cfg.name!r}: give each ablation config its own name (it names the row and "
                            f"the MLflow experiment)")
        seen[v.name] = v.path
    workdirs = {v.cfg.runtime.workdir for v in variants}
    if len(workdirs) > 1:
        listed = ", ".join(f"{display_path(v.path)}: {v.cfg.runtime.workdir}" for v in variants)
        raise UserError(f"the ablation configs use different workdirs ({listed}): give --workdir DIR so "
                        f"every variant shares one artifact store (and its data and proposals)")
    return variants


def pick_reference(variants: Sequence[Variant], wanted: str | None) -> Variant:
    """The variant named `wanted`; without one, REFERENCE when present, else the first."""
    by_name = {v.name: v for v in variants}
    if wanted is not None:
        if wanted not in by_name:
            raise UserError(f"--reference {wanted}: no such variant (the variants: {', '.join(by_name)})")
        return by_name[wanted]
    return by_name.get(REFERENCE, variants[0])


def config_changes(cfg: Config, reference: Config) -> list[str]:
    """Every leaf where `cfg` differs from `reference` (name and runtime aside), "key: value"."""
    def leaves(c: Config) -> dict[str, Any]:
        return flatten({f.name: getattr(c, f.name) for f in dataclasses.fields(c) if f.name not in NOT_COMPARED})

    mine, theirs = leaves(cfg), leaves(reference)
    return [f"{k}: {_show(mine.get(k))}" for k in sorted(set(mine) | set(theirs)) if mine.get(k) != theirs.get(k)]


def _show(value: Any) -> str:
    """A config value as YAML writes it in flow style: none, [conv3, conv4], true, null."""
    if isinstance(value, list):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    return str(value)


# ----------------------------------------------------------------------------- the table


def _values(entry: Mapping[str, Any]) -> dict[str, float | None]:
    values: dict[str, float | None] = {k: entry["stats"].get(k) for k in _STATS}
    for key in ("context_AP", "context_AP50", VOC_COLUMN[0]):
        values[key] = entry.get(key)
    return values


def paper_label(ablation: AblationConfig) -> str:
    """"T7 (d) 2x stacked 4-dir IRNN", or "" when the config names no paper table."""
    return "" if ablation.table is None else f"T{ablation.table} {ablation.row}".rstrip()


def build_rows(metrics: Mapping[str, Mapping[str, Any]], changes: Mapping[str, list[str]],
               reference: str, papers: Mapping[str, AblationConfig] | None = None) -> list[Row]:
    """The table: the reference, the other variants (in the order of `metrics`), then the
    reference's test-time rows.

    `metrics`: variant -> its evaluate metrics.json (stages/evaluate.py);
    `changes`: variant -> how its config differs from the reference's;
    `papers`: variant -> its config's `ablation` (the paper's row and number).
    """
    papers = papers or {}
    order = [reference] + [name for name in metrics if name != reference]
    rows = []
    for name in order:
        paper = papers.get(name, AblationConfig())
        rows.append(Row(label=name, key=name, changes=list(changes.get(name, [])),
                        values=_values(metrics[name][FINAL]), paper=paper_label(paper),
                        paper_map=paper.paper_map, variant=name))
    ref = metrics[reference]
    for setting, label, what in TEST_TIME_ROWS:
        if setting not in ref:
            continue
        params = ref["settings"][setting]  # how evaluate applied it: nms_iou, vote_iou, ...
        rows.append(Row(label=f"{reference}, {label.format(**params)}", key=f"{reference}/{setting}",
                        changes=[what.format(**params)], values=_values(ref[setting]), setting=setting,
                        variant=reference))
    return rows


def _cell(value: float | None) -> str:
    # COCO reports -1 where a split has no object of a size; None: no context classes.
    return "n/a" if value is None or value < 0 else f"{value:.3f}"


def _columns(rows: Sequence[Row]) -> tuple[tuple[str, str], ...]:
    """COLUMNS, and the VOC07 mAP when some row has it (VOC data, or evaluate.voc_metric)."""
    has_voc = any(row.values.get(VOC_COLUMN[0]) is not None for row in rows)
    return COLUMNS + ((VOC_COLUMN,) if has_voc else ())


def format_markdown(rows: Sequence[Row], reference: str) -> str:
    """The table as Markdown, with a line that says what the numbers are."""
    columns = _columns(rows)
    lines = [f"Test-split COCO AP (AP@[.5:.95]), AP50, APs (small objects) and the mean AP / AP50 of the "
             f"context classes. Variant rows: the evaluate stage's final setting (flip TTA, tuned NMS, "
             f"box voting). Rows \"{reference}, ...\": the reference run's evaluate settings with one "
             f"test-time step off. \"paper\": the table and row of Bell et al. 2016 the config reproduces "
             f"and its VOC07 test mAP (%).",
             "",
             "| row | differs from " + reference + " | paper | paper mAP | " + " | ".join(h for _, h in columns)
             + " |",
             "|---|---|---|---:|" + "---:|" * len(columns)]
    for row in rows:
        same = "(reference)" if row.variant == reference and row.setting == FINAL else "(nothing)"
        changes = "; ".join(row.changes) if row.changes else same
        paper_map = "" if row.paper_map is None else f"{row.paper_map:.1f}"
        cells = ([row.label, changes.replace("|", "\\|"), row.paper.replace("|", "\\|"), paper_map]
                 + [_cell(row.values.get(k)) for k, _ in columns])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def table_metrics(rows: Sequence[Row]) -> dict[str, float]:
    """`<row key>/<column>` -> value for MLflow; missing and COCO's -1 values are left out."""
    return {f"{row.key}/{k}": float(v) for row in rows for k, _ in _columns(rows)
            if (v := row.values.get(k)) is not None and v >= 0}


def table_json(rows: Sequence[Row], reference: str) -> dict[str, Any]:
    return {"reference": reference, "columns": [k for k, _ in _columns(rows)],
            "rows": [{"row": r.label, "key": r.key, "variant": r.variant, "setting": r.setting,
                      "changes": r.changes, "paper": r.paper, "paper_map": r.paper_map,
                      "values": {k: r.values.get(k) for k, _ in _columns(rows)}, **r.extra} for r in rows]}


# ----------------------------------------------------------------------------- running


def evaluate_metrics(store: ArtifactStore, variant: Variant, key: str) -> tuple[Path, dict[str, Any]]:
    """The variant's evaluate output directory and its metrics.json."""
    out = store.path("evaluate", key)
    if not store.exists("evaluate", key):
        raise UserError(f"{display_path(variant.path)}: no evaluate output (key {key[:12]}) to tabulate: "
                        f"run the ablations with --stages all")
    path = out / METRICS_FILE
    if not path.is_file():
        raise UserError(f"{path}: missing: the evaluate split ({variant.cfg.evaluate.split}) of "
                        f"{display_path(variant.path)} has no annotations, so no AP to tabulate "
                        f"(set evaluate.split to an annotated split)")
    metrics = json.loads(path.read_text(encoding="utf-8"))
    if FINAL not in metrics:
        raise UserError(f"{path}: no {FINAL!r} setting (written by an older evaluate stage?): rerun it "
                        f"with --stages evaluate --force")
    return out, metrics


def _run_command(variant: Variant, overrides: Sequence[str], workdir: Path | None) -> str:
    """`pipeline run` for one variant: what a missing-upstream message suggests."""
    return run_command(display_path(variant.path), overrides, workdir)


def parse_tables(text: str | None) -> set[int] | None:
    """--tables "5,9" -> {5, 9}; None -> None (every config)."""
    if text is None:
        return None
    try:
        tables = {int(part) for part in text.split(",") if part.strip()}
    except ValueError:
        raise UserError(f"--tables {text}: expected paper table numbers separated by commas, e.g. 5,9") from None
    if not tables:
        raise UserError(f"--tables {text!r}: name at least one table, e.g. 5,9")
    return tables


def select_tables(variants: Sequence[Variant], tables: set[int] | None, reference: Variant) -> list[Variant]:
    """The variants whose `ablation.table` is in `tables`, the reference first; all when None."""
    if tables is None:
        return list(variants)
    chosen = [v for v in variants if v is reference or v.cfg.ablation.table in tables]
    if len(chosen) == 1 and chosen[0] is reference and reference.cfg.ablation.table not in tables:
        known = sorted({v.cfg.ablation.table for v in variants if v.cfg.ablation.table is not None})
        raise UserError(f"--tables {','.join(map(str, sorted(tables)))}: no config reproduces a row of "
                        f"those tables (the configs cover tables {', '.join(map(str, known))})")
    return chosen


def add_parser(commands: Any) -> None:
    sub = commands.add_parser(NAME, help="run every ablation config, then tabulate their test AP "
                                         "(pipeline/commands/ablations.py)")
    sub.add_argument("--configs", nargs="+", type=Path, default=None, metavar="YAML",
                     help="ablation configs (default: configs/ablations/*.yaml of the project, sorted)")
    sub.add_argument("--reference", default=None, metavar="VARIANT",
                     help="the variant the others are compared with (default: irnn-identity if "
                          "present, else the first)")
    sub.add_argument("--stages", default="all", help="all, or a comma list (default: all)")
    sub.add_argument("--tables", default=None, metavar="N,N",
                     help="only the configs whose ablation.table is one of these paper tables "
                          "(e.g. 5,9), and the reference (default: every config)")
    sub.add_argument("-o", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override one config value in every variant (repeatable)")
    sub.add_argument("--workdir", type=Path, default=None,
                     help="directory for artifacts, mlflow.db and the table (overrides runtime.workdir)")


def run(args: argparse.Namespace) -> int:
    run_ablations(configs=args.configs, overrides=args.overrides, workdir=args.workdir, stages_spec=args.stages,
                  reference=args.reference, argv=args.argv, tables=args.tables, stops=args.stops)
    return 0


def run_ablations(*, configs: Sequence[Path] | None, overrides: Sequence[str], workdir: Path | None,
                  stages_spec: str, reference: str | None, argv: Sequence[str],
                  tables: str | None = None, stops: StopSignals = NO_SIGNALS) -> list[Row]:
    """Run every variant's stages, then write, print and log the table; returns its rows."""
    select_names(registered_names(), stages_spec)  # a typo fails before anything heavy is imported
    wanted_tables = parse_tables(tables)
    variants = load_variants(list(configs) if configs else default_config_paths(), overrides, workdir)
    ref = pick_reference(variants, reference)
    variants = select_tables(variants, wanted_tables, ref)
    stages = registered_stages()
    selected = select_stages(stages, stages_spec)
    # mlflow and ray take seconds to import: only once every config is known to be good.
    from pipeline.execution.session import stage_session

    root = Path(variants[0].cfg.runtime.workdir)
    headline = (f"ablations: {len(variants)} variant(s) | workdir {root} | "
                f"stages {','.join(s.name for s in selected)}")
    with stage_session(root, headline=headline, stops=stops) as session:
        return _run_variants(session, variants, ref, stages, selected, overrides=overrides, workdir=workdir,
                             stages_spec=stages_spec, command=invocation(argv))


def _run_variants(session: Any, variants: Sequence[Variant], ref: Variant, stages: Sequence[Any],
                  selected: Sequence[Any], *, overrides: Sequence[str], workdir: Path | None, stages_spec: str,
                  command: str) -> list[Row]:
    from pipeline.runner import check_upstream, format_summary
    from pipeline.tracking.client import FINISHED
    from pipeline.tracking.uri import experiment_name

    root = session.workdir
    store = ArtifactStore(root)
    keys = {v.name: cache_keys(stages, v.cfg) for v in variants}
    for v in variants:  # every variant's missing inputs, before the first one runs for an hour
        check_upstream(stages, selected, keys[v.name], store, force=False,
                       command=_run_command(v, overrides, workdir))
    runs = {}
    for i, v in enumerate(variants, 1):
        print(f"[{i}/{len(variants)}] {v.name}: config {display_path(v.path)} | workdir {root} | "
              f"stages {','.join(s.name for s in selected)}", flush=True)
        report = session.run_stages(v.cfg, stages=stages, selected=selected, experiment=v.cfg.name,
                                    config_file=v.path, command=_run_command(v, overrides, workdir),
                                    run_name=stages_spec, tags={"command": command, "ablation": v.name})
        runs[v.name] = report.parent_run_id
        print()
        print(format_summary(report))
        print(flush=True)

    metrics, extra = {}, {}
    for v in variants:
        out, metrics[v.name] = evaluate_metrics(store, v, keys[v.name]["evaluate"])
        extra[v.name] = {"config": display_path(v.path), "experiment": experiment_name(v.cfg.name),
                         "run_id": runs[v.name], "evaluate_dir": str(out)}
    changes = {v.name: config_changes(v.cfg, ref.cfg) for v in variants}
    rows = [dataclasses.replace(r, extra=extra[r.variant] if r.setting == FINAL else {})
            for r in build_rows(metrics, changes, ref.name, {v.name: v.cfg.ablation for v in variants})]
    text = format_markdown(rows, ref.name)
    md_path, json_path = root / TABLE_MD, root / TABLE_JSON
    write_text_atomic(md_path, text)
    write_text_atomic(json_path, json.dumps(table_json(rows, ref.name), indent=1) + "\n")

    tracker = session.tracker(EXPERIMENT)
    run = tracker.start_parent(name=EXPERIMENT, tags={
        "command": command, "reference": ref.name, "workdir": str(root),
        "configs": ",".join(display_path(v.path) for v in variants),
        **{f"run.{name}": run_id for name, run_id in runs.items()}})
    run.log_metrics(table_metrics(rows))
    run.log_file(md_path)
    run.log_file(json_path)
    run.finish(FINISHED)

    print(text)
    unshared = [v.name for v in variants
                if any(keys[v.name][s] != keys[ref.name][s] for s in ("data", "proposals"))]
    if unshared:
        print(f"note: {', '.join(unshared)} used other data or proposals outputs than {ref.name}: "
              f"their rows do not compare like for like")
    print(f"table: {md_path} and {json_path.name}; MLflow: experiment {tracker.experiment_name!r}, run {run.run_id}")
    return rows
