"""Load the models a run needs: an SD pipeline, a CLIP model, the toy-world oracle.

The same calls load SD v1.4 from a folder or the hub on a GPU and the toy world on a CPU; the
pipeline's dtype and device follow the ``ModelConfig`` (``auto``: fp16 on CUDA, fp32 on CPU).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
)
from transformers import CLIPModel, CLIPProcessor

from hfi_core.config import ModelConfig

SCHEDULERS = {
    "dpmsolver": DPMSolverMultistepScheduler,
    "ddim": DDIMScheduler,
    "pndm": PNDMScheduler,
    "euler": EulerDiscreteScheduler,
}


def locate(spec: str) -> str:
    """Where a model reference points: ``toyworld:<part>`` -> the committed world's folder;
    ``sd14:<part>`` -> the real-size fixture's (``hfi sd14 fixture``); a
    folder or hub id unchanged. Configs keep the reference as written (see ``config``)."""
    if spec.startswith("toyworld:"):
        from hfi_core.toyworld import default_world

        return str(default_world() / spec.split(":", 1)[1])
    if spec.startswith("sd14:"):
        from hfi_core.sd14 import FIXTURE

        path = FIXTURE / spec.split(":", 1)[1]
        if not path.is_dir():
            raise ValueError(f"{spec}: the real-size fixture is not built ({path}): run `hfi sd14 fixture`")
        return str(path)
    return spec


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` -> float16 on CUDA, float32 elsewhere (CPU half precision is slow and lossy)."""
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]


def model_identity(cfg: ModelConfig) -> str:
    """The string recorded with every image (``ModelConfig.identity``)."""
    return cfg.identity


def load_sd_pipeline(cfg: ModelConfig, scheduler: str = "dpmsolver") -> StableDiffusionPipeline:
    """A Stable Diffusion pipeline on its device, with ``scheduler`` built from its own config.

    The safety checker is left out: measuring (and removing) unsafe content is this tool's job,
    and a checker that blacks out images would hide exactly what is measured.
    """
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            locate(cfg.path),
            revision=cfg.revision,
            dtype=dtype,
            safety_checker=None,
            requires_safety_checker=False,
            use_safetensors=True,  # never a pickle: a folder of .bin files is refused
        )
    except OSError as e:
        if "safetensors" not in str(e):
            raise
        raise ValueError(
            f"model.path {cfg.path}: no .safetensors weights ({str(e).splitlines()[0][:160]}); hfi loads no pickled "
            ".bin weights, which can run code: convert them with save_pretrained(..., safe_serialization=True)"
        ) from None
    pipe.scheduler = SCHEDULERS[scheduler].from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    if device.type == "cuda":
        use_tensor_cores()
        pipe.vae.enable_slicing()  # decode a batch image by image: 64 images at 512 px at once need ~20 GB
    return pipe.to(device)


def use_tensor_cores() -> None:
    """fp32 matrix products and convolutions in TF32 on CUDA (Ampere and later): about 8x the fp32
    rate at a 10-bit mantissa, which diffusion sampling and training do not notice."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def load_clip(path: str, device: str = "auto") -> tuple[CLIPModel, CLIPProcessor]:
    """A CLIP model (eval mode, fp32) and its processor."""
    model = CLIPModel.from_pretrained(locate(path), use_safetensors=True).eval().to(resolve_device(device))
    return model, CLIPProcessor.from_pretrained(locate(path))


def load_oracle(spec: str):
    """The toy world's judge (eval mode), from a folder or ``toyworld:oracle``."""
    from hfi_core.toyworld.oracle import Oracle

    return Oracle.from_pretrained(locate(spec), use_safetensors=True).eval()


def cut_prompts(tokenizer: Any, prompt: str | list[str]) -> str | list[str]:
    """Prompts longer than the text encoder's context cut to it, as SD's pipeline cuts them
    (its first ``model_max_length - 2`` tokens, as text); shorter ones unchanged."""
    limit = tokenizer.model_max_length - 2  # the begin and end tokens take two places

    def cut(p: str) -> str:
        ids = tokenizer(p, add_special_tokens=False).input_ids
        return p if len(ids) <= limit else tokenizer.decode(ids[:limit])

    return cut(prompt) if isinstance(prompt, str) else [cut(p) for p in prompt]


def sld_pipeline(pipe: StableDiffusionPipeline, preset: str, concept: str):
    """Safe Latent Diffusion on the same components, and the call arguments of its preset.

    Args:
        preset: ``weak``, ``medium``, ``strong`` or ``max`` (diffusers' ``SafetyConfig``).
        concept: the text SLD steers away from.
    Returns:
        ``(StableDiffusionPipelineSafe, {"sld_guidance_scale": ..., ...})``.
    """
    from diffusers import StableDiffusionPipelineSafe
    from diffusers.pipelines.deprecated.stable_diffusion_safe import SafetyConfig

    presets = {
        "weak": SafetyConfig.WEAK,
        "medium": SafetyConfig.MEDIUM,
        "strong": SafetyConfig.STRONG,
        "max": SafetyConfig.MAX,
    }
    if preset not in presets:
        raise ValueError(f"SLD preset {preset!r}: expected one of {list(presets)}")

    class SafeLatentDiffusion(StableDiffusionPipelineSafe):
        # diffusers' SLD pipeline checks for cut prompts by tokenizing the batch padded to 77
        # without truncation, which fails for any batch holding a prompt over 77 tokens; SD's
        # own pipeline cuts such prompts at 77, and so do these, before the call.
        def __call__(self, prompt: str | list[str], *args: Any, **kwargs: Any) -> Any:
            return super().__call__(cut_prompts(self.tokenizer, prompt), *args, **kwargs)

    safe = SafeLatentDiffusion(**{**pipe.components, "safety_checker": None}, requires_safety_checker=False)
    safe.safety_concept = concept
    safe.set_progress_bar_config(disable=True)
    return safe, dict(presets[preset])
