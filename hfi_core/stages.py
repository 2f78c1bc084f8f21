"""One function per pipeline stage: ``(config, run folder) -> outputs under the run folder``.

    run/generate/   images/ + manifest.parquet
    run/publish/    tasks.json + label_config.xml (the Label Studio import for this batch)
    run/feedback/   labelstudio/ (simulated export), raw/ (every export, byte for byte), labels.parquet
    run/reward/     model/, metrics.json, roc.png, scores.parquet   (run/embedding_cache/ beside it)
    run/invert/     learned_embeds.safetensors, metrics.json, token_samples.png
    run/distill/    unet/, delta.safetensors, README.md (model card), losses.png
    run/evaluate/   <variant>/metrics.json + grid.png, summary.json, summary.md

The CLI (``hfi run`` and the per-stage commands) and the Airflow tasks call exactly these.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hfi_core.config import RunConfig

STAGES = ("generate", "publish", "feedback", "reward", "invert", "distill", "evaluate")


def stage_generate(cfg: RunConfig, run: Path, *, show_progress: bool = True) -> dict[str, Any]:
    from hfi_core.generation import generate

    result = generate(cfg, Path(run) / "generate", show_progress=show_progress)
    return {"manifest": str(result.manifest), "generated": result.generated, "reused": result.reused}


def stage_publish(cfg: RunConfig, run: Path) -> dict[str, Any]:
    """Write the Label Studio import file and labeling config for the generated batch."""
    from hfi_core.feedback.labelstudio import image_urls, import_batch, local_files_prefix
    from hfi_core.images import read_manifest

    run, fb = Path(run), cfg.feedback
    gen = run / "generate"
    rows = read_manifest(gen / "manifest.parquet").to_dict("records")
    urls = image_urls(rows, fb.image_store or local_files_prefix(str(gen.resolve())))
    out = run / "publish"
    out.mkdir(parents=True, exist_ok=True)
    tasks, xml = import_batch(rows, urls, fb.kind, fb.positive_choice, fb.negative_choice, fb.ranking_group)
    (out / "tasks.json").write_text(json.dumps(tasks, indent=1))
    (out / "label_config.xml").write_text(xml)
    return {"tasks": len(tasks), "kind": fb.kind, "import_file": str(out / "tasks.json")}


def stage_feedback(cfg: RunConfig, run: Path) -> dict[str, Any]:
    """Ingest the configured exports, or (toy world) the oracle's simulated export of the batch."""
    from hfi_core.feedback.ingest import IngestSettings, ingest
    from hfi_core.feedback.labelstudio import image_urls, local_files_prefix
    from hfi_core.images import read_manifest

    run, fb = Path(run), cfg.feedback
    gen = run / "generate"
    manifest = read_manifest(gen / "manifest.parquet")
    urls = image_urls(manifest.to_dict("records"), fb.image_store or local_files_prefix(str(gen.resolve())))
    ls = run / "feedback" / "labelstudio"
    ls.mkdir(parents=True, exist_ok=True)
    if fb.source == "simulate":
        from hfi_core.feedback.simulate import simulate_export

        export = simulate_export(
            manifest,
            gen,
            fb.simulate,
            kind=fb.kind,
            positive=fb.positive_choice,
            negative=fb.negative_choice,
            url_of=urls,
            ranking_group=fb.ranking_group,
        )
        sources = [ls / "simulated_export.json"]
        sources[0].write_text(json.dumps(export, indent=1))
    else:
        sources = [Path(f) for f in fb.files]
        if not sources:
            raise ValueError("feedback.files: empty; list the Label Studio exports, or use feedback.source: simulate")
    settings = IngestSettings(fb.kind, fb.positive_choice, fb.negative_choice, fb.image_store, fb.max_file_mb)
    return ingest(manifest, sources, run / "feedback", settings)


def stage_reward(cfg: RunConfig, run: Path) -> dict[str, Any]:
    from hfi_core.images import read_manifest
    from hfi_core.reward import train_reward

    run = Path(run)
    manifest = read_manifest(run / "generate" / "manifest.parquet")
    metrics = train_reward(
        cfg.reward, manifest, run / "generate", run / "feedback", run / "reward", cache_dir=run / "embedding_cache"
    )
    return {k: v for k, v in metrics.items() if k != "config"}


def stage_invert(cfg: RunConfig, run: Path, *, show_progress: bool = True) -> dict[str, Any]:
    """Reward-weighted textual inversion over the target groups' images."""
    from hfi_core.images import load_images, read_manifest
    from hfi_core.inversion import encode_latents, invert, reward_weights, save_token
    from hfi_core.models import load_sd_pipeline
    from hfi_core.reward import score_images

    run, ic = Path(run), cfg.invert
    manifest = read_manifest(run / "generate" / "manifest.parquet")
    manifest = manifest[manifest.group.map(lambda g: any(g.startswith(p) for p in ic.groups))].reset_index(drop=True)
    if manifest.empty:
        raise ValueError(f"invert.groups: {ic.groups} match no generated group")
    rewards = score_images(run / "reward" / "model", manifest, run / "generate", cache_dir=run / "embedding_cache")
    weights = reward_weights(rewards, ic.top_k)
    pipe = load_sd_pipeline(replace(cfg.model, dtype="float32"), "ddim")
    latents = encode_latents(pipe, load_images(manifest, run / "generate"))  # (N, C, h, w)
    init_word = ic.init_word or cfg.concept.init_word or cfg.concept.name
    t0 = time.time()
    v, losses = invert(pipe, latents, weights, ic, init_word, show_progress=show_progress)
    out = run / "invert"
    save_token(out, ic.token, v)
    _token_samples(pipe, ic, cfg, out / "token_samples.png")
    metrics = {
        "token": ic.token,
        "init_word": init_word,
        "images": len(manifest),
        "images_weighted": int((weights > 0).sum()),
        "reward_mean": float(np.mean(rewards)),
        "first_loss": losses[0],
        "last_loss_mean_10": float(np.mean(losses[-10:])),
        "seconds": round(time.time() - t0, 1),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def _token_samples(pipe, ic, cfg: RunConfig, path: Path, n: int = 8) -> None:
    """What v* draws on its own: people would rather look at this than read a loss."""
    from hfi_core.evaluation import save_grid

    pipe.set_progress_bar_config(disable=True)
    prompts = [ic.templates[0].format(ic.token)] * n
    images = pipe(
        prompts,
        generator=[torch.Generator(pipe.device).manual_seed(s) for s in range(n)],
        num_inference_steps=cfg.generation.steps,
        guidance_scale=cfg.generation.guidance,
        output_type="np",
    ).images
    images = np.round(images * 255).astype(np.uint8)
    save_grid(images, [(prompts[0], prompts[0], s) for s in range(n)], path, per_group=n)


def concept_prompts(cfg: RunConfig, token: str | None) -> list[str]:
    """The distillation's prompts: ``concept_prompts`` with the HFI token, else ``text_prompts``;
    ``{token}`` and ``{concept}`` filled in."""
    key, prompts = (
        ("concept_prompts", cfg.distill.concept_prompts) if token else ("text_prompts", cfg.distill.text_prompts)
    )
    for p in prompts:
        if "{token}" in p and not token:
            raise ValueError(f"distill.{key}: {p!r} needs the HFI token; text-only removal names the concept in words")
    return [p.replace("{token}", token or "").replace("{concept}", cfg.concept.name) for p in prompts]


def stage_distill(
    cfg: RunConfig, run: Path, *, resume: bool = False, show_progress: bool = True, out: Path | None = None
) -> dict[str, Any]:
    """SDD or ESD-x on the concept prompts (with v* when ``distill.use_token``), into ``out``
    (default ``run/distill``)."""
    from hfi_core.distill.esd import train_esd
    from hfi_core.distill.outputs import save_distilled
    from hfi_core.distill.sdd import train_sdd
    from hfi_core.models import load_sd_pipeline, model_identity

    run, dc = Path(run), cfg.distill
    pipe = load_sd_pipeline(replace(cfg.model, dtype="float32"), "ddim")  # train in fp32
    token = None
    if dc.use_token:
        pipe.load_textual_inversion(str(run / "invert"))
        token = cfg.invert.token
    prompts = concept_prompts(cfg, token)
    train = train_sdd if dc.method == "sdd" else train_esd
    out = Path(out) if out else run / "distill"
    t0 = time.time()
    unet, names, losses = train(pipe, dc, prompts, out, resume=resume, show_progress=show_progress)
    seconds = time.time() - t0
    if dc.trainable == "lora":
        from hfi_core.distill.common import merge_lora

        unet.save_lora_adapter(str(out / "lora"))  # the adapter itself, for load_lora_adapter
        unet, names = merge_lora(unet)
    card = {
        "name": cfg.name,
        "concept": cfg.concept.name,
        "base_model": model_identity(cfg.model),
        "method": dc.method,
        "token": token,
        "concept_prompts": prompts,
        "hyperparameters": asdict(dc),
        "trained_parameters": len(names),
        "trained_values": int(sum(unet.state_dict()[n].numel() for n in names)),
    }
    save_distilled(out, unet, names, card)
    _plot_losses(losses, out / "losses.png", dc.method)
    metrics = {"steps_run": len(losses), "final_loss_mean_20": float(np.mean(losses[-20:])) if losses else None,
               "seconds": round(seconds, 1), "trained_values": card["trained_values"], **peak_memory()}  # fmt: skip
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def peak_memory() -> dict[str, Any]:
    """This process's peak memory: the CUDA allocator's peak on a GPU, else the peak resident set
    (which includes loading the models: run a training in its own process to measure it alone)."""
    if torch.cuda.is_available():
        return {"peak_memory_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1), "peak_memory_kind": "cuda"}
    import resource

    return {
        "peak_memory_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_memory_kind": "rss",
    }


def _plot_losses(losses: list[float], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 2.8))
    ax.plot(losses, lw=0.6, alpha=0.5)
    if len(losses) >= 20:
        ax.plot(np.convolve(losses, np.ones(20) / 20, mode="valid"), lw=1.2)
    ax.set(title=f"{title} loss", xlabel="step", yscale="log")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def stage_evaluate(cfg: RunConfig, run: Path) -> dict[str, Any]:
    """Base, distilled and the configured baselines, same seeds; a before/after summary."""
    from hfi_core.evaluation import Variant, evaluate

    run, ec = Path(run), cfg.evaluate
    out = run / "evaluate"
    common = dict(n_per_prompt=ec.n_per_prompt, seed=ec.seed, clip_path=ec.clip or None, oracle_dir=ec.oracle or None)
    results: dict[str, dict] = {}
    base_metrics, base_images = evaluate(cfg, Variant("sd"), out / "sd", **common)
    results["sd"] = base_metrics
    variants = [Variant("distilled", unet=str(run / "distill" / "unet"))]
    for b in ec.baselines:
        variants.append(Variant(b, inference=b, negative_prompt=ec.negative_prompt or None))
    for v in variants:
        results[v.name], _ = evaluate(cfg, v, out / v.name, base_images=base_images, **common)
    summary = {name: m["groups"] for name, m in results.items()}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "summary.md").write_text(summary_table(summary))
    return summary


def summary_table(summary: dict[str, dict[str, dict[str, float]]]) -> str:
    """A Markdown table: one row per (variant, group), the headline metrics as columns."""
    cols = ["clip_concept_rate", "clip_score", "drift", "oracle_striped", "oracle_dotted", "oracle_plain",
            "oracle_shape_acc", "oracle_color_acc"]  # fmt: skip
    present = [c for c in cols if any(c in g for groups in summary.values() for g in groups.values())]
    lines = ["| variant | group | " + " | ".join(present) + " |", "|---|---|" + "---|" * len(present)]
    for name, groups in summary.items():
        for group, m in groups.items():
            cells = [f"{m[c]:.3f}" if c in m else "" for c in present]
            lines.append(f"| {name} | {group} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_all(
    cfg: RunConfig, run: Path, *, show_progress: bool = True, stages: tuple[str, ...] = STAGES
) -> dict[str, Any]:
    """Every stage in order (or those of ``stages``), on one machine; returns each stage's result
    and its seconds."""
    run = Path(run)
    run.mkdir(parents=True, exist_ok=True)
    calls = {
        "generate": lambda: stage_generate(cfg, run, show_progress=show_progress),
        "publish": lambda: stage_publish(cfg, run),
        "feedback": lambda: stage_feedback(cfg, run),
        "reward": lambda: stage_reward(cfg, run),
        "invert": lambda: stage_invert(cfg, run, show_progress=show_progress),
        "distill": lambda: stage_distill(cfg, run, show_progress=show_progress),
        "evaluate": lambda: stage_evaluate(cfg, run),
    }
    results: dict[str, Any] = {}
    for name in (n for n in STAGES if n in stages):
        if name == "invert" and not cfg.distill.use_token:
            continue  # text-only removal needs no token
        t0 = time.time()
        results[name] = calls[name]()
        results[f"{name}_seconds"] = round(time.time() - t0, 1)
        (run / "run.json").write_text(json.dumps(results, indent=2, default=str))
    return results
