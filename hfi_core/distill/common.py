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

import contextlib
import copy
import json
import os
from collections.abc import Iterator
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
        batch = s.latent_shape[0]  # this process's share of the step's batch
        cond = s.cond_all[(step // self.reuse) % len(s.cond_all)].expand(batch, -1, -1)  # (B, L, D)
        if step % self.reuse == 0:
            ks = [sample_step_index(cfg.sampler_steps, s.rng, cfg.timestep_alpha, cfg.timestep_beta)
                  for _ in range(self.reuse)]  # fmt: skip
            self.states = trajectory_states(
                model, s.sched, cond, s.uncond, ks, cfg.guidance, s.latent_shape, s.gen
            )  # one rollout to max(ks), the state at each k
        return (cond, *self.states[step % self.reuse])


def autocast(module: nn.Module, mode: str) -> contextlib.AbstractContextManager:
    """Mixed precision for a training step: bf16 autocast over the fp32 weights (the optimiser's
    master copy and the EMA stay fp32; bf16 has fp32's range, so no loss scaler is needed).
    ``auto``: on CUDA only, where bf16 tensor cores run it at several times fp32's (TF32's)
    speed; a CPU computes bf16 slowly."""
    device = next(module.parameters()).device
    if mode == "bf16" or (mode == "auto" and device.type == "cuda"):
        # No weight cache: autocast caches the bf16 cast of a trainable parameter by tensor, and
        # ``Weights.applied`` swaps a parameter's data under it (the teacher's, the original's);
        # a cached cast would be the other model's. Each weight is read once per forward anyway.
        return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False)
    return contextlib.nullcontext()


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


class Weights:
    """Other values for some of a module's parameters, swapped in only while they are needed.

    SDD's EMA teacher and the frozen original that ESD and the anchor term read differ from the
    model in training only in the parameters that train (cross-attention: about 10% of SD's
    UNet). Keeping just those values, and swapping them into the one UNet for a forward pass,
    gives the same predictions bit for bit as a second full copy, at a tenth of its memory
    (3.4 GB saved per copy at SD v1.4's size, fp32).
    """

    def __init__(self, module: nn.Module, names: list[str]) -> None:
        params = dict(module.named_parameters())
        self.names = list(names)
        self.params = [params[n] for n in self.names]
        self.values = [p.detach().clone() for p in self.params]  # the module's values now
        self._swapped = False

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The module computes with these values inside the block, with its own outside. A graph
        built before the block stays valid: backward runs after it, on the module's own values."""
        assert not self._swapped, "Weights.applied is not re-entrant"
        self._swap()
        try:
            yield
        finally:
            self._swap()

    @torch.no_grad()
    def _swap(self) -> None:
        for i, p in enumerate(self.params):
            p.data, self.values[i] = self.values[i], p.data  # pointers, no copy
        self._swapped = not self._swapped

    def state(self) -> dict[str, torch.Tensor]:
        assert not self._swapped, "Weights.state inside applied()"
        return {n: v.clone() for n, v in zip(self.names, self.values, strict=True)}

    def load(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for n, v in zip(self.names, self.values, strict=True):
                v.copy_(state[n])

    def copy_into(self, module: nn.Module) -> nn.Module:
        """Write these values into ``module`` (a model with the same parameter names) for good."""
        assert not self._swapped, "copy_into inside applied()"
        return assign(module, dict(zip(self.names, self.values, strict=True)))


def assign(module: nn.Module, values: dict[str, torch.Tensor]) -> nn.Module:
    """Copy ``values`` into the module's parameters of those names."""
    params = dict(module.named_parameters())
    with torch.no_grad():
        for n, v in values.items():
            params[n].copy_(v)
    return module


def start_from(unet: nn.Module, names: list[str], init: dict[str, torch.Tensor], source: str) -> None:
    """Set the trainable parameters ``names`` to ``init`` (a champion's trained values) after
    ``prepare``, so that ``Setup.original`` (the preserve term's and ESD's reference) stays the base.

    Raises:
        ValueError: when ``init`` does not hold exactly the parameters that train, naming ``source``.
    """
    if missing := sorted(set(names) - set(init)) or sorted(set(init) - set(names)):
        raise ValueError(f"{source}: its parameters differ from those that train here, e.g. {missing[0]!r} "
                         "(another trainable setting or base model?)")  # fmt: skip
    assign(unet, {n: init[n] for n in names})


class EMA(Weights):
    """SDD's teacher: an EMA of the student's trained parameters, ``teacher = decay * teacher +
    (1 - decay) * student`` after every optimiser step. Only parameters that train can change,
    so only those are kept; inside ``applied()`` the student computes as the teacher."""

    def __init__(self, student: nn.Module, names: list[str], decay: float) -> None:
        super().__init__(student, names)
        self.decay = decay

    @torch.no_grad()
    def update(self) -> None:
        assert not self._swapped, "EMA.update inside applied(): the student's values are swapped out"
        for v, p in zip(self.values, self.params, strict=True):
            v.lerp_(p.detach(), 1.0 - self.decay)


def prompt_ids(pipe: StableDiffusionPipeline, prompts: list[str]) -> torch.Tensor:
    """Token ids of prompts, (len(prompts), L), padded and cut as the pipeline does, on the text encoder's device.

    A multi-vector token is spelled out first (``<t>`` -> ``<t> <t>_1 ...``), as the pipeline's
    own call does: without it, only the token's first vector would condition the model.
    """
    if hasattr(pipe, "maybe_convert_prompt"):
        prompts = pipe.maybe_convert_prompt(list(prompts), pipe.tokenizer)
    return pipe.tokenizer(
        prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids.to(pipe.text_encoder.device)


@torch.no_grad()
def encode_prompts(pipe: StableDiffusionPipeline, prompts: list[str]) -> torch.Tensor:
    """Text embeddings for prompts, (len(prompts), L, D), as the pipeline conditions on them."""
    return pipe.text_encoder(prompt_ids(pipe, prompts))[0]


@dataclass(frozen=True)
class Replicas:
    """Data parallelism over processes (``accelerate launch``, ``torchrun``): each of ``world``
    processes rolls out ``batch_size / world`` trajectories a step from its own noise, on the
    same trajectory positions, and the gradients are averaged before the step. So N processes
    train on as many rollouts as one, and every process holds the same student and EMA."""

    rank: int = 0
    world: int = 1

    @staticmethod
    def current() -> Replicas:
        """This process's place in the process group that the launcher set up, if any."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return Replicas(dist.get_rank(), dist.get_world_size())
        return Replicas()

    def agree(self, value: int, what: str) -> None:
        """Raise unless every process holds the same ``value`` (a mismatch would hang the run)."""
        if self.world == 1:
            return
        import torch.distributed as dist

        both = torch.tensor([value, -value], dtype=torch.float64)
        dist.all_reduce(both, op=dist.ReduceOp.MAX)  # (max, -min)
        if both[0] != -both[1]:
            raise RuntimeError(f"data-parallel processes disagree on {what}: {int(-both[1])}..{int(both[0])}")

    def average(self, tensors: list[torch.Tensor]) -> None:
        """Replace each tensor by its mean over the processes, in place (one flat all-reduce)."""
        if self.world == 1 or not tensors:
            return
        import torch.distributed as dist

        flat = torch.cat([t.detach().reshape(-1).float() for t in tensors])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for t in tensors:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()


def mean_losses(s: Setup, losses: list[torch.Tensor]) -> list[float]:
    """Per-step losses, averaged over the processes, read back from the device once."""
    if not losses:
        return []
    stacked = torch.stack(losses).float()
    s.replicas.average([stacked])
    return [float(x) for x in stacked.cpu()]


RANK_SEED = 1_000_003
"""Process r draws its noise from seed ``distill.seed + r * RANK_SEED``: process 0 is the
one-process run's stream."""


@dataclass
class Setup:
    """Everything an erasure loop needs before its first step (shared by SDD and ESD)."""

    trainable: list[tuple[str, nn.Parameter]]
    opt: torch.optim.Optimizer
    sched: DDIMScheduler
    cond_all: torch.Tensor  # (P, L, D): one embedding per concept prompt, cycled
    uncond: torch.Tensor  # (B, L, D)
    latent_shape: tuple[int, int, int, int]  # (B, C, H, W)
    rng: np.random.Generator  # trajectory positions (the same on every process)
    gen: torch.Generator  # noise (this process's own)
    original: Weights  # the trained parameters' values before training: ESD's target, the anchor
    preserve: torch.Tensor | None = None  # (P', L, D): preserve-prompt embeddings, cycled
    replicas: Replicas = Replicas()  # the data-parallel processes this one trains with

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
    size: tuple[int | None, int | None] | None = None,
) -> Setup:
    """Freeze all but the trainable parameters, build AdamW, DDIM, prompt embeddings and RNGs,
    and keep the trainable parameters' original values (``Setup.original``).

    Args:
        size: training images' (height, width) in pixels; ``None``: the model's native size.
            Train at the size the model is sampled at (``generation.height``/``width``; a
            ``None`` in it is the native size).
    """
    unet = pipe.unet
    preserve = cfg.preserve_prompts
    replicas = Replicas.current()
    if cfg.batch_size % replicas.world:
        raise ValueError(f"distill.batch_size: {cfg.batch_size} does not split over {replicas.world} processes")
    batch = cfg.batch_size // replicas.world  # this process's share of every step's rollouts
    unet.train()
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    trainable = select_trainable(unet, cfg.trainable, cfg.lora_rank)
    factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    native = unet.config.sample_size * factor
    h, w = ((size[0] or native) // factor, (size[1] or native) // factor) if size else (unet.config.sample_size,) * 2
    return Setup(
        trainable=trainable,
        opt=torch.optim.AdamW([p for _, p in trainable], lr=cfg.lr, weight_decay=cfg.weight_decay),
        sched=ddim_scheduler(pipe, cfg.sampler_steps),
        cond_all=encode_prompts(pipe, concept_prompts),
        uncond=encode_prompts(pipe, [""]).expand(batch, -1, -1),
        latent_shape=(batch, unet.config.in_channels, h, w),
        rng=np.random.default_rng(cfg.seed),
        gen=torch.Generator().manual_seed(cfg.seed + RANK_SEED * replicas.rank),
        original=Weights(unet, [n for n, _ in trainable]),
        preserve=encode_prompts(pipe, preserve) if preserve else None,
        replicas=replicas,
    )


def preservation_loss(
    unet: UNet2DConditionModel, original: Weights, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor
) -> torch.Tensor:
    """|| eps_theta(x_t, t, c_p) - eps_original(x_t, t, c_p) ||^2 for a preserve prompt c_p, (B, L, D).

    The erasure terms only say what the concept prompts must become; this one says what other
    prompts must stay. x_t is the erasure step's own state: with cross-attention training, what
    moves is mostly how the text is read, so the state matters less than the prompt.
    """
    with torch.no_grad(), original.applied():
        target = unet(x_t, t, cond).sample  # (B, C, H, W), the original model's prediction
    return F.mse_loss(unet(x_t, t, cond).sample.float(), target.float())


def erasure_loss(s: Setup, unet: UNet2DConditionModel, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                 target: torch.Tensor, step: int, weight: float) -> torch.Tensor:  # fmt: skip
    """|| eps_theta(x_t, t, cond) - target ||^2, plus ``weight`` x the preserve term of this step's
    preserve prompt c_p (``preservation_loss``) when there is one.

    The two predictions that train, on ``cond`` and on c_p, run as one forward of batch 2B: one
    graph and one backward instead of two, about 10% of an SDD step on a CPU (more on a GPU,
    where a batch of 2B costs little more than B). Only the original model's prediction on c_p
    runs apart: it needs the original weights swapped in.
    """
    if s.preserve is None or weight == 0:
        return F.mse_loss(unet(x_t, t, cond).sample.float(), target.float())
    c_p = s.preserve[step % len(s.preserve)].expand(x_t.shape[0], -1, -1)  # (B, L, D)
    with torch.no_grad(), s.original.applied():
        anchor = unet(x_t, t, c_p).sample  # (B, C, H, W), the original model's prediction
    pred, pred_p = unet(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([cond, c_p])).sample.chunk(2)
    return F.mse_loss(pred.float(), target.float()) + weight * F.mse_loss(pred_p.float(), anchor.float())


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
