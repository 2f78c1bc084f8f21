"""A real build of the toy world, shrunk to a few optimiser steps per model."""

import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from transformers import CLIPModel, CLIPProcessor

from hfi_core.toyworld.build import BuildConfig, build_world, images_to_tensor, train_unet
from hfi_core.toyworld.manifest import verify_manifest
from hfi_core.toyworld.oracle import Oracle
from hfi_core.toyworld.render import render_many, sample_scenes
from hfi_core.toyworld.tokenizer import build_tokenizer, world_words

TINY = dict(
    n_train=108, n_heldout=27, vae_steps=3, vae_batch=8, unet_steps=4, unet_batch=8, checkpoint_every=2,
    clip_steps=3, clip_batch=16, oracle_steps=3, oracle_batch=8, sample_steps=2,
)  # fmt: skip


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    report = build_world(out, BuildConfig(**TINY))
    return out, report


def test_tiny_build_writes_folders_that_diffusers_and_transformers_load(tiny_world):
    out, _ = tiny_world
    pipe = StableDiffusionPipeline.from_pretrained(out / "sd")
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red circle with polka dots", num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 32, 32, 3)
    assert all(len(pipe.tokenizer.tokenize(w)) == 1 for w in world_words())
    ddim = DDIMScheduler.from_config(pipe.scheduler.config)
    assert ddim.config.clip_sample is False and ddim.config.steps_offset == 1
    clip, processor = CLIPModel.from_pretrained(out / "clip"), CLIPProcessor.from_pretrained(out / "clip")
    pixels = processor(images=list(render_many(sample_scenes(2, 0))), return_tensors="pt").pixel_values
    assert pixels.shape == (2, 3, 32, 32) and clip.config.projection_dim == 64
    assert Oracle.from_pretrained(out / "oracle").predict(render_many(sample_scenes(3, 0)))["style"]


def test_build_report_records_times_losses_and_heldout_accuracies(tiny_world):
    out, report = tiny_world
    on_disk = json.loads((out / "build_report.json").read_text())
    assert on_disk["config"]["unet_steps"] == 4
    assert set(on_disk["seconds"]) == {"vae", "oracle", "clip", "unet"}
    assert set(on_disk["final_losses"]) == {"vae_l1", "oracle_loss", "clip_loss", "unet_loss"}
    assert all(np.isfinite(v) and v > 0 for v in on_disk["final_losses"].values())
    assert all(0.0 <= v <= 1.0 for v in on_disk["heldout"].values())
    assert {"oracle_style_acc_decoded", "clip_zero_shot_style_acc"} <= set(on_disk["heldout"])
    assert (out / "losses.png").stat().st_size > 1000 and (out / "samples.png").stat().st_size > 1000


def test_manifest_matches_and_names_a_changed_or_extra_file(tiny_world, tmp_path):
    out, _ = tiny_world
    assert verify_manifest(out) == []
    copy = tmp_path / "copy"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns(".work"))
    (copy / "oracle" / "config.json").write_text("{}")
    (copy / "stray.txt").write_text("x")
    problems = verify_manifest(copy)
    assert any("oracle/config.json: sha256" in p for p in problems)
    assert any("stray.txt: not in manifest.json" in p for p in problems)


def test_rebuild_skips_finished_stages(tiny_world):
    out, _ = tiny_world
    stage_files = [out / ".work" / d / "config.json" for d in ("vae", "oracle", "clip", "unet")]
    before = [f.stat().st_mtime_ns for f in stage_files]
    unet_bytes = (out / "sd" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    build_world(out, BuildConfig(**TINY))
    assert [f.stat().st_mtime_ns for f in stage_files] == before
    assert (out / "sd" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == unet_bytes


def test_unet_training_resumed_from_its_checkpoint_ends_with_identical_weights(tiny_world, tmp_path):
    out, _ = tiny_world
    from diffusers import AutoencoderKL

    cfg = BuildConfig(**{**TINY, "unet_steps": 4, "checkpoint_every": 2})
    vae = AutoencoderKL.from_pretrained(out / ".work" / "vae")
    tok = build_tokenizer(tmp_path / "tok")
    scenes = sample_scenes(cfg.n_train, cfg.seed)
    images = images_to_tensor(render_many(scenes))
    straight, _ = train_unet(cfg, vae, tok, images, scenes, tmp_path, lambda *a: None)  # leaves a step-2 checkpoint
    assert torch.load(tmp_path / "unet_ckpt.pt", weights_only=True)["step"] == 2
    resumed, _ = train_unet(cfg, vae, tok, images, scenes, tmp_path, lambda *a: None)  # resumes at step 2
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_build_config_rejects_unknown_and_negative_fields_by_name():
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['unet_stepz'\]"):
        BuildConfig.from_dict({"unet_stepz": 10})
    with pytest.raises(ValueError, match=r"BuildConfig.vae_lr: must be >= 0"):
        BuildConfig.from_dict({"vae_lr": -1.0})
    assert BuildConfig.from_dict({"unet_channels": [32, 64, 64]}).unet_channels == (32, 64, 64)
