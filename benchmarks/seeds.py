"""``hfi bench seeds``: does a run config pass its promotion gates on every seed?

Another seed changes an upstream run the way another machine does (other float kernels: other
images, other labels, another token, another training), so a config whose verdict flips between
seeds flips between machines. This runs the whole config (``hfi run``: generate ... register)
once per seed, each replicate reseeding generation, the simulated annotators, the reward model,
the token and the training, and evaluating on seeds of its own (``evaluate.seed + 100000 * i``),
in a pool of ``jobs`` processes. It writes ``seeds.json`` and ``seeds.md``: per seed, each gate's
value, limit and verdict, and per prompt group the concept share before and after; then whether
the gates passed on every seed.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from benchmarks.removal import Task, replicate_config, run_tasks
from hfi_core.config import RunConfig


def seed_config(cfg: RunConfig, seed: int, i: int) -> RunConfig:
    """Replicate ``i`` of ``cfg``: every seeded stage draws from ``seed``, the evaluation from
    seeds no other replicate uses."""
    rcfg = replicate_config(cfg, seed)
    distill = rcfg.distill.model_copy(update={"seed": seed})
    evaluate = rcfg.evaluate.model_copy(update={"seed": cfg.evaluate.seed + 100_000 * i})
    return rcfg.model_copy(update=dict(distill=distill, evaluate=evaluate))


def _whole_run(cfg: RunConfig, run: Path, threads: int) -> dict[str, Any]:
    import torch

    from hfi_core.steps import run_local

    torch.set_num_threads(threads)
    return run_local(cfg, run, show_progress=False)


def seed_row(seed: int, result: dict[str, Any], summary: dict[str, dict[str, dict[str, float]]],
             metric: str) -> dict[str, Any]:  # fmt: skip
    """One replicate's line: its gates and, per prompt group, ``metric`` before (sd) and after."""
    reg = result["register"]
    return {
        "seed": seed,
        "passed": bool(reg["gates_passed"]),
        "gates": reg["gates"],
        "groups": {g: {"before": summary["sd"][g][metric], "after": summary["distilled"][g][metric]}
                   for g in summary["distilled"]},  # fmt: skip
        "seconds": {k.removesuffix("_seconds"): v for k, v in result.items() if k.endswith("_seconds")},
    }


def run_seeds(cfg: RunConfig, seeds: list[int], out: Path, *, jobs: int = 2, threads: int = 1,
              log: Any = print, provenance: dict[str, str] | None = None) -> dict[str, Any]:  # fmt: skip
    """Run ``cfg`` once per seed under ``out/seed-<seed>``; write and return the report.

    A replicate whose stages already finished in ``out`` with the same config is not run again
    (the steps' ``_SUCCESS`` markers)."""
    out, t0 = Path(out), time.time()
    results: dict[int, dict[str, Any]] = {}

    def on_done(task: Task, result: dict[str, Any]) -> None:
        seed = task.key[1]
        results[seed] = result
        reg = result["register"]
        log(f"seed {seed}: gates {'passed' if reg['gates_passed'] else 'FAILED'} "
            + ", ".join(f"{g} {c['value']:.3f} (limit {c['limit']})" for g, c in reg["gates"].items()))  # fmt: skip

    tasks = [Task(("run", seed), 0, _whole_run, (seed_config(cfg, seed, i), out / f"seed-{seed}", threads))
             for i, seed in enumerate(seeds)]  # fmt: skip
    run_tasks(tasks, jobs, on_done)
    rows = []
    for seed in seeds:
        summary = json.loads((out / f"seed-{seed}" / "evaluate" / "summary.json").read_text())
        rows.append(seed_row(seed, results[seed], summary, cfg.promotion.concept_metric))
    report = {
        "config": cfg.name,
        "method": {"method": cfg.distill.method, "use_token": cfg.distill.use_token,
                   "steps": cfg.distill.steps, "lr": cfg.distill.lr},  # fmt: skip
        "metric": cfg.promotion.concept_metric,
        "seeds": rows,
        "passed_every_seed": all(r["passed"] for r in rows),
        "seconds": round(time.time() - t0, 1),
        "provenance": provenance or {},
    }
    (out / "seeds.json").write_text(json.dumps(report, indent=2))
    (out / "seeds.md").write_text(seeds_table(report))
    return report


def seeds_table(report: dict[str, Any]) -> str:
    """seeds.md: one line per seed (gates, then each group's share before -> after)."""
    rows = report["seeds"]
    gates = list(rows[0]["gates"])
    groups = list(rows[0]["groups"])
    passed = sum(r["passed"] for r in rows)
    lines = [
        f"# `{report['config']}` on {len(rows)} seeds",
        "",
        f"Method: `{json.dumps(report['method'])}`. Each seed reseeds generation, annotators, reward, token and "
        f"training, and is evaluated on its own seeds. Gates passed on **{passed} of {len(rows)}** seeds.",
        "",
        "| seed | verdict | " + " | ".join(f"{g} (limit)" for g in gates) + " | "
        + " | ".join(f"{report['metric']}: {g} (sd -> model)" for g in groups) + " |",
        "|---|---|" + "---|" * (len(gates) + len(groups)),
    ]
    for r in rows:
        marks = {g: "" if r["gates"][g]["passed"] else " **x**" for g in gates}
        cells = [f"{r['gates'][g]['value']:.3f} ({r['gates'][g]['limit']}){marks[g]}" for g in gates]
        cells += [f"{r['groups'][g]['before']:.2f} -> {r['groups'][g]['after']:.2f}" for g in groups]
        lines.append(f"| {r['seed']} | {'passed' if r['passed'] else '**failed**'} | " + " | ".join(cells) + " |")
    lines += ["", f"Wall time: {report['seconds']:.0f} s."]
    for k, v in report.get("provenance", {}).items():
        lines.append(f"{k.capitalize()}: `{v}`")
    return "\n".join(lines) + "\n"
