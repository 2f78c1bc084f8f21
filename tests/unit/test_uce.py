"""Closed-form cross-attention editing (UCE): the solve, the concept positions, and the edit on a
tiny UNet with SD's layout (random weights: the maths does not need a trained model)."""

import pytest
import torch
from diffusers import StableDiffusionPipeline

from hfi_core.config import DistillConfig
from hfi_core.distill.uce import closed_form, concept_positions, edited_layers, text_states, train_uce
from hfi_core.toyworld.models import make_sampling_scheduler, make_text_encoder, make_unet, make_vae
from hfi_core.toyworld.tokenizer import build_tokenizer


@pytest.fixture
def pipe(tmp_path):
    torch.manual_seed(0)
    tok = build_tokenizer(tmp_path / "tok")
    return StableDiffusionPipeline(
        vae=make_vae(), text_encoder=make_text_encoder(tok).eval(), tokenizer=tok, unet=make_unet((16, 32, 32)).eval(),
        scheduler=make_sampling_scheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )  # fmt: skip


def test_the_solve_maps_erased_states_to_the_guide_and_keeps_preserved_ones():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(12, 16, generator=g)
    erase, guide, keep = (torch.randn(n, 16, generator=g) for n in (3, 3, 5))  # 8 of 16 directions
    new = closed_form(w, erase, guide, keep, lam=1e-6, scale=1.0)
    assert torch.allclose(new @ erase.T, w @ guide.T, atol=1e-3)  # the concept now reads as the guide
    assert torch.allclose(new @ keep.T, w @ keep.T, atol=1e-3)  # the preserved states read as before
    assert not torch.allclose(new, w, atol=1e-2)
    # The regulariser pulls towards the original: a huge lam leaves W as it was.
    assert torch.allclose(closed_form(w, erase, guide, keep, lam=1e9, scale=1.0), w, atol=1e-4)


def test_concept_positions_are_those_no_kept_prompt_shares_a_token_prefix_with():
    erase = torch.tensor([[0, 5, 7, 9, 9], [0, 6, 7, 9, 9]])
    kept = torch.tensor([[0, 9, 9, 9, 9], [0, 5, 8, 9, 9]])
    # Prompt 0 shares "0 5" with kept prompt 1; prompt 1 shares only "0" with both.
    assert concept_positions(erase, kept).tolist() == [
        [False, False, True, True, True],
        [False, True, True, True, True],
    ]


@pytest.mark.parametrize("guide", ["", "a with a flat fill"])
def test_uce_edits_only_cross_attention_kv_so_the_concept_reads_as_the_guide(pipe, guide):
    cfg = DistillConfig(method="uce", preserve_prompts=["a red circle with polka dots", "a blue square"],
                        uce_lambda=1e-4, uce_guide=guide)  # fmt: skip
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    concept = ["a in the style of van stripe"]
    ids, states = text_states(pipe, concept)
    _, kept = text_states(pipe, [guide, *cfg.preserve_prompts])
    unet, names, losses = train_uce(pipe, cfg, concept, None)
    after = unet.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == set(names) and names and losses == []
    assert all(".attn2.to_k." in n or ".attn2.to_v." in n for n in names)
    assert len(names) == len(edited_layers(unet))
    where = concept_positions(ids, text_states(pipe, [guide, "", *cfg.preserve_prompts])[0])[0]  # (L,)
    for name in edited_layers(unet):
        w0, w1 = before[f"{name}.weight"], after[f"{name}.weight"]
        # At the concept's positions the edited projection gives what the original gave the guide.
        got, want = states[0][where] @ w1.T, kept[0][where] @ w0.T
        assert (got - want).abs().max() < 0.05 * want.abs().max(), name
        # Every state of the preserve prompts projects (nearly) as before.
        p = kept[1:].reshape(-1, kept.shape[-1])
        assert (p @ w1.T - p @ w0.T).abs().max() < 0.05 * (p @ w0.T).abs().max(), name
    if guide:  # another guide is another edit: the concept does not read as the empty prompt
        _, empty = text_states(pipe, [""])
        w0, w1 = (w[f"{edited_layers(unet)[0]}.weight"] for w in (before, after))
        assert not torch.allclose(states[0][where] @ w1.T, empty[0][where] @ w0.T, atol=0.05)


def test_uce_refuses_a_concept_that_no_position_tells_apart(pipe):
    cfg = DistillConfig(method="uce", preserve_prompts=["a red circle"])
    with pytest.raises(ValueError, match="nothing is left to erase"):
        train_uce(pipe, cfg, ["a red circle"], None)
