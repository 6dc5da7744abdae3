"""The alignment MLP's losses, retrieval and diversity on cases worked by hand."""

from __future__ import annotations

import pytest
import torch

from prefgen_kedro.models.alignment import (
    AlignmentMlp,
    UserSetsDataset,
    alignment_loss,
    attribute_retrieval,
    mean_pairwise_cosine_distance,
    set_mmd2,
)
from prefgen_kedro.models.mmd import gaussian_mmd2


def test_collate_pads_sets_and_masks_the_padding():
    dataset = UserSetsDataset(
        [torch.ones(3, 2), torch.ones(1, 2)], [torch.zeros(2, 4), torch.zeros(4, 4)]
    )
    batch = UserSetsDataset.collate([dataset[0], dataset[1]])
    assert batch["contexts"].shape == (2, 3, 2) and batch["targets"].shape == (2, 4, 4)
    assert batch["contexts_mask"].tolist() == [[True] * 3, [True, False, False]]
    assert batch["targets_mask"].sum(dim=1).tolist() == [2, 4]
    with pytest.raises(ValueError, match="empty target set"):
        UserSetsDataset([torch.ones(2, 2)], [torch.zeros(0, 4)])


def test_mmd_loss_is_the_mean_of_per_user_mmd_over_unpadded_rows():
    torch.manual_seed(0)
    contexts = [torch.randn(4, 3), torch.randn(2, 3)]
    targets = [torch.randn(3, 5), torch.randn(5, 5)]
    model = AlignmentMlp(in_dim=3, out_dim=5, hidden_dim=8)
    batch = UserSetsDataset.collate(
        [{"contexts": c, "targets": t} for c, t in zip(contexts, targets, strict=True)]
    )
    loss, _ = alignment_loss(model, batch, objective="mmd")
    expected = torch.stack(
        [gaussian_mmd2(model(c), t) for c, t in zip(contexts, targets, strict=True)]
    ).mean()
    assert torch.allclose(loss, expected, atol=1e-6)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    assert torch.isclose(
        torch.tensor(set_mmd2([model(c) for c in contexts], targets)), expected, atol=1e-5
    )


def test_mse_pulls_to_the_targets_mean_and_loses_diversity_mmd_keeps():
    """Two users whose targets are two opposite points each: trained on the same contexts,
    MSE maps all contexts of a user to the middle; MMD spreads them over the targets."""
    torch.manual_seed(0)
    contexts = [torch.randn(6, 4) + 3, torch.randn(6, 4) - 3]
    targets = [torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[-1.0, 0.0], [0.0, -1.0]])]
    dataset = UserSetsDataset(contexts, targets)
    batch = UserSetsDataset.collate([dataset[0], dataset[1]])
    spread = {}
    for objective in ("mmd", "mse"):
        torch.manual_seed(1)
        model = AlignmentMlp(in_dim=4, out_dim=2, hidden_dim=32)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(400):
            optimizer.zero_grad()
            alignment_loss(model, batch, objective=objective)[0].backward()
            optimizer.step()
        with torch.no_grad():
            spread[objective] = mean_pairwise_cosine_distance(model(contexts[0]))
    assert spread["mse"] < 0.05 < spread["mmd"]


def test_retrieval_ranks_true_phrases_by_cosine():
    vocabulary = torch.eye(6)
    mapped = torch.tensor([[1.0, 0.9, 0.0, 0.0, 0.0, 0.1], [0.0, 0.0, 0.0, 0.0, 0.0, 1.0]])
    result = attribute_retrieval(mapped, vocabulary, [[0, 1], [2]], k=2)
    # user 0: phrases 0 and 1 rank 1 and 2; user 1: phrase 2 ranks 2..6 (ties: stable order)
    assert result["recall_at_2"] == pytest.approx((1.0 + 0.0) / 2)
    assert result["phrases"] == 6
    assert result["mean_rank"] >= 1.5


def test_diversity_is_zero_for_parallel_and_one_for_orthogonal_rows():
    assert mean_pairwise_cosine_distance(torch.ones(4, 3) * torch.arange(1, 5)[:, None]) == (
        pytest.approx(0.0, abs=1e-6)
    )
    assert mean_pairwise_cosine_distance(torch.eye(3)) == pytest.approx(1.0)
