"""One function per pipeline stage: ``(config, run folder, context) -> result``; outputs go
under the run folder:

    run/generate/   images/ + manifest.parquet
    run/publish/    tasks.json + label_config.xml (the Label Studio import for this batch)
    run/feedback/   labelstudio/ (simulated export), raw/ (every export, byte for byte), labels.parquet
    run/reward/     model/, metrics.json, roc.png, scores.parquet   (run/embedding_cache/ beside it)
    run/invert/     learned_embeds.safetensors (one per look: -2, -3...), tokens.json, metrics.json, token_samples.png
    run/distill/    unet/, delta.safetensors, README.md (model card), losses.png
    run/evaluate/   <variant>/metrics.json + grid.png, summary.json, summary.md
    run/register/   registration.json (the gates, and the registered version when tracked)

``STAGES``, at the bottom, is the pipeline's shape, written once: each stage's function, the
stages it reads, whether it wants a GPU, its time limit and whether it draws a progress bar.
``steps.run_step``, ``hfi run``, ``hfi step`` and (through ``dags/hfi_stages.json``, exported
from it) the Airflow DAGs all read it.

Heavy libraries are imported inside the functions, so reading the table costs nothing.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hfi_core.config import RunConfig
from hfi_core.store import FolderCache, ImagePool, Inbox, Store


@dataclass
class StageContext:
    """What a stage gets besides the config and the run folder."""

    show_progress: bool = False
    """Draw progress bars (stages whose table row says ``progress``)."""
    resume: bool = False
    """``distill``: continue from ``distill/checkpoint``."""
    tracker: Any = None
    """A ``tracking.Tracker`` when the step is recorded in MLflow (``register`` needs it to register)."""
    mlflow_run: str | None = None
    """The step's own MLflow run id, with ``tracker``."""
    pool: ImagePool | None = None
    """The store's images, shared by every night (``generate`` reuses what was drawn before)."""
    inbox: Inbox | None = None
    """The concept's feedback inbox (``feedback`` ingests it whole)."""
    labelstudio_token: str | None = None
    """The Label Studio API token, from the step's environment (never from a config)."""
    cache: FolderCache | None = None
    """Evaluations of models no night trains (the base model, inference-time baselines)."""
    tokens: FolderCache | None = None
    """The latest night's tokens per concept and model (``invert.warm_start`` continues them)."""
    champions: FolderCache | None = None
    """The latest promoted model's trained values per concept, model and method (``register``
    keeps them; ``distill.warm_start`` continues from them)."""
    checkpoint: Callable[[Path], None] | None = None
    """Called with each checkpoint file a long loop writes (stages whose row says ``checkpoints``):
    the step runner keeps it in the run store, where a retried step resumes from it."""

    @staticmethod
    def on(store: Store, cfg: RunConfig, **kw: Any) -> StageContext:
        """The context of a step against ``store``: its image pool, the concept's inbox, the cache."""
        return StageContext(pool=ImagePool(store), inbox=Inbox(store, cfg.concept.name),
                            cache=FolderCache(store, "evaluate"), tokens=FolderCache(store, "tokens"),
                            champions=FolderCache(store, "champions"), **kw)  # fmt: skip


def stage_generate(cfg: RunConfig, run: Path, ctx: StageContext) -> dict[str, Any]:
    """Seeded images of every prompt group and their manifest (resumes a cut-short run)."""
    from hfi_core.generation import generate

    result = generate(cfg, Path(run) / "generate", show_progress=ctx.show_progress, pool=ctx.pool)
    return {"manifest": str(result.manifest), "generated": result.generated, "reused": result.reused}


def stage_publish(cfg: RunConfig, run: Path, ctx: StageContext) -> dict[str, Any]:
    """Write the Label Studio import file and labeling config for the generated batch."""
    from hfi_core.feedback.labelstudio import import_batch

    run, fb = Path(run), cfg.feedback
    manifest, urls = _batch(cfg, run, ctx)
    rows = manifest.to_dict("records")
    out = run / "publish"
    out.mkdir(parents=True, exist_ok=True)
    tasks, xml = import_batch(rows, urls, fb.kind, fb.positive_choice, fb.negative_choice, fb.ranking_group)
    (out / "tasks.json").write_text(json.dumps(tasks, indent=1))
    (out / "label_config.xml").write_text(xml)
    result: dict[str, Any] = {"tasks": len(tasks), "kind": fb.kind, "import_file": str(out / "tasks.json")}
    if fb.labelstudio.url:
        from hfi_core.feedback.labelstudio_api import project_title, publish

        title = project_title(fb.labelstudio.project, cfg.concept.name)
        sent = publish(fb.labelstudio.url, ctx.labelstudio_token, title, xml, tasks)
        result |= {"labelstudio_project": sent["project"], "labelstudio_imported": sent["imported"],
                   "labelstudio_already_there": sent["already_there"]}  # fmt: skip
        (out / "labelstudio.json").write_text(json.dumps({"url": fb.labelstudio.url, "title": title, **sent}))
    return result


def _batch(cfg: RunConfig, run: Path, ctx: StageContext | None = None) -> tuple[Any, dict[str, str]]:
    """The generated batch's manifest and the URL each image has in Label Studio: under
    ``feedback.image_store`` when set, else the image pool's URL (presigned on S3), else the
    run folder's local-files URL."""
    from hfi_core.feedback.labelstudio import image_urls, local_files_prefix
    from hfi_core.images import read_manifest

    gen = Path(run) / "generate"
    manifest = read_manifest(gen / "manifest.parquet")
    rows = manifest.to_dict("records")
    if cfg.feedback.image_store is None and ctx is not None and ctx.pool is not None:
        return manifest, {r["image_id"]: ctx.pool.image_url(r["uri"]) for r in rows}
    return manifest, image_urls(rows, cfg.feedback.image_store or local_files_prefix(str(gen.resolve())))


def simulate_feedback(cfg: RunConfig, run: Path, dest: Path) -> dict[str, Any]:
    """Toy world: the oracle plays ``feedback.simulate.annotators`` people and writes a Label
    Studio export of the generated batch to ``dest``."""
    manifest, urls = _batch(cfg, run)
    export = _simulate(cfg, run, manifest, urls)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp")
    tmp.write_text(json.dumps(export, indent=1))
    tmp.replace(dest)
    return {"export": str(dest), "tasks": len(export), "annotations": sum(len(t["annotations"]) for t in export)}


def simulate_in_labelstudio(cfg: RunConfig, run: Path, token: str | None, share: float = 1.0) -> dict[str, Any]:
    """Toy world: the simulated people label the published batch in the Label Studio project,
    through its API, each as their own user. They take tasks nobody has labelled yet, in a
    seeded shuffled order, until ``share`` of the batch is labelled."""
    from hfi_core.feedback.labelstudio_api import Project, annotate_as, project_title

    fb = cfg.feedback
    if not fb.labelstudio.url:
        raise ValueError("feedback.labelstudio.url: empty; the simulated annotators have no server to label in")
    if fb.kind != "binary":
        raise ValueError("feedback.kind: the simulated Label Studio annotators label binary batches only")
    manifest, urls = _batch(cfg, run)
    project = Project.open(fb.labelstudio.url, token, project_title(fb.labelstudio.project, cfg.concept.name))
    tasks = {t.data.get("image_id"): t for t in project.tasks()}
    labelled = {i for i, t in tasks.items() if t.annotations}
    want = max(0, round(share * len(manifest)) - len(labelled & set(manifest.image_id)))
    # People work through a shuffled queue, not the batch's prompt order: a part of the batch
    # holds images of every group (seeded, so the same call labels the same images).
    queue = manifest[manifest.image_id.isin(set(tasks) - labelled)].sample(frac=1.0, random_state=fb.simulate.seed)
    todo = queue.head(want).reset_index(drop=True)
    if todo.empty:
        return {"annotations": 0, "images": 0, "labelled_before": len(labelled)}
    done = annotate_as(fb.labelstudio.url, token, project.title, _simulate(cfg, run, todo, urls))
    return {**done, "images": len(todo), "labelled_before": len(labelled)}


def _simulate(cfg: RunConfig, run: Path, manifest: Any, urls: dict[str, str]) -> list[dict]:
    from hfi_core.feedback.simulate import simulate_export

    fb = cfg.feedback
    return simulate_export(
        manifest, Path(run) / "generate", fb.simulate, kind=fb.kind, positive=fb.positive_choice,
        negative=fb.negative_choice, url_of=urls, ranking_group=fb.ranking_group,
    )  # fmt: skip


def _ingest_settings(cfg: RunConfig) -> Any:
    from hfi_core.feedback.ingest import IngestSettings

    fb = cfg.feedback
    return IngestSettings(fb.kind, fb.positive_choice, fb.negative_choice, fb.image_store, fb.max_file_mb)


def _elsewhere(manifest: Any, ctx: StageContext) -> frozenset[str]:
    """Image ids of other nights: labels of them are valid, though this night does not use them."""
    return frozenset(ctx.pool.ids() - set(manifest.image_id)) if ctx.pool is not None else frozenset()


INBOX = ".inbox"
"""Where a step keeps its local copy of the inbox (a dot-folder: never uploaded as an output)."""


def collect_feedback(cfg: RunConfig, run: Path, ctx: StageContext) -> dict[str, Any]:
    """Bring new exports into the inbox before the feedback step hashes it (``feedback.source``).

    Every new export is validated first: a bad one is refused with its one-line error and never
    reaches the inbox, where it would stop every later night.
    """
    from hfi_core.feedback.ingest import parse_source, read_source

    fb, run = cfg.feedback, Path(run)
    if ctx.inbox is None:
        raise ValueError("feedback: this step has no run store, so no feedback inbox")
    manifest, urls = _batch(cfg, run, ctx)
    settings, elsewhere = _ingest_settings(cfg), _elsewhere(manifest, ctx)
    new: list[tuple[bytes, str]] = []
    if fb.source == "files":
        for f in fb.files:
            data = read_source(Path(f), settings)  # read once: what is checked is what enters the inbox
            parse_source(Path(f), manifest, settings, elsewhere, data=data)  # raises, naming file/record/field
            new.append((data, Path(f).suffix.lower()))
    elif fb.source == "simulate":
        # The simulated people label what nobody has labelled yet, as annotators working
        # through a Label Studio project would: earlier nights' labels are not redone.
        labelled: set[str] = set()
        for path in ctx.inbox.download(run / INBOX):  # the folder the stage ingests from: fetched once
            for x in parse_source(path, manifest, settings, elsewhere):
                labelled |= set(getattr(x, "image_ids", None) or [x.image_id])
        todo = manifest[~manifest.image_id.isin(labelled)].reset_index(drop=True)
        if len(todo):
            new.append((json.dumps(_simulate(cfg, run, todo, urls), indent=1).encode(), ".json"))
    elif fb.source == "labelstudio":
        from hfi_core.feedback.labelstudio_api import project_title, pull_export

        if not fb.labelstudio.url:
            raise ValueError("feedback.labelstudio.url: empty, and feedback.source is labelstudio")
        data = pull_export(
            fb.labelstudio.url, ctx.labelstudio_token, project_title(fb.labelstudio.project, cfg.concept.name)
        )
        if data is not None:
            parse_source(Path(f"{fb.labelstudio.url}/export.json"), manifest, settings, elsewhere, data=data)
            new.append((data, ".json"))
    added = [ctx.inbox.add(data, suffix) for data, suffix in new]
    return {"inbox": ctx.inbox.uri(), "exports_added": sum(is_new for _, is_new in added)}


def stage_feedback(cfg: RunConfig, run: Path, ctx: StageContext) -> dict[str, Any]:
    """Ingest the concept's whole inbox: every night trains on all feedback so far, and an
    annotation that two exports both hold counts once."""
    from hfi_core.feedback.ingest import ingest

    run = Path(run)
    if ctx.inbox is None:
        raise ValueError("feedback: this step has no run store, so no feedback inbox")
    manifest, _ = _batch(cfg, run, ctx)
    sources = ctx.inbox.download(run / INBOX)
    if not sources:
        raise ValueError(
            f"feedback inbox {ctx.inbox.uri()} is empty: drop Label Studio exports there, list them in "
            "feedback.files, or set feedback.source to labelstudio (or simulate, in the toy world)"
        )
    summary = ingest(manifest, sources, run / "feedback", _ingest_settings(cfg), _elsewhere(manifest, ctx))
    return {**summary, "inbox": ctx.inbox.uri()}


def stage_reward(cfg: RunConfig, run: Path, ctx: StageContext) -> dict[str, Any]:
    """The reward model on every label so far (CLIP embeddings cached beside the stages)."""
    from hfi_core.images import read_manifest
    from hfi_core.reward import train_reward

    run = Path(run)
    manifest = read_manifest(run / "generate" / "manifest.parquet")
    metrics = train_reward(
        cfg.reward, manifest, run / "generate", run / "feedback", run / "reward", cache_dir=run / "embedding_cache",
        device=cfg.model.device,
    )  # fmt: skip
    return {k: v for k, v in metrics.items() if k != "config"}


def stage_invert(cfg: RunConfig, run: Path, ctx: StageContext) -> dict[str, Any]:
    """Reward-weighted textual inversion over the target groups' images: one token, or one per
    look of the concept that the flagged images show (``invert.modes``)."""
    from hfi_core.images import load_images, read_manifest
    from hfi_core.inversion import (
        LOOKS_FILE,
        TOKENS_FILE,
        encode_latents,
        invert,
        mode_token,
        reward_weights,
        save_token,
        token_file,
        warm_matches,
    )
    from hfi_core.models import load_sd_pipeline
    from hfi_core.modes import find_modes
    from hfi_core.reward import embed_and_score

    run, ic = Path(run), cfg.invert
    manifest = read_manifest(run / "generate" / "manifest.parquet")
    manifest = manifest[manifest.group.map(lambda g: any(g.startswith(p) for p in ic.groups))].reset_index(drop=True)
    if manifest.empty:
        raise ValueError(f"invert.groups: {ic.groups} match no generated group")
    embeddings, rewards = embed_and_score(run / "reward" / "model", manifest, run / "generate",
                                          cache_dir=run / "embedding_cache", device=cfg.model.device)  # fmt: skip
    weights = reward_weights(rewards, ic.top_k)  # (N,), > 0 for the images the feedback flags
    modes = find_modes(embeddings, weights > 0, modes=ic.modes, max_modes=ic.max_modes, seed=ic.seed)
    pipe = load_sd_pipeline(cfg.model.model_copy(update={"dtype": "float32"}), "ddim")
    latents = encode_latents(pipe, load_images(manifest, run / "generate"))  # (N, C, h, w)
    out = run / "invert"
    earlier, key = _earlier_tokens(cfg, ctx) if ic.warm_start else (None, "")
    ids = list(manifest.image_id)
    match = warm_matches(ids, modes.labels, earlier[1]) if earlier else {}
    t0, listed, losses_all = time.time(), [], []
    for k in range(modes.count):
        w = np.where(modes.labels == k, weights, 0.0)  # this look's images, weighted as before
        token = mode_token(ic.token, k)
        start = earlier[0][match[k]] if k in match else None  # (earlier token, its rows)
        v, losses = invert(pipe, latents, w / w[w > 0].mean(), ic, ic.init_word, token=token,
                           init=start[1] if start else None, steps=ic.warm_steps if start else None,
                           show_progress=ctx.show_progress)  # fmt: skip
        save_token(out, token, v, token_file(k))
        groups = manifest.group[modes.labels == k].value_counts()
        listed.append({"token": token, "file": token_file(k), "vectors": ic.vectors, "images": int((w > 0).sum()),
                       "groups": {g: int(n) for g, n in groups.items()}, "warm_from": start[0] if start else None,
                       "steps": len(losses), "first_loss": losses[0],
                       "last_loss_mean_10": float(np.mean(losses[-10:]))})  # fmt: skip
        losses_all.append(losses)
    (out / TOKENS_FILE).write_text(json.dumps({"tokens": listed}, indent=2))
    looks = {i: int(k) for i, k in zip(ids, modes.labels, strict=True) if k >= 0}
    (out / LOOKS_FILE).write_text(json.dumps(looks))
    _token_samples(pipe, cfg, [t["token"] for t in listed], out / "token_samples.png")
    metrics = {
        "token": ic.token,
        "tokens": [t["token"] for t in listed],
        "init_word": ic.init_word,
        "images": len(manifest),
        "images_weighted": int((weights > 0).sum()),
        "modes": modes.count,
        "mode_sizes": modes.sizes(),
        "mode_silhouettes": {str(k): round(v, 4) for k, v in modes.silhouettes.items()},
        "reward_mean": float(np.mean(rewards)),
        "first_loss": float(np.mean([ls[0] for ls in losses_all])),
        "last_loss_mean_10": float(np.mean([np.mean(ls[-10:]) for ls in losses_all])),
        "seconds": round(time.time() - t0, 1),
        "warm_started": sum(t["warm_from"] is not None for t in listed),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    if ic.warm_start and ctx.tokens is not None:
        ctx.tokens.put(key, out)  # what the next night continues
    return metrics


def _earlier_tokens(cfg: RunConfig, ctx: StageContext) -> tuple[tuple[list[Any], dict[str, int]] | None, str]:
    """The latest night's tokens for this concept, model, token shape and image seed, from the store:
    ``(([(token, rows)], {image_id: look}) or None, the cache key)``."""
    import tempfile

    from hfi_core.inversion import LOOKS_FILE, read_tokens
    from hfi_core.models import model_identity

    ic = cfg.invert
    # The generation seed too: a look is matched by image ids, which only that seed's nights share
    # (and replicates of a benchmark that share a store then never write one entry at once).
    what = {"concept": cfg.concept.name, "model": model_identity(cfg.model), "token": ic.token,
            "vectors": ic.vectors, "templates": ic.templates, "images_seed": cfg.generation.seed}  # fmt: skip
    key = FolderCache.key_of(what)
    if ctx.tokens is None:
        return None, key
    with tempfile.TemporaryDirectory() as tmp:
        if not ctx.tokens.get(key, Path(tmp)) or not (Path(tmp) / LOOKS_FILE).exists():
            return None, key
        return (read_tokens(Path(tmp)), json.loads((Path(tmp) / LOOKS_FILE).read_text())), key


def _token_samples(pipe: Any, cfg: RunConfig, tokens: list[str], path: Path, n: int = 8) -> None:
    """What each token draws on its own, a row per token: people would rather look at this than read a loss."""
    from hfi_core.evaluation import save_grid
    from hfi_core.sampling import sample

    plan = [(t, cfg.invert.templates[0].format(t), s) for t in tokens for s in range(n)]
    g = cfg.generation
    images = sample(pipe, [p for _, p, _ in plan], [s for _, _, s in plan], steps=g.steps, guidance=g.guidance,
                    height=g.height, width=g.width)  # fmt: skip
    save_grid(images, plan, path, per_group=n)


def concept_prompts(cfg: RunConfig, tokens: list[str] | None) -> list[str]:
    """The distillation's prompts: ``concept_prompts`` with the HFI tokens, else ``text_prompts``;
    ``{concept}`` filled in, and a prompt with ``{token}`` once per token (one per look)."""
    key, prompts = (
        ("concept_prompts", cfg.distill.concept_prompts) if tokens else ("text_prompts", cfg.distill.text_prompts)
    )
    out = []
    for p in prompts:
        if "{token}" in p and not tokens:
            raise ValueError(f"distill.{key}: {p!r} needs the HFI token; text-only removal names the concept in words")
        p = p.replace("{concept}", cfg.concept.name)
        out += [p.replace("{token}", t) for t in tokens] if "{token}" in p else [p]
    return out


def stage_distill(cfg: RunConfig, run: Path, ctx: StageContext) -> dict[str, Any]:
    """SDD, ESD-x or UCE on the concept prompts (with v* when ``distill.use_token``)."""
    from hfi_core.distill.common import Replicas
    from hfi_core.distill.esd import train_esd
    from hfi_core.distill.outputs import save_distilled
    from hfi_core.distill.sdd import train_sdd
    from hfi_core.distill.uce import train_uce
    from hfi_core.inversion import load_tokens
    from hfi_core.models import load_sd_pipeline, model_identity

    run, dc = Path(run), cfg.distill
    pipe = load_sd_pipeline(cfg.model.model_copy(update={"dtype": "float32"}), "ddim")  # train in fp32
    tokens = load_tokens(pipe, run / "invert") if dc.use_token else None
    prompts = concept_prompts(cfg, tokens)
    train = {"sdd": train_sdd, "esd": train_esd, "uce": train_uce}[dc.method]
    out = run / "distill"
    champion = _champion(cfg, ctx) if dc.warm_start else None  # (values, version) or None
    if champion is not None:
        dc = dc.model_copy(update={"steps": dc.warm_steps})
    t0 = time.time()
    size = (cfg.generation.height, cfg.generation.width)  # train at the size the model is sampled at
    unet, names, losses = train(pipe, dc, prompts, out, resume=ctx.resume, show_progress=ctx.show_progress,
                                on_checkpoint=ctx.checkpoint, size=size,
                                **({"init": champion[0]} if champion else {}))  # fmt: skip
    seconds = time.time() - t0
    if (replicas := Replicas.current()).rank > 0:  # data-parallel: process 0 holds the same model and saves it
        return {"replica": replicas.rank, "steps_run": len(losses), "seconds": round(seconds, 1)}
    shutil.rmtree(out / "checkpoint", ignore_errors=True)  # finished: the outputs are the model, not its state
    if dc.trainable == "lora" and dc.method != "uce":  # UCE edits the projections themselves
        from hfi_core.distill.common import merge_lora

        unet.save_lora_adapter(str(out / "lora"))  # the adapter itself, for load_lora_adapter
        unet, names = merge_lora(unet)
    card = {
        "name": cfg.name,
        "concept": cfg.concept.name,
        "base_model": model_identity(cfg.model),
        "method": dc.method,
        "tokens": tokens,
        "concept_prompts": prompts,
        "hyperparameters": dc.model_dump(mode="json"),
        "trained_parameters": len(names),
        "trained_values": int(sum(unet.state_dict()[n].numel() for n in names)),
        "warm_from": champion[1] if champion else None,
    }
    save_distilled(out, unet, names, card)
    _plot_losses(losses, out / "losses.png", dc.method)
    metrics = {"steps_run": len(losses), "final_loss_mean_20": float(np.mean(losses[-20:])) if losses else None,
               "seconds": round(seconds, 3), "trained_values": card["trained_values"],
               "warm_started": champion is not None, **peak_memory()}  # fmt: skip
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


CHAMPION_FILE = "champion.json"


def _champion_key(cfg: RunConfig) -> str:
    """What a champion's trained values fit: the concept, the base model, the method and which
    parameters train (a night with other hyperparameters may still continue from them)."""
    from hfi_core.models import model_identity

    dc = cfg.distill
    what = {"concept": cfg.concept.name, "model": model_identity(cfg.model), "method": dc.method,
            "trainable": dc.trainable, "use_token": dc.use_token}  # fmt: skip
    return FolderCache.key_of(what)


def _champion(cfg: RunConfig, ctx: StageContext) -> tuple[dict[str, Any], Any] | None:
    """The latest promoted model's trained values for this concept, model and method, from the
    store: ``(values, its registry version)``, or None when there is none yet."""
    import tempfile

    from safetensors.torch import load_file

    from hfi_core.distill.outputs import DELTA

    if ctx.champions is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        if not ctx.champions.get(_champion_key(cfg), Path(tmp)):
            return None
        version = json.loads((Path(tmp) / CHAMPION_FILE).read_text()).get("version")
        return load_file(Path(tmp) / DELTA), version


def _keep_champion(cfg: RunConfig, run: Path, ctx: StageContext, version: Any) -> None:
    """Keep a promoted model's trained values (its delta) where ``distill.warm_start`` finds them."""
    import tempfile

    from hfi_core.distill.outputs import DELTA

    if ctx.champions is None:
        return
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(run / "distill" / DELTA, Path(tmp) / DELTA)
        (Path(tmp) / CHAMPION_FILE).write_text(json.dumps({"version": version, "run": run.name}))
        ctx.champions.put(_champion_key(cfg), Path(tmp))


def peak_memory() -> dict[str, Any]:
    """This process's peak memory: the CUDA allocator's peak on a GPU, else the peak resident set
    (which includes loading the models: run a training in its own process to measure it alone)."""
    import torch

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


def stage_evaluate(cfg: RunConfig, run: Path, ctx: StageContext) -> dict[str, Any]:
    """Base, distilled and the configured baselines, same seeds; a before/after summary."""
    from hfi_core.evaluation import Variant, evaluate

    run = Path(run)
    out = run / "evaluate"
    results: dict[str, dict] = {}
    # The base model and the inference-time baselines are the same every night on the same
    # seeds: measured once per store and evaluation setup, then read back (with their images,
    # which the other variants' drift is measured against).
    fixed = [Variant("sd")] + [Variant(b, inference=b) for b in cfg.evaluate.baselines]
    base_images = None
    for v in fixed:
        key = _evaluation_key(cfg, v)
        if ctx.cache is not None and ctx.cache.get(key, out / v.name):
            results[v.name] = json.loads((out / v.name / "metrics.json").read_text())
            images = np.load(out / v.name / "images.npz")["images"]
        else:
            results[v.name], images = evaluate(cfg, v, out / v.name, base_images=base_images)
            np.savez_compressed(out / v.name / "images.npz", images=images)
            if ctx.cache is not None:
                ctx.cache.put(key, out / v.name)
        base_images = images if v.name == "sd" else base_images
    trained = Variant("distilled", unet=str(run / "distill" / "unet"))
    results[trained.name], _ = evaluate(cfg, trained, out / trained.name, base_images=base_images)
    results = {name: results[name] for name in ["sd", "distilled", *cfg.evaluate.baselines]}
    summary = {name: m["groups"] for name, m in results.items()}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "summary.md").write_text(summary_table(summary))
    return summary


_EVALUATION_CODE = ("evaluation.py", "sampling.py", "models.py", "embeddings.py", "nudity.py", "distill/outputs.py")
"""The modules an evaluation's numbers come from: a change to any of them measures afresh."""


def _evaluation_key(cfg: RunConfig, variant: Any) -> str:
    """Everything a fixed variant's evaluation depends on: model, prompts, sampler, evaluators."""
    import hashlib
    from dataclasses import asdict

    from hfi_core.models import model_identity

    here = Path(__file__).parent
    code = hashlib.sha256(b"".join((here / f).read_bytes() for f in _EVALUATION_CODE)).hexdigest()
    g = cfg.generation
    what = {
        "code": code,
        "variant": asdict(variant),
        "model": model_identity(cfg.model),
        "prompts": [(ps.group, ps.prompts) for ps in cfg.prompts],
        "sampler": [g.scheduler, g.steps, g.guidance, g.height, g.width],
        "evaluate": cfg.evaluate.model_dump(mode="json"),
        "concept": cfg.concept.model_dump(mode="json"),
    }
    return FolderCache.key_of(what)


def stage_register(cfg: RunConfig, run: Path, ctx: StageContext) -> dict[str, Any]:
    """Check the promotion gates and the challenger rule, and register the distilled model.

    With a tracker, the model becomes a new version of ``promotion.model_name`` and takes the
    ``champion`` alias only when it passes every gate and beats the current champion
    (``promotion.challenge``); the verdict, both models' numbers and the reason go on the version
    and on the night's parent run. Without one, only the gates' verdict is written."""
    from hfi_core.promotion import challenge, promotion_gates

    run, p = Path(run), cfg.promotion
    summary = json.loads((run / "evaluate" / "summary.json").read_text())
    gates = promotion_gates(summary, p.max_concept_rate, p.max_preservation_drop, p.concept_metric, p.max_became)
    version, champion = None, None
    if ctx.tracker is not None and ctx.mlflow_run is not None:
        ctx.tracker.log_artifacts(ctx.mlflow_run, run / "distill", "model")
        champion = ctx.tracker.champion(p.model_name, ctx.mlflow_run)
    verdict = challenge(gates, champion[1] if champion else None, champion[0] if champion else None)
    if ctx.tracker is not None and ctx.mlflow_run is not None:
        version = ctx.tracker.register(ctx.mlflow_run, p.model_name, "model", gates, verdict)
        if verdict.promoted and cfg.distill.method != "uce":  # what the next night's warm start continues
            _keep_champion(cfg, run, ctx, version)
    else:
        verdict.promoted, verdict.reason = False, f"not tracked: no registry to promote in ({verdict.reason})"
    result = {
        "model_name": p.model_name,
        "version": version,
        "champion": verdict.promoted,
        "gates_passed": gates.passed,
        "gates": gates.checks,
        "reason": verdict.reason,
        "night": verdict.night,
        "previous_champion": {"version": verdict.champion_version, **verdict.champion} if verdict.champion else None,
    }
    out = run / "register"
    out.mkdir(parents=True, exist_ok=True)
    (out / "registration.json").write_text(json.dumps(result, indent=2))
    return result


def headline(name: str, result: dict[str, Any], cfg: RunConfig) -> dict[str, float]:
    """What a step adds to the night's parent run, so that the runs table compares nights:
    labels used, reward AUC, the concept rate before and after per group, preservation, promoted."""
    if result.get("skipped"):
        return {}
    if name == "feedback":
        return {"labels_used": result.get("labels", 0), "labelled_images": result.get("rows", 0)}
    if name == "reward":
        keys = {"holdout_auc": "reward_auc", "holdout_pair_accuracy": "reward_pair_accuracy"}
        return {keys[k]: v for k, v in result.items() if k in keys}
    if name == "evaluate":
        key = cfg.promotion.concept_metric
        out: dict[str, float] = {}
        for group, before in result.get("sd", {}).items():
            after = result.get("distilled", {}).get(group, {})
            tag = _group_tag(group)
            if key in before:
                out[f"{tag}.concept_before"], out[f"{tag}.concept_after"] = before[key], after.get(key, float("nan"))
        return out
    if name == "register":
        night, champion = result["night"], result.get("previous_champion") or {}
        out = {"concept_rate": night["concept_rate"], "preservation_drop": night["preservation_drop"],
               "promoted": float(result["champion"]), "gates_passed": float(result["gates_passed"])}  # fmt: skip
        out |= {f"champion_{k}": champion[k] for k in ("concept_rate", "preservation_drop") if k in champion}
        return out
    return {}


def _group_tag(group: str) -> str:
    return group.replace(":", "_")  # "target:implicit:zebra" -> "target_implicit_zebra" (metric-key safe)


def headline_keys(cfg: RunConfig) -> list[str]:
    """Every metric ``headline`` can put on a night's parent, in the order a reader wants them:
    the verdict first, then what fed it, then each group's concept rate before and after."""
    groups = [_group_tag(ps.group) for ps in cfg.prompts]
    return [
        "promoted", "concept_rate", "preservation_drop", "champion_concept_rate", "champion_preservation_drop",
        "gates_passed", "labels_used", "labelled_images",
        "reward_auc" if cfg.feedback.kind == "binary" else "reward_pair_accuracy",
        *(f"{g}.concept_{when}" for g in groups for when in ("before", "after")),
    ]  # fmt: skip


def grids(name: str, run: Path) -> dict[str, Path]:
    """The image grids a step shows on the night's parent run, by key (the same keys every night)."""
    if name != "evaluate":
        return {}
    return {f"grid_{p.parent.name}": p for p in sorted((Path(run) / "evaluate").glob("*/grid.png"))}


def summary_table(summary: dict[str, dict[str, dict[str, float]]]) -> str:
    """A Markdown table: one row per (variant, group), the headline metrics as columns."""
    cols = ["clip_concept_rate", "clip_score", "drift", "oracle_striped", "oracle_dotted", "oracle_plain",
            "oracle_shape_acc", "oracle_color_acc", "oracle_became_plain", "oracle_became_dotted"]  # fmt: skip
    present = [c for c in cols if any(c in g for groups in summary.values() for g in groups.values())]
    lines = ["| variant | group | " + " | ".join(present) + " |", "|---|---|" + "---|" * len(present)]
    for name, groups in summary.items():
        for group, m in groups.items():
            cells = [f"{m[c]:.3f}" if c in m else "" for c in present]
            lines.append(f"| {name} | {group} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


CHECKPOINT_FILE = "checkpoint/state.pt"
"""Where a checkpointing stage's loop keeps its state, in its folder (``distill.common.CHECKPOINT``)."""


@dataclass(frozen=True)
class Stage:
    """One row of the pipeline's table."""

    name: str
    run: Callable[[RunConfig, Path, StageContext], dict[str, Any]]
    """``(config, run folder, context) -> result``; writes under ``run/<name>/``."""
    upstream: tuple[str, ...]
    """Stages whose outputs this one reads (the DAG's edges, the step's input hashes)."""
    gpu: bool
    """Asks for a GPU when steps run in containers or pods."""
    timeout_hours: float
    """The step's time limit (Airflow's ``execution_timeout``)."""
    progress: bool
    """Draws a progress bar of its own long loop (tqdm) when asked to."""
    command: tuple[str, ...]
    """The ``hfi`` command that runs the stage alone (``hfi feedback ingest``)."""
    batch: bool = False
    """Part of a labelling batch: the feedback-collection DAG runs these stages."""
    needed: Callable[[RunConfig], bool] = lambda cfg: True
    """Whether a run with this config needs the stage; one that does not is marked done, empty."""
    registers: bool = False
    """Its work is registering in MLflow's model registry: without MLflow it fails (and is retried)
    instead of running untracked as the other stages do."""
    checkpoints: bool = False
    """Writes checkpoints (``CHECKPOINT_FILE`` in its folder) that a retry of the step resumes from."""
    parallel: bool = False
    """Trains data-parallel when launched as several processes (``torchrun``, ``accelerate
    launch``): a step on several GPUs runs one process per GPU. Other stages refuse to."""
    collect: Callable[[RunConfig, Path, StageContext], dict[str, Any]] | None = None
    """Reads the feedback inbox: this runs first, bringing new exports in, and the inbox's
    content hash becomes one of the step's inputs (new feedback re-runs it, none skips it)."""


STAGES: dict[str, Stage] = {
    s.name: s
    for s in (
        Stage("generate", stage_generate, (), gpu=True, timeout_hours=2, progress=True, command=("generate",),
              batch=True),
        Stage("publish", stage_publish, ("generate",), gpu=False, timeout_hours=0.25, progress=False,
              command=("feedback", "export"), batch=True),
        Stage("feedback", stage_feedback, ("generate",), gpu=False, timeout_hours=0.5, progress=False,
              command=("feedback", "ingest"), collect=collect_feedback),
        Stage("reward", stage_reward, ("generate", "feedback"), gpu=False, timeout_hours=1, progress=False,
              command=("reward", "train")),
        # Text-only removal (distill.use_token: false) needs no token.
        Stage("invert", stage_invert, ("generate", "reward"), gpu=True, timeout_hours=2, progress=True,
              command=("invert",), needed=lambda cfg: cfg.distill.use_token),
        Stage("distill", stage_distill, ("invert",), gpu=True, timeout_hours=6, progress=True, command=("distill",),
              checkpoints=True, parallel=True),
        Stage("evaluate", stage_evaluate, ("generate", "distill"), gpu=True, timeout_hours=2, progress=False,
              command=("evaluate",)),
        Stage("register", stage_register, ("evaluate", "distill"), gpu=False, timeout_hours=0.25, progress=False,
              command=("register",), registers=True),
    )
}  # fmt: skip


def stage(name: str) -> Stage:
    """The table's row for ``name``; a ValueError listing the stages otherwise."""
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; stages: {list(STAGES)}")
    return STAGES[name]


def upstream_closure(names: list[str] | tuple[str, ...]) -> list[str]:
    """``names`` and every stage they read from, transitively, in table order."""
    want: set[str] = set()
    todo = list(names)
    while todo:
        n = todo.pop()
        if n not in want:
            want.add(n)
            todo += stage(n).upstream
    return [n for n in STAGES if n in want]


def stage_table() -> list[dict[str, Any]]:
    """The table as plain data (``dags/hfi_stages.json``): what the DAGs need, without importing this."""
    return [{"name": s.name, "upstream": list(s.upstream), "gpu": s.gpu, "timeout_hours": s.timeout_hours,
             "progress": s.progress, "batch": s.batch, "parallel": s.parallel} for s in STAGES.values()]  # fmt: skip
