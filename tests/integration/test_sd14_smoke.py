"""`hfi run configs/sd14-smoke.yaml`: SD v1.4's exact architecture (random weights) through every
stage on a CPU, as a user runs it, from `hfi sd14 fixture` to the registry gates.

One test module, so that its 10 GB of models stay on one test worker."""

import json
import resource
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).parents[2]
CONFIG = ROOT / "configs" / "sd14-smoke.yaml"
FIXTURE = ROOT / ".fixtures" / "sd14"  # what the config's sd14:sd and sd14:clip name
MAX_RSS_GB = 16  # two test workers must fit in 24 GB


def _hfi(*args: str, timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tasks.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


@pytest.fixture(scope="module")
def fixture():
    if not (FIXTURE / "fixture.json").exists():
        done = _hfi("sd14", "fixture", "--out", str(FIXTURE), timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
    return FIXTURE


@pytest.fixture(scope="module")
def run(fixture, tmp_path_factory):
    out = tmp_path_factory.mktemp("sd14") / "run"
    done = _hfi("run", str(CONFIG), "--out", str(out), timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    print(f"hfi run sd14-smoke: peak RSS {peak_gb:.1f} GB")
    return out, peak_gb, done.stdout


def test_the_fixture_is_sd_v1_4_sized_with_clips_real_tokenizer(fixture):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTokenizer

    counts = json.loads((fixture / "fixture.json").read_text())["parameters"]
    assert round(counts["unet"] / 1e6) == 860 and round(counts["text_encoder"] / 1e6) == 123
    assert round(counts["vae"] / 1e6) == 84 and round(counts["clip"] / 1e6) == 428  # ViT-L/14
    config = UNet2DConditionModel.load_config(fixture / "sd" / "unet")
    assert config["cross_attention_dim"] == 768 and config["sample_size"] == 64
    tok = CLIPTokenizer.from_pretrained(fixture / "sd" / "tokenizer")
    assert len(tok) == 49408 and tok.model_max_length == 77
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]  # the released ids


def test_every_stage_runs_on_the_real_size_model_within_memory(run):
    out, peak_gb, stdout = run
    assert peak_gb < MAX_RSS_GB, f"peak RSS {peak_gb:.1f} GB"
    manifest = pd.read_parquet(out / "generate" / "manifest.parquet")
    assert len(manifest) == 12 and set(manifest.width) == {64} and set(manifest.height) == {64}
    assert (out / "feedback" / "labels.parquet").exists() and (out / "reward" / "model" / "config.json").exists()
    assert "promotion gates:" in stdout


def test_the_token_is_768_wide_and_loads_with_load_textual_inversion(run, fixture):
    from diffusers import StableDiffusionPipeline

    out, _, _ = run
    saved = load_file(out / "invert" / "learned_embeds.safetensors")["<hfi-nudity>"]
    assert saved.shape == (1, 768) and torch.isfinite(saved).all()
    pipe = StableDiffusionPipeline.from_pretrained(fixture / "sd", safety_checker=None, use_safetensors=True)
    pipe.load_textual_inversion(str(out / "invert"))
    token_id = pipe.tokenizer.convert_tokens_to_ids("<hfi-nudity>")
    assert token_id == 49408 and torch.equal(pipe.text_encoder.get_input_embeddings().weight[token_id], saved[0])


def test_the_distilled_unet_loads_and_changed_only_cross_attention(run, fixture):
    from diffusers import UNet2DConditionModel
    from safetensors import safe_open

    out, _, _ = run
    weights = "diffusion_pytorch_model.safetensors"
    with safe_open(fixture / "sd" / "unet" / weights, "pt") as base, safe_open(out / "distill" / "unet" / weights,
                                                                                 "pt") as tuned:  # fmt: skip
        assert set(base.keys()) == set(tuned.keys())
        changed = [n for n in base.keys() if not torch.equal(base.get_tensor(n), tuned.get_tensor(n))]  # one at a time
    assert changed and all(".attn2." in n for n in changed)
    assert UNet2DConditionModel.load_config(out / "distill" / "unet")["cross_attention_dim"] == 768
    metrics = json.loads((out / "distill" / "metrics.json").read_text())
    assert metrics["steps_run"] == 4 and metrics["final_loss_mean_20"] > 0


def test_evaluation_measures_every_variant_with_vit_l_clip_and_nudenet(run):
    out, _, _ = run
    summary = json.loads((out / "evaluate" / "summary.json").read_text())
    assert set(summary) == {"sd", "distilled", "negative_prompt", "sld-medium"}
    for groups in summary.values():
        assert set(groups) == {"target:explicit", "target:implicit", "preserve"}
        assert all({"nudenet_rate", "clip_concept_rate", "clip_score"} <= set(m) for m in groups.values())
    assert summary["distilled"]["target:explicit"]["drift"] > 0  # the trained teacher draws other images
    evaluators = json.loads((out / "evaluate" / "sd" / "metrics.json").read_text())["evaluators"]
    assert len(evaluators["clip"]["weights_sha256"]) == 64 and evaluators["nudenet"]["onnx"] == "320n.onnx"
    registration = json.loads((out / "register" / "registration.json").read_text())
    assert set(registration["gates"]) == {"concept_rate", "preservation_drop"}
