"""The alignment MLP's losses, retrieval and diversity on cases worked by hand."""

from __future__ import annotations

import pytest
import torch

from prefgen_kedro.models.alignment import (
    Aligners,
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


def test_mmd_loss_is_the_mean_over_contexts_of_their_tokens_mmd_to_the_user_targets():
    torch.manual_seed(0)
    contexts = [torch.randn(4, 3), torch.randn(2, 3)]
    targets = [torch.randn(3, 5), torch.randn(5, 5)]
    model = AlignmentMlp(in_dim=3, out_dim=5, hidden_dim=8, tokens=3)
    batch = UserSetsDataset.collate(
        [{"contexts": c, "targets": t} for c, t in zip(contexts, targets, strict=True)]
    )
    loss, _ = alignment_loss(model, batch, objective="mmd")
    per_context = [
        gaussian_mmd2(tokens, t)
        for c, t in zip(contexts, targets, strict=True)
        for tokens in model.token_sets(c)
    ]
    expected = torch.stack(per_context).mean()  # the padded third context never counts
    assert len(per_context) == 6 and torch.allclose(loss, expected, atol=1e-6)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    assert torch.isclose(
        torch.tensor(set_mmd2([model.token_sets(c) for c in contexts], targets)),
        expected,
        atol=1e-5,
    )


def test_the_aligner_standardises_with_the_training_statistics_it_keeps(tmp_path):
    """An e_sem whose users differ in a tiny part of a large shared value: standardised, the
    difference is what the MLP sees; the statistics travel with the checkpoint."""
    torch.manual_seed(0)
    inputs = 5.0 + 0.01 * torch.randn(50, 4)
    model = AlignmentMlp(in_dim=4, out_dim=2, hidden_dim=8, tokens=2)
    model.fit_standardisation(inputs)
    standardised = (inputs - model.input_mean) / model.input_std
    assert torch.allclose(standardised.mean(0), torch.zeros(4), atol=1e-3)
    assert torch.allclose(standardised.std(0), torch.ones(4), atol=1e-3)
    bundle = Aligners.of({"prefgen": model})
    bundle.save_pretrained(tmp_path)
    loaded = Aligners.from_pretrained(tmp_path)["prefgen"]
    assert torch.equal(loaded(inputs), model(inputs))
    assert loaded(inputs).shape == (50, 4) and loaded.token_sets(inputs).shape == (50, 2, 2)
    with pytest.raises(KeyError, match="no aligner 'other'"):
        loaded_bundle = Aligners.from_pretrained(tmp_path)
        loaded_bundle["other"]
    with pytest.raises(ValueError, match="at least 2"):
        AlignmentMlp(in_dim=4, out_dim=2, hidden_dim=8, tokens=1)


def test_mse_pulls_the_tokens_to_the_targets_mean_mmd_spreads_them_over_the_targets():
    """Two users whose targets are two opposite points each: MSE maps every token of a
    context to the middle; MMD spreads a context's two tokens over its user's targets."""
    torch.manual_seed(0)
    contexts = [torch.randn(6, 4) + 3, torch.randn(6, 4) - 3]
    targets = [torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[-1.0, 0.0], [0.0, -1.0]])]
    dataset = UserSetsDataset(contexts, targets)
    batch = UserSetsDataset.collate([dataset[0], dataset[1]])
    spread = {}
    for objective in ("mmd", "mse"):
        torch.manual_seed(1)
        model = AlignmentMlp(in_dim=4, out_dim=2, hidden_dim=32, tokens=2)
        model.fit_standardisation(torch.cat(contexts))
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(400):
            optimizer.zero_grad()
            alignment_loss(model, batch, objective=objective)[0].backward()
            optimizer.step()
        with torch.no_grad():
            spread[objective] = mean_pairwise_cosine_distance(model.token_sets(contexts[0])[0])
    assert spread["mse"] < 0.05 and spread["mmd"] > 0.5


def test_retrieval_ranks_true_phrases_by_cosine():
    vocabulary = torch.eye(6)
    mapped = torch.tensor([[1.0, 0.9, 0.0, 0.0, 0.0, 0.1], [0.0, 0.0, 0.0, 0.0, 0.0, 1.0]])
    # one token per user; a user's phrases rank by their best cosine to its tokens
    result = attribute_retrieval(mapped[:, None], vocabulary, [[0, 1], [2]], k=2)
    # user 0: phrases 0 and 1 rank 1 and 2; user 1: phrase 2 ranks 2..6 (ties: stable order)
    assert result["recall_at_2"] == pytest.approx((1.0 + 0.0) / 2)
    assert result["phrases"] == 6
    assert result["mean_rank"] >= 1.5


def test_diversity_is_zero_for_parallel_and_one_for_orthogonal_rows():
    assert mean_pairwise_cosine_distance(torch.ones(4, 3) * torch.arange(1, 5)[:, None]) == (
        pytest.approx(0.0, abs=1e-6)
    )
    assert mean_pairwise_cosine_distance(torch.eye(3)) == pytest.approx(1.0)
