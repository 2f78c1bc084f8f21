"""``hfi bench removal``: the paper's comparison on the toy world, through the pipeline's own code.

One upstream run (the stages the HFI token needs: generate, simulated feedback, reward model,
token), then

    sd, negative prompt, SLD medium/max          inference-time, nothing trains
    ESD-x and SDD on the text concept             ``distill.use_token: false``
    HFI+ESD-x and HFI+SDD                         the same trainings on the HFI token

each evaluated by ``evaluation.evaluate`` on the same evaluation seeds, which are never the
validation seeds the hyperparameters were chosen on (both are recorded). Methods of one family
(ESD-x / HFI+ESD-x, SDD / HFI+SDD) share one ``DistillConfig``: only the prompts differ.

The upstream stages and every training run as the pipeline's steps do (``steps.run_step``): a
training is the ``distill`` step of a method's own run folder, whose upstream stages are the
shared upstream run's. So there is one resume rule, the ``_SUCCESS`` markers' input hashes:
``--resume`` reuses exactly the steps whose config and inputs did not change.

The upstream run, trainings and evaluations run in a pool of ``jobs`` processes, one torch
thread each, a fresh process per task so that its peak memory is its own; the inference-time
methods are evaluated while the upstream run makes the token.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator

from hfi_core.config import DistillConfig, RunConfig, Section, load_config, load_yaml_file, parse
from hfi_core.stages import STAGES, upstream_closure

Family = Literal["sdd", "esd"]
TRAINING = "distill"  # the stage a method trains in
UPSTREAM = tuple(upstream_closure(STAGES[TRAINING].upstream))  # the stages every method shares


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


METHODS = (
    Method("sd"),
    Method("negative prompt", inference="negative_prompt"),
    Method("sld-medium", inference="sld-medium"),
    Method("sld-max", inference="sld-max"),
    Method("esd-x", family="esd"),
    Method("sdd", family="sdd"),
    Method("hfi+esd-x", family="esd", token=True),
    Method("hfi+sdd", family="sdd", token=True),
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


class BenchConfig(Section):
    """``benchmarks/removal.yaml``: the comparison's settings, validated on load."""

    config: str
    """The run config (prompts, world, feedback, reward, token, evaluators), relative to this file."""
    text_concept: str
    """The concept in words, for the text-only methods: negative prompt and SLD's safety concept."""
    sdd: DistillConfig
    """Hyperparameters of SDD and HFI+SDD (``use_token`` is set per method)."""
    esd: DistillConfig
    """Hyperparameters of ESD-x and HFI+ESD-x."""
    eval_seed: int = Field(3_000_000, ge=0)
    """First evaluation seed; every method draws the same seeds."""
    validation_seed: int = Field(2_000_000, ge=0)
    """First seed of the validation set the hyperparameters were chosen on (recorded, never evaluated here)."""
    n_per_group: int = Field(128, ge=1)
    """Evaluation images per prompt group, at least (rounded up to whole prompts)."""
    quick: QuickConfig = QuickConfig()
    """Settings of ``--quick``."""

    @model_validator(mode="after")
    def _check(self) -> BenchConfig:
        if self.eval_seed == self.validation_seed:
            raise ValueError("eval_seed: must differ from validation_seed (no tuning on the evaluation seeds)")
        if self.sdd.method != "sdd" or self.esd.method != "esd":
            raise ValueError("sdd.method / esd.method: the families are 'sdd' and 'esd'")
        return self


def load_bench_config(path: str | Path) -> tuple[BenchConfig, RunConfig]:
    """Read ``benchmarks/removal.yaml`` and the run config it names.

    Raises:
        ConfigError: naming the file and the key.
    """
    from hfi_core.config import ConfigError

    path = Path(path)
    try:
        bench = parse(BenchConfig, load_yaml_file(path))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    return bench, load_config(path.parent / bench.config)


def per_prompt(cfg: RunConfig, n_per_group: int) -> int:
    """Images per prompt so that every group gets at least ``n_per_group``."""
    return max(math.ceil(n_per_group / len(ps.prompts)) for ps in cfg.prompts)


def method_config(cfg: RunConfig, bench: BenchConfig, m: Method, quick: bool) -> RunConfig:
    """The run config a method trains with: its family's hyperparameters, token or text."""
    dc = (bench.sdd if m.family == "sdd" else bench.esd).model_copy(update={"use_token": m.token})
    if quick:
        dc = dc.model_copy(update={"steps": bench.quick.distill_steps, "checkpoint_every": 0})
    return cfg.model_copy(update={"distill": dc})


def quick_config(cfg: RunConfig, bench: BenchConfig) -> RunConfig:
    """The upstream run shrunk for ``--quick``."""
    prompts = [ps.model_copy(update={"images_per_prompt": bench.quick.images_per_prompt}) for ps in cfg.prompts]
    invert = cfg.invert.model_copy(update={"steps": bench.quick.invert_steps})
    return cfg.model_copy(update={"prompts": prompts, "invert": invert})


def eval_config(cfg: RunConfig, n_per_prompt: int, seed: int) -> RunConfig:
    """The run config with the benchmark's evaluation plan."""
    return cfg.model_copy(update={"evaluate": cfg.evaluate.model_copy(update={"n_per_prompt": n_per_prompt,
                                                                               "seed": seed})})  # fmt: skip


# ----------------------------------------------------------------------------- pool workers


def _upstream(cfg: RunConfig, run: Path, threads: int) -> dict[str, Any]:
    import torch

    from hfi_core.steps import run_local

    torch.set_num_threads(threads)
    return run_local(cfg, run, stages=UPSTREAM, show_progress=False)


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


def method_run(out: Path, name: str, upstream: Path) -> Path:
    """A method's run folder, ``methods/<name>/``: the shared upstream stages linked in, its own
    training beside them."""
    run = method_dir(out, name)
    run.mkdir(parents=True, exist_ok=True)
    for stage in UPSTREAM:
        link = run / stage
        if not link.exists():
            link.symlink_to(os.path.relpath(upstream / stage, run))  # relative: the folder can move
    return run


# ----------------------------------------------------------------------------- the benchmark


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
    """Run the comparison into ``out``: results.json, results.md, grid.png, one folder per method.

    Args:
        resume: keep what an earlier bench in ``out`` finished and reuse every step (upstream
            stage or training) whose ``_SUCCESS`` marker matches its config and inputs; without
            it, the upstream run and the trainings start from scratch. Evaluations always run.
        tracker: a ``tracking.Tracker`` for a parent run and one child per method, or None.
        log: where progress lines go.
        provenance: how the run was made (command, commit), written into the results.
    Returns:
        The content of results.json.
    """
    from hfi_core.evaluation import Variant

    out = Path(out)
    run = out / "run"
    t_start = time.time()
    if not resume:
        shutil.rmtree(run, ignore_errors=True)
        shutil.rmtree(out / "methods", ignore_errors=True)
    if quick:
        cfg = quick_config(cfg, bench)
    n_group = bench.quick.n_per_group if quick else bench.n_per_group
    n_prompt = per_prompt(cfg, n_group)
    ecfg = eval_config(cfg, n_prompt, bench.eval_seed)
    # The HFI methods need the token whatever the run config's own distill section says.
    upstream_cfg = cfg.model_copy(update={"distill": cfg.distill.model_copy(update={"use_token": True})})
    upstream: dict[str, Any] = {}
    reused: list[str] = []

    def variant(m: Method) -> Variant:
        unet = str(method_dir(out, m.name) / TRAINING / "unet") if m.family else None
        return Variant(m.name, unet=unet, inference=m.inference, negative_prompt=bench.text_concept,  # type: ignore[arg-type]
                       safety_concept=bench.text_concept)  # fmt: skip

    # Tasks wait in `ready` until a worker is free, longest first: the upstream run, then the
    # trainings (they need its token), then the evaluations. The inference-time methods need
    # nothing upstream, so they fill the second worker while the upstream run holds the first.
    Task = tuple[int, str, Method | None]  # (priority: lower runs first, kind, method)
    ready: list[Task] = [(0, "upstream", None)]
    ready += [(2, "evaluate", m) for m in METHODS if not m.family]
    ready += [(1, "train", m) for m in METHODS if m.family]  # held back until the upstream run is done
    trained: dict[str, dict[str, Any]] = {}
    evaluated: dict[str, dict[str, Any]] = {}

    ctx = get_context("spawn")  # fresh interpreters: no torch state shared with the parent
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, max_tasks_per_child=1) as pool:
        pending: dict[Future, Task] = {}
        while ready or pending:
            ready.sort(key=lambda task: task[0])  # stable: METHODS order within a priority
            runnable = [t for t in ready if t[1] != "train" or upstream]
            while runnable and len(pending) < jobs:
                task = runnable.pop(0)
                ready.remove(task)
                _, kind, m = task
                if kind == "upstream":
                    fut = pool.submit(_upstream, upstream_cfg, run, threads)
                elif kind == "train":
                    assert m is not None
                    fut = pool.submit(_train, method_config(cfg, bench, m, quick), method_run(out, m.name, run),
                                      threads)  # fmt: skip
                else:
                    assert m is not None
                    fut = pool.submit(_evaluate, ecfg, variant(m), method_dir(out, m.name) / "evaluate", threads)
                pending[fut] = task
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                _, kind, m = pending.pop(fut)
                result = fut.result()
                if kind == "upstream":
                    upstream = result
                    skipped = [n for n in UPSTREAM if result[n].get("skipped")]
                    reused += [f"upstream {n}" for n in skipped]
                    log("upstream: " + ", ".join(f"{n} {result[f'{n}_seconds']} s" for n in UPSTREAM)
                        + (f" (reused: {', '.join(skipped)})" if skipped else ""))  # fmt: skip
                elif kind == "train":
                    assert m is not None
                    trained[m.name] = result
                    if result["reused"]:
                        reused.append(f"{m.name} training")
                    log(f"trained {m.name}: {result['seconds']} s" + (" (reused)" if result["reused"] else ""))
                    ready.append((2, "evaluate", m))
                else:
                    assert m is not None
                    evaluated[m.name] = result
                    log(f"evaluated {m.name}: {result['seconds']} s")

    images = {m.name: np.load(method_dir(out, m.name) / "evaluate" / "images.npy") for m in METHODS}
    results = _collect(cfg, bench, images, trained, evaluated, upstream, quick=quick, n_prompt=n_prompt)
    results["seconds"] = round(time.time() - t_start, 1)
    if reused:
        results["reused"] = reused
    results["provenance"] = provenance or {}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(results_table(results))
    save_method_grid(out / "grid.png", images, cfg, n_prompt)
    if tracker is not None:
        _track(tracker, out, results)
    return results


def method_dir(out: Path, name: str) -> Path:
    """A method's folder under the benchmark's output: ``methods/<name>/{distill,evaluate}``."""
    return Path(out) / "methods" / name.replace(" ", "_").replace("+", "_")


def group_slices(cfg: RunConfig, n_prompt: int) -> list[slice]:
    """Where each prompt group's images lie in an evaluation's image array (``eval_plan`` order)."""
    ends = np.cumsum([len(ps.prompts) * n_prompt for ps in cfg.prompts])
    return [slice(int(e) - len(ps.prompts) * n_prompt, int(e)) for e, ps in zip(ends, cfg.prompts, strict=True)]


def _collect(cfg: RunConfig, bench: BenchConfig, images: dict[str, np.ndarray], trained: dict, evaluated: dict,
             upstream: dict, *, quick: bool, n_prompt: int) -> dict[str, Any]:  # fmt: skip
    """One row of numbers per method; drift against SD's images of the same prompts and seeds."""
    base = images["sd"].astype(np.float32)  # (N, H, W, 3)
    groups = [ps.group for ps in cfg.prompts]
    kept = [sl for sl, grp in zip(group_slices(cfg, n_prompt), groups, strict=True) if not grp.startswith("target")]
    rows: dict[str, dict[str, Any]] = {}
    for m in METHODS:
        g = evaluated[m.name]["groups"]
        drift = np.mean([np.abs(images[m.name][sl].astype(np.float32) - base[sl]).mean() / 255 for sl in kept])
        row: dict[str, Any] = {}
        for grp in groups:
            if grp.startswith("target"):
                row[f"striped[{grp.removeprefix('target:')}]"] = g[grp]["oracle_striped"]
        for grp in groups:
            if grp.startswith("preserve"):
                style = grp.split(":")[-1]
                row[f"{style}[{style}]"] = g[grp][f"oracle_{style}"]
        row["shape_acc"] = float(np.mean([g[grp]["oracle_shape_acc"] for grp in groups]))
        row["color_acc"] = float(np.mean([g[grp]["oracle_color_acc"] for grp in groups]))
        row["drift_non_target"] = float(drift)
        row["clip_concept_rate_target"] = float(np.mean([g[grp]["clip_concept_rate"] for grp in groups
                                                         if grp.startswith("target")]))  # fmt: skip
        t = trained.get(m.name, {})
        row["train_seconds"] = t.get("seconds", 0.0)
        row["peak_memory_mb"] = t.get("peak_memory_mb")
        row["eval_seconds"] = evaluated[m.name]["seconds"]
        rows[m.name] = row
    return {
        "mode": "quick" if quick else "full",
        "methods": rows,
        "groups": {m.name: evaluated[m.name]["groups"] for m in METHODS},
        "settings": {
            "eval_seed": bench.eval_seed,
            "validation_seed": bench.validation_seed,
            "images_per_prompt": n_prompt,
            "images_per_group": {ps.group: len(ps.prompts) * n_prompt for ps in cfg.prompts},
            "text_concept": bench.text_concept,
            "families": {
                f: method_config(cfg, bench, Method(f, family=f), quick).distill.model_dump(mode="json")
                for f in ("sdd", "esd")
            },
            "generation": cfg.generation.model_dump(mode="json"),
            "token": cfg.invert.token,
        },
        "upstream": upstream,
        "evaluators": evaluated["sd"]["evaluators"],
    }


COLUMNS = (
    ("striped[explicit]", "striped: explicit"),
    ("striped[implicit:zebra]", "striped: zebra"),
    ("striped[implicit:barcode]", "striped: barcode"),
    ("dotted[dotted]", "dotted on dotted"),
    ("plain[plain]", "plain on plain"),
    ("shape_acc", "shape acc"),
    ("color_acc", "colour acc"),
    ("drift_non_target", "drift (non-target)"),
    ("clip_concept_rate_target", "tiny-CLIP concept rate (target)"),
    ("train_seconds", "train s"),
    ("peak_memory_mb", "peak MB"),
)


def results_table(results: dict[str, Any]) -> str:
    """results.md: one row per method; oracle shares and accuracies, drift, CLIP, cost."""
    s = results["settings"]
    lines = [
        f"# Removal on the toy world ({results['mode']} mode)",
        "",
        f"{min(s['images_per_group'].values())}+ images per prompt group, evaluation seeds from {s['eval_seed']} "
        f"(hyperparameters chosen on validation seeds from {s['validation_seed']}); oracle-judged shares.",
        "",
        "| method | " + " | ".join(title for _, title in COLUMNS) + " |",
        "|---|" + "---|" * len(COLUMNS),
    ]
    for name, row in results["methods"].items():
        cells = []
        for key, _ in COLUMNS:
            v = row.get(key)
            cells.append("" if v is None else f"{v:.0f}" if key in ("train_seconds", "peak_memory_mb") else f"{v:.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", f"Total wall time: {results.get('seconds', 0):.0f} s."]
    if reused := results.get("reused"):
        lines.append(f"Reused from an earlier run in the same folder (`--resume`): {', '.join(reused)}.")
    for k, v in results.get("provenance", {}).items():
        lines.append(f"{k.capitalize()}: `{v}`")
    return "\n".join(lines) + "\n"


def save_method_grid(
    path: Path, images: dict[str, np.ndarray], cfg: RunConfig, n_prompt: int, per_cell: int = 4
) -> None:
    """The grid figure: rows = methods, columns = prompt groups; in each cell the first image of
    the group's first ``per_cell`` prompts, the same seeds in every row."""
    from PIL import Image, ImageDraw

    rows = []
    label_w, pad = 110, 6
    slices = group_slices(cfg, n_prompt)
    for m in METHODS:
        cells = []
        for sl, ps in zip(slices, cfg.prompts, strict=True):
            idx = [sl.start + p * n_prompt for p in range(min(per_cell, len(ps.prompts)))]
            cell = np.concatenate([images[m.name][i] for i in idx], axis=1)  # (H, per_cell * W, 3)
            cells.append(np.pad(cell, ((0, 0), (0, pad), (0, 0)), constant_values=255))
        rows.append(np.concatenate(cells, axis=1))
    grid = np.concatenate(rows, axis=0)
    scale = max(1, 64 // images["sd"].shape[1])  # 32-px toy images shown at 64 px
    h, w = grid.shape[0] * scale, grid.shape[1] * scale
    img = Image.fromarray(grid).resize((w, h), Image.NEAREST)
    canvas = Image.new("RGB", (w + label_w, h + 20), "white")
    canvas.paste(img, (label_w, 20))
    draw = ImageDraw.Draw(canvas)
    row_h, col_w = h // len(METHODS), w // len(cfg.prompts)
    for i, m in enumerate(METHODS):
        draw.text((4, 20 + i * row_h + row_h // 2 - 5), m.name, fill="black")
    for j, ps in enumerate(cfg.prompts):
        draw.text((label_w + j * col_w + 2, 4), ps.group, fill="black")
    canvas.save(path)


def _track(tracker: Any, out: Path, results: dict[str, Any]) -> None:
    """A parent run for the benchmark, a child per method with its row as metrics."""
    tags = {"hfi.kind": "bench-removal", "hfi.mode": results["mode"]}
    parent = tracker.parent(str(out.resolve()), f"bench-removal-{results['mode']}", results["settings"], tags)
    for name, row in results["methods"].items():
        child = tracker.child(parent, name, tags)
        tracker.log_metrics(child, {k.replace("[", ".").replace("]", ""): v for k, v in row.items()})
        tracker.log_metrics(child, results["groups"][name], prefix="groups.")
        grid = method_dir(out, name) / "evaluate" / "grid.png"
        if grid.exists():
            tracker.log_file(child, grid)
        tracker.finish(child)
    for f in ("results.md", "results.json", "grid.png"):
        tracker.log_file(parent, out / f)
    tracker.finish(parent)
