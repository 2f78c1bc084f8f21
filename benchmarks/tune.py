"""``hfi bench tune``: choose every trained method's hyperparameters on validation data, with the
same budget for each.

Each trained method of ``benchmarks/removal.yaml``, text-only and HFI alike, is trained once per
candidate of its family's grid (``tuning.candidates``: overrides of the family's settings; every
family has as many candidates as the others, so every method gets the same budget). The trainings
start from the upstream run of ``tuning.seed``, a replicate the evaluation never uses, and are
measured on the **validation prompts** (the run config's own prompts, which hold no evaluation
prompt) with the **validation seeds**. Per method, the rule picks the candidate with the lowest
worst target-group concept share among those that keep every preserve group's own style, shape
and colour within ``tuning.max_drop`` of SD; when none does, the one whose largest drop is
smallest. Writes ``tuning.json``, ``tuning.md`` and ``tuned.yaml``: the ``tuned:`` section for
``removal.yaml``, which ``method_config`` applies on top of the family's settings.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import yaml

from benchmarks.removal import (
    METHODS,
    TRAINING,
    UPSTREAM,
    BenchConfig,
    Method,
    Task,
    _evaluate,
    _train,
    _upstream,
    eval_config,
    link_stages,
    method_config,
    method_dir,
    per_prompt,
    replicate_config,
    run_tasks,
    upstream_dir,
    variant_tasks,
)
from hfi_core.config import RunConfig


def candidate_config(cfg: RunConfig, bench: BenchConfig, m: Method, overrides: dict[str, Any]) -> RunConfig:
    """The method's run config (seeded as the tuning replicate) with one candidate's overrides."""
    from hfi_core.config import DistillConfig

    mcfg = method_config(cfg, bench, m, quick=False, seed=bench.tuning.seed, tuned=False)
    dc = DistillConfig.model_validate({**mcfg.distill.model_dump(), **overrides})
    return mcfg.model_copy(update={"distill": dc})


def scores(groups: dict[str, dict[str, float]], sd: dict[str, dict[str, float]]) -> dict[str, float]:
    """``worst``: the largest concept share over target groups; ``drop``: the largest loss against
    SD of a preserve group's own style share, or of shape or colour accuracy."""
    worst = max(g["oracle_striped"] for n, g in groups.items() if n.startswith("target"))
    drops = [sd[n][f"oracle_{n.split(':')[-1]}"] - g[f"oracle_{n.split(':')[-1]}"]
             for n, g in groups.items() if n.startswith("preserve")]  # fmt: skip
    for attr in ("oracle_shape_acc", "oracle_color_acc"):
        drops.append(sum(sd[n][attr] for n in sd) / len(sd) - sum(g[attr] for g in groups.values()) / len(groups))
    return {"worst": float(worst), "drop": float(max(drops))}


def select(candidates: list[dict[str, float]], max_drop: float) -> int:
    """Index of the chosen candidate (each a ``scores`` dict): the lowest ``worst`` among those
    with ``drop <= max_drop``, else the smallest ``drop``; ties go to the earlier candidate."""
    keeping = [i for i, c in enumerate(candidates) if c["drop"] <= max_drop]
    if keeping:
        return min(keeping, key=lambda i: (candidates[i]["worst"], i))
    return min(range(len(candidates)), key=lambda i: (candidates[i]["drop"], i))


def run_tuning(cfg: RunConfig, bench: BenchConfig, out: Path, *, jobs: int = 2, threads: int = 1,
               log: Any = print) -> dict[str, Any]:  # fmt: skip
    """Train and validate every (method, candidate); write the choice per method."""
    from hfi_core.evaluation import Variant

    out, t0, tc = Path(out), time.time(), bench.tuning
    rcfg = replicate_config(cfg, tc.seed)
    up_cfg = rcfg.model_copy(update={"distill": rcfg.distill.model_copy(update={"use_token": True})})
    n_prompt = per_prompt(cfg.prompts, tc.n_per_group)
    vcfg = eval_config(rcfg, cfg.prompts, n_prompt, bench.validation_seed)  # validation prompts and seeds
    trained = [m for m in METHODS if m.family]
    tasks = [Task(("upstream",), 0, _upstream, (up_cfg, out / "run", threads))]
    tasks += variant_tasks(up_cfg, bench, out, (), threads)
    tasks.append(Task(("evaluate", "sd", 0), 5, _evaluate, (vcfg, Variant("sd"), out / "sd" / "evaluate", threads)))
    # Candidate-major, and each validation as soon as its training is done (priority 1 < 2): the
    # first round of every method is measured within minutes, and a stopped run keeps whole rounds.
    n_cands = max(len(c) for c in tc.candidates.values())
    for i in range(n_cands):
        for m in trained:
            source = upstream_dir(out, m.upstream)
            needs = (("upstream",),) + (((m.upstream,),) if m.upstream else ())
            overrides = tc.candidates[m.family][i]  # type: ignore[index]
            run = link_stages(method_dir(out, m.name) / f"c{i}", source, UPSTREAM)
            tasks.append(Task(("train", m.name, i), 2, _train, (candidate_config(cfg, bench, m, overrides), run,
                                                                threads), needs))  # fmt: skip
            variant = Variant(m.name, unet=str(run / TRAINING / "unet"))
            tasks.append(Task(("evaluate", m.name, i), 1, _evaluate, (vcfg, variant, run / "evaluate", threads),
                              (("train", m.name, i),)))  # fmt: skip
    measured: dict[tuple[str, int], dict[str, Any]] = {}

    def on_done(task: Task, result: dict[str, Any]) -> None:
        if task.key[0] == "evaluate":
            measured[task.key[1:]] = result
            if task.key[1] != "sd":
                log(
                    f"validated {task.key[1]} candidate {task.key[2]}: "
                    + ", ".join(f"{g.split(':')[-1]} {v['oracle_striped']:.2f}" for g, v in result["groups"].items())
                )

    run_tasks(tasks, jobs, on_done)
    sd = measured[("sd", 0)]["groups"]
    report: dict[str, Any] = {"seed": tc.seed, "validation_seed": bench.validation_seed, "n_per_prompt": n_prompt,
                              "max_drop": tc.max_drop, "methods": {}}  # fmt: skip
    for m in trained:
        cands = tc.candidates[m.family]  # type: ignore[index]
        rows = [{"overrides": ov, **scores(measured[(m.name, i)]["groups"], sd),
                 "groups": measured[(m.name, i)]["groups"]} for i, ov in enumerate(cands)]  # fmt: skip
        best = select(rows, tc.max_drop)
        report["methods"][m.name] = {"chosen": best, "overrides": cands[best], "candidates": rows}
    report["seconds"] = round(time.time() - t0, 1)
    (out / "tuning.json").write_text(json.dumps(report, indent=2))
    (out / "tuning.md").write_text(tuning_table(report))
    tuned = {name: r["overrides"] for name, r in report["methods"].items()}
    (out / "tuned.yaml").write_text(yaml.safe_dump({"tuned": tuned}, sort_keys=False))
    return report


def tuning_table(report: dict[str, Any]) -> str:
    """tuning.md: every (method, candidate) with its worst concept share and largest drop."""
    lines = [
        "# Hyperparameters chosen on validation prompts and seeds",
        "",
        f"Upstream replicate seed {report['seed']}; validation seeds from {report['validation_seed']}, "
        f"{report['n_per_prompt']} images per validation prompt. Rule: lowest worst target-group striped share "
        f"among the candidates whose largest drop against SD is at most {report['max_drop']}.",
        "",
        "| method | candidate | overrides | worst striped share | largest drop | chosen |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in report["methods"].items():
        for i, c in enumerate(r["candidates"]):
            lines.append(f"| {name} | {i} | `{json.dumps(c['overrides'])}` | {c['worst']:.3f} | {c['drop']:.3f} | "
                         f"{'**yes**' if i == r['chosen'] else ''} |")  # fmt: skip
    lines += ["", f"Wall time: {report.get('seconds', 0):.0f} s."]
    return "\n".join(lines) + "\n"
