"""The toy world's model architectures: SD v1's layout, shrunk to 32x32 images.

Each factory returns an untrained model in the class the real pipeline uses, so everything
downstream (``from_pretrained``, textual inversion, SDD, SLD) treats it like SD v1.4.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import AutoencoderKL, DDPMScheduler, PNDMScheduler, UNet2DConditionModel
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPProcessor,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
)

from hfi_core.toyworld.render import IMAGE_SIZE
from hfi_core.toyworld.tokenizer import MODEL_MAX_LENGTH

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's, so processors look familiar
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def make_vae() -> AutoencoderKL:
    """32x32x3 images <-> 16x16x4 latents (8x8 blurred the 2-px dots away in the prototype)."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=IMAGE_SIZE,
        mid_block_add_attention=False,  # a third of the step time, and the images need none
    )


def _text_transformer(tokenizer: CLIPTokenizer, hidden: int) -> dict:
    """The two-layer text transformer shared by the SD text encoder and tiny CLIP's text tower."""
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MODEL_MAX_LENGTH,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def make_text_encoder(tokenizer: CLIPTokenizer, hidden: int = 64) -> CLIPTextModel:
    """A two-layer CLIP text transformer over the world's one-token words."""
    return CLIPTextModel(CLIPTextConfig(**_text_transformer(tokenizer, hidden), projection_dim=hidden))


def make_unet(channels: tuple[int, int, int], cross_attention_dim: int = 64) -> UNet2DConditionModel:
    """SD's UNet layout, shrunk: cross-attention at 16x16 and 8x8, a plain block at 4x4."""
    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 2,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=channels,
        layers_per_block=1,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=4,
        norm_num_groups=16,
    )


def make_noise_scheduler() -> DDPMScheduler:
    """SD v1's training noise schedule (scaled-linear betas 0.00085..0.012, 1000 steps)."""
    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def make_sampling_scheduler() -> PNDMScheduler:
    """The scheduler saved with the pipeline: SD v1.4's own settings (PNDM, PRK skipped).

    PNDM itself has no ``clip_sample``; like SD v1.4's ``scheduler_config.json`` we still write
    ``clip_sample: false`` into the config, so that ``DDIMScheduler.from_config`` on it does not
    fall back to DDIM's default ``True`` (which collapsed small-VAE images to pale blobs).
    """
    scheduler = PNDMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    scheduler.register_to_config(clip_sample=False)
    return scheduler


def make_clip(tokenizer: CLIPTokenizer, hidden: int = 64) -> CLIPModel:
    """A ViT (patch 4 on 32x32) and a text transformer, projected to a shared 64-d space."""
    text = _text_transformer(tokenizer, hidden)
    vision = dict(
        image_size=IMAGE_SIZE,
        patch_size=4,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=3,
        num_attention_heads=4,
    )
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=hidden))


def make_clip_processor(tokenizer: CLIPTokenizer) -> CLIPProcessor:
    """Resize/crop are identities at 32x32; normalisation is CLIP's."""
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )
    return CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


# ----------------------------------------------------------------------------- tensors


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float in [-1, 1], (N, 3, H, W): the VAE's and UNet's range."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def tensor_to_images(x: torch.Tensor) -> np.ndarray:
    """float in [-1, 1], (N, 3, H, W) -> uint8 (N, H, W, 3)."""
    x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


@torch.no_grad()
def vae_roundtrip(vae: AutoencoderKL, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Encode (posterior mean) and decode images in [-1, 1]; same shape out."""
    out = [vae.decode(vae.encode(images[i : i + batch]).latent_dist.mean).sample for i in range(0, len(images), batch)]
    return torch.cat(out).clamp(-1, 1)
