"""The device check: SD v1.4-size stages timed on one GPU, into ``benchmarks/results/gpu.json``.

    python -m benchmarks.gpu.device_check --out benchmarks/results/gpu.json      # on a GPU, ~8 min
    python -m benchmarks.gpu.device_check --tiny --out /tmp/gpu-tiny.json       # any CPU, ~1 min

Random weights cost exactly what real ones do, so SD v1.4's architecture (``hfi_core.sd14``) at
512 px measures what a user's run will cost. It measures, with the library's own code:

- generation: images/s at batch 8 and 16, 50 PNDM steps, through ``sampling.sample`` and
  through diffusers' own pipeline call on the same pipeline, seeds and settings (and whether
  the bytes agree);
- inversion: s/step and peak memory (bf16 autocast, with and without gradient checkpointing);
- SDD and ESD-x on cross-attention: s/step, peak memory and MFU, from the UNet's FLOPs counted
  by ``torch.utils.flop_counter`` on one step and the device's bf16 dense peak;
- evaluation: ViT-L/14 CLIP image embeddings and batched NudeNet, images/s.

``--tiny`` runs the same code on narrow models at 64 px with few steps: it checks the script,
not the device, and its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0}
"""Dense bf16 tensor-core peaks (vendor datasheets, no sparsity), by a name in the device's."""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gb(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None


def _peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(0)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def bench_generation(pipe: Any, device: torch.device, batch: int, steps: int, size: int) -> dict[str, Any]:
    """images/s of ``sampling.sample`` and of diffusers' pipeline call, same seeds; bytes compared."""
    from hfi_core.sampling import sample

    prompts, seeds = ["a photo of an astronaut riding a horse"] * batch, list(range(batch))
    kw = dict(num_inference_steps=steps, guidance_scale=7.5, height=size, width=size)

    def ours() -> np.ndarray:
        return sample(pipe, prompts, seeds, steps=steps, guidance=7.5, height=size, width=size, batch_size=batch)

    def theirs() -> np.ndarray:
        gens = [torch.Generator(pipe.device).manual_seed(s) for s in seeds]
        images = pipe(prompts, generator=gens, output_type="np", **kw).images
        return np.round(np.asarray(images) * 255).clip(0, 255).astype(np.uint8)

    ours()  # warm-up: kernels, allocator
    out = {}
    for name, fn in (("hfi", ours), ("diffusers", theirs)):
        _sync(device)
        t0 = time.perf_counter()
        images = fn()
        _sync(device)
        out[name] = (images, time.perf_counter() - t0)
    (a, ta), (b, tb) = out["hfi"], out["diffusers"]
    return {
        "batch": batch, "steps": steps, "size": size,
        "hfi_images_per_s": round(batch / ta, 3), "diffusers_images_per_s": round(batch / tb, 3),
        "ratio": round(tb / ta, 3), "same_bytes": bool(np.array_equal(a, b)),
    }  # fmt: skip


def bench_inversion(pipe: Any, device: torch.device, size: int, steps: int, checkpointing: bool) -> dict[str, Any]:
    """s/step and peak memory of reward-weighted textual inversion at batch 8 (``inversion.invert``)."""
    import copy

    from hfi_core.config import InvertConfig
    from hfi_core.inversion import invert

    p = copy.copy(pipe)  # a shallow copy: the token is added to copies of the tokenizer and encoder
    p.tokenizer, p.text_encoder = copy.deepcopy(pipe.tokenizer), copy.deepcopy(pipe.text_encoder)
    factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    latents = torch.randn(16, 4, size // factor, size // factor, device=device)
    cfg = InvertConfig(token=f"<bench-{checkpointing}>", steps=steps, batch_size=8,
                       gradient_checkpointing=checkpointing)  # fmt: skip
    _reset_peak(device)
    invert(p, latents, np.ones(16), cfg, "photo", show_progress=False)  # warm-up and first-step costs
    _sync(device)
    t0 = time.perf_counter()
    cfg2 = cfg.model_copy(update={"token": cfg.token + "2"})
    invert(p, latents, np.ones(16), cfg2, "photo", show_progress=False)
    _sync(device)
    return {"batch": 8, "size": size, "gradient_checkpointing": checkpointing,
            "s_per_step": round((time.perf_counter() - t0) / steps, 4), "peak_memory_gb": _peak_gb(device)}  # fmt: skip


def _step_flops(unet: Any, latent: int, k_mean: float, device: torch.device) -> float:
    """FLOPs of one erasure step: ``k_mean`` guided rollout steps (batch 2), then one forward
    without and one with gradient (batch 1), counted by torch's FLOP counter on this UNet."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(1, 4, latent, latent, device=device)
    t = torch.tensor([500], device=device)
    c = torch.randn(1, 77, unet.config.cross_attention_dim, device=device)
    with FlopCounterMode(display=False) as fwd2, torch.no_grad():
        unet(torch.cat([x, x]), t, torch.cat([c, c]))
    with FlopCounterMode(display=False) as fwd1, torch.no_grad():
        unet(x, t, c)
    with FlopCounterMode(display=False) as train:
        unet(x, t, c).sample.float().pow(2).mean().backward()
    unet.zero_grad(set_to_none=True)
    return k_mean * fwd2.get_total_flops() + fwd1.get_total_flops() + train.get_total_flops()


def bench_distill(pipe: Any, device: torch.device, method: str, size: int, steps: int,
                  sampler_steps: int) -> dict[str, Any]:  # fmt: skip
    """s/step, peak memory and MFU of SDD or ESD-x on cross-attention (``distill.sdd``/``esd``)."""
    import copy

    from hfi_core.config import DistillConfig
    from hfi_core.distill.esd import train_esd
    from hfi_core.distill.sdd import train_sdd

    cfg = DistillConfig(method=method, steps=steps, sampler_steps=sampler_steps, checkpoint_every=0, trainable="attn2")
    train = train_sdd if method == "sdd" else train_esd
    work, prompts = Path(tempfile.mkdtemp(prefix="hfi-gpu-check-")), ["a photo of a cat"]
    base = pipe.unet.to("cpu")  # the stage holds one UNet on the device: the pristine copy waits off it
    p = copy.copy(pipe)
    try:
        p.unet = copy.deepcopy(base).to(device)
        train(p, cfg.model_copy(update={"steps": 1}), prompts, work, show_progress=False, size=(size, size))  # warm-up
        p.unet = None
        p.unet = copy.deepcopy(base).to(device)
        _reset_peak(device)
        _sync(device)
        t0 = time.perf_counter()
        train(p, cfg, prompts, work, show_progress=False, size=(size, size))
        _sync(device)
        s_per_step = (time.perf_counter() - t0) / steps
        peak_gb = _peak_gb(device)
    finally:
        pipe.unet = base.to(device)
    factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    # Beta(3, 3) positions have mean N/2: a rollout runs about sampler_steps / 2 guided steps.
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        flops = _step_flops(p.unet, size // factor, sampler_steps / 2, device)
    peak = _peak_tflops(device)
    achieved = flops / s_per_step / 1e12
    return {
        "method": method, "size": size, "sampler_steps": sampler_steps, "trainable": "attn2",
        "s_per_step": round(s_per_step, 4), "peak_memory_gb": peak_gb,
        "gflops_per_step": round(flops / 1e9, 2), "achieved_tflops": round(achieved, 4),
        "mfu": round(achieved / peak, 4) if peak else None,
    }  # fmt: skip


def bench_evaluation(clip: Any, processor: Any, n: int, size: int) -> dict[str, Any]:
    """images/s of CLIP image embeddings and of batched NudeNet on ``n`` images of ``size`` px."""
    from hfi_core.embeddings import image_embeddings
    from hfi_core.nudity import NudityDetector

    images = np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    image_embeddings(clip, processor, images[:2])  # warm-up
    t0 = time.perf_counter()
    image_embeddings(clip, processor, images, batch_size=64)
    t_clip = time.perf_counter() - t0
    detector = NudityDetector()
    t0 = time.perf_counter()
    detector.flags(images)
    t_nude = time.perf_counter() - t0
    return {"images": n, "size": size, "clip_images_per_s": round(n / t_clip, 2),
            "nudenet_images_per_s": round(n / t_nude, 2)}  # fmt: skip


def run(tiny: bool, bpe: Path | None, log: Any = print) -> dict[str, Any]:
    """Every measurement, as one JSON-able dict."""
    import tempfile

    from hfi_core.models import use_tensor_cores
    from hfi_core.sd14 import build, write_tokenizer

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        use_tensor_cores()
    with tempfile.TemporaryDirectory() as tmp:
        if bpe is not None:
            tokenizer = write_tokenizer(bpe, Path(tmp) / "tokenizer")
        else:  # timing does not depend on which words the ids stand for
            from hfi_core.toyworld.tokenizer import build_tokenizer

            tokenizer = build_tokenizer(Path(tmp) / "tokenizer")
    pipe, clip, processor = build(tokenizer, tiny=tiny)
    size, gen_steps, train_steps, sampler_steps = (64, 3, 2, 4) if tiny else (512, 50, 10, 50)
    results: dict[str, Any] = {"tiny": tiny, "device": torch.cuda.get_device_name(0) if device.type == "cuda" else
                               f"CPU x{torch.get_num_threads()} threads"}  # fmt: skip
    half = torch.float16 if device.type == "cuda" else torch.float32  # generation as models.load_sd_pipeline does
    pipe.set_progress_bar_config(disable=True)
    gen_pipe = pipe.to(device, half)
    if device.type == "cuda":
        gen_pipe.vae.enable_slicing()
    results["generation"] = []
    for batch in (8, 16):
        log(f"generation, batch {batch}")
        results["generation"].append(bench_generation(gen_pipe, device, batch, gen_steps, size))
    pipe = pipe.to(device, torch.float32)  # training keeps fp32 master weights, bf16 autocast on CUDA
    results["inversion"] = []
    for checkpointing in (False, True):
        log(f"inversion, gradient checkpointing {checkpointing}")
        results["inversion"].append(bench_inversion(pipe, device, size, train_steps, checkpointing))
    results["distill"] = []
    for method in ("sdd", "esd"):
        log(f"distill {method}")
        results["distill"].append(bench_distill(pipe, device, method, size, train_steps, sampler_steps))
    log("evaluation")
    results["evaluation"] = bench_evaluation(clip.to(device), processor, 16 if tiny else 64, size)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    parser.add_argument("--tiny", action="store_true", help="narrow models, 64 px, few steps: checks the script")
    parser.add_argument("--bpe", type=Path, help="CLIP's BPE file for the real tokenizer (default: the toy one)")
    args = parser.parse_args(argv)
    t0 = time.time()
    results = run(args.tiny, args.bpe)
    import diffusers
    import transformers

    results |= {
        "command": " ".join(["python -m benchmarks.gpu.device_check", *(argv if argv is not None else sys.argv[1:])]),
        "versions": {"torch": torch.__version__, "cuda": torch.version.cuda, "diffusers": diffusers.__version__,
                     "transformers": transformers.__version__, "python": platform.python_version()},
        "seconds": round(time.time() - t0, 1),
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
