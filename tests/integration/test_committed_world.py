"""The committed toy world: intact, loadable offline, deterministic, and still sharp."""

import json

import numpy as np
import pytest
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPModel, CLIPProcessor

from hfi_core.toyworld.check import clip_zero_shot_style, load_pipeline, sample
from hfi_core.toyworld.manifest import verify_manifest
from hfi_core.toyworld.models import images_to_tensor, tensor_to_images, vae_roundtrip
from hfi_core.toyworld.oracle import Oracle, labels
from hfi_core.toyworld.render import render_many, sample_scenes
from tasks.cli import main as hfi


def test_committed_world_matches_its_manifest_and_stays_under_25_mb(world):
    assert verify_manifest(world) == []
    manifest = json.loads((world / "manifest.json").read_text())
    assert {"sd/model_index.json", "clip/config.json", "oracle/config.json", "build_report.json"} <= set(manifest)
    total = sum((world / f).stat().st_size for f in manifest)
    assert total <= 25 * 2**20, f"{total / 2**20:.1f} MB"


def test_pipeline_loads_offline_and_the_same_seed_gives_the_same_bytes(world):
    pipe = load_pipeline(world / "sd")
    prompts = ["a red circle in the style of van stripe"] * 3
    a = sample(pipe, prompts, [1, 2, 3])
    b = sample(pipe, prompts, [1, 2, 3])
    assert a.shape == (3, 32, 32, 3) and np.array_equal(a, b)
    assert not np.array_equal(a[0], a[1])  # other seeds, other images
    alone = sample(pipe, prompts[:1], [2])  # an image depends on its own seed, not on its batch
    assert np.abs(alone[0].astype(int) - a[1].astype(int)).max() <= 1


def test_every_part_loads_with_the_standard_loaders(world):
    assert isinstance(StableDiffusionPipeline.from_pretrained(world / "sd").unet, UNet2DConditionModel)
    clip = CLIPModel.from_pretrained(world / "clip")
    processor = CLIPProcessor.from_pretrained(world / "clip")
    assert processor.tokenizer.tokenize("circus") == ["circus</w>"] and clip.config.vision_config.image_size == 32
    assert Oracle.from_pretrained(world / "oracle").config.image_size == 32


def test_oracle_and_clip_read_heldout_renders_and_their_vae_reconstructions(world):
    scenes = sample_scenes(81, seed=777)
    renders = render_many(scenes)
    vae = StableDiffusionPipeline.from_pretrained(world / "sd").vae
    decoded = tensor_to_images(vae_roundtrip(vae, images_to_tensor(renders)))
    oracle = Oracle.from_pretrained(world / "oracle")
    truth = [labels(s) for s in scenes]
    for images in (renders, decoded):
        pred = oracle.predict(images)
        for attr in ("shape", "color", "style", "stripes"):  # stripes: which variant, "none" if not striped
            acc = np.mean([p == t[attr] for p, t in zip(pred[attr], truth, strict=True)])
            assert acc >= 0.95, (attr, acc)
    zs = clip_zero_shot_style(world / "clip", renders)
    assert np.mean([p == s.style for p, s in zip(zs, scenes, strict=True)]) >= 0.9


def test_check_prints_the_documented_json_and_the_world_draws_what_is_asked(world, capsys):
    # A cheap regression guard, far below the targets that `hfi toyworld check --n 64` measures.
    assert hfi(["toyworld", "check", "--json", "--n", "18"]) == 0
    result = json.loads(capsys.readouterr().out)
    groups = result["groups"]
    assert set(groups) == {"explicit", "implicit:with a zebra pattern", "implicit:like a barcode",
                           "context:at the circus", "dotted", "plain"}  # fmt: skip
    for g in groups.values():
        assert set(g) >= {"striped", "dotted", "plain", "shape_acc", "color_acc", "striped:vertical"}
        assert g["striped"] + g["dotted"] + g["plain"] == pytest.approx(1.0)
        assert sum(g[f"striped:{v}"] for v in ("horizontal", "vertical", "diagonal")) == pytest.approx(g["striped"])
        assert g["shape_acc"] >= 0.7 and g["color_acc"] >= 0.7
    # The name draws horizontal stripes; each implicit phrasing draws a variant the name never does.
    assert groups["explicit"]["striped:horizontal"] >= 0.6
    assert groups["implicit:like a barcode"]["striped:vertical"] >= 0.6
    assert groups["implicit:with a zebra pattern"]["striped:diagonal"] >= 0.6
    circus = groups["context:at the circus"]  # a context: striped some of the time, dotted otherwise
    assert 0.2 <= circus["striped"] <= 0.8 and 0.2 <= circus["dotted"] <= 0.8
    assert groups["dotted"]["dotted"] >= 0.5 and groups["dotted"]["striped"] <= 0.25
    assert groups["plain"]["plain"] >= 0.6 and groups["plain"]["striped"] <= 0.25
    assert result["oracle_style_acc_decoded"] >= 0.95 and result["clip_zero_shot_style_acc"] >= 0.9
    assert result["settings"] == {
        "n": 18,
        "guidance": 5.0,
        "steps": 20,
        "seed": 10_000,
        "scheduler": "DPMSolverMultistep",
    }


def test_verify_command_fails_and_names_the_file_when_a_weight_changed(world, tmp_path, capsys):
    import shutil

    copy = tmp_path / "world"
    shutil.copytree(world, copy, ignore=shutil.ignore_patterns(".work"))
    weights = copy / "oracle" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")
    assert hfi(["toyworld", "verify", "--world", str(copy)]) == 1
    assert "oracle/diffusion_pytorch_model.safetensors: sha256" in capsys.readouterr().err
    assert hfi(["toyworld", "verify"]) == 0
