"""Reward model maths and the embedding cache, on synthetic data and an untrained tiny CLIP."""

import hashlib

import numpy as np
import pandas as pd
import pytest
import torch

from hfi_core.config import RewardConfig
from hfi_core.images import png_bytes
from hfi_core.metrics import roc_auc, roc_curve
from hfi_core.reward import EmbeddingCache, RewardModel, train_binary, train_ranking
from hfi_core.toyworld.models import make_clip, make_clip_processor
from hfi_core.toyworld.render import render_many, sample_scenes
from hfi_core.toyworld.tokenizer import build_tokenizer


def test_roc_auc_matches_hand_counted_pairs_with_ties_as_half():
    scores = np.array([0.9, 0.8, 0.8, 0.3, 0.1])
    labels = np.array([1, 1, 0, 0, 1])
    # positives 0.9, 0.8, 0.1 vs negatives 0.8, 0.3: wins 2 + (0.5 + 1) + 0 = 3.5 of 6
    assert roc_auc(scores, labels) == pytest.approx(3.5 / 6)
    assert roc_auc(np.arange(4), np.array([0, 0, 1, 1])) == 1.0
    fpr, tpr = roc_curve(scores, labels)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0, 0, 1, 1)
    with pytest.raises(ValueError, match="both classes"):
        roc_auc(np.ones(3), np.ones(3))


def _separable(n=200, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = (torch.arange(n) % 2).float()
    emb = (
        torch.randn(n, d, generator=g) + 4.0 * y[:, None]
    )  # Bayes AUC ~0.998 * torch.nn.functional.one_hot(torch.tensor(0), d)
    return torch.nn.functional.normalize(emb, dim=-1), y


@pytest.mark.parametrize("loss", ["mse", "bce"])
def test_binary_reward_learns_a_separable_concept_and_reports_holdout_metrics(loss):
    emb, y = _separable()
    labels = pd.DataFrame(
        {"image_id": [f"i{k}" for k in range(len(y))], "label": y.numpy(), "majority": y.int().numpy()}
    )
    prompts = [f"p{k // 2 % 20}" for k in range(len(y))]  # 20 prompts of 10 images, both classes each
    cfg = RewardConfig(hidden=32, epochs=150, loss=loss, holdout=0.25)
    model, metrics, table = train_binary(cfg, emb, labels, prompts, "clip-x")
    assert metrics["holdout_n"] == 50 and metrics["train_n"] == 150 and metrics["holdout_prompts"] == 5
    assert metrics["holdout_auc"] > 0.9 and metrics["holdout_accuracy"] > 0.8
    assert set(table.split) == {"train", "holdout"} and model.config.clip == "clip-x"
    # The split is by prompt: no prompt has images on both sides.
    assert not set(table[table.split == "holdout"].prompt) & set(table[table.split == "train"].prompt)
    # Scores are on the label's 0..1 scale for both losses: BCE's are probabilities, not logits.
    with torch.no_grad():
        scores = model.score(emb)
    assert np.allclose(table.score, scores.numpy())
    if loss == "bce":
        assert model.config.loss == "bce" and 0 < scores.min() and scores.max() < 1
        assert torch.allclose(scores, torch.sigmoid(model(emb)))
        assert (model(emb) < 0).any()  # the raw logits would have been negative rewards


def test_a_bce_reward_scores_images_as_probabilities_after_a_round_trip(tmp_path):
    model = RewardModel(8, hidden=16, layers=1, clip="c", kind="binary", loss="bce").eval()
    model.save_pretrained(tmp_path)
    again = RewardModel.from_pretrained(tmp_path).eval()
    x = torch.randn(32, 8)
    with torch.no_grad():
        assert torch.equal(again.score(x), torch.sigmoid(model(x)))


def test_ranking_reward_orders_held_out_pairs_by_bradley_terry():
    emb, y = _separable(seed=1)
    ids = [f"i{k}" for k in range(len(y))]
    emb_of = dict(zip(ids, emb, strict=True))
    pos = [i for i, v in zip(ids, y, strict=True) if v == 1]
    neg = [i for i, v in zip(ids, y, strict=True) if v == 0]
    pairs = pd.DataFrame({"image_pos": pos, "image_neg": neg, "annotator": "a", "annotation_id": range(len(pos))})
    prompt_of = {i: f"p{k // 2 % 10}" for k, i in enumerate(ids)}  # each pair's two images share a prompt
    _, metrics, table = train_ranking(RewardConfig(hidden=32, epochs=150, holdout=0.3), emb_of, pairs, prompt_of, "c")
    held_prompts = {prompt_of[i] for i in table[table.split == "holdout"].image_pos}
    trained_prompts = {prompt_of[i] for i in table[table.split == "train"].image_pos}
    assert held_prompts and not held_prompts & trained_prompts
    assert metrics["holdout_pair_accuracy"] > 0.85


def test_reward_model_round_trips_through_from_pretrained(tmp_path):
    model = RewardModel(8, hidden=16, layers=2, clip="some/clip").eval()
    model.save_pretrained(tmp_path)
    again = RewardModel.from_pretrained(tmp_path).eval()
    x = torch.randn(4, 8)
    assert torch.equal(model(x), again(x)) and again.config.clip == "some/clip"


def _manifest(tmp_path, n, seed):
    images = render_many(sample_scenes(n, seed))
    rows = []
    (tmp_path / "images").mkdir(exist_ok=True)
    for k, img in enumerate(images):
        data = png_bytes(img)
        sha = hashlib.sha256(data).hexdigest()
        (tmp_path / "images" / f"{sha}.png").write_bytes(data)
        rows.append({"image_id": f"s{seed}_{k}", "uri": f"images/{sha}.png", "sha256": sha})
    return pd.DataFrame(rows)


def test_the_embedding_cache_encodes_only_images_it_has_not_seen(tmp_path):
    tok = build_tokenizer(tmp_path / "tok")
    clip, processor = make_clip(tok).eval(), make_clip_processor(tok)
    calls = []
    clip.vision_model.register_forward_hook(  # images per forward of the vision tower
        lambda m, args, kwargs, out: calls.append((args[0] if args else kwargs["pixel_values"]).shape[0]),
        with_kwargs=True,
    )
    first = _manifest(tmp_path, 40, seed=1)
    emb1 = EmbeddingCache(tmp_path / "cache", clip, processor, "tiny").get(first, tmp_path)
    assert sum(calls) == 40 and emb1.shape == (40, 64)
    calls.clear()
    more = pd.concat([first, _manifest(tmp_path, 4, seed=2)])  # 10% new
    cache = EmbeddingCache(tmp_path / "cache", clip, processor, "tiny")  # a new process, say
    emb2 = cache.get(more, tmp_path)
    assert sum(calls) == 4 and cache.computed == 4
    assert torch.equal(emb2[:40], emb1)
    calls.clear()
    EmbeddingCache(tmp_path / "cache", clip, processor, "another-clip").get(first, tmp_path)
    assert sum(calls) == 40  # another CLIP, another embedding space: never mixed
