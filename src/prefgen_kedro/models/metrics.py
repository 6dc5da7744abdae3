"""Per-user statistics for the benchmark (DESIGN.md §5): bootstrap CIs, win-rates, CLIP scores.

Every metric is first reduced to one value per test user (the mean over that user's
images), and a confidence interval resamples *users*, not images: images of one user are
not independent draws. Public API: ``bootstrap_ci``, ``win_rate``, ``clip_score``,
``clip_preference``.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F


def bootstrap_ci(
    per_user: np.ndarray, *, resamples: int = 2000, level: float = 0.95, seed: int = 0
) -> dict[str, float]:
    """Mean of ``per_user`` values and its percentile bootstrap interval over users."""
    values = np.asarray(per_user, dtype=float)
    if values.ndim != 1 or len(values) == 0:
        raise ValueError(f"need a non-empty 1-D array of per-user values, got shape {values.shape}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(len(values), size=(resamples, len(values)))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return {
        "mean": float(values.mean()),
        "ci_low": float(low),
        "ci_high": float(high),
        "n": len(values),
    }


def win_rate(ours: Mapping[str, float], theirs: Mapping[str, float]) -> dict[str, float]:
    """Share of users (present in both) where ``ours`` scores higher; a tie counts half."""
    users = sorted(set(ours) & set(theirs))
    if not users:
        raise ValueError("the two methods share no user")
    wins = [1.0 if ours[u] > theirs[u] else 0.5 if ours[u] == theirs[u] else 0.0 for u in users]
    return {"win_rate": float(np.mean(wins)), "n": len(users)}


def clip_score(image_embeddings: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
    """CLIP score per (image, its prompt) pair: 100 × max(cos, 0) (Hessel et al., 2021)."""
    cosine = F.cosine_similarity(image_embeddings.float(), text_embeddings.float(), dim=-1)
    return 100.0 * cosine.clamp_min(0.0)


def clip_preference(
    image_embeddings: torch.Tensor, liked: torch.Tensor, disliked: torch.Tensor
) -> torch.Tensor:
    """CLIP-I per image: mean cosine to the user's liked context images minus mean cosine to
    the disliked ones. ``liked``/``disliked`` are (N, K, D): each image's own user's context."""
    image = F.normalize(image_embeddings.float(), dim=-1)[:, None]
    to_liked = (image * F.normalize(liked.float(), dim=-1)).sum(-1).mean(-1)
    to_disliked = (image * F.normalize(disliked.float(), dim=-1)).sum(-1).mean(-1)
    return to_liked - to_disliked
