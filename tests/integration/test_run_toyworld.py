"""`hfi run` on the committed toy world, shrunk: every stage runs, every artifact loads in diffusers."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file

from hfi_core.distill.outputs import apply_delta
from tasks.cli import main as hfi

CONFIG = Path(__file__).parents[2] / "configs" / "toyworld-striped.yaml"


@pytest.fixture(scope="module")
def run(tmp_path_factory, world):
    cfg = yaml.safe_load(CONFIG.read_text())
    for group in cfg["prompts"]:
        group["prompts"] = group["prompts"][:3]
        group["images_per_prompt"] = 4  # 72 images
    cfg["invert"].update(steps=15, batch_size=4)
    cfg["distill"].update(steps=6, warm_steps=3, sampler_steps=6, checkpoint_every=3)
    cfg["evaluate"].update(n_per_prompt=1)
    cfg["model"]["path"] = str(world / "sd")
    cfg["reward"]["clip"] = str(world / "clip")
    cfg["feedback"]["simulate"]["oracle"] = cfg["evaluate"]["oracle"] = str(world / "oracle")
    root = tmp_path_factory.mktemp("run")
    path = root / "small.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert hfi(["run", str(path), "--out", str(root / "run")]) == 0
    return root / "run"


def test_every_stage_leaves_its_outputs(run):
    for rel in ("generate/manifest.parquet", "feedback/labels.parquet", "reward/model/config.json",
                "invert/learned_embeds.safetensors", "invert/token_samples.png", "distill/unet/config.json",
                "distill/delta.safetensors", "distill/README.md", "distill/losses.png", "evaluate/summary.md",
                "evaluate/sd/grid.png", "evaluate/distilled/metrics.json", "evaluate/negative_prompt/metrics.json"):  # fmt: skip
        assert (run / rel).exists(), rel
    summary = json.loads((run / "evaluate" / "summary.json").read_text())
    assert set(summary) == {"sd", "distilled", "negative_prompt"}
    assert (
        summary["distilled"]["target:explicit"]["drift"] >= 0 and "oracle_striped" in summary["sd"]["target:explicit"]
    )
    card = (run / "distill" / "README.md").read_text()
    method = yaml.safe_load(CONFIG.read_text())["distill"]["method"]
    assert "<hfi-striped>" in card and f"Method: **{method.upper()}**" in card


def test_every_token_loads_with_load_textual_inversion(run, world):
    # One token per look the feedback showed (invert.modes: 0), each of invert.vectors vectors.
    vectors = yaml.safe_load(CONFIG.read_text())["invert"]["vectors"]
    listed = json.loads((run / "invert" / "tokens.json").read_text())["tokens"]
    assert listed[0] == {**listed[0], "token": "<hfi-striped>", "file": "learned_embeds.safetensors"}
    assert json.loads((run / "invert" / "metrics.json").read_text())["modes"] == len(listed)
    pipe = StableDiffusionPipeline.from_pretrained(world / "sd")
    table = pipe.text_encoder.get_input_embeddings
    for entry in listed:
        pipe.load_textual_inversion(str(run / "invert"), weight_name=entry["file"])
        saved = load_file(run / "invert" / entry["file"])[entry["token"]]
        assert saved.shape == (vectors, 64)
        names = [entry["token"]] + [f"{entry['token']}_{i}" for i in range(1, vectors)]
        assert torch.equal(table().weight[pipe.tokenizer.convert_tokens_to_ids(names)], saved)
    card = json.loads((run / "distill" / "card.json").read_text())
    assert card["tokens"] == [t["token"] for t in listed]


def test_the_delta_on_the_base_unet_reproduces_the_saved_unet_exactly(run, world):
    saved = UNet2DConditionModel.from_pretrained(run / "distill" / "unet").state_dict()
    base = UNet2DConditionModel.from_pretrained(world / "sd" / "unet")
    untouched = {n: t.clone() for n, t in base.state_dict().items()}
    rebuilt = apply_delta(base, run / "distill" / "delta.safetensors").state_dict()
    assert all(torch.equal(rebuilt[n], saved[n]) for n in saved)
    delta = load_file(run / "distill" / "delta.safetensors")
    assert delta and all(".attn2." in n for n in delta)  # only cross-attention trained
    assert any(not torch.equal(untouched[n], saved[n]) for n in delta)
    assert all(torch.equal(untouched[n], saved[n]) for n in saved if n not in delta)


def test_a_delta_for_another_unet_is_refused_by_name(run, tmp_path):
    from hfi_core.toyworld.models import make_unet

    with pytest.raises(ValueError, match=r"delta\.safetensors: .* has shape"):
        apply_delta(make_unet((16, 32, 32)), run / "distill" / "delta.safetensors")
