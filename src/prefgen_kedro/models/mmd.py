"""Multi-kernel Gaussian maximum mean discrepancy (MMD²), PrefGen's alignment loss.

Matching distributions rather than points keeps the mapped user embeddings as diverse as
their targets; a point-wise MSE (the ``no_mmd`` ablation) pulls them to the mean.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

DEFAULT_BANDWIDTH_FACTORS = (0.25, 0.5, 1.0, 2.0, 4.0)


def median_heuristic(squared_distances: torch.Tensor) -> torch.Tensor:
    """The median of the off-diagonal squared distances (a constant: no gradient), the
    midpoint of the two middle values for an even count, as numpy takes it."""
    n = squared_distances.shape[0]
    mask = ~torch.eye(n, dtype=torch.bool, device=squared_distances.device)
    return squared_distances[mask].detach().quantile(0.5).clamp_min(1e-12)


def gaussian_mmd2(
    x: torch.Tensor,
    y: torch.Tensor,
    bandwidth_factors: Sequence[float] = DEFAULT_BANDWIDTH_FACTORS,
) -> torch.Tensor:
    """Unbiased MMD² between samples ``x`` (n, d) and ``y`` (m, d), n, m ≥ 2.

    The kernel is the mean of Gaussians ``exp(-||a - b||² / (2 f σ²))``, one per factor f,
    with σ² the median squared distance over the pooled sample (median heuristic); the
    mean keeps the kernel in [0, 1] whatever the number of factors.
    """
    n, m = x.shape[0], y.shape[0]
    if n < 2 or m < 2:
        raise ValueError(f"unbiased MMD needs ≥ 2 samples on each side, got {n} and {m}")
    pooled = torch.cat([x, y])
    squared = torch.cdist(pooled, pooled).pow(2)
    scale = median_heuristic(squared)
    kernel = sum(
        torch.exp(-squared / (2.0 * factor * scale)) for factor in bandwidth_factors
    ) / len(bandwidth_factors)
    k_xx, k_yy, k_xy = kernel[:n, :n], kernel[n:, n:], kernel[:n, n:]
    within_x = (k_xx.sum() - k_xx.diagonal().sum()) / (n * (n - 1))
    within_y = (k_yy.sum() - k_yy.diagonal().sum()) / (m * (m - 1))
    return within_x + within_y - 2.0 * k_xy.mean()
