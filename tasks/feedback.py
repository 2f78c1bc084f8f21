"""``hfi feedback export|simulate|ingest``: the labeling round trip."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tasks.common import add_runtime_args, setup_runtime


def register(groups: argparse._SubParsersAction) -> None:
    p = groups.add_parser("feedback", help="publish images for labeling, simulate annotators, ingest exports")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("--manifest", type=Path, required=True, help="manifest.parquet from `hfi generate`")
        q.add_argument("--config", type=Path, help="run config: kind, choices, image store (flags override it)")
        q.add_argument("--kind", choices=["binary", "ranking"])
        q.add_argument("--positive", help="choice text meaning 'shows the concept'")
        q.add_argument("--negative", help="choice text meaning 'does not'")

    e = sub.add_parser("export", help="write a Label Studio import file + labeling config")
    common(e)
    e.add_argument("--out", type=Path, required=True, help="tasks.json to write (label_config.xml goes beside it)")
    e.add_argument("--image-url-prefix", help="URL prefix of the images (default: Label Studio local files)")
    e.set_defaults(func=_export)

    s = sub.add_parser("simulate", help="let the toy-world oracle play K annotators; writes a Label Studio export")
    common(s)
    s.add_argument("--annotators", type=int, help="simulated people (default 3)")
    s.add_argument("--noise", type=float, help="chance of a wrong answer per label (default 0.1)")
    s.add_argument("--seed", type=int)
    s.add_argument("--oracle", help="oracle folder (default: the committed toy world's)")
    s.add_argument("--out", type=Path, required=True, help="export JSON to write")
    s.add_argument("--image-url-prefix")
    add_runtime_args(s)
    s.set_defaults(func=_simulate)

    i = sub.add_parser("ingest", help="validate exports and write labels.parquet / pairs.parquet")
    common(i)
    i.add_argument("--source", type=Path, action="append", required=True, help="an export (repeatable)")
    i.add_argument("--out", type=Path, required=True, help="feedback folder; earlier batches in it are kept")
    i.add_argument("--image-store", help="image URLs must start with this")
    i.set_defaults(func=_ingest)


def _feedback_cfg(args: argparse.Namespace):
    from hfi_core.config import FeedbackConfig, load_config

    cfg = load_config(args.config).feedback if args.config else FeedbackConfig()
    cfg.kind = args.kind or cfg.kind
    cfg.positive_choice = args.positive or cfg.positive_choice
    cfg.negative_choice = args.negative or cfg.negative_choice
    return cfg


def _manifest_rows(path: Path):
    from hfi_core.images import read_manifest

    df = read_manifest(path)
    return df, df.to_dict("records")


def _prefix(args: argparse.Namespace) -> str:
    from hfi_core.feedback.labelstudio import local_files_prefix

    return args.image_url_prefix or local_files_prefix(str(args.manifest.resolve().parent))


def _write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def _export(args: argparse.Namespace) -> int:
    from hfi_core.feedback.labelstudio import image_urls, import_batch

    cfg = _feedback_cfg(args)
    _, rows = _manifest_rows(args.manifest)
    urls = image_urls(rows, _prefix(args))
    tasks, xml = import_batch(rows, urls, cfg.kind, cfg.positive_choice, cfg.negative_choice, cfg.ranking_group)
    _write_json(args.out, tasks)
    (args.out.parent / "label_config.xml").write_text(xml)
    print(f"{len(tasks)} {cfg.kind} tasks -> {args.out}; labeling config -> {args.out.parent / 'label_config.xml'}")
    return 0


def _simulate(args: argparse.Namespace) -> int:
    setup_runtime(args)
    from hfi_core.config import resolve_model_path
    from hfi_core.feedback.labelstudio import image_urls
    from hfi_core.feedback.simulate import simulate_export

    cfg = _feedback_cfg(args)
    sim = cfg.simulate
    sim.annotators = args.annotators if args.annotators is not None else sim.annotators
    sim.noise = args.noise if args.noise is not None else sim.noise
    sim.seed = args.seed if args.seed is not None else sim.seed
    sim.oracle = resolve_model_path(args.oracle or sim.oracle)
    if not 0 <= sim.noise <= 1:
        raise ValueError(f"--noise: must be in [0, 1], got {sim.noise}")
    if sim.annotators < 1:
        raise ValueError(f"--annotators: must be >= 1, got {sim.annotators}")
    df, rows = _manifest_rows(args.manifest)
    export = simulate_export(
        df, args.manifest.parent, sim, kind=cfg.kind, positive=cfg.positive_choice, negative=cfg.negative_choice,
        url_of=image_urls(rows, _prefix(args)), ranking_group=cfg.ranking_group,
    )  # fmt: skip
    _write_json(args.out, export)
    n = sum(len(t["annotations"]) for t in export)
    who = f"{sim.annotators} simulated annotators (noise {sim.noise})"
    print(f"{len(export)} tasks, {n} annotations by {who} -> {args.out}")
    return 0


def _ingest(args: argparse.Namespace) -> int:
    from hfi_core.feedback.ingest import IngestSettings, ingest

    cfg = _feedback_cfg(args)
    settings = IngestSettings(
        kind=cfg.kind, positive=cfg.positive_choice, negative=cfg.negative_choice,
        image_store=args.image_store or cfg.image_store, max_file_mb=cfg.max_file_mb,
    )  # fmt: skip
    df, _ = _manifest_rows(args.manifest)
    summary = ingest(df, args.source, args.out, settings)
    print(json.dumps(summary, indent=2))
    return 0
