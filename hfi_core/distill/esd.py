"""ESD-x: erasing a concept by negative guidance (Gandikota et al.; METHOD.md stage 6).

The original UNet gives eps* (its trained parameters' original values, swapped in: no second
copy). The trained UNet's conditional prediction is pulled to the negatively guided original:

    eps_theta(x_t, c, t)  ->  eps*(x_t, "", t) - eta * (eps*(x_t, c, t) - eps*(x_t, "", t))

with x_t sampled from the model being trained (DDIM, guidance, from pure noise) with the concept
prompt, and only cross-attention training (the "-x" variant). The trained UNet is what is saved.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from tqdm.auto import tqdm

from hfi_core.config import DistillConfig
from hfi_core.distill.common import (
    RANK_SEED,
    Rollouts,
    Weights,
    assign,
    autocast,
    erasure_loss,
    load_checkpoint,
    mean_losses,
    prepare,
    save_checkpoint,
    start_from,
)


@torch.no_grad()
def esd_target(
    unet: UNet2DConditionModel,
    original: Weights,
    x_t: torch.Tensor,
    t: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    eta: float,
) -> torch.Tensor:
    """eps*(x_t, "") - eta * (eps*(x_t, c) - eps*(x_t, "")), (B, C, H, W), eps* the original model."""
    with original.applied():
        e_u, e_c = unet(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([uncond, cond])).sample.chunk(2)
    return e_u - eta * (e_c - e_u)


def train_esd(
    pipe: StableDiffusionPipeline,
    cfg: DistillConfig,
    concept_prompts: list[str],
    work: Path,
    *,
    resume: bool = False,
    show_progress: bool = True,
    on_checkpoint: Callable[[Path], None] | None = None,
    size: tuple[int | None, int | None] | None = None,
    init: dict[str, torch.Tensor] | None = None,
) -> tuple[UNet2DConditionModel, list[str], list[float]]:
    """Erase what ``concept_prompts`` name from ``pipe.unet`` by ESD-x.

    Returns ``(unet, trained_names, losses)`` like ``train_sdd`` (whose arguments it takes);
    ``init`` starts the student there while the frozen copy stays the base.
    """
    unet = pipe.unet
    s = prepare(pipe, cfg, concept_prompts, size)
    names = s.names
    if init is not None:
        start_from(unet, names, init, "distill init")
    start, ckpt = 0, Path(work) / "checkpoint"
    if resume and (restored := load_checkpoint(ckpt, s.opt, s.rng, s.gen)) is not None:
        start, params = restored
        assign(unet, {n: params[f"student.{n}"] for n in names})

    losses, rollouts = [], Rollouts(s, cfg)
    s.replicas.agree(start, "the step to start from (every process must resume from the same checkpoint)")
    if start and s.replicas.world > 1:  # the checkpoint holds process 0's noise: each process re-seeds its own
        s.gen.manual_seed(cfg.seed + RANK_SEED * s.replicas.rank + start)
    for step in tqdm(range(start, cfg.steps), desc="esd", initial=start, total=cfg.steps, disable=not show_progress):
        with autocast(unet, cfg.mixed_precision):
            cond, x_t, t = rollouts.state(unet, step)  # x_t from the model in training, (B, C, H, W)
            target = esd_target(unet, s.original, x_t, t, cond, s.uncond, cfg.esd_eta)
            loss = erasure_loss(s, unet, x_t, t, cond, target, step, cfg.preserve_weight)
        s.opt.zero_grad(set_to_none=True)
        loss.backward()
        s.replicas.average([p.grad for p in s.params if p.grad is not None])  # data-parallel: one gradient
        torch.nn.utils.clip_grad_norm_(s.params, cfg.grad_clip)
        s.opt.step()
        losses.append(loss.detach())  # no sync per step
        if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and s.replicas.rank == 0:
            current = dict(unet.named_parameters())
            saved = save_checkpoint(
                ckpt, step + 1, {f"student.{n}": current[n].detach().clone() for n in names}, s.opt, s.rng, s.gen
            )
            if on_checkpoint is not None:
                on_checkpoint(saved)
    unet.eval()
    return unet, names, mean_losses(s, losses)
