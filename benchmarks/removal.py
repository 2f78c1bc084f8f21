"""``hfi bench removal``: the paper's comparison on the toy world, through the pipeline's own code.

For each of ``seeds`` (independent replicates: generation, simulated annotators, reward model,
token and training all reseeded), one upstream run (the stages the HFI token needs: generate,
simulated feedback, reward model, token), a second token from ranking feedback on the same
images, then

    sd, negative prompt, SLD medium/max          inference-time, nothing trains
    ESD-x, SDD and UCE on the text concept       ``distill.use_token: false``
    HFI+ESD-x, HFI+SDD and HFI+UCE               the same methods on the HFI token
    HFI+SDD (ranking)                            SDD on the token from ranked feedback

each evaluated by ``evaluation.evaluate`` on **held-out prompts** (``evaluation_prompts``: colour
and shape combinations that no feedback, token, anchor or tuning run used) and held-out seeds,
which are never the validation seeds the hyperparameters were chosen on (both are recorded).
Methods of one family (ESD-x / HFI+ESD-x, SDD / HFI+SDD, UCE / HFI+UCE) start from one
``DistillConfig``; ``hfi bench tune`` (``benchmarks/tune.py``) then chooses each method's own
overrides (``tuned``) on validation prompts and seeds, with the same budget for every method.
Each cell of the report gives the mean over seeds, the min and max, and a 95% Wilson interval
on the images pooled over seeds.

The upstream stages and every training run as the pipeline's steps do (``steps.run_step``): a
training is the ``distill`` step of a method's own run folder, whose upstream stages are the
replicate's upstream run's. So there is one resume rule, the ``_SUCCESS`` markers' input hashes:
``--resume`` reuses exactly the steps whose config and inputs did not change.

The upstream runs, trainings and evaluations run in a pool of ``jobs`` processes, one torch
thread each, a fresh process per task so that its peak memory is its own; the inference-time
methods are evaluated while the upstream run makes the token.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator

from hfi_core.config import DistillConfig, PromptSet, RunConfig, Section, load_config, load_yaml_file, parse
from hfi_core.metrics import wilson_interval
from hfi_core.stages import STAGES, upstream_closure

Family = Literal["sdd", "esd", "uce"]
TRAINING = "distill"  # the stage a method trains in
UPSTREAM = tuple(upstream_closure(STAGES[TRAINING].upstream))  # the stages every method shares
IMAGES = tuple(upstream_closure(STAGES["feedback"].upstream))  # what feedback is given on
FEEDBACK_STAGES = tuple(s for s in UPSTREAM if s not in IMAGES)  # what another feedback kind redoes on them
REDONE: dict[str, tuple[str, ...]] = {"ranking": FEEDBACK_STAGES, "one token": ("invert",)}
"""Per upstream variant (``Method.upstream``), the stages it runs again; the others are the replicate's, linked."""


@dataclass(frozen=True)
class Method:
    """One row of the comparison."""

    name: str
    family: Family | None = None
    """The training family, or None for an inference-time method."""
    token: bool = False
    """Train on the HFI token (True) or on the text concept (False)."""
    inference: str = "none"
    """``evaluation.Variant.inference``: none, negative_prompt, sld-medium, sld-max..."""
    upstream: Literal["", "ranking", "one token"] = ""
    """Where the HFI tokens come from: the replicate's own upstream run (binary feedback, a token
    per look, ``invert`` as the run config says); ``ranking``: the same images ranked four at a
    time; ``one token``: the same feedback inverted into one token of one vector, as the paper
    inverts it (an ablation: what the looks add)."""


METHODS = (
    Method("sd"),
    Method("negative prompt", inference="negative_prompt"),
    Method("sld-medium", inference="sld-medium"),
    Method("sld-max", inference="sld-max"),
    Method("esd-x", family="esd"),
    Method("sdd", family="sdd"),
    Method("uce", family="uce"),
    Method("hfi+esd-x", family="esd", token=True),
    Method("hfi+sdd", family="sdd", token=True),
    Method("hfi+uce", family="uce", token=True),
    Method("hfi+sdd (ranking)", family="sdd", token=True, upstream="ranking"),
    Method("hfi+uce (one token)", family="uce", token=True, upstream="one token"),
)


class QuickConfig(Section):
    """What ``--quick`` shrinks: a smoke run, not a measurement."""

    n_per_group: int = Field(32, ge=1)
    """Evaluation images per prompt group."""
    images_per_prompt: int = Field(4, ge=1)
    """Upstream images per prompt (feedback, reward, token)."""
    invert_steps: int = Field(100, ge=1)
    """Token training steps."""
    distill_steps: int = Field(150, ge=1)
    """Training steps of every removal method."""
    seeds: int = Field(1, ge=1)
    """How many of ``seeds`` run (the first ones)."""


class TuningConfig(Section):
    """``hfi bench tune``: the same budget of candidate settings for every trained method."""

    seed: int = Field(100, ge=0)
    """The upstream replicate tuned on; never one of the evaluation's ``seeds``."""
    n_per_group: int = Field(36, ge=1)
    """Validation images per prompt group (on the run config's prompts, from ``validation_seed``)."""
    max_drop: float = Field(0.05, ge=0, le=1)
    """A candidate keeps the rest when no preserve style share, shape or colour accuracy falls by more."""
    candidates: dict[Family, list[dict[str, Any]]] = {}
    """Per family, overrides of its settings to try; every family lists as many (the budget)."""

    @model_validator(mode="after")
    def _equal_budget(self) -> TuningConfig:
        sizes = {f: len(c) for f, c in self.candidates.items()}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"candidates: every family needs the same number (the same budget), got {sizes}")
        fields = set(DistillConfig.model_fields)
        for fam, cands in self.candidates.items():
            for i, ov in enumerate(cands):
                if bad := set(ov) - fields:
                    raise ValueError(f"candidates.{fam}[{i}]: {sorted(bad)} are not distill settings")
                if {"method", "use_token", "seed"} & set(ov):
                    raise ValueError(f"candidates.{fam}[{i}]: method, use_token and seed are the benchmark's to set")
        return self


class BenchConfig(Section):
    """``benchmarks/removal.yaml``: the comparison's settings, validated on load."""

    config: str
    """The run config (upstream prompts, world, feedback, reward, token, evaluators), relative to this file."""
    text_concept: str
    """The concept in words, for the text-only methods: negative prompt and SLD's safety concept."""
    sdd: DistillConfig
    """Hyperparameters of SDD and HFI+SDD (``use_token`` is set per method)."""
    esd: DistillConfig
    """Hyperparameters of ESD-x and HFI+ESD-x."""
    uce: DistillConfig
    """Hyperparameters of UCE and HFI+UCE."""
    ranking: dict[str, Any] = {"feedback": {"kind": "ranking"}}
    """Run-config sections overridden for the token from ranking feedback (validated on load)."""
    one_token: dict[str, Any] = {"invert": {"vectors": 1, "modes": 1}}
    """Run-config sections overridden for the ablation that inverts the feedback as the paper does."""
    evaluation_prompts: list[PromptSet]
    """The held-out prompt groups every method is measured on: none of them may appear in the run
    config's prompts (feedback and token) or in any family's concept, text or preserve prompts."""
    seeds: list[int] = Field([0, 1, 2], min_length=1)
    """Independent replicates of the whole chain; replicate ``i`` seeds generation, annotators,
    reward, token and training with ``seeds[i]`` and evaluates on seeds from ``eval_seed + i * 100000``."""
    eval_seed: int = Field(3_000_000, ge=0)
    """First evaluation seed; every method of a replicate draws the same seeds."""
    validation_seed: int = Field(2_000_000, ge=0)
    """First seed of the validation set the hyperparameters were chosen on (recorded, never evaluated here)."""
    n_per_group: int = Field(128, ge=1)
    """Evaluation images per prompt group and replicate, at least (rounded up to whole prompts)."""
    quick: QuickConfig = QuickConfig()
    """Settings of ``--quick``."""
    tuning: TuningConfig = TuningConfig()
    """How ``hfi bench tune`` chooses each method's settings."""
    tuned: dict[str, dict[str, Any]] = {}
    """Per trained method, the overrides ``hfi bench tune`` chose (its ``tuned.yaml``), applied on
    top of the family's settings; a method without an entry trains with its family's settings."""

    @model_validator(mode="after")
    def _check(self) -> BenchConfig:
        if abs(self.eval_seed - self.validation_seed) < 100_000 * len(self.seeds):
            raise ValueError("eval_seed: must differ from validation_seed (no tuning on the evaluation seeds)")
        if self.sdd.method != "sdd" or self.esd.method != "esd" or self.uce.method != "uce":
            raise ValueError("sdd.method / esd.method / uce.method: the families are 'sdd', 'esd' and 'uce'")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds: {self.seeds} repeats a seed; replicates must be independent")
        if self.tuning.seed in self.seeds:
            raise ValueError(f"tuning.seed: {self.tuning.seed} is an evaluation replicate; tune on another")
        trained = {m.name for m in METHODS if m.family}
        for name, ov in self.tuned.items():
            if name not in trained:
                raise ValueError(f"tuned.{name}: not a trained method ({sorted(trained)})")
            if {"method", "use_token", "seed"} & set(ov):
                raise ValueError(f"tuned.{name}: method, use_token and seed are the benchmark's to set")
        return self


def load_bench_config(path: str | Path) -> tuple[BenchConfig, RunConfig]:
    """Read ``benchmarks/removal.yaml`` and the run config it names.

    Raises:
        ConfigError: naming the file and the key, also when an evaluation prompt is one that
            feedback, the token or a training saw.
    """
    from hfi_core.config import ConfigError

    path = Path(path)
    try:
        bench = parse(BenchConfig, load_yaml_file(path))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    cfg = load_config(path.parent / bench.config)
    seen = {p: f"{bench.config}: prompts ({ps.group})" for ps in cfg.prompts for p in ps.prompts}
    for fam in ("sdd", "esd", "uce"):
        dc: DistillConfig = getattr(bench, fam)
        for key in ("concept_prompts", "text_prompts", "preserve_prompts"):
            seen |= {p: f"{fam}.{key}" for p in getattr(dc, key)}
    for i, ps in enumerate(bench.evaluation_prompts):
        for p in ps.prompts:
            if p in seen:
                raise ConfigError(
                    f"{path}: evaluation_prompts[{i}] ({ps.group}): {p!r} is also in {seen[p]}; "
                    "evaluation prompts must be held out"
                )
    for variant in REDONE:
        try:
            upstream_config(cfg, bench, variant)
        except ConfigError as e:
            raise ConfigError(f"{path}: {variant.replace(' ', '_')}: {e}") from None
    return bench, cfg


def per_prompt(prompts: list[PromptSet], n_per_group: int) -> int:
    """Images per prompt so that every group gets at least ``n_per_group``."""
    return max(math.ceil(n_per_group / len(ps.prompts)) for ps in prompts)


def replicate_config(cfg: RunConfig, seed: int) -> RunConfig:
    """The run config of one replicate: every seeded upstream stage draws from ``seed``."""
    fb = cfg.feedback
    return cfg.model_copy(update={
        "generation": cfg.generation.model_copy(update={"seed": seed}),
        "feedback": fb.model_copy(update={"simulate": fb.simulate.model_copy(update={"seed": seed})}),
        "reward": cfg.reward.model_copy(update={"seed": seed}),
        "invert": cfg.invert.model_copy(update={"seed": seed}),
    })  # fmt: skip


def upstream_config(cfg: RunConfig, bench: BenchConfig, variant: str) -> RunConfig:
    """The run config of an upstream variant (``Method.upstream``): ``ranking``, the token from
    ranking feedback on the same images; ``one token``, the feedback inverted as the paper does."""
    overrides = {"ranking": bench.ranking, "one token": bench.one_token}[variant]
    data = cfg.model_dump(mode="json")
    for section, values in overrides.items():
        data[section] = {**data.get(section, {}), **values} if isinstance(values, dict) else values
    return parse(RunConfig, data)


def upstream_dir(rdir: Path, variant: str) -> Path:
    """The run folder of a replicate's upstream variant ("" is the replicate's own)."""
    return rdir / variant.replace(" ", "-") / "run" if variant else rdir / "run"


def variant_tasks(up_cfg: RunConfig, bench: BenchConfig, rdir: Path, key: tuple, threads: int) -> list[Task]:
    """One task per upstream variant the methods use: its stages again, on the replicate's others
    linked in (its own store: the feedback inbox is per store and concept)."""
    tasks = []
    for variant in dict.fromkeys(m.upstream for m in METHODS if m.upstream):
        kept = tuple(s for s in UPSTREAM if s not in REDONE[variant])
        run = link_stages(upstream_dir(rdir, variant), rdir / "run", kept)
        tasks.append(Task((variant, *key), 1, _redo_upstream,
                          (upstream_config(up_cfg, bench, variant), run, REDONE[variant], threads),
                          (("upstream", *key),)))  # fmt: skip
    return tasks


def method_config(
    cfg: RunConfig, bench: BenchConfig, m: Method, quick: bool, seed: int = 0, tuned: bool = True
) -> RunConfig:
    """The run config a method trains with: its family's hyperparameters with the method's own
    tuned overrides (unless ``tuned`` is False), token or text, the replicate's seed."""
    family = getattr(bench, m.family or "sdd")
    overrides = bench.tuned.get(m.name, {}) if tuned else {}
    dc = DistillConfig.model_validate({**family.model_dump(), **overrides, "use_token": m.token, "seed": seed})
    if quick:
        dc = dc.model_copy(update={"steps": bench.quick.distill_steps, "checkpoint_every": 0})
    base = upstream_config(cfg, bench, m.upstream) if m.upstream else cfg
    return base.model_copy(update={"distill": dc})


def quick_config(cfg: RunConfig, bench: BenchConfig) -> RunConfig:
    """The upstream run shrunk for ``--quick``."""
    prompts = [ps.model_copy(update={"images_per_prompt": bench.quick.images_per_prompt}) for ps in cfg.prompts]
    invert = cfg.invert.model_copy(update={"steps": bench.quick.invert_steps})
    return cfg.model_copy(update={"prompts": prompts, "invert": invert})


def eval_config(cfg: RunConfig, prompts: list[PromptSet], n_per_prompt: int, seed: int) -> RunConfig:
    """The run config with the benchmark's evaluation plan: the held-out prompts and seeds."""
    ev = cfg.evaluate.model_copy(update={"n_per_prompt": n_per_prompt, "seed": seed})
    return cfg.model_copy(update={"prompts": prompts, "evaluate": ev})


# ----------------------------------------------------------------------------- pool workers


def _upstream(cfg: RunConfig, run: Path, threads: int) -> dict[str, Any]:
    import torch

    from hfi_core.steps import run_local

    torch.set_num_threads(threads)
    return run_local(cfg, run, stages=UPSTREAM, show_progress=False)


def _redo_upstream(cfg: RunConfig, run: Path, stages: tuple[str, ...], threads: int) -> dict[str, Any]:
    """``stages`` again on a run whose earlier stages are linked in (an upstream variant)."""
    import torch

    from hfi_core.steps import run_local_step

    torch.set_num_threads(threads)
    out: dict[str, Any] = {}
    for stage in stages:
        t0 = time.time()
        out[stage] = run_local_step(stage, cfg, run, show_progress=False)
        out[f"{stage}_seconds"] = round(time.time() - t0, 1)
    return out


def _train(cfg: RunConfig, run: Path, threads: int) -> dict[str, Any]:
    """The method's training step; its metrics, also when the step was reused (``--resume``)."""
    import torch

    from hfi_core.steps import run_local_step

    torch.set_num_threads(threads)
    result = run_local_step(TRAINING, cfg, run, show_progress=False)
    metrics = json.loads((run / TRAINING / "metrics.json").read_text())
    return {**metrics, "reused": bool(result.get("skipped"))}


def _evaluate(cfg: RunConfig, variant: Any, out: Path, threads: int) -> dict[str, Any]:
    import torch

    from hfi_core.evaluation import evaluate

    torch.set_num_threads(threads)
    t0 = time.time()
    metrics, images = evaluate(cfg, variant, out)
    np.save(out / "images.npy", images)
    metrics["seconds"] = round(time.time() - t0, 1)
    return metrics


def link_stages(run: Path, source: Path, stages: tuple[str, ...]) -> Path:
    """``run`` with ``source``'s finished ``stages`` linked in (relative links: the folder can move)."""
    run.mkdir(parents=True, exist_ok=True)
    for stage in stages:
        link = run / stage
        if not link.is_symlink() and not link.exists():  # a link made before its target ran stays
            link.symlink_to(os.path.relpath(source / stage, run))
    return run


def method_dir(out: Path, name: str) -> Path:
    """A method's folder under a replicate's output: ``methods/<name>/{distill,evaluate}``."""
    return Path(out) / "methods" / re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def replicate_dir(out: Path, seed: int) -> Path:
    """A replicate's folder: ``seed-<seed>/{run,ranking/run,methods}``."""
    return Path(out) / f"seed-{seed}"


# ----------------------------------------------------------------------------- the benchmark


@dataclass
class Task:
    """One unit of pool work: run ``fn(*args)`` once every task of ``needs`` has finished."""

    key: tuple
    priority: int  # lower first: upstream runs, then trainings (longest first), then evaluations
    fn: Callable[..., dict[str, Any]]
    args: tuple
    needs: tuple[tuple, ...] = ()


def run_tasks(tasks: list[Task], jobs: int, on_done: Callable[[Task, dict[str, Any]], None]) -> None:
    """Run ``tasks`` in a pool of ``jobs`` fresh processes, each as soon as its needs are met."""
    ready = sorted(tasks, key=lambda t: t.priority)  # stable: the list's order within a priority
    finished: set[tuple] = set()
    ctx = get_context("spawn")  # fresh interpreters: no torch state shared with the parent
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, max_tasks_per_child=1) as pool:
        pending: dict[Future, Task] = {}
        while ready or pending:
            runnable = [t for t in ready if all(n in finished for n in t.needs)]
            while runnable and len(pending) < jobs:
                task = runnable.pop(0)
                ready.remove(task)
                pending[pool.submit(task.fn, *task.args)] = task
            if not pending:
                raise RuntimeError(f"bench: tasks wait for work that never runs: {[t.key for t in ready]}")
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                task = pending.pop(fut)
                on_done(task, fut.result())
                finished.add(task.key)


def run_removal_bench(
    cfg: RunConfig,
    bench: BenchConfig,
    out: Path,
    *,
    quick: bool = False,
    resume: bool = False,
    jobs: int = 2,
    threads: int = 1,
    tracker: Any = None,
    log: Any = print,
    provenance: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Run the comparison into ``out``: results.json, results.md, grid.png, groups.png, and a
    folder per replicate with one per method.

    Args:
        resume: keep what an earlier bench in ``out`` finished and reuse every step (upstream
            stage or training) whose ``_SUCCESS`` marker matches its config and inputs; without
            it, the upstream runs and the trainings start from scratch. Evaluations always run.
        tracker: a ``tracking.Tracker`` for a parent run and one child per method, or None.
        log: where progress lines go.
        provenance: how the run was made (command, commit), written into the results.
    Returns:
        The content of results.json.
    """
    from hfi_core.evaluation import Variant

    out = Path(out)
    t_start = time.time()
    seeds = bench.seeds[: bench.quick.seeds] if quick else bench.seeds
    if not resume:
        for old in out.glob("seed-*"):
            shutil.rmtree(old, ignore_errors=True)
    if quick:
        cfg = quick_config(cfg, bench)
    n_group = bench.quick.n_per_group if quick else bench.n_per_group
    n_prompt = per_prompt(bench.evaluation_prompts, n_group)
    upstream: dict[int, dict[str, Any]] = {}
    trained: dict[tuple[int, str], dict[str, Any]] = {}
    evaluated: dict[tuple[int, str], dict[str, Any]] = {}
    reused: list[str] = []

    tasks: list[Task] = []
    for i, seed in enumerate(seeds):
        rcfg = replicate_config(cfg, seed)
        rdir = replicate_dir(out, seed)
        # The HFI methods need the token whatever the run config's own distill section says.
        up_cfg = rcfg.model_copy(update={"distill": rcfg.distill.model_copy(update={"use_token": True})})
        ecfg = eval_config(rcfg, bench.evaluation_prompts, n_prompt, bench.eval_seed + 100_000 * i)
        tasks.append(Task(("upstream", seed), 0, _upstream, (up_cfg, rdir / "run", threads)))
        tasks += variant_tasks(up_cfg, bench, rdir, (seed,), threads)
        for m in METHODS:
            mdir = method_dir(rdir, m.name)
            if m.family:
                source = upstream_dir(rdir, m.upstream)
                needs = (("upstream", seed),) + (((m.upstream, seed),) if m.upstream else ())
                mcfg = method_config(rcfg, bench, m, quick, seed)
                priority = {"sdd": 2, "esd": 3, "uce": 4}[m.family]  # the longest trainings first
                run = link_stages(mdir, source, UPSTREAM)  # the replicate's upstream, its own training
                tasks.append(Task(("train", seed, m.name), priority, _train, (mcfg, run, threads), needs))
                unet = str(mdir / TRAINING / "unet")
                eval_needs: tuple[tuple, ...] = (("train", seed, m.name),)
            else:
                unet, eval_needs = None, ()
            variant = Variant(m.name, unet=unet, inference=m.inference, negative_prompt=bench.text_concept,  # type: ignore[arg-type]
                              safety_concept=bench.text_concept)  # fmt: skip
            tasks.append(Task(("evaluate", seed, m.name), 5, _evaluate, (ecfg, variant, mdir / "evaluate", threads),
                              eval_needs))  # fmt: skip

    def on_done(task: Task, result: dict[str, Any]) -> None:
        kind, seed, *rest = task.key
        if kind == "upstream" or kind in REDONE:
            upstream.setdefault(seed, {})[kind] = result
            stages = UPSTREAM if kind == "upstream" else REDONE[kind]
            skipped = [n for n in stages if result[n].get("skipped")]
            reused.extend(f"seed {seed} {kind} {n}" for n in skipped)
            log(f"seed {seed} {kind}: " + ", ".join(f"{n} {result[f'{n}_seconds']} s" for n in stages)
                + (f" (reused: {', '.join(skipped)})" if skipped else ""))  # fmt: skip
        elif kind == "train":
            trained[(seed, rest[0])] = result
            if result["reused"]:
                reused.append(f"seed {seed} {rest[0]} training")
            log(f"seed {seed} trained {rest[0]}: {result['seconds']} s" + (" (reused)" if result["reused"] else ""))
        else:
            evaluated[(seed, rest[0])] = result
            log(f"seed {seed} evaluated {rest[0]}: {result['seconds']} s")

    run_tasks(tasks, jobs, on_done)

    images = {
        (seed, m.name): np.load(method_dir(replicate_dir(out, seed), m.name) / "evaluate" / "images.npy")
        for seed in seeds
        for m in METHODS
    }
    results = _collect(cfg, bench, seeds, images, trained, evaluated, upstream, quick=quick, n_prompt=n_prompt)
    results["seconds"] = round(time.time() - t_start, 1)
    if reused:
        results["reused"] = reused
    results["provenance"] = provenance or {}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(results_table(results))
    save_method_grid(out / "grid.png", {m.name: images[(seeds[0], m.name)] for m in METHODS},
                     bench.evaluation_prompts, n_prompt)  # fmt: skip
    save_group_plot(out / "groups.png", results)
    if tracker is not None:
        _track(tracker, out, results, seeds[0])
    return results


def group_slices(prompts: list[PromptSet], n_prompt: int) -> list[slice]:
    """Where each prompt group's images lie in an evaluation's image array (``eval_plan`` order)."""
    ends = np.cumsum([len(ps.prompts) * n_prompt for ps in prompts])
    return [slice(int(e) - len(ps.prompts) * n_prompt, int(e)) for e, ps in zip(ends, prompts, strict=True)]


def cell(per_seed: list[tuple[int, int]]) -> dict[str, Any]:
    """One table cell from (successes, images) per seed: the mean of the seeds' shares, their min
    and max, and the 95% Wilson interval of the images pooled over seeds."""
    shares = [k / n for k, n in per_seed]
    k, n = sum(k for k, _ in per_seed), sum(n for _, n in per_seed)
    lo, hi = wilson_interval(k, n)
    return {"mean": float(np.mean(shares)), "min": min(shares), "max": max(shares), "lo": lo, "hi": hi,
            "k": k, "n": n, "per_seed": shares}  # fmt: skip


def _collect(cfg: RunConfig, bench: BenchConfig, seeds: list[int], images: dict[tuple[int, str], np.ndarray],
             trained: dict, evaluated: dict, upstream: dict, *, quick: bool,
             n_prompt: int) -> dict[str, Any]:  # fmt: skip
    """Per method, one cell per column over the replicates; drift and where the erased concept
    went are measured against SD's images of the same prompts and seeds."""
    from hfi_core.evaluation import became
    from hfi_core.models import load_oracle

    prompts = bench.evaluation_prompts
    oracle = load_oracle(cfg.evaluate.oracle)
    slices = group_slices(prompts, n_prompt)
    targets = [(sl, ps.group) for sl, ps in zip(slices, prompts, strict=True) if ps.group.startswith("target")]
    kept = [(sl, ps.group) for sl, ps in zip(slices, prompts, strict=True) if not ps.group.startswith("target")]
    base_pred = {seed: oracle.predict(images[(seed, "sd")]) for seed in seeds}
    rows: dict[str, dict[str, Any]] = {}
    for m in METHODS:
        counts: dict[str, list[tuple[int, int]]] = {}  # column -> (successes, images) per seed
        other: dict[str, list[float]] = {}
        for seed in seeds:
            g = evaluated[(seed, m.name)]["groups"]
            shares = [(f"striped[{grp.removeprefix('target:')}]", g[grp]["oracle_striped"], g[grp]["n"])
                      for _, grp in targets]  # fmt: skip
            shares += [(f"{st}[{st}]", g[grp][f"oracle_{st}"], g[grp]["n"]) for _, grp in kept
                       for st in [grp.split(":")[-1]]]  # fmt: skip
            shares += [(f"striped_in[{grp.split(':')[-1]}]", g[grp]["oracle_striped"], g[grp]["n"])
                       for _, grp in kept]  # fmt: skip
            n_all = sum(g[grp]["n"] for grp in g)
            for attr in ("shape_acc", "color_acc"):
                shares.append((attr, sum(g[grp][f"oracle_{attr}"] * g[grp]["n"] for grp in g) / n_all, n_all))
            for key, share, n in shares:
                counts.setdefault(key, []).append((int(round(share * n)), n))
            pred = oracle.predict(images[(seed, m.name)])
            for style in ("dotted", "plain"):
                k = n = 0
                for sl, _ in targets:
                    part = became({a: v[sl] for a, v in base_pred[seed].items()}, {a: v[sl] for a, v in pred.items()})
                    k += int(round(part[f"became_{style}"] * (sl.stop - sl.start)))
                    n += sl.stop - sl.start
                counts.setdefault(f"became_{style}", []).append((k, n))
            base, now = images[(seed, "sd")].astype(np.float32), images[(seed, m.name)].astype(np.float32)
            drift = np.mean([np.abs(now[sl] - base[sl]).mean() / 255 for sl, _ in kept])
            other.setdefault("drift_non_target", []).append(float(drift))
            t = trained.get((seed, m.name), {})
            other.setdefault("train_seconds", []).append(t.get("seconds", 0.0))
            if t.get("peak_memory_mb") is not None:
                other.setdefault("peak_memory_mb", []).append(t["peak_memory_mb"])
            other.setdefault("eval_seconds", []).append(evaluated[(seed, m.name)]["seconds"])
        row: dict[str, Any] = {k: cell(v) for k, v in counts.items()}
        row |= {k: float(np.mean(v)) for k, v in other.items()}
        row.setdefault("peak_memory_mb", None)
        rows[m.name] = row
    results = {
        "mode": "quick" if quick else "full",
        "seeds": seeds,
        "methods": rows,
        "groups": {m.name: {str(s): evaluated[(s, m.name)]["groups"] for s in seeds} for m in METHODS},
        "settings": {
            "eval_seeds": [bench.eval_seed + 100_000 * i for i in range(len(seeds))],
            "validation_seed": bench.validation_seed,
            "images_per_prompt": n_prompt,
            "images_per_group": {ps.group: len(ps.prompts) * n_prompt for ps in prompts},
            "evaluation_prompts": {ps.group: ps.prompts for ps in prompts},
            "upstream_prompts": {ps.group: ps.prompts for ps in cfg.prompts},
            "text_concept": bench.text_concept,
            "families": {
                f: method_config(cfg, bench, Method(f, family=f), quick).distill.model_dump(mode="json")  # type: ignore[arg-type]
                for f in ("sdd", "esd", "uce")
            },
            "ranking": bench.ranking,
            "one_token": bench.one_token,
            "generation": cfg.generation.model_dump(mode="json"),
            "token": cfg.invert.token,
        },
        "upstream": {str(s): v for s, v in upstream.items()},
        "evaluators": evaluated[(seeds[0], "sd")]["evaluators"],
    }
    results["claims"] = claims(results)
    return results


# ----------------------------------------------------------------------------- the report


def _target_columns(results: dict[str, Any]) -> list[str]:
    return [k for k in results["methods"]["sd"] if k.startswith("striped[")]


def _separated(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two cells' 95% intervals do not overlap."""
    return a["hi"] < b["lo"] or b["hi"] < a["lo"]


def claims(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The questions the benchmark answers, each with its numbers and a plain verdict."""
    rows, out = results["methods"], []
    targets = _target_columns(results)
    implicit = [c for c in targets if c != "striped[explicit]"]
    for text in ("sdd", "esd-x", "uce"):
        worst = max(implicit, key=lambda c: rows[text][c]["mean"])
        c = rows[text][worst]
        out.append({
            "claim": f"text-only {text} on the name leaves at least 0.5 of the concept on some implicit group",
            "holds": c["mean"] >= 0.5, "where": worst, "mean": c["mean"], "interval": [c["lo"], c["hi"]],
            "min_seed": c["min"], "intervals_separate_from_0.5": c["lo"] > 0.5 or c["hi"] < 0.5,
        })  # fmt: skip
    hfi = rows["hfi+sdd"]
    worst_max = max(targets, key=lambda c: hfi[c]["max"])
    out.append({
        "claim": "hfi+sdd leaves at most 0.10 on the explicit and every implicit group, in every seed",
        "holds": hfi[worst_max]["max"] <= 0.10, "where": worst_max, "max_seed": hfi[worst_max]["max"],
    })  # fmt: skip
    keep = [k for k in rows["sd"] if k.endswith("]") and not k.startswith("striped")] + ["shape_acc", "color_acc"]
    drops = {k: rows["sd"][k]["mean"] - hfi[k]["mean"] for k in keep}
    out.append({
        "claim": "hfi+sdd keeps dotted, plain, shape and colour within 0.05 of sd",
        "holds": max(drops.values()) <= 0.05, "drops": drops,
    })  # fmt: skip
    for text, with_hfi in (("sdd", "hfi+sdd"), ("esd-x", "hfi+esd-x"), ("uce", "hfi+uce"),
                           ("hfi+sdd", "hfi+sdd (ranking)"), ("hfi+uce (one token)", "hfi+uce"),
                           ("uce", "hfi+uce (one token)")):  # fmt: skip
        per_group = {}
        for c in targets:
            a, b = rows[text][c], rows[with_hfi][c]
            per_group[c] = {"difference": a["mean"] - b["mean"], "separate": _separated(a, b),
                            "better": b["hi"] < a["lo"]}  # fmt: skip
        mean_gap = float(np.mean([v["difference"] for v in per_group.values()]))
        out.append({
            "claim": f"{with_hfi} removes more of the concept than {text}",
            "holds": mean_gap > 0 and any(v["better"] for v in per_group.values()),
            "mean_difference": mean_gap, "groups": per_group,
        })  # fmt: skip
    return out


COLUMNS = (
    ("striped[explicit]", "striped: explicit"),
    ("striped[implicit:barcode]", "striped: barcode"),
    ("striped[implicit:zebra]", "striped: zebra"),
    ("striped[context:circus]", "striped: circus"),
    ("dotted[dotted]", "dotted on dotted"),
    ("plain[plain]", "plain on plain"),
    ("shape_acc", "shape acc"),
    ("color_acc", "colour acc"),
    ("became_dotted", "target became dotted"),
    ("became_plain", "target became plain"),
)
NUMBERS = (("drift_non_target", "drift (non-target)"), ("train_seconds", "train s"), ("peak_memory_mb", "peak MB"))


def _fmt(c: dict[str, Any], seeds: int) -> str:
    spread = f" [{c['min']:.2f}-{c['max']:.2f}]" if seeds > 1 else ""
    return f"{c['mean']:.3f}{spread} ({c['lo']:.2f}-{c['hi']:.2f})"


def results_table(results: dict[str, Any]) -> str:
    """results.md: one row per method (mean [min-max over seeds] (95% Wilson interval)), then the claims."""
    s = results["settings"]
    seeds = results["seeds"]
    cols = [(k, t) for k, t in COLUMNS if k in results["methods"]["sd"]]
    lines = [
        f"# Removal on the toy world ({results['mode']} mode)",
        "",
        f"{len(seeds)} seed(s) {seeds}; {min(s['images_per_group'].values())}+ images per prompt group and seed, on "
        f"held-out prompts, evaluation seeds from {s['eval_seeds'][0]} (hyperparameters chosen on validation seeds "
        f"from {s['validation_seed']}); oracle-judged shares. Each cell: mean over seeds"
        + (" [min-max]" if len(seeds) > 1 else "")
        + " (95% Wilson interval of the pooled images).",
        "",
        "| method | " + " | ".join(t for _, t in cols) + " | " + " | ".join(t for _, t in NUMBERS) + " |",
        "|---|" + "---|" * (len(cols) + len(NUMBERS)),
    ]
    for name, row in results["methods"].items():
        cells = [_fmt(row[k], len(seeds)) for k, _ in cols]
        for k, _ in NUMBERS:
            v = row.get(k)
            cells.append("" if v is None else f"{v:.0f}" if k != "drift_non_target" else f"{v:.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "## Claims", ""]
    for c in results.get("claims", []):
        verdict = "holds" if c["holds"] else "does NOT hold"
        detail = {k: v for k, v in c.items() if k not in ("claim", "holds", "groups")}
        line = f"- **{c['claim']}**: {verdict}. " + ", ".join(f"{k} {_short(v)}" for k, v in detail.items())
        if "groups" in c:
            line += ". Per group (difference, intervals separate): " + "; ".join(
                f"{g.removeprefix('striped[').rstrip(']')} {v['difference']:+.3f} {'yes' if v['separate'] else 'no'}"
                for g, v in c["groups"].items()
            )
        lines.append(line)
    lines += ["", f"Total wall time: {results.get('seconds', 0):.0f} s."]
    if reused := results.get("reused"):
        lines.append(f"Reused from an earlier run in the same folder (`--resume`): {', '.join(reused)}.")
    for k, v in results.get("provenance", {}).items():
        lines.append(f"{k.capitalize()}: `{v}`")
    return "\n".join(lines) + "\n"


def _short(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    if isinstance(v, list):
        return "[" + ", ".join(_short(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_short(x)}" for k, x in v.items()) + "}"
    return str(v)


def save_group_plot(path: Path, results: dict[str, Any]) -> None:
    """groups.png: per method, the concept share on each prompt group, with 95% Wilson intervals
    (and the min and max over seeds as ticks)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["methods"]
    groups = [k for k in rows["sd"] if k.startswith(("striped[", "striped_in["))]
    names = list(rows)
    fig, ax = plt.subplots(figsize=(max(8, 1.9 * len(groups) + 3), 4.2))
    width = 0.8 / len(names)
    cmap = plt.get_cmap("tab20")
    for j, name in enumerate(names):
        xs = np.arange(len(groups)) + (j - (len(names) - 1) / 2) * width
        mean = np.array([rows[name][g]["mean"] for g in groups])
        lo = np.array([rows[name][g]["lo"] for g in groups])
        hi = np.array([rows[name][g]["hi"] for g in groups])
        ax.bar(xs, mean, width * 0.9, color=cmap(j % 20), label=name)
        ax.errorbar(xs, mean, yerr=[np.clip(mean - lo, 0, None), np.clip(hi - mean, 0, None)], fmt="none",
                    ecolor="black", elinewidth=0.8, capsize=1.5)  # fmt: skip
        if len(results["seeds"]) > 1:
            ax.scatter(xs, [rows[name][g]["min"] for g in groups], marker="_", color="grey", s=12, zorder=3)
            ax.scatter(xs, [rows[name][g]["max"] for g in groups], marker="_", color="grey", s=12, zorder=3)
    ax.set_xticks(np.arange(len(groups)), [g.split("[")[1].rstrip("]") for g in groups])
    ax.axhline(0.10, color="red", lw=0.6, ls="--")
    ax.set(ylim=(0, 1.05), ylabel="striped share (oracle)",
           title=f"Concept share per prompt group, {results['mode']} mode, seeds {results['seeds']} "
                 "(bars: mean; lines: 95% Wilson; ticks: seed min/max)")  # fmt: skip
    ax.title.set_fontsize(9)
    ax.legend(fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_method_grid(
    path: Path, images: dict[str, np.ndarray], prompts: list[PromptSet], n_prompt: int, per_cell: int = 3
) -> None:
    """The grid figure: rows = methods, columns = prompt groups; in each cell the first image of
    the group's first ``per_cell`` prompts, the same seeds in every row."""
    from PIL import Image, ImageDraw

    rows = []
    label_w, pad = 130, 6
    slices = group_slices(prompts, n_prompt)
    for m in METHODS:
        cells = []
        for sl, ps in zip(slices, prompts, strict=True):
            idx = [sl.start + p * n_prompt for p in range(min(per_cell, len(ps.prompts)))]
            cell_img = np.concatenate([images[m.name][i] for i in idx], axis=1)  # (H, per_cell * W, 3)
            cells.append(np.pad(cell_img, ((0, 0), (0, pad), (0, 0)), constant_values=255))
        rows.append(np.concatenate(cells, axis=1))
    grid = np.concatenate(rows, axis=0)
    scale = max(1, 64 // images["sd"].shape[1])  # 32-px toy images shown at 64 px
    h, w = grid.shape[0] * scale, grid.shape[1] * scale
    img = Image.fromarray(grid).resize((w, h), Image.NEAREST)
    canvas = Image.new("RGB", (w + label_w, h + 20), "white")
    canvas.paste(img, (label_w, 20))
    draw = ImageDraw.Draw(canvas)
    row_h, col_w = h // len(METHODS), w // len(prompts)
    for i, m in enumerate(METHODS):
        draw.text((4, 20 + i * row_h + row_h // 2 - 5), m.name, fill="black")
    for j, ps in enumerate(prompts):
        draw.text((label_w + j * col_w + 2, 4), ps.group.removeprefix("target:"), fill="black")
    canvas.save(path)


def _track(tracker: Any, out: Path, results: dict[str, Any], first_seed: int) -> None:
    """A parent run for the benchmark, a child per method with its cells' means as metrics."""
    tags = {"hfi.kind": "bench-removal", "hfi.mode": results["mode"]}
    parent = tracker.parent(str(out.resolve()), f"bench-removal-{results['mode']}", results["settings"], tags)
    for name, row in results["methods"].items():
        child = tracker.child(parent, name, tags)
        flat: dict[str, float] = {}
        for k, v in row.items():
            key = k.replace("[", ".").replace("]", "")
            if isinstance(v, dict):
                flat |= {key: v["mean"], f"{key}.lo": v["lo"], f"{key}.hi": v["hi"]}
            elif v is not None:
                flat[key] = v
        tracker.log_metrics(child, flat)
        grid = method_dir(replicate_dir(out, first_seed), name) / "evaluate" / "grid.png"
        if grid.exists():
            tracker.log_file(child, grid)
        tracker.finish(child)
    for f in ("results.md", "results.json", "grid.png", "groups.png"):
        tracker.log_file(parent, out / f)
    tracker.finish(parent)
