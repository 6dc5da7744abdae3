import numpy as np
import pytest
import torch

from prefgen_kedro.models.mmd import gaussian_gram, gaussian_mmd2, weighted_mmd2


def reference_mmd2(x: np.ndarray, y: np.ndarray, factors) -> float:
    """The same estimator as plain double loops."""
    pooled = np.concatenate([x, y])
    distances = [
        float(np.sum((pooled[i] - pooled[j]) ** 2))
        for i in range(len(pooled))
        for j in range(len(pooled))
        if i != j
    ]
    scale = float(np.median(distances))

    def k(a, b):
        d = float(np.sum((a - b) ** 2))
        return sum(np.exp(-d / (2 * f * scale)) for f in factors) / len(factors)

    n, m = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(n) for j in range(m)) / (n * m)
    return xx + yy - 2 * xy


def test_matches_an_independent_double_loop():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(7, 3)), rng.normal(0.5, 1.2, size=(9, 3))
    factors = (0.5, 1.0, 2.0)
    got = gaussian_mmd2(torch.tensor(x), torch.tensor(y), factors).item()
    assert got == pytest.approx(reference_mmd2(x, y, factors), rel=1e-9, abs=1e-12)


def test_near_zero_for_one_distribution_and_grows_with_a_mean_shift():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(400, 4, generator=generator)
    same = torch.randn(400, 4, generator=generator)
    values = [gaussian_mmd2(x, same + shift).item() for shift in (0.0, 0.5, 1.0, 2.0)]
    assert abs(values[0]) < 0.01
    assert values == sorted(values) and values[-1] > 0.5


def test_gradient_flows_to_the_first_sample():
    x = torch.randn(16, 5, requires_grad=True)
    y = torch.randn(16, 5) + 1.0
    gaussian_mmd2(x, y).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_too_few_samples_is_an_error():
    with pytest.raises(ValueError, match="≥ 2 samples"):
        gaussian_mmd2(torch.zeros(1, 2), torch.zeros(3, 2))


def test_leading_dimensions_give_one_value_each_and_y_broadcasts():
    torch.manual_seed(0)
    x, y = torch.randn(3, 4, 5), torch.randn(6, 5)
    batched = gaussian_mmd2(x, y)
    assert batched.shape == (3,)
    assert torch.allclose(batched, torch.stack([gaussian_mmd2(item, y) for item in x]), atol=1e-6)


def test_weighted_mmd2_of_uniform_weights_is_the_biased_sample_mmd2():
    """Weights uniform on two subsets of the points give the V-statistic MMD² of the two
    samples under the same kernel: mean K within each, minus twice the mean across."""
    torch.manual_seed(0)
    points = torch.randn(6, 3, dtype=torch.float64)
    gram = gaussian_gram(points)
    first, second = [0, 1, 2], [3, 4]
    p = torch.zeros(6, dtype=torch.float64)
    q = torch.zeros(6, dtype=torch.float64)
    p[first], q[second] = 1 / 3, 1 / 2
    expected = (
        gram[first][:, first].mean()
        + gram[second][:, second].mean()
        - 2 * gram[first][:, second].mean()
    )
    assert weighted_mmd2(p, q, gram).item() == pytest.approx(expected.item(), rel=1e-12)
    assert weighted_mmd2(p, p, gram).item() == pytest.approx(0.0, abs=1e-15)
