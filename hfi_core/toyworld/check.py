"""Measure a toy world: does the model draw what its captions ask, as the oracle sees it?

``check_world(world)`` generates ``n`` images per prompt group with fixed seeds and reports,
per group, the share of images the oracle puts in each style and its shape and colour accuracy;
plus the oracle's style accuracy on VAE-decoded held-out renders and tiny CLIP's zero-shot
style accuracy on held-out renders. ``hfi toyworld check --json`` prints exactly this.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionPipeline
from transformers import CLIPModel, CLIPProcessor

from hfi_core.embeddings import image_embeddings, text_embeddings
from hfi_core.sampling import sample as draw
from hfi_core.toyworld.models import images_to_tensor, tensor_to_images, vae_roundtrip
from hfi_core.toyworld.oracle import ATTRIBUTES, Oracle
from hfi_core.toyworld.oracle import labels as oracle_labels
from hfi_core.toyworld.render import (
    COLORS,
    CONTEXT_STRIPED,
    EXPLICIT_STRIPED,
    IMPLICIT_STRIPED,
    SHAPES,
    STRIPES,
    STYLE_PHRASES,
    STYLES,
    Scene,
    caption,
    render_many,
    sample_scenes,
)

CHECK_SEED = 10_000  # evaluation seeds start here; the build never samples with these


@dataclass(frozen=True)
class PromptGroup:
    """Prompts of one caption phrase over every (colour, shape), and the style they ask for."""

    name: str
    phrase: str
    style: str

    def prompts(self, n: int) -> list[tuple[str, str, str]]:
        """``n`` (prompt, colour, shape) triples, cycling through the 9 colour x shape pairs."""
        combos = [(c, s) for c in COLORS for s in SHAPES]
        return [(caption(c, s, self.phrase), c, s) for c, s in (combos[i % len(combos)] for i in range(n))]


def check_groups() -> list[PromptGroup]:
    """The groups of ``hfi toyworld check``: explicit, each implicit phrasing, each context,
    dotted, plain."""
    groups = [PromptGroup("explicit", EXPLICIT_STRIPED, "striped")]
    groups += [PromptGroup(f"implicit:{p}", p, "striped") for p in IMPLICIT_STRIPED]
    groups += [PromptGroup(f"context:{p}", p, "striped") for p in CONTEXT_STRIPED]
    groups += [PromptGroup("dotted", STYLE_PHRASES["dotted"][0], "dotted")]
    groups += [PromptGroup("plain", STYLE_PHRASES["plain"][0], "plain")]
    return groups


def load_pipeline(sd_dir: Path) -> StableDiffusionPipeline:
    """The world's SD pipeline with DPM-Solver++ (20 steps are enough for it)."""
    pipe = StableDiffusionPipeline.from_pretrained(sd_dir, use_safetensors=True)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample(
    pipe: StableDiffusionPipeline,
    prompts: list[str],
    seeds: list[int],
    *,
    guidance: float = 5.0,
    steps: int = 20,
    desc: str | None = None,
) -> np.ndarray:
    """One image per (prompt, seed); uint8 (N, H, W, 3): the pipeline's own sampling loop
    (``hfi_core.sampling``) at the check's settings."""
    return draw(pipe, prompts, seeds, steps=steps, guidance=guidance, desc=desc)


def _group_stats(oracle: Oracle, images: np.ndarray, colors: list[str], shapes: list[str]) -> dict[str, float]:
    pred = oracle.predict(images)
    stats = {s: float(np.mean([p == s for p in pred["style"]])) for s in STYLES}
    striped = [v for st, v in zip(pred["style"], pred["stripes"], strict=True) if st == "striped"]
    for v in STRIPES:  # which variants the striped images show, as shares of the whole group
        stats[f"striped:{v}"] = float(sum(x == v for x in striped) / max(1, len(pred["style"])))
    stats["shape_acc"] = float(np.mean([p == s for p, s in zip(pred["shape"], shapes, strict=True)]))
    stats["color_acc"] = float(np.mean([p == c for p, c in zip(pred["color"], colors, strict=True)]))
    return stats


@torch.no_grad()
def heldout_accuracies(world: Path, scenes: list[Scene]) -> dict[str, float]:
    """Oracle accuracy on renders and on their VAE reconstructions; CLIP zero-shot on renders."""
    world = Path(world)
    oracle = Oracle.from_pretrained(world / "oracle", use_safetensors=True).eval()
    vae = AutoencoderKL.from_pretrained(world / "sd" / "vae", use_safetensors=True).eval()
    renders = render_many(scenes)
    decoded = tensor_to_images(vae_roundtrip(vae, images_to_tensor(renders)))
    out: dict[str, float] = {}
    for name, imgs in (("render", renders), ("decoded", decoded)):
        pred = oracle.predict(imgs)
        truth = [oracle_labels(s) for s in scenes]
        for k in ATTRIBUTES:
            out[f"oracle_{k}_acc_{name}"] = float(np.mean([p == t[k] for p, t in zip(pred[k], truth, strict=True)]))
    zs = clip_zero_shot_style(world / "clip", renders)
    out["clip_zero_shot_style_acc"] = float(np.mean([p == s.style for p, s in zip(zs, scenes, strict=True)]))
    zs = clip_zero_shot_style(world / "clip", decoded)
    out["clip_zero_shot_style_acc_decoded"] = float(np.mean([p == s.style for p, s in zip(zs, scenes, strict=True)]))
    return out


def clip_zero_shot_style(clip_dir: Path, images: np.ndarray) -> list[str]:
    """Each image's style by CLIP zero-shot: nearest mean text embedding of the style's phrases."""
    model = CLIPModel.from_pretrained(clip_dir, use_safetensors=True).eval()
    processor = CLIPProcessor.from_pretrained(clip_dir)
    # (3, D): one prompt ensemble per style, as CLIP's zero-shot recipe does with templates
    text = torch.stack(
        [
            F.normalize(text_embeddings(model, processor, [f"a {p}" for p in STYLE_PHRASES[s]]).mean(0), dim=0)
            for s in STYLES
        ]
    )
    img = image_embeddings(model, processor, images)  # (N, D)
    return [STYLES[i] for i in (img @ text.T).argmax(-1).tolist()]


def check_world(
    world: Path,
    n: int = 64,
    *,
    guidance: float = 5.0,
    steps: int = 20,
    seed: int = CHECK_SEED,
    show_progress: bool = True,
) -> dict:
    """Generate ``n`` images per check group (seeds ``seed .. seed+n-1``) and judge them.

    Returns ``{"groups": {name: {"striped", "dotted", "plain", "striped:<variant>", "shape_acc",
    "color_acc"}},
    "oracle_style_acc_decoded", "clip_zero_shot_style_acc", "settings"}``.
    """
    world = Path(world)
    pipe = load_pipeline(world / "sd")
    oracle = Oracle.from_pretrained(world / "oracle", use_safetensors=True).eval()
    seeds = list(range(seed, seed + n))
    groups = {}
    for g in check_groups():
        triples = g.prompts(n)
        images = sample(
            pipe, [p for p, _, _ in triples], seeds, guidance=guidance, steps=steps,
            desc=g.name if show_progress else None,
        )  # fmt: skip
        groups[g.name] = _group_stats(oracle, images, [c for _, c, _ in triples], [s for _, _, s in triples])
    heldout = heldout_accuracies(world, sample_scenes(540, seed + 1))
    return {
        "groups": groups,
        "oracle_style_acc_decoded": heldout["oracle_style_acc_decoded"],
        "clip_zero_shot_style_acc": heldout["clip_zero_shot_style_acc"],
        "heldout": heldout,
        "settings": {"n": n, "guidance": guidance, "steps": steps, "seed": seed, "scheduler": "DPMSolverMultistep"},
    }


def sample_grid(world: Path, path: Path, *, guidance: float = 5.0, steps: int = 20, per_group: int = 9) -> None:
    """A PNG grid: one row per check group, one column per (colour, shape), seeds fixed."""
    from PIL import Image

    pipe = load_pipeline(Path(world) / "sd")
    rows = []
    for g in check_groups():
        prompts = [p for p, _, _ in g.prompts(per_group)]
        rows.append(
            sample(pipe, prompts, list(range(CHECK_SEED, CHECK_SEED + per_group)), guidance=guidance, steps=steps)
        )
    grid = np.concatenate([np.concatenate(list(r), axis=1) for r in rows], axis=0)  # (rows*32, cols*32, 3)
    Image.fromarray(grid).resize((grid.shape[1] * 3, grid.shape[0] * 3), Image.NEAREST).save(path)
