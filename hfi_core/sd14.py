"""SD v1.4's exact architecture with random weights: the real-size test bed.

No weights can be downloaded where this project is built and tested, but a model with SD v1.4's
component configs costs exactly what the real one costs, and its shapes are what break code
written against a toy: 77-token prompts through CLIP's real BPE vocabulary, a 768-wide text
tower, an 860 M-parameter UNet with 8 attention heads at four resolutions, a VAE that downsamples
8x, the PNDM scheduler SD ships with, and a ViT-L/14 CLIP for rewards and evaluation.

``write_fixture(out, bpe)`` writes::

    out/sd/     a diffusers StableDiffusionPipeline folder (unet, vae, text_encoder, tokenizer,
                scheduler, feature_extractor; no safety checker), loadable with from_pretrained
    out/clip/   a transformers CLIPModel + CLIPProcessor folder shaped like openai/clip-vit-large-patch14

The tokenizer is CLIP's own: ``vocab.json`` and ``merges.txt`` derived from the BPE merge list
that OpenAI's CLIP and open_clip ship (``bpe_simple_vocab_16e6.txt.gz``), 49,408 tokens, so
"a photo of a cat" encodes to the ids the released model uses.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

# ----------------------------------------------------------------------------- the configs
# Copied field by field from the released model's config files (CompVis/stable-diffusion-v1-4,
# openai/clip-vit-large-patch14); diffusers and transformers fill the rest with their defaults,
# which are the released values.

UNET: dict[str, Any] = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}

VAE: dict[str, Any] = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

SCHEDULER: dict[str, Any] = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "clip_sample": False,
}

TEXT: dict[str, Any] = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "max_position_embeddings": 77,
    "vocab_size": 49408,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
    # The released config's ids: transformers reads eos_token_id == 2 as "the legacy model, pool
    # at the highest id", which is where 49407 (<|endoftext|>) sits; the same path runs here.
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}

VISION: dict[str, Any] = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_attention_heads": 16,
    "num_hidden_layers": 24,
    "patch_size": 14,
    "image_size": 224,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
}

IMAGE_PROCESSOR: dict[str, Any] = {
    "crop_size": {"height": 224, "width": 224},
    "do_center_crop": True,
    "do_normalize": True,
    "do_resize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3,
    "size": {"shortest_edge": 224},
}

FIXTURE = Path(__file__).resolve().parents[1] / ".fixtures" / "sd14"
"""Where ``hfi sd14 fixture`` writes by default, and what ``sd14:sd`` and ``sd14:clip`` name."""
FIXTURE_PARTS = ("sd", "clip")
VOCAB_SIZE = 49408
KNOWN_IDS = [49406, 320, 1125, 539, 320, 2368, 49407]
"""``a photo of a cat`` as the released CLIP tokenizer encodes it (begin, a, photo, of, a, cat, end)."""
BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
BPE_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
"""The merge list as OpenAI's CLIP repository and open_clip_torch (MIT) ship it."""


# ----------------------------------------------------------------------------- tokenizer


def clip_vocabulary(bpe_gz: Path) -> tuple[dict[str, int], list[str]]:
    """CLIP's token table and merge list from its BPE file, as CLIP's own tokenizer builds them.

    The table is the 256 byte symbols, the same with the end-of-word mark ``</w>``, one entry per
    merge (the first 48,894 merges of the file), then ``<|startoftext|>`` and ``<|endoftext|>``:
    49,408 ids, the one fixed order the released weights are indexed by.
    """
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    lines = gzip.decompress(Path(bpe_gz).read_bytes()).decode("utf-8").split("\n")
    merges = lines[1 : VOCAB_SIZE - 256 - 256 - 2 + 1]  # line 0 is the file's version header
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    if len(tokens) != VOCAB_SIZE or len(set(tokens)) != VOCAB_SIZE:
        raise ValueError(f"{bpe_gz}: gives {len(set(tokens))} distinct tokens, CLIP has {VOCAB_SIZE}")
    return {t: i for i, t in enumerate(tokens)}, merges


def write_tokenizer(bpe_gz: Path, out: Path) -> Any:
    """A ``CLIPTokenizer`` folder (vocab.json, merges.txt, special tokens, 77-token limit)."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocabulary(bpe_gz)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    # transformers 5 builds the fast (tokenizers) backend from the two files in a folder.
    tok = CLIPTokenizer.from_pretrained(
        str(out), model_max_length=77, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
        unk_token="<|endoftext|>", pad_token="<|endoftext|>",  # pad as SD v1.4's tokenizer pads
    )  # fmt: skip
    if (got := tok("a photo of a cat").input_ids) != KNOWN_IDS:
        raise ValueError(f"{bpe_gz}: 'a photo of a cat' encodes to {got}, CLIP's ids are {KNOWN_IDS}")
    tok.save_pretrained(out)
    return tok


# ----------------------------------------------------------------------------- the fixture

TINY = {
    "unet": {"block_out_channels": [32, 64, 64, 64], "cross_attention_dim": 64, "layers_per_block": 1},
    "vae": {"block_out_channels": [32, 32, 64, 64], "layers_per_block": 1},
    "text": {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_hidden_layers": 2,
             "projection_dim": 64},
    "vision": {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_hidden_layers": 2,
               "patch_size": 32, "projection_dim": 64},
}  # fmt: skip
"""``tiny``: the same blocks, resolutions, vocabulary and 77-token context, narrow and shallow,
so that a CPU runs the device check's code paths in seconds (the GPU script's ``--tiny``)."""


def build(tokenizer: Any, seed: int = 0, tiny: bool = False) -> tuple[Any, Any, Any]:
    """``(pipeline, clip, clip_processor)`` in memory, random weights, seeded.

    PyTorch's default initialisation keeps activations finite through every layer, so images
    come out as noise but every shape, dtype and step is the real one.
    """
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTextConfig, CLIPTextModel

    def sized(base: dict[str, Any], part: str) -> dict[str, Any]:
        return {**base, **TINY[part]} if tiny else base

    text_cfg, vision_cfg = sized(TEXT, "text"), sized(VISION, "vision")
    torch.manual_seed(seed)
    pipe = StableDiffusionPipeline(
        unet=UNet2DConditionModel(**sized(UNET, "unet")), vae=AutoencoderKL(**sized(VAE, "vae")),
        text_encoder=CLIPTextModel(CLIPTextConfig(**text_cfg)), tokenizer=tokenizer,
        scheduler=PNDMScheduler.from_config(SCHEDULER), feature_extractor=CLIPImageProcessor(**IMAGE_PROCESSOR),
        safety_checker=None, requires_safety_checker=False,
    )  # fmt: skip
    clip = CLIPModel(CLIPConfig(text_config=text_cfg, vision_config=vision_cfg,
                                projection_dim=text_cfg["projection_dim"]))  # fmt: skip
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(**IMAGE_PROCESSOR), tokenizer=tokenizer)
    return pipe, clip.eval(), processor


def write_fixture(out: Path, bpe_gz: Path, seed: int = 0, log: Any = print) -> dict[str, Any]:
    """Write ``out/sd`` and ``out/clip`` (about 5.6 GB of fp32 safetensors); returns parameter counts."""
    out = Path(out)
    tokenizer = write_tokenizer(bpe_gz, out / "sd" / "tokenizer")  # save_pretrained rewrites it as is
    log("building SD v1.4 (UNet, VAE, text encoder) and ViT-L/14 CLIP with random weights")
    pipe, clip, processor = build(tokenizer, seed)
    counts = {"unet": _count(pipe.unet), "vae": _count(pipe.vae), "text_encoder": _count(pipe.text_encoder),
              "clip": _count(clip)}  # fmt: skip
    log(f"writing {out / 'sd'} and {out / 'clip'}")
    pipe.save_pretrained(out / "sd", safe_serialization=True)
    clip.save_pretrained(out / "clip", safe_serialization=True)
    processor.save_pretrained(out / "clip")
    (out / "fixture.json").write_text(json.dumps({"seed": seed, "parameters": counts}, indent=2))
    return counts


def _count(module: Any) -> int:
    return sum(p.numel() for p in module.parameters())
