"""What SDD and ESD share: timestep sampling on a sampler trajectory, partial teacher
trajectories, the EMA teacher, trainable-parameter selection, prompt encoding.

Timesteps (METHOD.md, SDD step 1). Training states ``x_t`` are made by running a sampler from
pure noise, so ``t`` must be one of the sampler's own timesteps. We draw ``u ~ Beta(a, b)`` on
(0, 1), take ``k = floor(u * N)`` (clipped to ``0..N-1``) as the number of sampler steps to run,
and label the state with ``timesteps[k]``: the noise level the sampler would denoise next. k = 0
is pure noise labelled with the first (latest) timestep; k = N-1 is the last, nearly clean state,
labelled with the smallest timestep. A state is never labelled with a timestep other than its own
(the reference code, at index 0, trained a fully denoised latent under a near-T label).
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from torch import nn

from hfi_core.config import DistillConfig


def ddim_scheduler(pipe: StableDiffusionPipeline, steps: int) -> DDIMScheduler:
    """DDIM (eta 0) built from the pipeline's own config, with SD's sampling offsets."""
    sched = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False, set_alpha_to_one=False)
    sched.set_timesteps(steps)
    return sched


def sample_step_index(n_steps: int, rng: np.random.Generator, alpha: float = 3.0, beta: float = 3.0) -> int:
    """How many sampler steps to run before training: ``u ~ Beta(alpha, beta)`` mapped onto 0..N-1.

    ``alpha = beta = 1`` is the uniform draw of the reference code; (3, 3) concentrates training
    on the middle of the trajectory, as HFI does. A numpy Generator, because its state can be
    checkpointed and restored exactly.
    """
    return min(n_steps - 1, int(rng.beta(alpha, beta) * n_steps))


@torch.no_grad()
def run_trajectory(
    unet: UNet2DConditionModel,
    sched: DDIMScheduler,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    n_steps: int,
    guidance: float,
    shape: tuple[int, ...],
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``n_steps`` DDIM steps with CFG from pure noise.

    Args:
        cond, uncond: text embeddings, (B, L, D).
        shape: latent shape, (B, C, H, W).
    Returns:
        ``(x_t, t)``: the state after ``n_steps`` steps and its timestep ``sched.timesteps[n_steps]``, (B,).
    """
    return trajectory_states(unet, sched, cond, uncond, [n_steps], guidance, shape, generator)[0]


@torch.no_grad()
def trajectory_states(
    unet: UNet2DConditionModel,
    sched: DDIMScheduler,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    positions: list[int],
    guidance: float,
    shape: tuple[int, ...],
    generator: torch.Generator,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One DDIM trajectory with CFG from pure noise, run to ``max(positions)`` steps; the state
    ``(x_t, t)`` after each position's number of steps, in the order of ``positions``."""
    device, dtype = cond.device, cond.dtype
    x = torch.randn(shape, generator=generator).to(device, dtype) * sched.init_noise_sigma  # (B, C, H, W)
    states = {0: x}  # only the positions asked for are kept
    for i, t in enumerate(sched.timesteps[: max(positions)]):
        inp = sched.scale_model_input(torch.cat([x, x]), t)
        eps_u, eps_c = unet(inp, t, torch.cat([uncond, cond])).sample.chunk(2)
        x = sched.step(eps_u + guidance * (eps_c - eps_u), t, x).prev_sample
        if i + 1 in positions:
            states[i + 1] = x
    return [(states[k], sched.timesteps[k].expand(shape[0]).to(device)) for k in positions]


class Rollouts:
    """Training states for SDD and ESD: ``(cond, x_t, t)`` for each step.

    Every ``reuse`` steps (``DistillConfig.rollout_reuse``) one rollout with the group's concept
    prompt serves the next ``reuse`` steps: their positions are drawn up front and the trajectory
    runs once, to the furthest. The model that rolls out is the one at the group's first step
    (the EMA teacher moves by ~1% a step at decay 0.99). With ``reuse = 1`` this is a fresh
    partial trajectory each step, the concept prompt cycling with the step, as published.
    """

    def __init__(self, s: Setup, cfg: DistillConfig) -> None:
        self.s, self.cfg = s, cfg
        self.reuse: int = cfg.rollout_reuse
        self.states: list[tuple[torch.Tensor, torch.Tensor]] = []  # the current rollout's (x_t, t)

    def state(self, model: UNet2DConditionModel, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(cond, x_t, t)`` for ``step``; steps come in order from a multiple of ``reuse``
        (``checkpoint_every`` is one, so a resumed run starts there too)."""
        s, cfg = self.s, self.cfg
        cond = s.cond_all[(step // self.reuse) % len(s.cond_all)].expand(cfg.batch_size, -1, -1)  # (B, L, D)
        if step % self.reuse == 0:
            ks = [sample_step_index(cfg.sampler_steps, s.rng, cfg.timestep_alpha, cfg.timestep_beta)
                  for _ in range(self.reuse)]  # fmt: skip
            self.states = trajectory_states(
                model, s.sched, cond, s.uncond, ks, cfg.guidance, s.latent_shape, s.gen
            )  # one rollout to max(ks), the state at each k
        return (cond, *self.states[step % self.reuse])


LORA_TARGETS = ["attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"]


def select_trainable(unet: UNet2DConditionModel, which: str, lora_rank: int = 4) -> list[tuple[str, nn.Parameter]]:
    """Freeze the UNet except ``which``: ``attn2`` (cross-attention, SDD's default, ~5% of SD's
    UNet), ``attn2_kv`` (only its key/value projections of the text, so image-side computation
    is untouched), ``attn`` (all attention), ``all``, or ``lora`` (a peft LoRA added on cross-attention,
    whose A/B matrices alone train). Returns the trainable (name, parameter) pairs."""
    if which == "lora":
        from peft import LoraConfig

        unet.requires_grad_(False)
        unet.add_adapter(
            LoraConfig(r=lora_rank, lora_alpha=lora_rank, init_lora_weights="gaussian", target_modules=LORA_TARGETS)
        )
        return [(n, p) for n, p in unet.named_parameters() if "lora_" in n and p.requires_grad]
    chosen = []
    for name, p in unet.named_parameters():
        keep = (
            which == "all"
            or (which == "attn2" and ".attn2." in name)
            or (which == "attn2_kv" and (".attn2.to_k." in name or ".attn2.to_v." in name))
            or (which == "attn" and ".attn" in name)
        )
        p.requires_grad_(keep)
        if keep:
            chosen.append((name, p))
    if not chosen:
        raise ValueError(f"distill.trainable: {which!r} selects no parameter of this UNet")
    return chosen


class EMA:
    """EMA of a module's parameters, kept in a full copy of the module (the teacher).

    ``teacher = decay * teacher + (1 - decay) * student`` after every optimiser step; only
    parameters that train can change, so only those are updated.
    """

    def __init__(self, student: nn.Module, names: list[str], decay: float) -> None:
        self.decay = decay
        self.teacher = copy.deepcopy(student).eval().requires_grad_(False)
        s_params, t_params = dict(student.named_parameters()), dict(self.teacher.named_parameters())
        self.pairs = [(t_params[n], s_params[n]) for n in names]

    @torch.no_grad()
    def update(self) -> None:
        for t, s in self.pairs:
            t.lerp_(s.detach(), 1.0 - self.decay)

    def state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.teacher.named_parameters()}


@torch.no_grad()
def encode_prompts(pipe: StableDiffusionPipeline, prompts: list[str]) -> torch.Tensor:
    """Text embeddings for prompts, (len(prompts), L, D), as the pipeline conditions on them."""
    ids = pipe.tokenizer(
        prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids.to(pipe.text_encoder.device)
    return pipe.text_encoder(ids)[0]


@dataclass
class Setup:
    """Everything an erasure loop needs before its first step (shared by SDD and ESD)."""

    trainable: list[tuple[str, nn.Parameter]]
    opt: torch.optim.Optimizer
    sched: DDIMScheduler
    cond_all: torch.Tensor  # (P, L, D): one embedding per concept prompt, cycled
    uncond: torch.Tensor  # (B, L, D)
    latent_shape: tuple[int, int, int, int]  # (B, C, H, W)
    rng: np.random.Generator  # trajectory positions
    gen: torch.Generator  # noise
    preserve: torch.Tensor | None = None  # (P', L, D): preserve-prompt embeddings, cycled
    anchor: UNet2DConditionModel | None = None  # frozen original, for the preserve term

    @property
    def names(self) -> list[str]:
        return [n for n, _ in self.trainable]

    @property
    def params(self) -> list[nn.Parameter]:
        return [p for _, p in self.trainable]


def prepare(
    pipe: StableDiffusionPipeline,
    cfg: DistillConfig,
    concept_prompts: list[str],
    anchor: UNet2DConditionModel | None = None,
) -> Setup:
    """Freeze all but the trainable parameters, build AdamW, DDIM, prompt embeddings and RNGs.

    With ``cfg.preserve_prompts``, also their embeddings and a frozen copy of the original UNet
    (``anchor``, or a new copy made here, before anything trains).
    """
    unet = pipe.unet
    preserve = cfg.preserve_prompts
    if preserve and anchor is None:
        anchor = copy.deepcopy(unet).eval().requires_grad_(False)
    unet.train()
    trainable = select_trainable(unet, cfg.trainable, cfg.lora_rank)
    size = unet.config.sample_size
    return Setup(
        trainable=trainable,
        opt=torch.optim.AdamW([p for _, p in trainable], lr=cfg.lr, weight_decay=cfg.weight_decay),
        sched=ddim_scheduler(pipe, cfg.sampler_steps),
        cond_all=encode_prompts(pipe, concept_prompts),
        uncond=encode_prompts(pipe, [""]).expand(cfg.batch_size, -1, -1),
        latent_shape=(cfg.batch_size, unet.config.in_channels, size, size),
        rng=np.random.default_rng(cfg.seed),
        gen=torch.Generator().manual_seed(cfg.seed),
        preserve=encode_prompts(pipe, preserve) if preserve else None,
        anchor=anchor if preserve else None,
    )


def preservation_loss(
    unet: UNet2DConditionModel, anchor: UNet2DConditionModel, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor
) -> torch.Tensor:
    """|| eps_theta(x_t, t, c_p) - eps_original(x_t, t, c_p) ||^2 for a preserve prompt c_p, (B, L, D).

    The erasure terms only say what the concept prompts must become; this one says what other
    prompts must stay. x_t is the erasure step's own state: with cross-attention training, what
    moves is mostly how the text is read, so the state matters less than the prompt.
    """
    with torch.no_grad():
        target = anchor(x_t, t, cond).sample  # (B, C, H, W)
    return F.mse_loss(unet(x_t, t, cond).sample.float(), target.float())


def add_preservation(s: Setup, unet: UNet2DConditionModel, loss: torch.Tensor, x_t: torch.Tensor,
                     t: torch.Tensor, step: int, weight: float) -> torch.Tensor:  # fmt: skip
    """``loss`` plus the weighted preserve term of this step's preserve prompt (if any)."""
    if s.preserve is None or s.anchor is None:
        return loss
    cond = s.preserve[step % len(s.preserve)].expand(x_t.shape[0], -1, -1)
    return loss + weight * preservation_loss(unet, s.anchor, x_t, t, cond)


def merge_lora(unet: UNet2DConditionModel) -> tuple[UNet2DConditionModel, list[str]]:
    """A plain UNet (no adapter) with the LoRA fused in, and the names of the weights it changed.

    diffusers' ``unload_lora`` after ``fuse_lora`` drops the fused weights again, so the fused
    base weights are copied into a fresh UNet of the same config instead.
    """
    fused = copy.deepcopy(unet)
    fused.fuse_lora()
    state = {k.replace(".base_layer", ""): v for k, v in fused.state_dict().items() if "lora_" not in k}
    plain = UNet2DConditionModel.from_config(unet.config)
    plain.load_state_dict(state)
    changed = sorted({n.split(".lora_")[0] + ".weight" for n, _ in unet.named_parameters() if "lora_" in n})
    return plain.to(unet.device, unet.dtype).eval(), changed


# ----------------------------------------------------------------------------- checkpoints


CHECKPOINT = "state.pt"
"""One file per checkpoint: weights, optimiser, both RNGs. A kill can never pair one step's
weights with another step's RNG state, and one PUT puts it in the run store whole."""


def save_checkpoint(
    path: Path, step: int, params: dict[str, torch.Tensor], opt: torch.optim.Optimizer,
    rng: np.random.Generator, gen: torch.Generator,
) -> Path:  # fmt: skip
    """Everything a resumed run needs to continue bit for bit, as ``path/state.pt``, written to a
    unique temporary name, fsynced, then renamed over the old one. Returns the file."""
    import tempfile

    path.mkdir(parents=True, exist_ok=True)
    state = {"step": step, "params": params, "opt": opt.state_dict(), "gen": gen.get_state(),
             "rng": json.dumps(rng.bit_generator.state)}  # big ints: JSON text, not pickle  # fmt: skip
    fd, tmp = tempfile.mkstemp(dir=path, prefix=f".{CHECKPOINT}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path / CHECKPOINT)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path / CHECKPOINT


def load_checkpoint(path: Path, opt: torch.optim.Optimizer, rng: np.random.Generator, gen: torch.Generator):
    """Restore optimiser and RNG states in place; returns ``(step, params)`` or ``None``."""
    if not (path / CHECKPOINT).exists():
        return None
    state = torch.load(path / CHECKPOINT, weights_only=True)
    opt.load_state_dict(state["opt"])
    gen.set_state(state["gen"])
    rng.bit_generator.state = json.loads(state["rng"])
    return state["step"], state["params"]
