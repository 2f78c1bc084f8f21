"""``hfi bench perf``: where a night's time goes, each figure a ratio measured side by side in one run.

    hfi bench perf --out perf-out            # full: about 30 min on 2 cores
    hfi bench perf --quick --out perf-quick  # smoke run (CI): tiny sizes, nothing is measured

Sections (``--only`` picks some):

- ``uce``: the closed-form edit of the toy world's cross-attention (text concept), seconds.
- ``generation``: images/s of our sampling path (``sampling.sample``, what generation and
  evaluation draw through) and of the generation stage (plus PNG files and the journal) against
  diffusers' own ``pipe(...)`` call at the same batch, steps and guidance, alternated so that
  drift hits both; and whether the bytes agree seed for seed.
- ``sdd``: the published loop (a fresh teacher rollout every step, batch 1, no anchor term) against
  the project's default SDD loop (``benchmarks/removal.yaml``'s ``sdd`` family). Both see the same
  number of training states (reference steps = default steps x default batch). Seconds per step and
  per training state always; in full mode both train to the end on the text concept and are judged
  by the oracle on the validation prompts and seeds: the speedup counts only when no group is worse
  than the reference by more than ``EQUAL_REMOVAL``.

Night 2 over night 1 is ``make demo``'s figure (``tasks/demo.py`` prints both nights and the ratio).
Writes ``perf.json`` and ``perf.md`` with the command, the commit and the machine.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.removal import BenchConfig, Method, eval_config, method_config, per_prompt
from hfi_core.config import DistillConfig, RunConfig

SECTIONS = ("uce", "generation", "sdd")
EQUAL_REMOVAL = 0.03
"""How much worse than the reference a group's share may be for the removal to count as equal."""


def _pipe(cfg: RunConfig, scheduler: str):  # noqa: ANN202 - a diffusers pipeline
    from hfi_core.models import load_sd_pipeline

    return load_sd_pipeline(cfg.model.model_copy(update={"dtype": "float32"}), scheduler)


# ----------------------------------------------------------------------------- closed-form edit


def bench_uce(cfg: RunConfig, bench: BenchConfig, repeats: int) -> dict[str, Any]:
    """Seconds of one UCE edit (text concept, the benchmark's UCE settings), from a loaded pipeline
    to the edited UNet: the first (cold) and the median of ``repeats`` more on restored weights."""
    import torch

    from hfi_core.distill.uce import edited_layers, train_uce

    mcfg = method_config(cfg, bench, Method("uce", family="uce"), quick=False)
    dc = mcfg.distill
    pipe = _pipe(cfg, "ddim")
    layers = [pipe.unet.get_submodule(n) for n in edited_layers(pipe.unet)]
    original = [m.weight.detach().clone() for m in layers]
    times = []
    for _ in range(repeats + 1):
        with torch.no_grad():
            for m, w in zip(layers, original, strict=True):
                m.weight.copy_(w)
        t0 = time.perf_counter()
        train_uce(pipe, dc, dc.text_prompts)
        times.append(time.perf_counter() - t0)
    return {"layers": len(layers), "cold_seconds": round(times[0], 3),
            "seconds": round(statistics.median(times[1:]), 3), "repeats": repeats}  # fmt: skip


# ----------------------------------------------------------------------------- generation


def _diffusers_call(pipe: Any, prompts: list[str], seeds: list[int], steps: int, guidance: float,
                    batch: int) -> np.ndarray:  # fmt: skip
    """diffusers' own call, batch by batch, as a user would write it; uint8 (N, H, W, 3)."""
    import torch

    out = []
    for i in range(0, len(prompts), batch):
        gens = [torch.Generator(pipe.device).manual_seed(s) for s in seeds[i : i + batch]]
        images = pipe(prompts[i : i + batch], generator=gens, num_inference_steps=steps,
                      guidance_scale=guidance, output_type="np").images  # fmt: skip
        out.append(images)
    return np.round(np.concatenate(out) * 255).clip(0, 255).astype(np.uint8)


def bench_generation(cfg: RunConfig, n_images: int, rounds: int) -> dict[str, Any]:
    """Images/s of diffusers' call, of ``sampling.sample`` and of the generation stage, on the
    run config's prompts, batch, steps and guidance; ``rounds`` alternations after a warm-up."""
    from hfi_core.generation import generate
    from hfi_core.sampling import sample

    g = cfg.generation
    pipe = _pipe(cfg, g.scheduler)
    prompts = [p for ps in cfg.prompts for p in ps.prompts]
    prompts = (prompts * n_images)[:n_images]
    seeds = list(range(g.seed, g.seed + n_images))
    # The stage draws n_images of one prompt (its seeds are its own), into a fresh folder each time.
    first = cfg.prompts[0].model_copy(update={"prompts": cfg.prompts[0].prompts[:1], "images_per_prompt": n_images})
    stage_cfg = cfg.model_copy(update={"prompts": [first], "model": cfg.model.model_copy(update={"dtype": "float32"})})

    def ours() -> np.ndarray:
        return sample(pipe, prompts, seeds, steps=g.steps, guidance=g.guidance, batch_size=g.batch_size)

    def theirs() -> np.ndarray:
        return _diffusers_call(pipe, prompts, seeds, g.steps, g.guidance, g.batch_size)

    def stage() -> int:
        with tempfile.TemporaryDirectory() as tmp:
            return generate(stage_cfg, Path(tmp), show_progress=False).generated

    a, b = ours(), theirs()  # warm-up, and the byte check
    same = bool(np.array_equal(a, b))
    times: dict[str, list[float]] = {"diffusers": [], "sample": [], "stage": []}
    for _ in range(rounds):
        for name, fn in (("diffusers", theirs), ("sample", ours), ("stage", stage)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    rate = {k: n_images / statistics.median(v) for k, v in times.items()}
    return {
        "images": n_images, "batch": g.batch_size, "steps": g.steps, "guidance": g.guidance,
        "scheduler": g.scheduler, "rounds": rounds, "same_bytes": same,
        "images_per_s": {k: round(v, 3) for k, v in rate.items()},
        "ratio_sample": round(rate["sample"] / rate["diffusers"], 3),
        "ratio_stage": round(rate["stage"] / rate["diffusers"], 3),
    }  # fmt: skip


# ----------------------------------------------------------------------------- SDD


def sdd_configs(cfg: RunConfig, bench: BenchConfig, steps: int | None = None,
                lr: float | None = None) -> dict[str, DistillConfig]:  # fmt: skip
    """The project's default SDD (text concept) and the published loop on the same hyperparameters:
    batch 1, a fresh rollout every step, no anchor term, as many steps as the default has states.
    ``steps``: the default's steps instead of the benchmark's (a shorter comparison); ``lr``: the
    default's learning rate instead of the benchmark's (a batch of 4 averages its gradient, so the
    same lr moves it less per state than batch 1 does); the reference keeps the benchmark's."""
    dc = method_config(cfg, bench, Method("sdd", family="sdd"), quick=False).distill
    dc = dc.model_copy(update={"checkpoint_every": 0, "steps": steps or dc.steps})
    reference = dc.model_copy(update={"batch_size": 1, "rollout_reuse": 1, "preserve_prompts": [],
                                      "steps": dc.steps * dc.batch_size})  # fmt: skip
    return {"reference": reference, "default": dc.model_copy(update={"lr": lr or dc.lr})}


def _train_sdd(cfg: RunConfig, dc: DistillConfig, show_progress: bool,
               checkpoints: int = 0) -> tuple[Any, float, list[tuple[int, float, dict[str, Any]]]]:  # fmt: skip
    """Train SDD on the text concept from the base model. Returns the pipeline (its UNet the
    teacher), the loop's seconds and, with ``checkpoints``, that many ``(step, seconds so far,
    teacher parameters)`` along the way (the time spent reading them back is not counted)."""
    import torch

    from hfi_core.distill.sdd import train_sdd

    pipe = _pipe(cfg, "ddim")
    size = (cfg.generation.height, cfg.generation.width)
    every = 0
    if checkpoints:  # a multiple of rollout_reuse, as the loop requires
        every = max(dc.rollout_reuse, dc.steps // checkpoints // dc.rollout_reuse * dc.rollout_reuse)
    dc = dc.model_copy(update={"checkpoint_every": every})
    taken: list[tuple[int, float, dict[str, Any]]] = []
    aside = 0.0

    def keep(path: Path) -> None:
        nonlocal aside
        t1 = time.perf_counter()
        state = torch.load(path, weights_only=True)
        teacher = {k.removeprefix("teacher."): v for k, v in state["params"].items() if k.startswith("teacher.")}
        taken.append((state["step"], t1 - t0 - aside, teacher))
        aside += time.perf_counter() - t1

    with tempfile.TemporaryDirectory() as work:
        t0 = time.perf_counter()
        train_sdd(pipe, dc, dc.text_prompts, Path(work), show_progress=show_progress, size=size, on_checkpoint=keep)
        seconds = time.perf_counter() - t0 - aside
    return pipe, seconds, taken


def _judge(cfg: RunConfig, bench: BenchConfig, unet: Any, out: Path) -> dict[str, float]:
    """Per validation group: the striped share on a target group, the own style's on a preserve
    group (the oracle, on the validation prompts and seeds)."""
    from hfi_core.evaluation import Variant, evaluate

    unet.save_pretrained(out / "unet")
    n_prompt = per_prompt(cfg.prompts, bench.tuning.n_per_group)
    vcfg = eval_config(cfg, cfg.prompts, n_prompt, bench.validation_seed)
    metrics, _ = evaluate(vcfg, Variant(out.name, unet=str(out / "unet")), out / "evaluate")
    return {g: round(v["oracle_striped"] if g.startswith("target") else v[f"oracle_{g.split(':')[-1]}"], 4)
            for g, v in metrics["groups"].items()}  # fmt: skip


def worse_by(groups: dict[str, float], reference: dict[str, float]) -> dict[str, float]:
    """How much worse than the reference each group is: a higher concept share on a target group,
    a lower own-style share on a preserve group (negative: better)."""
    return {g: round((groups[g] - reference[g]) * (1 if g.startswith("target") else -1), 4) for g in reference}


def bench_sdd(cfg: RunConfig, bench: BenchConfig, out: Path, *, probe_steps: int, full: bool, checkpoints: int = 4,
              steps: int | None = None, lr: float | None = None,
              show_progress: bool = True) -> dict[str, Any]:  # fmt: skip
    """Per-step and per-state seconds of both loops; in full mode, the reference trained to the
    end and the default's checkpoints judged in order until one is no worse than the reference
    on any group by more than ``EQUAL_REMOVAL``: the wall time to that checkpoint is the
    default's time to equal removal."""
    from hfi_core.distill.common import assign

    configs = sdd_configs(cfg, bench, steps, lr)
    fields = ("steps", "batch_size", "rollout_reuse", "lr", "sampler_steps")
    report: dict[str, Any] = {"settings": {k: {f: getattr(v, f) for f in fields} | {"anchor": bool(v.preserve_prompts)}
                                           for k, v in configs.items()}}  # fmt: skip
    for name, dc in configs.items():
        probe = dc.model_copy(update={"steps": probe_steps * dc.rollout_reuse})
        _, seconds, _ = _train_sdd(cfg, probe, show_progress=False)
        report[name] = {"probe_steps": probe.steps, "s_per_step": round(seconds / probe.steps, 4),
                        "s_per_state": round(seconds / (probe.steps * dc.batch_size), 4)}  # fmt: skip
    report["per_state_speedup"] = round(report["reference"]["s_per_state"] / report["default"]["s_per_state"], 2)
    if not full:
        return report
    pipe, seconds, _ = _train_sdd(cfg, configs["reference"], show_progress)
    groups = _judge(cfg, bench, pipe.unet, out / "reference")
    report["reference"] |= {"train_seconds": round(seconds, 1), "groups": groups}
    pipe, seconds, taken = _train_sdd(cfg, configs["default"], show_progress, checkpoints)
    report["default"]["train_seconds"] = round(seconds, 1)
    report["default"]["checkpoints"] = []
    base = _pipe(cfg, "ddim").unet
    for step, elapsed, teacher in taken:
        groups = _judge(cfg, bench, assign(base, teacher), out / f"default-{step}")
        worse = worse_by(groups, report["reference"]["groups"])
        equal = max(worse.values()) <= EQUAL_REMOVAL
        report["default"]["checkpoints"].append({"step": step, "seconds": round(elapsed, 1), "groups": groups,
                                                 "worse_by": worse, "equal_removal": equal})  # fmt: skip
        if equal:
            report["speedup"] = round(report["reference"]["train_seconds"] / elapsed, 2)
            break
    report["equal_removal"] = "speedup" in report
    return report


# ----------------------------------------------------------------------------- the run


def run_perf(cfg: RunConfig, bench: BenchConfig, out: Path, *, quick: bool, sections: tuple[str, ...] = SECTIONS,
             sdd_steps: int | None = None, sdd_lr: float | None = None, provenance: dict[str, str] | None = None,
             log: Any = print) -> dict[str, Any]:  # fmt: skip
    """Every asked section, one after the other (each on all of this process's threads);
    ``sdd_steps`` / ``sdd_lr``: the default SDD loop's steps and lr in the comparison (default:
    the benchmark's)."""
    import torch

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {**(provenance or {}), "quick": quick, "threads": torch.get_num_threads()}
    t0 = time.time()
    if "uce" in sections:
        report["uce"] = bench_uce(cfg, bench, repeats=1 if quick else 5)
        log(f"uce: {report['uce']['seconds']} s")
    if "generation" in sections:
        report["generation"] = bench_generation(cfg, n_images=4 if quick else 64, rounds=1 if quick else 3)
        log(f"generation: {json.dumps(report['generation']['images_per_s'])}")
    if "sdd" in sections:
        report["sdd"] = bench_sdd(cfg, bench, out / "sdd", probe_steps=2 if quick else 12, full=not quick,
                                  steps=sdd_steps, lr=sdd_lr)  # fmt: skip
        log(f"sdd: {json.dumps({k: v for k, v in report['sdd'].items() if k != 'settings'})}")
    report["seconds"] = round(time.time() - t0, 1)
    (out / "perf.json").write_text(json.dumps(report, indent=2))
    (out / "perf.md").write_text(perf_table(report))
    return report


def perf_table(r: dict[str, Any]) -> str:
    """perf.md: each figure, its goal and whether it is met."""
    quick = " (quick: nothing measured)" if r["quick"] else ""
    lines = ["# Speed, side by side", "", f"Command: `{r.get('command', '?')}`  ",
             f"Commit: `{r.get('commit', '?')}`  ",
             f"Machine: {r.get('machine', '?')}, {r['threads']} torch threads{quick}", "",
             "| figure | measured | goal | met |", "|---|---|---|---|"]  # fmt: skip

    def row(name: str, value: Any, goal: str, met: bool | None) -> None:
        lines.append(f"| {name} | {value} | {goal} | {'' if met is None else ('yes' if met else '**no**')} |")

    if u := r.get("uce"):
        row("closed-form edit (UCE), toy world", f"{u['seconds']} s ({u['layers']} projections)", "<= 10 s",
            u["seconds"] <= 10)  # fmt: skip
    if g := r.get("generation"):
        rate = g["images_per_s"]
        row("generation: `sampling.sample` / diffusers' call", f"{g['ratio_sample']} ({rate['sample']} vs "
            f"{rate['diffusers']} img/s)", ">= 1.0", g["ratio_sample"] >= 1.0)  # fmt: skip
        row("generation stage (PNG, journal) / diffusers' call", f"{g['ratio_stage']} ({rate['stage']} img/s)",
            ">= 1.0", g["ratio_stage"] >= 1.0)  # fmt: skip
        row("same bytes for the same seeds", g["same_bytes"], "yes", g["same_bytes"])
    if s := r.get("sdd"):
        row("SDD seconds per training state, reference / default", s["per_state_speedup"], "", None)
        if "equal_removal" in s:
            last = s["default"]["checkpoints"][-1]
            row("SDD wall time to equal removal, reference / default",
                s.get("speedup", "never equal"), ">= 5", s.get("speedup", 0) >= 5)  # fmt: skip
            row(f"... at default step {last['step']}: how much worse than the reference per group "
                f"(at most {EQUAL_REMOVAL})", json.dumps(last["worse_by"]), "", s["equal_removal"])  # fmt: skip
    lines += ["", "Night 2 over night 1: `make demo` prints it (`tasks/demo.py`).", "",
              f"Wall time: {r['seconds']:.0f} s."]  # fmt: skip
    return "\n".join(lines) + "\n"
