"""The reward model r_psi(x) = MLP(CLIP_img(x)): what people's feedback says an image shows.

- Embeddings come from a frozen CLIP image encoder and are cached by image sha256, per CLIP
  model, so a nightly rerun embeds only the images it has not seen.
- Binary feedback: MSE on the mean label (the paper's), or BCE on it; a BCE model's scores are
  probabilities (the sigmoid of its logit), as an MSE model's are mean labels.
- Ranking feedback: Bradley-Terry, ``-log sigmoid(r(x+) - r(x-))`` on every ranked pair.
- A seeded held-out split by prompt gives the reported metrics: ROC-AUC and accuracy, or pair
  accuracy. Images of one prompt look alike, so a split by image would put near-copies of its
  training images in the held-out set and report an optimistic AUC.

The head is a diffusers ``ModelMixin``: ``RewardModel.from_pretrained(folder)`` loads it, and
its config names the CLIP it expects, so ``score_images`` needs nothing else.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm
from transformers import CLIPModel, CLIPProcessor

from hfi_core.config import RewardConfig
from hfi_core.embeddings import image_embeddings
from hfi_core.images import load_images
from hfi_core.metrics import roc_auc, roc_curve


class RewardModel(ModelMixin, ConfigMixin):
    """An MLP from a CLIP image embedding (D,) to a scalar reward."""

    @register_to_config
    def __init__(
        self,
        embed_dim: int,
        hidden: int = 256,
        layers: int = 2,
        dropout: float = 0.1,
        clip: str = "",
        kind: str = "binary",
        loss: str = "mse",
    ) -> None:
        super().__init__()
        dims = [embed_dim] + [hidden] * layers
        blocks: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:], strict=True):
            blocks += [nn.Linear(a, b), nn.GELU(), nn.Dropout(dropout)]
        self.mlp = nn.Sequential(*blocks, nn.Linear(dims[-1], 1))

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(B, D) L2-normalised CLIP embeddings -> (B,) raw outputs (a BCE model's are logits)."""
        return self.mlp(embeddings).squeeze(-1)

    def score(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(B, D) -> (B,) rewards: a BCE model's probability, any other model's raw output."""
        out = self(embeddings)
        return torch.sigmoid(out) if self.config.kind == "binary" and self.config.loss == "bce" else out


# ----------------------------------------------------------------------------- embedding cache


class EmbeddingCache:
    """CLIP image embeddings by image sha256, one safetensors file per CLIP model.

    The file is rewritten whole (through a temporary file and a rename) after each update, so
    a killed run leaves the previous cache intact.
    """

    def __init__(self, folder: Path, model: CLIPModel, processor: CLIPProcessor, identity: str) -> None:
        self.model, self.processor = model, processor
        key = hashlib.sha256(identity.encode()).hexdigest()[:16]
        self.path = Path(folder) / f"clip-{key}.safetensors"
        self.identity = identity
        self.store: dict[str, torch.Tensor] = load_file(self.path) if self.path.exists() else {}
        self.computed = 0  # images embedded by this object (the rest came from the cache)

    def get(self, manifest: pd.DataFrame, root: Path, batch_size: int = 64) -> torch.Tensor:
        """Embeddings of the manifest's images in row order, (N, D); computes only the missing."""
        missing = manifest[~manifest.sha256.isin(self.store.keys())].drop_duplicates("sha256")
        if len(missing):
            for i in tqdm(range(0, len(missing), batch_size), desc="embed", unit="batch", dynamic_ncols=True):
                chunk = missing.iloc[i : i + batch_size]
                emb = image_embeddings(self.model, self.processor, load_images(chunk, root))  # (b, D)
                self.store.update({sha: e.clone() for sha, e in zip(chunk.sha256, emb, strict=True)})
                self.computed += len(chunk)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            save_file(self.store, tmp, metadata={"clip": self.identity})
            os.replace(tmp, self.path)
        return torch.stack([self.store[s] for s in manifest.sha256])


# ----------------------------------------------------------------------------- training


def _split(keys: list[str], holdout: float, seed: int) -> set[str]:
    """A seeded held-out subset of ``keys`` (at least one key when holdout > 0)."""
    uniq = sorted(set(keys))
    rng = np.random.default_rng(seed)
    n = max(1, int(round(holdout * len(uniq)))) if holdout > 0 else 0
    return set(rng.permutation(uniq)[:n].tolist())


def _fit(model: RewardModel, loss_fn: Any, cfg: RewardConfig) -> list[float]:
    """Full-batch AdamW: labels are few and embeddings are cached, so one batch is the data."""
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    history = []
    model.train()
    for _ in tqdm(range(cfg.epochs), desc="reward", dynamic_ncols=True, leave=False):
        loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.append(loss.item())
    model.eval()
    return history


def train_binary(
    cfg: RewardConfig, emb: torch.Tensor, labels: pd.DataFrame, prompts: list[str], identity: str
) -> tuple[RewardModel, dict[str, Any], pd.DataFrame]:
    """Fit on binary labels. ``emb`` (N, D) and ``prompts`` (N,) are aligned with ``labels`` rows;
    the held-out images are those of a seeded share of the prompts.

    Returns the model, its metrics and a per-image table (image_id, prompt, split, label, score).
    """
    torch.manual_seed(cfg.seed)
    if len(prompts) != len(labels):
        raise ValueError(f"train_binary: {len(prompts)} prompts for {len(labels)} labelled images")
    held = _split(list(prompts), cfg.holdout, cfg.seed)
    is_test = torch.tensor([p in held for p in prompts], dtype=torch.bool)
    y = torch.tensor(labels.label.to_numpy(), dtype=torch.float32)  # mean label in [0, 1]
    model = RewardModel(emb.shape[1], cfg.hidden, cfg.layers, cfg.dropout, identity, "binary", cfg.loss)
    x_tr, y_tr = emb[~is_test], y[~is_test]

    def loss_fn() -> torch.Tensor:
        out = model(x_tr)
        return F.mse_loss(out, y_tr) if cfg.loss == "mse" else F.binary_cross_entropy_with_logits(out, y_tr)

    history = _fit(model, loss_fn, cfg)
    with torch.no_grad():
        score = model.score(emb)  # both losses on a 0..1 scale
    majority = labels.majority.to_numpy()
    table = pd.DataFrame(
        {"image_id": labels.image_id, "prompt": list(prompts), "split": np.where(is_test, "holdout", "train"),
         "label": labels.label, "majority": majority, "score": score.numpy()}
    )  # fmt: skip
    metrics: dict[str, Any] = {
        "kind": "binary",
        "loss": cfg.loss,
        "final_train_loss": history[-1],
        "holdout_prompts": len(held),
    }
    for split in ("train", "holdout"):
        t = table[table.split == split]
        if len(t):
            metrics[f"{split}_n"] = len(t)
            metrics[f"{split}_accuracy"] = float(((t.score >= 0.5) == (t.majority == 1)).mean())
            if t.majority.nunique() == 2:
                metrics[f"{split}_auc"] = roc_auc(t.score.to_numpy(), t.majority.to_numpy())
    return model, metrics, table


def train_ranking(
    cfg: RewardConfig, emb_of: dict[str, torch.Tensor], pairs: pd.DataFrame, prompt_of: dict[str, str], identity: str
) -> tuple[RewardModel, dict[str, Any], pd.DataFrame]:
    """Bradley-Terry on ranked pairs, split by prompt: a pair is held out when both its images come
    from held-out prompts, trains when neither does, and is dropped otherwise (no held-out image
    is ever trained on)."""
    torch.manual_seed(cfg.seed)
    held = _split(sorted(set(prompt_of.values())), cfg.holdout, cfg.seed)
    pos_held, neg_held = pairs.image_pos.map(prompt_of).isin(held), pairs.image_neg.map(prompt_of).isin(held)
    pairs = pairs[pos_held == neg_held].reset_index(drop=True)
    split = np.where(pos_held[pos_held == neg_held].to_numpy(), "holdout", "train")
    pos = torch.stack([emb_of[i] for i in pairs.image_pos])  # (P, D)
    neg = torch.stack([emb_of[i] for i in pairs.image_neg])
    tr = torch.tensor(split == "train")
    model = RewardModel(pos.shape[1], cfg.hidden, cfg.layers, cfg.dropout, identity, "ranking")
    history = _fit(model, lambda: -F.logsigmoid(model(pos[tr]) - model(neg[tr])).mean(), cfg)
    with torch.no_grad():
        margin = (model(pos) - model(neg)).numpy()
    table = pairs.assign(split=split, margin=margin)
    metrics: dict[str, Any] = {"kind": "ranking", "final_train_loss": history[-1]}
    for s in ("train", "holdout"):
        t = table[table.split == s]
        if len(t):
            metrics[f"{s}_pairs"] = len(t)
            metrics[f"{s}_pair_accuracy"] = float((t.margin > 0).mean())
    return model, metrics, table


def _plot(table: pd.DataFrame, metrics: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 3.4))
    if metrics["kind"] == "binary":
        for split, style in (("train", ":"), ("holdout", "-")):
            t = table[table.split == split]
            if t.majority.nunique() == 2:
                fpr, tpr = roc_curve(t.score.to_numpy(), t.majority.to_numpy())
                axes[0].plot(
                    fpr, tpr, style, label=f"{split} AUC {roc_auc(t.score.to_numpy(), t.majority.to_numpy()):.3f}"
                )
        axes[0].plot([0, 1], [0, 1], color="grey", lw=0.5)
        axes[0].set(xlabel="false positive rate", ylabel="true positive rate", title="ROC (held-out vs train)")
        if len(axes[0].lines) > 1:  # a split with one class has no ROC curve
            axes[0].legend(fontsize=8)
        t = table[table.split == "holdout"]
        bins = np.linspace(0, 1, 11)
        idx = np.clip(np.digitize(t.score.clip(0, 1), bins) - 1, 0, 9)
        centres = [(bins[b] + bins[b + 1]) / 2 for b in range(10) if (idx == b).any()]
        means = [t.label[idx == b].mean() for b in range(10) if (idx == b).any()]
        axes[1].plot([0, 1], [0, 1], color="grey", lw=0.5)
        axes[1].plot(centres, means, "o-")
        axes[1].set(xlabel="predicted reward", ylabel="mean human label", title="calibration (held-out)")
    else:
        for split in ("train", "holdout"):
            axes[0].hist(table[table.split == split].margin, bins=30, alpha=0.6, label=split)
        axes[0].axvline(0, color="k", lw=0.5)
        axes[0].set(xlabel="r(x+) - r(x-)", title="ranked-pair margins")
        axes[0].legend(fontsize=8)
        axes[1].bar(
            ["train", "holdout"], [metrics.get("train_pair_accuracy", 0), metrics.get("holdout_pair_accuracy", 0)]
        )
        axes[1].set(ylim=(0, 1), title="pair accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def train_reward(
    cfg: RewardConfig,
    manifest: pd.DataFrame,
    image_root: Path,
    feedback_dir: Path,
    out: Path,
    *,
    cache_dir: Path | None = None,
    clip: tuple[CLIPModel, CLIPProcessor] | None = None,
    device: str = "auto",
) -> dict[str, Any]:
    """Train the reward model on ``feedback_dir``'s labels and write it to ``out``.

    Writes ``out/model/`` (``RewardModel.from_pretrained``), ``metrics.json``, ``roc.png`` and
    ``scores.parquet``. ``cache_dir`` defaults to ``out/../embedding_cache`` so reruns in the
    same run store reuse embeddings. Returns the metrics (with ``embedded``: images encoded now).
    """
    from hfi_core.models import load_clip

    out = Path(out)
    feedback_dir = Path(feedback_dir)
    model, processor = clip or load_clip(cfg.clip, device)  # embeddings come back on the CPU
    cache = EmbeddingCache(cache_dir or out.parent / "embedding_cache", model, processor, cfg.clip)
    labels_path, pairs_path = feedback_dir / "labels.parquet", feedback_dir / "pairs.parquet"
    if labels_path.exists():
        labels = pd.read_parquet(labels_path)
        rows = manifest.set_index("image_id").loc[labels.image_id].reset_index()
        emb = cache.get(rows, image_root)  # (N, D)
        reward, metrics, table = train_binary(cfg, emb, labels, rows.prompt.tolist(), cfg.clip)
    elif pairs_path.exists():
        pairs = pd.read_parquet(pairs_path)
        ids = sorted(set(pairs.image_pos) | set(pairs.image_neg))
        rows = manifest.set_index("image_id").loc[ids].reset_index()
        emb_of = dict(zip(rows.image_id, cache.get(rows, image_root), strict=True))
        prompt_of = dict(zip(rows.image_id, rows.prompt, strict=True))
        reward, metrics, table = train_ranking(cfg, emb_of, pairs, prompt_of, cfg.clip)
    else:
        raise FileNotFoundError(f"{feedback_dir}: neither labels.parquet nor pairs.parquet (run `hfi feedback ingest`)")
    metrics["embedded"] = cache.computed
    metrics["config"] = cfg.model_dump(mode="json")
    out.mkdir(parents=True, exist_ok=True)
    reward.save_pretrained(out / "model")
    table.to_parquet(out / "scores.parquet", index=False)
    _plot(table, metrics, out / "roc.png")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def score_images(
    model_dir: Path, manifest: pd.DataFrame, image_root: Path, *, cache_dir: Path | None = None, device: str = "auto"
) -> np.ndarray:
    """Rewards of the manifest's images, (N,), with the CLIP the reward model was trained on."""
    return embed_and_score(model_dir, manifest, image_root, cache_dir=cache_dir, device=device)[1]


@torch.no_grad()
def embed_and_score(
    model_dir: Path, manifest: pd.DataFrame, image_root: Path, *, cache_dir: Path | None = None, device: str = "auto"
) -> tuple[np.ndarray, np.ndarray]:
    """The manifest's images' CLIP embeddings (N, D) and rewards (N,), with the reward model's CLIP."""
    from hfi_core.models import load_clip

    reward = RewardModel.from_pretrained(model_dir, use_safetensors=True).eval()
    clip_model, processor = load_clip(reward.config.clip, device)
    if cache_dir is not None:
        emb = EmbeddingCache(cache_dir, clip_model, processor, reward.config.clip).get(manifest, image_root)
    else:
        emb = image_embeddings(clip_model, processor, load_images(manifest, image_root))
    return emb.float().numpy(), reward.score(emb).numpy()
