"""SDD: safe self-distillation (METHOD.md stage 5).

Student theta trains; teacher theta_ema is the EMA of the student; both start from the base UNet.
Each step:

1. pick the next concept prompt c_s (cycled) and a trajectory position k ~ Beta(3, 3);
2. run the EMA teacher from pure noise with c_s (DDIM, eta 0, guidance 3) for k steps: x_t
   (``rollout_reuse`` > 1: one such rollout serves that many steps, ``common.Rollouts``);
3. loss = || sg[eps_theta(x_t, t, "")] - eps_theta(x_t, t, c_s) ||^2  (the student's own
   unconditional prediction, stop-gradient, is the target of its conditional one);
4. AdamW step on the trainable parameters (cross-attention by default), then the EMA update.

Optionally (``distill.preserve_prompts``, not in the paper) an anchor term keeps other prompts'
predictions at the original model's: ``common.preservation_loss``, folded into the step's
trained forward (``common.erasure_loss``).

The EMA teacher is what is saved and evaluated.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from tqdm.auto import tqdm

from hfi_core.config import DistillConfig
from hfi_core.distill.common import (
    EMA,
    RANK_SEED,
    Rollouts,
    assign,
    autocast,
    erasure_loss,
    load_checkpoint,
    mean_losses,
    prepare,
    save_checkpoint,
    start_from,
)


def sdd_loss(
    unet: UNet2DConditionModel, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor
) -> torch.Tensor:
    """|| sg[eps(x_t, t, uncond)] - eps(x_t, t, cond) ||^2, mean over all elements.

    Zero exactly when the model already ignores the concept prompt at (x_t, t).
    """
    return F.mse_loss(unet(x_t, t, cond).sample.float(), sdd_target(unet, x_t, t, uncond).float())


@torch.no_grad()
def sdd_target(unet: UNet2DConditionModel, x_t: torch.Tensor, t: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
    """sg[eps_theta(x_t, t, uncond)], (B, C, H, W): no gradient, so the target moves with theta."""
    return unet(x_t, t, uncond).sample


def train_sdd(
    pipe: StableDiffusionPipeline,
    cfg: DistillConfig,
    concept_prompts: list[str],
    work: Path,
    *,
    resume: bool = False,
    show_progress: bool = True,
    on_checkpoint: Callable[[Path], None] | None = None,
    size: tuple[int | None, int | None] | None = None,
    student_dir: Path | None = None,
    init: dict[str, torch.Tensor] | None = None,
) -> tuple[UNet2DConditionModel, list[str], list[float]]:
    """Erase what ``concept_prompts`` name from ``pipe.unet``.

    Args:
        work: checkpoint folder (``work/checkpoint``); ``resume`` continues from it.
        on_checkpoint: called with each checkpoint file once it is written whole.
        size: the training states' (height, width) in pixels; ``None``: the model's native size.
        student_dir: also save the student there (the teacher is what is returned).
        init: the trained parameters' starting values (a champion's), for student and teacher;
            the preserve term still compares against the base.
    Returns:
        ``(teacher, trained_names, losses)``: ``pipe.unet`` with the EMA teacher's values in
        place, the names of the parameters that trained, and the loss of every step run here.
    """
    unet = pipe.unet
    s = prepare(pipe, cfg, concept_prompts, size)
    names = s.names
    if init is not None:
        start_from(unet, names, init, "distill init")
    ema = EMA(unet, names, cfg.ema_decay)  # the trained parameters' EMA; the rest is shared with the student
    start, ckpt = 0, Path(work) / "checkpoint"
    if resume and (restored := load_checkpoint(ckpt, s.opt, s.rng, s.gen)) is not None:
        start, params = restored
        assign(unet, {n: params[f"student.{n}"] for n in names})
        ema.load({n: params[f"teacher.{n}"] for n in names})

    losses, rollouts = [], Rollouts(s, cfg)
    s.replicas.agree(start, "the step to start from (every process must resume from the same checkpoint)")
    if start and s.replicas.world > 1:  # the checkpoint holds process 0's noise: each process re-seeds its own
        s.gen.manual_seed(cfg.seed + RANK_SEED * s.replicas.rank + start)
    for step in tqdm(range(start, cfg.steps), desc="sdd", initial=start, total=cfg.steps, disable=not show_progress):
        with autocast(unet, cfg.mixed_precision):
            with ema.applied():  # x_t from the EMA teacher's trajectory, (B, C, H, W)
                cond, x_t, t = rollouts.state(unet, step)
            target = sdd_target(unet, x_t, t, s.uncond)
            loss = erasure_loss(s, unet, x_t, t, cond, target, step, cfg.preserve_weight)
        s.opt.zero_grad(set_to_none=True)
        loss.backward()
        s.replicas.average([p.grad for p in s.params if p.grad is not None])  # data-parallel: one gradient
        torch.nn.utils.clip_grad_norm_(s.params, cfg.grad_clip)
        s.opt.step()
        ema.update()
        losses.append(loss.detach())  # no sync per step: read back once, at the end
        if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and s.replicas.rank == 0:
            student = dict(unet.named_parameters())
            params = {f"student.{n}": student[n].detach().clone() for n in names}
            params |= {f"teacher.{n}": v for n, v in ema.state().items()}
            saved = save_checkpoint(ckpt, step + 1, params, s.opt, s.rng, s.gen)
            if on_checkpoint is not None:
                on_checkpoint(saved)  # e.g. copy it to the run store, where a retried step finds it
    unet.eval()
    if student_dir is not None:
        unet.save_pretrained(student_dir)
    return ema.copy_into(unet), names, mean_losses(s, losses)
