"""Per-user statistics for the benchmark (DESIGN.md §5): bootstrap CIs, win-rates, CLIP scores.

Every metric is first reduced to one value per test user (the mean over that user's
images), and a confidence interval resamples *users*, not images: images of one user are
not independent draws. Set statistics (FID, KID) resample users too. Public API:
``bootstrap_ci``, ``bootstrap_set_statistic``, ``per_user_wins``, ``win_rate``, ``clip_score``,
``clip_preference``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

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


def per_user_wins(ours: Mapping[str, float], theirs: Mapping[str, float]) -> dict[str, float]:
    """1 where ``ours`` scores higher for a user (present in both), 0.5 for a tie, else 0."""
    users = sorted(set(ours) & set(theirs))
    if not users:
        raise ValueError("the two methods share no user")
    return {u: 1.0 if ours[u] > theirs[u] else 0.5 if ours[u] == theirs[u] else 0.0 for u in users}


def win_rate(ours: Mapping[str, float], theirs: Mapping[str, float]) -> dict[str, float]:
    """Share of users (present in both) where ``ours`` scores higher; a tie counts half."""
    wins = per_user_wins(ours, theirs)
    return {"win_rate": float(np.mean(list(wins.values()))), "n": len(wins)}


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


def bootstrap_set_statistic(
    groups: Sequence[np.ndarray],
    statistic: Callable[[np.ndarray], float],
    *,
    resamples: int = 200,
    level: float = 0.95,
    seed: int = 0,
    floor: float | None = None,
) -> dict[str, float]:
    """A statistic of a whole set (FID, KID) with a bootstrap interval over users.

    ``groups`` holds each user's items (rows); a resample draws users with replacement and
    pools their rows. ``mean`` is the statistic of all rows, the number every paper would
    compute. A resample repeats users, which shrinks the set's spread and biases FID
    upward: the resampled values can all sit above θ, so the plain percentile interval
    misses θ. The interval is therefore the percentile interval moved by the bootstrap's
    bias estimate (mean of the resamples − θ): the resamples' spread around θ. ``floor``
    clips it at a bound the statistic cannot cross (0 for FID).
    """
    if not groups:
        raise ValueError("need at least one user's items")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    rng = np.random.default_rng(seed)
    values = [
        statistic(np.concatenate([groups[i] for i in rng.integers(len(groups), size=len(groups))]))
        for _ in range(resamples)
    ]
    tail = (1 - level) / 2 * 100
    q_low, q_high = np.percentile(values, [tail, 100 - tail])
    point = float(statistic(np.concatenate(list(groups))))
    bias = float(np.mean(values)) - point
    low, high = q_low - bias, q_high - bias
    if floor is not None:
        low, high = max(low, floor), max(high, floor)
    return {"mean": point, "ci_low": float(low), "ci_high": float(high), "n": len(groups)}
