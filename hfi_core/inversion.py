"""Human Feedback Inversion: the soft token v* for the concept as people judge it (METHOD.md stage 4).

    v* = argmin_v  sum_i w_i * E_{t,eps} || eps - eps_theta(z_{i,t}, t, tau(prompt(v))) ||^2,
    z_{i,t} = sqrt(abar_t) z_i + sqrt(1 - abar_t) eps

over the model's own samples x_i for the concept prompts, z_i their VAE latents and w_i their
rewards (standardised, clipped at 0, normalised to mean 1; ``top_k`` keeps only the K highest). Textual
inversion, weighted: only the new token's embedding rows train (``vectors`` of them, spelled
``<t> <t>_1 ...`` in a prompt, as diffusers spells a multi-vector token; each optionally kept within
``max_norm`` times the largest word embedding's norm, by projection after each step). After
every step all other rows are copied back from the original table, so they come out
bit-identical (AdamW's weight decay or any stray gradient cannot move them). Saved as diffusers saves textual inversion
(``learned_embeds.safetensors`` = ``{token: (vectors, D)}``) for ``pipe.load_textual_inversion``.

With several looks (``invert.modes``, ``hfi_core.modes``), each look's images get a token of their
own (``mode_token``: ``<t>``, ``<t-2>``, ...), one file each, listed in ``tokens.json``;
``load_tokens`` loads them all.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, StableDiffusionPipeline
from safetensors.torch import save_file
from tqdm.auto import tqdm

from hfi_core.config import InvertConfig
from hfi_core.distill.common import autocast


def reward_weights(rewards: np.ndarray, top_k: int = 0) -> np.ndarray:
    """Rewards -> per-image weights: standardised, clipped at 0, optionally top-K, normalised to
    mean 1 over the kept.

    Standardising first makes the weights depend only on how the images' rewards compare: a
    Bradley-Terry reward is defined up to an added constant (its last bias gets no gradient),
    and a reward on another scale (MSE on mean labels, BCE probabilities) says the same thing.
    Without it, which images train would be an accident of the reward model's initialisation.
    So the images above the mean reward train, in proportion to how far above it they are.

    Raises:
        ValueError: when every image has the same reward (the feedback tells them not apart).
    """
    r = np.asarray(rewards, dtype=np.float64)
    spread = r.std()
    if not np.isfinite(spread) or spread <= 1e-12 * max(1.0, np.abs(r).max(initial=0.0)):
        raise ValueError(
            f"invert: all {len(r)} images have the same reward; the feedback tells no concept apart to invert"
        )
    w = np.clip((r - r.mean()) / spread, 0.0, None)
    if top_k and top_k < len(w):
        keep = np.zeros_like(w, dtype=bool)
        keep[np.argsort(-w, kind="stable")[:top_k]] = True
        w = np.where(keep, w, 0.0)
    kept = w > 0  # never empty: some reward lies above the mean of unequal rewards
    return w / w[kept].mean()


def spell(token: str, vectors: int) -> str:
    """How a token of ``vectors`` vectors appears in a prompt, as diffusers' loader spells it."""
    return " ".join([token] + [f"{token}_{i}" for i in range(1, vectors)])


def mode_token(token: str, mode: int) -> str:
    """The placeholder of look ``mode`` (0-based): ``<t>`` for the first, ``<t-2>``, ``<t-3>``... after."""
    if mode == 0:
        return token
    return f"{token[:-1]}-{mode + 1}>" if token.endswith(">") else f"{token}-{mode + 1}"


def add_token(pipe: StableDiffusionPipeline, token: str, init_word: str, vectors: int = 1) -> list[int]:
    """Add ``token`` (and ``token_1``... for more vectors) to the tokenizer, grow the embedding
    table, start every new row at ``init_word``'s embedding. Returns the new rows' ids."""
    names = spell(token, vectors).split(" ")
    if any(n in pipe.tokenizer.get_vocab() for n in names) or pipe.tokenizer.add_tokens(names) != len(names):
        raise ValueError(f"invert.token: {token!r} is already in the tokenizer; choose another placeholder")
    pipe.text_encoder.resize_token_embeddings(len(pipe.tokenizer))
    ids = pipe.tokenizer.convert_tokens_to_ids(names)
    init_ids = pipe.tokenizer.encode(init_word, add_special_tokens=False)
    if not init_ids:
        raise ValueError(f"invert.init_word: {init_word!r} encodes to no token")
    table = pipe.text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        table[ids] = table[init_ids].mean(0)  # a multi-token word starts from its mean
    return ids


@torch.no_grad()
def encode_latents(pipe: StableDiffusionPipeline, images: np.ndarray, batch_size: int = 32) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> scaled VAE latents (posterior means), (N, C, H/f, W/f)."""
    out = []
    for i in range(0, len(images), batch_size):
        x = torch.from_numpy(images[i : i + batch_size]).permute(0, 3, 1, 2).float() / 127.5 - 1  # (B, 3, H, W)
        x = x.to(pipe.vae.device, pipe.vae.dtype)
        out.append(pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor)
    return torch.cat(out)


def invert(
    pipe: StableDiffusionPipeline,
    latents: torch.Tensor,
    weights: np.ndarray,
    cfg: InvertConfig,
    init_word: str,
    *,
    token: str | None = None,
    init: torch.Tensor | None = None,
    steps: int | None = None,
    show_progress: bool = True,
) -> tuple[torch.Tensor, list[float]]:
    """Learn v*. ``latents`` (N, C, h, w) of the concept images, ``weights`` (N,) from ``reward_weights``.

    Args:
        init: the token's starting rows (vectors, D), e.g. an earlier night's v* (a warm start);
            ``None``: ``init_word``'s embedding.
        steps: optimiser steps; ``None``: ``cfg.steps``.
    Returns ``(v, losses)``: the learned rows (vectors, D) and the weighted loss per step. The
    pipeline's tokenizer and text encoder keep the new token (``token``, a different placeholder
    than ``cfg.token`` for a look other than the first).
    """
    token = token or cfg.token
    token_ids = add_token(pipe, token, init_word, cfg.vectors)
    te, unet = pipe.text_encoder, pipe.unet
    if init is not None:
        rows = te.get_input_embeddings().weight
        if tuple(init.shape) != (len(token_ids), rows.shape[1]):
            raise ValueError(f"invert: the starting token is {tuple(init.shape)}, the token needs "
                             f"({len(token_ids)}, {rows.shape[1]}): did invert.vectors change?")  # fmt: skip
        with torch.no_grad():
            rows[token_ids] = init.to(rows)
    unet.requires_grad_(False)
    pipe.vae.requires_grad_(False)
    te.requires_grad_(False)
    table = te.get_input_embeddings().weight
    table.requires_grad_(True)
    original = table.detach().clone()
    others = torch.ones(len(table), dtype=torch.bool, device=table.device)
    others[token_ids] = False
    cap = cfg.max_norm * original[others].norm(dim=1).max() if cfg.max_norm else None
    opt = torch.optim.AdamW([table], lr=cfg.lr, weight_decay=0.0)
    noise_sched = DDPMScheduler.from_config(pipe.scheduler.config)
    prompts = [t.format(spell(token, cfg.vectors)) for t in cfg.templates]
    ids = pipe.tokenizer(
        prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids.to(te.device)  # (T, L)
    pool = torch.from_numpy(np.flatnonzero(weights > 0))  # images with weight 0 (top-K) never train
    w = torch.as_tensor(weights, dtype=torch.float32, device=latents.device)
    gen = torch.Generator().manual_seed(cfg.seed)
    losses = []
    te.train()
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()  # the gradient reaches v* through the whole UNet
    steps = cfg.steps if steps is None else steps
    for _ in tqdm(range(steps), desc="invert", disable=not show_progress, dynamic_ncols=True):
        idx = pool[torch.randint(len(pool), (cfg.batch_size,), generator=gen)]
        z = latents[idx]  # (B, C, h, w)
        noise = torch.randn(z.shape, generator=gen).to(z)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (len(idx),), generator=gen).to(z.device)
        with autocast(unet, cfg.mixed_precision):
            cond = te(ids[torch.randint(len(ids), (len(idx),), generator=gen)])[0]  # (B, L, D)
            pred = unet(noise_sched.add_noise(z, noise, t), t, cond).sample
        per_image = F.mse_loss(pred.float(), noise.float(), reduction="none").mean(dim=(1, 2, 3))  # (B,)
        loss = (w[idx] * per_image).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            table[others] = original[others]  # every other row bit-identical, whatever the optimiser did
            if cap is not None:  # project each vector back onto the ball of word-sized embeddings
                norms = table[token_ids].norm(dim=1, keepdim=True)  # (vectors, 1)
                table[token_ids] *= torch.clamp(cap / norms, max=1.0)
        losses.append(loss.detach())  # no sync per step
    te.eval()
    unet.disable_gradient_checkpointing()
    table.requires_grad_(False)
    return table[token_ids].detach().clone(), [float(x) for x in torch.stack(losses).cpu()]  # one sync, at the end


def warm_matches(image_ids: list[str], labels: np.ndarray, earlier: dict[str, int]) -> dict[int, int]:
    """Which earlier look each of tonight's looks continues: ``{look: earlier look}``.

    ``labels`` (N,) is tonight's look of each image (-1: not flagged), ``earlier`` an earlier
    night's ``{image_id: look}``. Look k continues earlier look j when more than half of k's
    images were j's; each earlier look continues at most one look (the best-supported first).
    """
    counts: dict[tuple[int, int], int] = {}
    for image_id, k in zip(image_ids, labels, strict=True):
        if k >= 0 and image_id in earlier:
            pair = (int(k), earlier[image_id])
            counts[pair] = counts.get(pair, 0) + 1
    sizes = {int(k): int((labels == k).sum()) for k in set(labels.tolist()) if k >= 0}
    matched: dict[int, int] = {}
    for (k, j), n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        if k not in matched and j not in matched.values() and 2 * n > sizes[k]:
            matched[k] = j
    return matched


def read_tokens(folder: Path) -> list[tuple[str, torch.Tensor]]:
    """``(token, rows (vectors, D))`` of every token an ``invert`` folder lists, in look order."""
    import json

    from safetensors.torch import load_file

    listed = json.loads((Path(folder) / TOKENS_FILE).read_text())["tokens"]
    return [(t["token"], load_file(str(_token_path(folder, t["file"])))[t["token"]]) for t in listed]


def _token_path(folder: Path, file: str) -> Path:
    """``folder / file`` for a token file that ``tokens.json`` lists: a plain name in the folder, never a path."""
    if "/" in file or "\\" in file or file.startswith("."):
        raise ValueError(f"{Path(folder) / TOKENS_FILE}: token file {file!r} is not a plain file name in the folder")
    return Path(folder) / file


LOOKS_FILE = "looks.json"
"""An ``invert`` folder's ``{image_id: look}`` of the flagged images: what a later night matches its looks by."""


def token_file(mode: int) -> str:
    """The file of look ``mode``'s token: diffusers' default name for the first."""
    return "learned_embeds.safetensors" if mode == 0 else f"learned_embeds-{mode + 1}.safetensors"


TOKENS_FILE = "tokens.json"
"""Lists a folder's tokens and their files, in look order: ``{"tokens": [{"token", "file", ...}]}``."""


def save_token(path: Path, token: str, vectors: torch.Tensor, file: str = "learned_embeds.safetensors") -> Path:
    """Write ``{token: (vectors, D)}`` as diffusers' textual-inversion script does."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    out = path / file
    save_file({token: vectors.detach().float().cpu().reshape(-1, vectors.shape[-1]).contiguous()}, out)
    return out


def load_tokens(pipe: StableDiffusionPipeline, folder: Path) -> list[str]:
    """Load every token of an ``invert`` folder into ``pipe`` (``tokens.json``'s, else the one
    ``learned_embeds.safetensors``); returns the placeholders, in look order."""
    import json

    from safetensors import safe_open

    folder = Path(folder)
    listed = folder / TOKENS_FILE
    if listed.exists():
        files = [t["file"] for t in json.loads(listed.read_text())["tokens"]]
    else:
        files = [token_file(0)]
    tokens = []
    for file in files:
        with safe_open(str(_token_path(folder, file)), framework="pt") as f:
            (token,) = list(f.keys())
        pipe.load_textual_inversion(str(folder), weight_name=file, use_safetensors=True)
        tokens.append(token)
    return tokens
