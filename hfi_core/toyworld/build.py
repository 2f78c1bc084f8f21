"""Train the toy world from scratch: VAE, UNet + text encoder, tiny CLIP, oracle.

``build_world(out, cfg)`` writes, under ``out``:

- ``sd/``      a Stable Diffusion folder: ``StableDiffusionPipeline.from_pretrained(out/"sd")``
- ``clip/``    a ``CLIPModel`` + ``CLIPProcessor`` trained contrastively on the world
- ``oracle/``  the judge, ``Oracle.from_pretrained(out/"oracle")``
- ``build_report.json``, ``losses.png``, ``samples.png`` and ``manifest.json`` (sha256 per file)

Stages run in order and each leaves a finished folder under ``out/.work``; a build that is
stopped and started again skips the stages already done, and the UNet stage resumes from its
last checkpoint. Everything is seeded: the same config gives the same world on the same machine.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from pydantic import Field, model_validator
from tqdm.auto import tqdm
from transformers import CLIPModel, CLIPTextModel, CLIPTokenizer

from hfi_core.config import Section, parse
from hfi_core.toyworld.check import heldout_accuracies, sample_grid
from hfi_core.toyworld.manifest import file_manifest
from hfi_core.toyworld.models import (
    CLIP_MEAN,
    CLIP_STD,
    images_to_tensor,
    make_clip,
    make_clip_processor,
    make_noise_scheduler,
    make_sampling_scheduler,
    make_text_encoder,
    make_unet,
    make_vae,
    vae_roundtrip,
)
from hfi_core.toyworld.oracle import ATTRIBUTES, Oracle
from hfi_core.toyworld.oracle import labels as oracle_labels
from hfi_core.toyworld.render import (
    COLORS,
    LOOKS,
    PHRASES,
    SHAPES,
    Scene,
    caption,
    phrase_of_look,
    render_many,
    sample_scenes,
)
from hfi_core.toyworld.tokenizer import build_tokenizer


class BuildConfig(Section):
    """How the toy world is trained. The defaults are the committed world's."""

    seed: int = 0
    """Seeds every render, initialisation and batch."""
    n_train: int = 12_000
    """Scenes rendered for training (cycled through every shape x colour x style)."""
    n_heldout: int = 540
    """Scenes with another seed, for the accuracies in the build report."""
    vae_steps: int = 1_500
    """VAE optimiser steps (L1 reconstruction + a tiny KL)."""
    vae_batch: int = 32
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6
    """Small, as in SD's VAE: latents stay informative; the scaling factor fixes their scale."""
    unet_steps: int = 7_500
    """UNet + text-encoder optimiser steps: the bulk of the build time."""
    unet_batch: int = 32
    unet_lr: float = 1e-3
    text_lr: float = 2e-3
    """Higher than the UNet's: a text encoder trained from scratch was the slow learner."""
    unet_channels: tuple[int, int, int] = Field((48, 96, 96), strict=False)
    """UNet block widths (a YAML list is fine)."""
    warmup_steps: int = 200
    ema_decay: float = 0.999
    """EMA of UNet and text encoder weights; the EMA weights are what is saved."""
    cond_dropout: float = 0.1
    """Share of captions replaced by the empty prompt, so classifier-free guidance works."""
    min_snr_gamma: float = 5.0
    checkpoint_every: int = 500
    clip_steps: int = 1_500
    clip_batch: int = 128
    clip_lr: float = 1e-3
    oracle_steps: int = 1_200
    oracle_batch: int = 64
    oracle_lr: float = 2e-3
    sample_guidance: float = 5.0
    sample_steps: int = 20

    @model_validator(mode="after")
    def _no_negative_numbers(self) -> BuildConfig:
        for name, v in self:
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v < 0:
                raise ValueError(f"BuildConfig.{name}: must be >= 0, got {v}")
        return self

    @classmethod
    def from_dict(cls, values: dict) -> BuildConfig:
        """Validate and build from a plain dict (e.g. parsed YAML); unknown keys are errors."""
        return parse(cls, values, "BuildConfig")


# ----------------------------------------------------------------------------- data


def clip_normalize(x01: torch.Tensor) -> torch.Tensor:
    """[0, 1] images (N, 3, H, W) -> the CLIP processor's normalisation."""
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x01 - mean) / std


def labels_of(scenes: list[Scene]) -> dict[str, torch.Tensor]:
    """Class indices per attribute, in the oracle's class order."""
    named = [oracle_labels(s) for s in scenes]
    return {k: torch.tensor([names.index(n[k]) for n in named]) for k, names in ATTRIBUTES.items()}


def caption_weights() -> dict[tuple[str, str], list[tuple[str, float]]]:
    """For each look, the phrases a training caption of it may use, with their probabilities.

    Training scenes are spread evenly over the looks, so the model learns p(look | phrase) in
    proportion to p(phrase | look). Captioning a look with ``phrase`` at a rate proportional to
    ``PHRASES[phrase]``'s probability of that look makes the model draw each phrase's mixture
    as written: "at the circus" names 30% of dotted scenes and 10% of each stripe variant's,
    so the model learns it as half dotted, half striped (guidance 5 then draws it about a quarter
    striped: guidance favours the mode the context names most). Every look keeps its own phrase most of the
    time, so it stays the sharper prompt.
    """
    context_rate = 0.3  # the circus's share of the captions of the look it draws most often
    peak = {p: max(w for _, _, w in draws) for p, draws in PHRASES.items() if len(draws) > 1}
    out: dict[tuple[str, str], list[tuple[str, float]]] = {}
    for style, variant in LOOKS:
        shares = [
            (p, context_rate * w / peak[p])
            for p, draws in PHRASES.items()
            if len(draws) > 1
            for s, v, w in draws
            if (s, v) == (style, variant)
        ]
        own = 1.0 - sum(w for _, w in shares)
        out[(style, variant)] = [(phrase_of_look(style, variant), own), *shares]
    return out


def _lr_lambda(warmup: int, total: int, floor: float = 0.1) -> Callable[[int], float]:
    """Linear warm-up, then cosine decay to ``floor`` of the peak."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


class _EMA:
    """Exponential moving average of parameters (warm-up: decay grows as (1+n)/(10+n))."""

    def __init__(self, params: list[torch.Tensor], decay: float) -> None:
        self.params = params
        self.shadow = [p.detach().clone() for p in params]
        self.decay, self.n = decay, 0

    @torch.no_grad()
    def update(self) -> None:
        self.n += 1
        d = min(self.decay, (1 + self.n) / (10 + self.n))
        for s, p in zip(self.shadow, self.params, strict=True):
            s.lerp_(p.detach(), 1 - d)

    @torch.no_grad()
    def copy_to(self, params: list[torch.Tensor]) -> None:
        for s, p in zip(self.shadow, params, strict=True):
            p.copy_(s)


# ----------------------------------------------------------------------------- stages


def train_vae(cfg: BuildConfig, images: torch.Tensor, log: Callable[[str, int, float], None]) -> AutoencoderKL:
    """L1 reconstruction + tiny KL on renders in [-1, 1], (N, 3, 32, 32)."""
    torch.manual_seed(cfg.seed)
    vae = make_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(50, cfg.vae_steps))
    gen = torch.Generator().manual_seed(cfg.seed)
    for step in (bar := tqdm(range(cfg.vae_steps), desc="vae", dynamic_ncols=True)):
        x = images[torch.randint(len(images), (cfg.vae_batch,), generator=gen)]  # (B, 3, 32, 32)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample
        rec = F.l1_loss(recon, x)
        loss = rec + cfg.vae_kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(l1=f"{rec.item():.4f}")
        if step % 25 == 0 or step == cfg.vae_steps - 1:
            log("vae_l1", step, rec.item())
    # SD scales latents to unit variance before the UNet sees them; measure ours the same way.
    with torch.no_grad():
        z = torch.cat([vae.encode(images[i : i + 256]).latent_dist.mean for i in range(0, min(len(images), 2048), 256)])
    vae.register_to_config(scaling_factor=float(1.0 / z.std()))
    return vae.eval()


CaptionTable = dict[tuple[str, str, str, str], tuple[torch.Tensor, torch.Tensor]]


def _caption_table(tokenizer: CLIPTokenizer) -> tuple[CaptionTable, torch.Tensor]:
    """For every (shape, colour, style, variant): the token ids of its caption phrasings (P, L)
    and their probabilities (P,); and the ids of the empty prompt."""
    table = {}
    for (style, variant), phrases in caption_weights().items():
        for shape in SHAPES:
            for color in COLORS:
                texts = [caption(color, shape, p) for p, _ in phrases]
                ids = tokenizer(texts, padding="max_length", return_tensors="pt").input_ids
                table[(shape, color, style, variant)] = (ids, torch.tensor([w for _, w in phrases]))
    empty = tokenizer([""], padding="max_length", return_tensors="pt").input_ids[0]
    return table, empty


def train_unet(
    cfg: BuildConfig,
    vae: AutoencoderKL,
    tokenizer: CLIPTokenizer,
    images: torch.Tensor,
    scenes: list[Scene],
    work: Path,
    log: Callable[[str, int, float], None],
) -> tuple[UNet2DConditionModel, CLIPTextModel]:
    """Train UNet and text encoder together on cached latents; returns their EMA weights.

    Loss: min-SNR-weighted epsilon MSE, SD's noise schedule, 10% empty captions. A checkpoint
    (``work/unet_ckpt.pt``) every ``checkpoint_every`` steps lets a stopped build resume.
    """
    torch.manual_seed(cfg.seed + 1)
    unet, text_encoder = make_unet(cfg.unet_channels), make_text_encoder(tokenizer)
    noise_sched = make_noise_scheduler()
    with torch.no_grad():  # cache the posteriors: the VAE encoder never runs in the loop
        dists = [vae.encode(images[i : i + 256]).latent_dist for i in range(0, len(images), 256)]
        mean = torch.cat([d.mean for d in dists])  # (N, 4, 16, 16)
        std = torch.cat([d.std for d in dists])
    table, empty_ids = _caption_table(tokenizer)
    keys = [(s.shape, s.color, s.style, s.variant) for s in scenes]
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(
        [
            {"params": list(unet.parameters()), "lr": cfg.unet_lr},
            {"params": list(text_encoder.parameters()), "lr": cfg.text_lr},
        ],
        weight_decay=1e-2,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg.warmup_steps, cfg.unet_steps))
    ema = _EMA(params, cfg.ema_decay)
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    start = 0
    ckpt = work / "unet_ckpt.pt"
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=True)
        unet.load_state_dict(state["unet"])
        text_encoder.load_state_dict(state["text_encoder"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        ema.shadow, ema.n = state["ema"], state["ema_n"]
        gen.set_state(state["gen"])
        start = state["step"]
    alphas_cumprod = noise_sched.alphas_cumprod
    scale = vae.config.scaling_factor
    unet.train()
    text_encoder.train()
    bar = tqdm(range(start, cfg.unet_steps), desc="unet", dynamic_ncols=True, initial=start, total=cfg.unet_steps)
    for step in bar:
        idx = torch.randint(len(mean), (cfg.unet_batch,), generator=gen)
        latents = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * scale  # (B, 4, 16, 16)
        picks = [table[keys[i]] for i in idx.tolist()]
        ids = torch.stack([c[torch.multinomial(w, 1, generator=gen).item()] for c, w in picks])  # (B, L)
        drop = torch.rand(cfg.unet_batch, generator=gen) < cfg.cond_dropout
        ids[drop] = empty_ids
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (cfg.unet_batch,), generator=gen)
        noisy = noise_sched.add_noise(latents, noise, t)
        cond = text_encoder(ids).last_hidden_state  # (B, L, 64)
        pred = unet(noisy, t, cond).sample  # (B, 4, 16, 16)
        # min-SNR weighting for epsilon prediction: w = min(SNR, gamma) / SNR
        snr = alphas_cumprod[t] / (1 - alphas_cumprod[t])
        w = torch.clamp(snr, max=cfg.min_snr_gamma) / snr
        loss = (w * (pred - noise).pow(2).mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema.update()
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % 25 == 0 or step == cfg.unet_steps - 1:
            log("unet_loss", step, loss.item())
        if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.unet_steps:
            state = {
                "unet": unet.state_dict(),
                "text_encoder": text_encoder.state_dict(),
                "opt": opt.state_dict(),
                "sched": sched.state_dict(),
                "ema": ema.shadow,
                "ema_n": ema.n,
                "gen": gen.get_state(),
                "step": step + 1,
            }
            torch.save(state, ckpt.with_suffix(".tmp"))
            ckpt.with_suffix(".tmp").replace(ckpt)  # never leave a half-written checkpoint
    ema.copy_to(params)
    return unet.eval(), text_encoder.eval()


def _clip_texts(scenes: list[Scene], gen: torch.Generator) -> tuple[list[str], list[dict[str, str]]]:
    """One caption per scene that names a random non-empty subset of its attributes."""
    texts, named = [], []
    for s in scenes:
        keep = torch.rand(3, generator=gen) < 0.6
        if not keep.any():
            keep[torch.randint(3, (1,), generator=gen)] = True
        attrs: dict[str, str] = {}
        words = ["a"]
        if keep[0]:
            attrs["color"] = s.color
            words.append(s.color)
        if keep[1]:
            attrs["shape"] = s.shape
            words.append(s.shape)
        if keep[2]:  # the look's own phrase: CLIP learns each stripe variant apart
            attrs["style"] = s.style
            attrs["variant"] = s.variant
            words.append(phrase_of_look(s.style, s.variant))
        texts.append(" ".join(words))
        named.append(attrs)
    return texts, named


def train_clip(
    cfg: BuildConfig,
    tokenizer: CLIPTokenizer,
    images01: torch.Tensor,
    scenes: list[Scene],
    log: Callable[[str, int, float], None],
) -> CLIPModel:
    """Contrastive training with soft targets.

    Many images in a batch share a caption ("a red circle"), so the one-hot targets of plain
    CLIP would punish true matches. The target of image i and text j is 1 when every attribute
    text j names agrees with image i, normalised per row (and per column for the text side).
    ``images01``: renders and VAE reconstructions in [0, 1], (N, 3, 32, 32).
    """
    torch.manual_seed(cfg.seed + 3)
    model = make_clip(tokenizer)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.clip_lr, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(100, cfg.clip_steps))
    gen = torch.Generator().manual_seed(cfg.seed + 4)
    for step in (bar := tqdm(range(cfg.clip_steps), desc="clip", dynamic_ncols=True)):
        idx = torch.randint(len(images01), (cfg.clip_batch,), generator=gen)
        batch_scenes = [scenes[i % len(scenes)] for i in idx.tolist()]
        texts, named = _clip_texts(batch_scenes, gen)
        ids = tokenizer(texts, padding="max_length", return_tensors="pt").input_ids
        x = images01[idx] + 0.02 * torch.randn(images01[idx].shape, generator=gen)
        out = model(input_ids=ids, pixel_values=clip_normalize(x.clamp(0, 1)))
        match = torch.tensor(
            [[all(getattr(s, k) == v for k, v in attrs.items()) for attrs in named] for s in batch_scenes],
            dtype=torch.float32,
        )  # (B images, B texts)
        loss_i = -(match / match.sum(1, keepdim=True) * out.logits_per_image.log_softmax(1)).sum(1).mean()
        loss_t = -(match.T / match.T.sum(1, keepdim=True) * out.logits_per_text.log_softmax(1)).sum(1).mean()
        loss = (loss_i + loss_t) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if step % 25 == 0 or step == cfg.clip_steps - 1:
            log("clip_loss", step, loss.item())
    return model.eval()


def train_oracle(
    cfg: BuildConfig, images01: torch.Tensor, labels: dict[str, torch.Tensor], log: Callable[[str, int, float], None]
) -> Oracle:
    """Cross-entropy on three heads; light noise and brightness augmentation."""
    torch.manual_seed(cfg.seed + 5)
    oracle = Oracle()
    opt = torch.optim.AdamW(oracle.parameters(), lr=cfg.oracle_lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(50, cfg.oracle_steps))
    gen = torch.Generator().manual_seed(cfg.seed + 6)
    for step in (bar := tqdm(range(cfg.oracle_steps), desc="oracle", dynamic_ncols=True)):
        idx = torch.randint(len(images01), (cfg.oracle_batch,), generator=gen)
        x = images01[idx] * (0.9 + 0.2 * torch.rand(len(idx), 1, 1, 1, generator=gen))
        x = (x + 0.04 * torch.rand(len(idx), 1, 1, 1, generator=gen) * torch.randn(x.shape, generator=gen)).clamp(0, 1)
        logits = oracle(x)
        loss = sum(F.cross_entropy(logits[k], labels[k][idx % len(labels[k])]) for k in ATTRIBUTES)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if step % 25 == 0 or step == cfg.oracle_steps - 1:
            log("oracle_loss", step, loss.item())
    return oracle.eval()


# ----------------------------------------------------------------------------- the build


def build_world(out: Path, cfg: BuildConfig | None = None) -> dict:
    """Train every toy-world model into ``out`` and return the build report (also written).

    Stages already finished under ``out/.work`` are loaded, not retrained.
    """

    cfg = cfg or BuildConfig()
    out = Path(out)
    work = out / ".work"
    work.mkdir(parents=True, exist_ok=True)
    history: dict[str, list[tuple[int, float]]] = {}
    hist_file = work / "history.json"
    if hist_file.exists():
        history = {k: [tuple(p) for p in v] for k, v in json.loads(hist_file.read_text()).items()}
    times: dict[str, float] = json.loads((work / "times.json").read_text()) if (work / "times.json").exists() else {}

    def log(name: str, step: int, value: float) -> None:
        history.setdefault(name, []).append((step, value))

    def done(stage: str, seconds: float) -> None:
        times[stage] = round(seconds, 1)
        hist_file.write_text(json.dumps(history))
        (work / "times.json").write_text(json.dumps(times))

    tokenizer = build_tokenizer(work / "tokenizer")
    scenes = sample_scenes(cfg.n_train, cfg.seed)
    images = images_to_tensor(render_many(scenes))  # (N, 3, 32, 32) in [-1, 1]

    if not (work / "vae" / "config.json").exists():
        t0 = time.time()
        history.pop("vae_l1", None)
        train_vae(cfg, images, log).save_pretrained(work / "vae")
        done("vae", time.time() - t0)
    vae = AutoencoderKL.from_pretrained(work / "vae").eval()

    if not (work / "recon.pt").exists():
        torch.save(vae_roundtrip(vae, images), work / "recon.pt")
    recon = torch.load(work / "recon.pt", weights_only=True)
    both01 = (torch.cat([images, recon]) + 1) / 2  # renders then reconstructions, [0, 1]

    if not (work / "oracle" / "config.json").exists():
        t0 = time.time()
        history.pop("oracle_loss", None)
        train_oracle(cfg, both01, {k: torch.cat([v, v]) for k, v in labels_of(scenes).items()}, log).save_pretrained(
            work / "oracle"
        )
        done("oracle", time.time() - t0)

    if not (work / "clip" / "config.json").exists():
        t0 = time.time()
        history.pop("clip_loss", None)
        train_clip(cfg, tokenizer, both01, scenes, log).save_pretrained(work / "clip")
        done("clip", time.time() - t0)

    if not (work / "unet" / "config.json").exists():
        t0 = time.time()
        unet, text_encoder = train_unet(cfg, vae, tokenizer, images, scenes, work, log)
        unet.save_pretrained(work / "unet")
        text_encoder.save_pretrained(work / "text_encoder")
        (work / "unet_ckpt.pt").unlink(missing_ok=True)
        done("unet", time.time() - t0)  # after a resume: the time since the resume

    # Assemble the published folders from the finished stages.
    for name in ("sd", "clip", "oracle"):
        shutil.rmtree(out / name, ignore_errors=True)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=CLIPTextModel.from_pretrained(work / "text_encoder"),
        tokenizer=tokenizer,
        unet=UNet2DConditionModel.from_pretrained(work / "unet"),
        scheduler=make_sampling_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out / "sd")
    clip = CLIPModel.from_pretrained(work / "clip")
    clip.save_pretrained(out / "clip")
    make_clip_processor(tokenizer).save_pretrained(out / "clip")
    shutil.copytree(work / "oracle", out / "oracle")

    heldout = sample_scenes(cfg.n_heldout, cfg.seed + 1000)
    report = {
        "config": cfg.model_dump(mode="json"),
        "seconds": times,
        "final_losses": {k: v[-1][1] for k, v in history.items() if v},
        "params": {
            "unet": sum(p.numel() for p in pipe.unet.parameters()),
            "text_encoder": sum(p.numel() for p in pipe.text_encoder.parameters()),
            "vae": sum(p.numel() for p in vae.parameters()),
            "clip": sum(p.numel() for p in clip.parameters()),
            "oracle": sum(p.numel() for p in Oracle.from_pretrained(out / "oracle").parameters()),
        },
        "heldout": heldout_accuracies(out, heldout),
        "torch": torch.__version__,
    }
    _plot_losses(history, out / "losses.png")
    sample_grid(out, out / "samples.png", guidance=cfg.sample_guidance, steps=cfg.sample_steps)
    (out / "build_report.json").write_text(json.dumps(report, indent=2))
    (out / "manifest.json").write_text(json.dumps(file_manifest(out), indent=2))
    return report


def _plot_losses(history: dict[str, list[tuple[int, float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [k for k, v in history.items() if v]
    fig, axes = plt.subplots(1, max(1, len(names)), figsize=(3.2 * max(1, len(names)), 2.6))
    for ax, name in zip(np.atleast_1d(axes), names, strict=True):
        steps, values = zip(*history[name], strict=True)
        ax.plot(steps, values, lw=0.8)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.set_yscale("log")
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
