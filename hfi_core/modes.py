"""The looks of a concept in people's feedback: which flagged images go together.

People flag images as showing the concept, and the concept as they judge it can have several
looks: stripes across, down or diagonal; nudity in a bathroom or on a beach. One textual-inversion
token over all of them averages them or collapses onto one (measured on the toy world: a single
token drew one colour in 53 of 64 samples and stripes in fewer than half), and what a removal
erases is what the token draws. So HFI can invert each look into a token of its own.

The looks are found without words, from the CLIP image embeddings the reward model already has:

1. the images *not* flagged span what varies whatever the concept: colour, shape, layout. The
   principal directions that explain ``explained`` of their variance are projected out of the
   flagged images' embeddings, so what is left varies with how the image shows the concept
   (on the toy world: 5 directions, and the flagged images then fall apart by stripe variant
   with a purity of 1.00, where plain k-means split them by colour or shape);
2. k-means (k-means++ starts, ``restarts`` of them, the lowest inertia kept) on what is left:
   ``modes`` clusters, or, with ``modes: 0``, the k in ``2..max_modes`` with the highest mean
   silhouette, and a single look when no k reaches ``min_silhouette`` (0.5: a single elongated
   blob, cut in two, scores 0.3-0.5; the toy world's three looks score 0.71 at k = 3).

Modes are numbered by size, largest first, so that a rerun names them alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Modes:
    """How the flagged images split into looks."""

    labels: np.ndarray
    """(N,) int: the mode of each flagged image (0 = the largest), -1 for images not flagged."""
    dims_removed: int = 0
    """Principal directions of the unflagged images projected out before clustering."""
    silhouettes: dict[int, float] = field(default_factory=dict)
    """Mean silhouette of the best clustering per k tried (``modes: 0``)."""

    @property
    def count(self) -> int:
        return int(self.labels.max()) + 1 if (self.labels >= 0).any() else 0

    def sizes(self) -> list[int]:
        return [int((self.labels == k).sum()) for k in range(self.count)]


def kmeans(x: np.ndarray, k: int, rng: np.random.Generator, iters: int = 100) -> tuple[np.ndarray, float]:
    """Lloyd's k-means from a k-means++ start. ``x`` (n, d); returns (labels (n,), inertia)."""
    n = len(x)
    centres = [x[rng.integers(n)]]
    for _ in range(1, k):  # k-means++: the next start far from the ones chosen, in proportion to d^2
        d2 = np.min([((x - c) ** 2).sum(1) for c in centres], axis=0)
        centres.append(x[rng.choice(n, p=d2 / d2.sum())] if d2.sum() > 0 else x[rng.integers(n)])
    c = np.stack(centres)  # (k, d)
    labels = np.full(n, -1)
    for _ in range(iters):
        new = ((x[:, None, :] - c[None]) ** 2).sum(-1).argmin(1)  # (n,)
        if (new == labels).all():
            break
        labels = new
        c = np.stack([x[labels == j].mean(0) if (labels == j).any() else c[j] for j in range(k)])
    return labels, float(((x - c[labels]) ** 2).sum())


def silhouette(x: np.ndarray, labels: np.ndarray) -> float:
    """Mean silhouette: for each point, (b - a) / max(a, b) with a its mean distance to its own
    cluster and b to the nearest other one; 0 for a point alone in its cluster."""
    dist = np.sqrt(np.maximum(((x[:, None, :] - x[None]) ** 2).sum(-1), 0.0))  # (n, n)
    ks = np.unique(labels)
    means = np.stack([dist[:, labels == k].mean(1) for k in ks], axis=1)  # (n, K): mean distance to each cluster
    sizes = np.array([(labels == k).sum() for k in ks])
    own = np.searchsorted(ks, labels)
    n_own = sizes[own]
    a = means[np.arange(len(x)), own] * n_own / np.maximum(n_own - 1, 1)  # without the point itself
    means[np.arange(len(x)), own] = np.inf
    b = means.min(1)
    s = np.where(n_own > 1, (b - a) / np.maximum(np.maximum(a, b), 1e-12), 0.0)
    return float(s.mean())


def find_modes(
    embeddings: np.ndarray,
    flagged: np.ndarray,
    *,
    modes: int = 0,
    max_modes: int = 4,
    explained: float = 0.95,
    min_silhouette: float = 0.5,
    restarts: int = 8,
    seed: int = 0,
    max_points: int = 2000,
) -> Modes:
    """Split the flagged images into looks.

    Args:
        embeddings: (N, D) image embeddings (CLIP's), any scale: each row is normalised.
        flagged: (N,) bool, the images people's feedback says show the concept.
        modes: how many looks; 0 chooses k in ``2..max_modes`` by silhouette (or 1).
        explained: share of the unflagged images' variance whose directions are projected out.
        max_points: silhouettes are measured on at most this many flagged images (a seeded sample).
    Raises:
        ValueError: when fewer flagged images than ``modes`` are given (``modes: 0`` then keeps one look).
    """
    flagged = np.asarray(flagged, dtype=bool)
    x = np.asarray(embeddings, dtype=np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    n_flagged = int(flagged.sum())
    labels = np.full(len(x), -1)
    if modes == 1 or (modes == 0 and n_flagged < 3):  # choosing needs k + 1 >= 3 images to score a split
        labels[flagged] = 0
        return Modes(labels)
    if n_flagged < modes:
        raise ValueError(f"invert.modes: {n_flagged} flagged image(s) cannot split into {modes} looks")
    rest, pos = x[~flagged], x[flagged]
    centred = pos - pos.mean(0)  # (P, D)
    dims = 0
    if len(rest) >= 2:
        _, s, vt = np.linalg.svd(rest - rest.mean(0), full_matrices=False)
        var = s**2
        if var.sum() > 0:
            dims = min(int(np.searchsorted(np.cumsum(var) / var.sum(), explained) + 1), x.shape[1] - 1)
            basis = vt[:dims]  # (dims, D): what varies among the images not flagged
            centred = centred - centred @ basis.T @ basis
    rng = np.random.default_rng(seed)

    def best(k: int) -> np.ndarray:
        return min((kmeans(centred, k, rng) for _ in range(restarts)), key=lambda r: r[1])[0]

    scores: dict[int, float] = {}
    if modes >= 2:
        chosen = best(modes)
    else:
        sample = rng.choice(n_flagged, min(n_flagged, max_points), replace=False)
        tries = {k: best(k) for k in range(2, min(max_modes, n_flagged - 1) + 1)}
        scores = {k: silhouette(centred[sample], lab[sample]) for k, lab in tries.items()}
        k_best = max(scores, key=lambda k: (scores[k], -k)) if scores else None
        if k_best is None or scores[k_best] < min_silhouette:
            labels[flagged] = 0
            return Modes(labels, dims, scores)
        chosen = tries[k_best]
    order = np.argsort([-(chosen == j).sum() for j in range(chosen.max() + 1)], kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    labels[flagged] = rank[chosen]
    return Modes(labels, dims, scores)
