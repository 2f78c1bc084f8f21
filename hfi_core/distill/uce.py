"""Closed-form cross-attention editing (UCE-style; Gandikota et al., "Unified Concept Editing").

No sampling and no optimiser: every cross-attention key and value projection W (d_out, D) of
the UNet is replaced, in one linear solve, by the W' that

    minimises   sum_i || W' e_i - W g_i ||^2             erase: the concept's text states e_i
                                                          now read as the guide's g_i
              + s * sum_j || W' p_j - W p_j ||^2          preserve: other prompts read as before
              + lam * || W' - W ||_F^2                    stay near the original

    W' = (W G^T E + s W P^T P + lam W) (E^T E + s P^T P + lam I)^-1

with E (n, D), G (n, D), P (m, D) the stacked text-encoder states. e_i are the states of the
concept prompts (the text concept, or ``a {token}`` with the HFI token v*: HFI+UCE) at the
positions that carry the concept; g_i are the guide prompt's states at the same positions: by
default the empty prompt's (the concept comes to read as no prompt at all, which is what SDD
distils towards), or ``uce_guide``'s, a neutral phrase the concept should read as; p_j are every
state of the preserve prompts. Which positions carry the concept is exact, not a heuristic: the
text encoder is causal, so a position's state depends only on the tokens up to it, and a
position whose token prefix some preserve prompt or the empty prompt shares has the very same
state there. Those positions are left to the preserve term.
"""

from __future__ import annotations

import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel

from hfi_core.config import DistillConfig
from hfi_core.distill.common import prompt_ids


@torch.no_grad()
def text_states(pipe: StableDiffusionPipeline, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (N, L) and the text encoder's last hidden states (N, L, D) of ``prompts``."""
    ids = prompt_ids(pipe, prompts)
    return ids, pipe.text_encoder(ids)[0]


def concept_positions(erase_ids: torch.Tensor, shared_ids: torch.Tensor) -> torch.Tensor:
    """Which positions of each erase prompt carry the concept, (N, L) bool.

    A position carries it when no prompt of ``shared_ids`` (M, L) has the same tokens up to and
    including it; such a prefix gives a causal text encoder the same state there.
    """
    # same[n, m, k]: erase prompt n and shared prompt m agree on tokens 0..k
    same = (erase_ids[:, None, :] == shared_ids[None, :, :]).int().cumprod(-1).bool()
    return ~same.any(1)


@torch.no_grad()
def closed_form(
    w: torch.Tensor, erase: torch.Tensor, guide: torch.Tensor, preserve: torch.Tensor, lam: float, scale: float
) -> torch.Tensor:
    """The edited projection W' (d_out, D) for W (d_out, D), erase/guide (n, D), preserve (m, D).

    Solved in float64 (E^T E is rank-deficient without the lam I term on small n) and cast back.
    """
    w64, e, g, p = (x.double() for x in (w, erase, guide, preserve))
    eye = torch.eye(w.shape[1], dtype=torch.float64, device=w.device)
    rhs = w64 @ g.T @ e + scale * (w64 @ p.T @ p) + lam * w64  # (d_out, D)
    gram = e.T @ e + scale * (p.T @ p) + lam * eye  # (D, D), symmetric positive definite
    return torch.linalg.solve(gram, rhs.T).T.to(w.dtype)  # W' = rhs @ gram^-1


def edited_layers(unet: UNet2DConditionModel) -> list[str]:
    """Names of the cross-attention key and value projections UCE edits (``*.attn2.to_k`` / ``to_v``)."""
    return [n for n, _ in unet.named_modules() if n.endswith(".attn2.to_k") or n.endswith(".attn2.to_v")]


@torch.no_grad()
def train_uce(
    pipe: StableDiffusionPipeline,
    cfg: DistillConfig,
    concept_prompts: list[str],
    work: object = None,
    **_: object,
) -> tuple[UNet2DConditionModel, list[str], list[float]]:
    """Edit ``pipe.unet`` in place so that ``concept_prompts`` read as ``cfg.uce_guide`` (default:
    the empty prompt).

    Takes the trainers' arguments (``work``, ``resume``, ``size``...) and ignores them: there is
    nothing to resume in a solve of seconds. Returns ``(unet, edited parameter names, [])``, as
    the trainers return (unet, trained names, losses); there is no loss curve.

    Raises:
        ValueError: when no position of any concept prompt differs from the preserve prompts.
    """
    unet = pipe.unet
    erase_ids, erase_h = text_states(pipe, concept_prompts)  # (N, L), (N, L, D)
    keep_ids, keep_h = text_states(pipe, [cfg.uce_guide, "", *cfg.preserve_prompts])  # row 0: the guide
    where = concept_positions(erase_ids, keep_ids)  # (N, L)
    if not where.any():
        raise ValueError(
            f"distill.concept_prompts: {concept_prompts} share every token prefix with the preserve prompts; "
            "nothing is left to erase"
        )
    erase = erase_h[where]  # (n, D)
    guide = keep_h[0].expand_as(erase_h)[where]  # (n, D): the guide's state at the same position
    preserve = keep_h[2:].reshape(-1, keep_h.shape[-1])  # (m, D); empty when no preserve prompt
    names = []
    for name in edited_layers(unet):
        proj = unet.get_submodule(name)
        proj.weight.copy_(closed_form(proj.weight, erase, guide, preserve, cfg.uce_lambda, cfg.uce_preserve_scale))
        names.append(f"{name}.weight")
    return unet, names, []
