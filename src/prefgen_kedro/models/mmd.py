"""Multi-kernel Gaussian maximum mean discrepancy (MMD²), PrefGen's alignment loss.

Matching distributions rather than points keeps the mapped user embeddings as diverse as
their targets; a point-wise MSE (the ``no_mmd`` ablation) pulls them to the mean.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

DEFAULT_BANDWIDTH_FACTORS = (0.25, 0.5, 1.0, 2.0, 4.0)


def median_heuristic(squared_distances: torch.Tensor) -> torch.Tensor:
    """The median of the off-diagonal squared distances of each (..., n, n) matrix (a
    constant: no gradient), the midpoint of the two middle values for an even count, as
    numpy takes it."""
    n = squared_distances.shape[-1]
    mask = ~torch.eye(n, dtype=torch.bool, device=squared_distances.device)
    off_diagonal = squared_distances[..., mask].detach()
    return off_diagonal.quantile(0.5, dim=-1).clamp_min(1e-12)


def gaussian_mmd2(
    x: torch.Tensor,
    y: torch.Tensor,
    bandwidth_factors: Sequence[float] = DEFAULT_BANDWIDTH_FACTORS,
) -> torch.Tensor:
    """Unbiased MMD² between samples ``x`` (..., n, d) and ``y`` (..., m, d), n, m ≥ 2, one
    value per leading index (``y`` broadcasts against ``x``'s leading dimensions).

    The kernel is the mean of Gaussians ``exp(-||a - b||² / (2 f σ²))``, one per factor f,
    with σ² the median squared distance over the pooled sample (median heuristic); the
    mean keeps the kernel in [0, 1] whatever the number of factors.
    """
    n, m = x.shape[-2], y.shape[-2]
    if n < 2 or m < 2:
        raise ValueError(f"unbiased MMD needs ≥ 2 samples on each side, got {n} and {m}")
    y = y.expand(*x.shape[:-2], m, y.shape[-1])
    pooled = torch.cat([x, y], dim=-2)
    squared = torch.cdist(pooled, pooled).pow(2)
    scale = median_heuristic(squared)[..., None, None]
    kernel = sum(
        torch.exp(-squared / (2.0 * factor * scale)) for factor in bandwidth_factors
    ) / len(bandwidth_factors)
    k_xx, k_yy, k_xy = kernel[..., :n, :n], kernel[..., n:, n:], kernel[..., :n, n:]
    diagonal = lambda k: k.diagonal(dim1=-2, dim2=-1).sum(-1)  # noqa: E731
    within_x = (k_xx.sum((-2, -1)) - diagonal(k_xx)) / (n * (n - 1))
    within_y = (k_yy.sum((-2, -1)) - diagonal(k_yy)) / (m * (m - 1))
    return within_x + within_y - 2.0 * k_xy.mean((-2, -1))


def gaussian_gram(
    points: torch.Tensor, bandwidth_factors: Sequence[float] = DEFAULT_BANDWIDTH_FACTORS
) -> torch.Tensor:
    """The kernel of ``gaussian_mmd2`` between every pair of ``points`` (V, d): (V, V), with
    σ² the median squared distance between distinct points."""
    squared = torch.cdist(points, points).pow(2)
    scale = median_heuristic(squared)
    return sum(torch.exp(-squared / (2.0 * factor * scale)) for factor in bandwidth_factors) / len(
        bandwidth_factors
    )


def weighted_mmd2(p: torch.Tensor, q: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """MMD² between two distributions on the same V points, given as weights ``p`` and
    ``q`` (..., V) that sum to one, under the kernel ``gram`` (V, V): ``(p − q)ᵀ K (p − q)``,
    one value per leading index (the V-statistic: exact for distributions on those points)."""
    difference = p - q
    return torch.einsum("...i,ij,...j->...", difference, gram, difference)
