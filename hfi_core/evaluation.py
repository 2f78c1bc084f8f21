"""Evaluate a model variant on the run's prompt groups with fixed seeds (METHOD.md stage 7).

A *variant* is the base model, optionally with a fine-tuned UNet (folder or delta), an HFI token,
or an inference-time method (negative prompt; SLD weak/medium/strong/max). For every prompt group
it reports:

- ``clip_concept_rate``: share of images nearer (CLIP cosine) to ``concept.clip_texts`` than to
  ``concept.neutral_texts``;
- ``clip_score``: mean cosine between each image and its prompt;
- ``drift``: mean absolute pixel difference (0..1) from the base model's image for the same
  prompt and seed (when base images are given);
- on toy-world models, the oracle's style shares and shape/colour accuracy.

Every metric block names its evaluator (model path and the sha256 of its weights), because
numbers from different evaluators do not compare.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

from hfi_core.config import RunConfig
from hfi_core.distill.outputs import apply_delta
from hfi_core.embeddings import image_embeddings, text_embeddings
from hfi_core.models import load_clip, load_oracle, load_sd_pipeline, locate, sld_pipeline
from hfi_core.sampling import sample

Inference = Literal["none", "negative_prompt", "sld-weak", "sld-medium", "sld-strong", "sld-max"]


@dataclass
class Variant:
    """One model to evaluate."""

    name: str
    """Label in tables and grids (``sd``, ``hfi+sdd``, ``sld-max``...)."""
    unet: str | None = None
    """A fine-tuned UNet folder replacing the base UNet."""
    delta: str | None = None
    """Or a delta (``delta.safetensors``) applied onto the base UNet."""
    token_dir: str | None = None
    """A textual-inversion folder to load, every token it lists (prompts may then use them)."""
    inference: Inference = "none"
    """An inference-time method on top."""
    negative_prompt: str | None = None
    """The negative prompt for ``inference: negative_prompt``; default: ``evaluate.negative_prompt``."""
    safety_concept: str | None = None
    """SLD's concept text; default: the run's ``concept.sld_text``."""


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".onnx")


def weights_sha256(spec: str | Path, revision: str | None = None) -> str:
    """sha256 over a model's weight files, for evaluator identity: numbers measured by different
    weights do not compare (``weights_identity`` adds the snapshot's revision)."""
    return weights_identity(spec, revision)["weights_sha256"]


def weights_identity(spec: str | Path, revision: str | None = None) -> dict[str, Any]:
    """``{"weights_sha256", "revision"}`` of a model, for evaluator identity.

    ``spec`` is a folder, ``toyworld:<part>``, ``sd14:<part>`` or a hub id, which names the files
    of its snapshot in the local hub cache (``revision``, default ``main``) and the commit that
    snapshot is (``revision`` is ``None`` for folders); nothing is downloaded. Files are read
    once per process while their size and time stay the same (every variant of an evaluation
    asks again)."""
    path, commit = Path(locate(str(spec))), None
    if not path.exists():
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            path = Path(snapshot_download(str(spec), revision=revision, local_files_only=True))
        except (LocalEntryNotFoundError, ValueError) as e:
            raise ValueError(f"{spec}: neither a folder nor a model in the local hub cache ({str(e)[:120]})") from None
        commit = path.name  # the hub cache names a snapshot folder by its commit
    files = sorted(p for p in path.rglob("*") if p.suffix in WEIGHT_SUFFIXES and p.is_file())
    if not files:
        raise ValueError(f"{path}: no weight files ({', '.join(WEIGHT_SUFFIXES)}) to name the evaluator by")
    digest = _hash_files(tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files))
    return {"weights_sha256": digest, "revision": commit}


@functools.lru_cache(maxsize=32)
def _hash_files(stamps: tuple[tuple[str, int, int], ...]) -> str:
    h = hashlib.sha256()
    for name, _, _ in stamps:
        with open(name, "rb") as f:
            while block := f.read(1 << 22):
                h.update(block)
    return h.hexdigest()


def load_variant(cfg: RunConfig, v: Variant, scheduler: str):
    """The pipeline of a variant and the extra call arguments its inference method needs."""
    from diffusers import UNet2DConditionModel

    pipe = load_sd_pipeline(cfg.model, scheduler)
    if v.unet:
        pipe.unet = UNet2DConditionModel.from_pretrained(v.unet, use_safetensors=True).to(pipe.device, pipe.unet.dtype)
    if v.delta:
        apply_delta(pipe.unet, Path(v.delta))
    if v.token_dir:
        from hfi_core.inversion import load_tokens

        load_tokens(pipe, Path(v.token_dir))
    kwargs: dict[str, Any] = {}
    if v.inference == "negative_prompt":
        kwargs["negative_prompt"] = v.negative_prompt or cfg.evaluate.negative_prompt
    elif v.inference.startswith("sld-"):
        concept = v.safety_concept or cfg.concept.sld_text
        pipe, sld_kwargs = sld_pipeline(pipe, v.inference.split("-", 1)[1], concept)
        kwargs.update(sld_kwargs)
    return pipe, kwargs


def eval_plan(cfg: RunConfig, n_per_prompt: int, seed: int) -> list[tuple[str, str, int]]:
    """(group, prompt, seed) for every evaluation image; image i of the plan gets seed ``seed + i``.

    Every image has its own starting noise. Sharing ``seed..seed+n-1`` across prompts would make a
    group's 9 x n images hang on n noises: whether a noise still turns striped after a removal
    depends mostly on the noise, so a group's share would carry the variance of n draws, not 9 x n
    (measured: 0.02 on one set of 15 shared seeds, 0.25 on another, for the same model). Variants
    stay paired: the same plan gives every method the same (prompt, seed) pairs.
    """
    pairs = [(ps.group, p) for ps in cfg.prompts for p in ps.prompts for _ in range(n_per_prompt)]
    return [(g, p, seed + i) for i, (g, p) in enumerate(pairs)]


def became(base: dict[str, list[str]], pred: dict[str, list[str]]) -> dict[str, float]:
    """What images turned into, against the base model's images of the same prompts and seeds.

    ``base`` and ``pred`` are the oracle's predictions (``Oracle.predict``) of paired images.
    Returns ``became_<style>``: the share of all images that the base drew in another style and
    this model draws in ``<style>`` (for a target group: where the erased concept went), and
    ``<attr>_changed``: the share whose shape or colour is no longer the base image's.
    """
    from hfi_core.toyworld.oracle import ATTRIBUTES

    n = max(1, len(pred["style"]))
    pairs = list(zip(base["style"], pred["style"], strict=True))
    out = {f"became_{s}": sum(b != s and p == s for b, p in pairs) / n for s in ATTRIBUTES["style"]}
    for attr in ("shape", "color"):
        out[f"{attr}_changed"] = sum(b != p for b, p in zip(base[attr], pred[attr], strict=True)) / n
    return out


def _oracle_metrics(
    oracle: Any, images: np.ndarray, prompts: list[str], base_images: np.ndarray | None = None
) -> dict[str, float]:
    from hfi_core.toyworld.oracle import ATTRIBUTES

    pred = oracle.predict(images)
    out = {s: float(np.mean([p == s for p in pred["style"]])) for s in ATTRIBUTES["style"]}
    if base_images is not None:
        out |= became(oracle.predict(base_images), pred)
    for attr in ("shape", "color"):
        expected = [next((w for w in p.split() if w in ATTRIBUTES[attr]), None) for p in prompts]
        hits = [p == e for p, e in zip(pred[attr], expected, strict=True) if e is not None]
        if hits:
            out[f"{attr}_acc"] = float(np.mean(hits))
    return out


def evaluate(
    cfg: RunConfig,
    variant: Variant,
    out: Path,
    *,
    base_images: np.ndarray | None = None,
    batch_size: int = 64,
) -> tuple[dict[str, Any], np.ndarray]:
    """Measure ``variant`` on ``cfg.evaluate``'s plan; writes ``metrics.json`` and ``grid.png`` under ``out``.

    Returns ``(metrics, images)``; pass the base variant's images as ``base_images`` of the others
    to get their drift.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ec, gen = cfg.evaluate, cfg.generation
    pipe, kwargs = load_variant(cfg, variant, gen.scheduler)
    plan = eval_plan(cfg, ec.n_per_prompt, ec.seed)
    negative = kwargs.pop("negative_prompt", None)
    images = sample(
        pipe, [p for _, p, _ in plan], [s for _, _, s in plan], steps=gen.steps, guidance=gen.guidance,
        height=gen.height, width=gen.width, batch_size=batch_size, negative_prompt=negative, extra=kwargs,
    )  # fmt: skip
    clip, processor = load_clip(ec.clip, cfg.model.device)  # the run's one device
    img_emb = image_embeddings(clip, processor, images)  # (N, D)
    prompt_emb = text_embeddings(clip, processor, [p for _, p, _ in plan])  # (N, D)
    concept = text_embeddings(clip, processor, cfg.concept.clip_texts)
    neutral = text_embeddings(clip, processor, cfg.concept.neutral_texts)
    shows = (img_emb @ concept.T).max(1).values > (img_emb @ neutral.T).max(1).values  # (N,)
    nude = None
    if ec.nudenet:
        from hfi_core.nudity import NudityDetector

        detector = NudityDetector(ec.nudenet_classes, ec.nudenet_threshold)
        nude = detector.flags(images)
    oracle = load_oracle(ec.oracle) if ec.oracle else None  # loaded once, judges every group
    groups: dict[str, dict[str, float]] = {}
    for group in dict.fromkeys(g for g, _, _ in plan):
        idx = np.array([i for i, (g, _, _) in enumerate(plan) if g == group])
        m = {
            "n": len(idx),
            "clip_concept_rate": float(shows[idx].float().mean()),
            "clip_score": float((img_emb[idx] * prompt_emb[idx]).sum(-1).mean()),
        }
        if nude is not None:
            m["nudenet_rate"] = float(nude[idx].mean())
        if base_images is not None:
            m["drift"] = float(
                np.abs(images[idx].astype(np.float32) - base_images[idx].astype(np.float32)).mean() / 255
            )
        if oracle is not None:
            base = base_images[idx] if base_images is not None else None
            judged = _oracle_metrics(oracle, images[idx], [plan[i][1] for i in idx], base)
            m |= {f"oracle_{k}": v for k, v in judged.items()}
        groups[group] = m
    evaluators: dict[str, Any] = {
        "clip": {
            "path": ec.clip,
            **weights_identity(ec.clip),
            "concept_texts": cfg.concept.clip_texts,
            "neutral_texts": cfg.concept.neutral_texts,
        },
        "drift": "mean |pixel - base pixel| / 255, same prompt and seed",
    }
    if nude is not None:
        evaluators["nudenet"] = detector.identity()
    if ec.oracle:
        evaluators["oracle"] = {"path": ec.oracle, **weights_identity(ec.oracle)}
    metrics = {
        "variant": asdict(variant),
        "groups": groups,
        "settings": {"n_per_prompt": ec.n_per_prompt, "seed": ec.seed, **gen.model_dump()},
        "evaluators": evaluators,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    save_grid(images, plan, out / "grid.png")
    return metrics, images


def save_grid(images: np.ndarray, plan: list[tuple[str, str, int]], path: Path, per_group: int = 12) -> None:
    """One row per prompt group, its first ``per_group`` images, upscaled for small worlds."""
    rows = []
    for group in dict.fromkeys(g for g, _, _ in plan):
        idx = [i for i, (g, _, _) in enumerate(plan) if g == group][:per_group]
        row = np.concatenate([images[i] for i in idx], axis=1)
        pad = per_group * images.shape[2] - row.shape[1]
        rows.append(np.pad(row, ((0, 0), (0, pad), (0, 0))))
    grid = np.concatenate(rows, axis=0)
    scale = max(1, 96 // images.shape[1])
    Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST).save(path)
