"""The alignment MLP's losses, retrieval and diversity on cases worked by hand."""

from __future__ import annotations

import pytest
import torch

from prefgen_kedro.models.alignment import (
    Aligners,
    AlignmentMlp,
    UserSetsDataset,
    alignment_loss,
    mean_pairwise_cosine_distance,
    phrase_retrieval,
    set_mmd2,
)
from prefgen_kedro.models.mmd import gaussian_gram, weighted_mmd2


def test_collate_pads_contexts_and_weighs_each_users_phrases_equally():
    dataset = UserSetsDataset([torch.ones(3, 2), torch.ones(1, 2)], [[0, 2], [1, 2, 3, 4]], 5)
    batch = UserSetsDataset.collate([dataset[0], dataset[1]])
    assert batch["contexts"].shape == (2, 3, 2) and batch["targets"].shape == (2, 5)
    assert batch["contexts_mask"].tolist() == [[True] * 3, [True, False, False]]
    assert batch["targets"].tolist() == [[0.5, 0, 0.5, 0, 0], [0, 0.25, 0.25, 0.25, 0.25]]
    with pytest.raises(ValueError, match="empty target set"):
        UserSetsDataset([torch.ones(2, 2)], [[]], 5)


def _aligner(in_dim: int = 3, vocabulary: torch.Tensor | None = None, **kwargs) -> AlignmentMlp:
    vocabulary = torch.eye(5, 6) if vocabulary is None else vocabulary
    model = AlignmentMlp(
        in_dim=in_dim,
        out_dim=vocabulary.shape[1],
        vocabulary_size=len(vocabulary),
        hidden_dim=kwargs.pop("hidden_dim", 8),
        tokens=kwargs.pop("tokens", 2),
        **kwargs,
    )
    model.set_vocabulary(vocabulary)
    return model


def test_mmd_loss_is_the_mean_over_contexts_of_the_distributions_mmd_to_the_user_targets():
    torch.manual_seed(0)
    contexts = [torch.randn(4, 3), torch.randn(2, 3)]
    phrases = [[0, 1], [2, 3, 4]]
    model = _aligner()
    gram = gaussian_gram(model.vocabulary)
    batch = UserSetsDataset.collate(list(UserSetsDataset(contexts, phrases, 5)))
    loss, _ = alignment_loss(model, batch, objective="mmd", gram=gram)
    per_context = [
        weighted_mmd2(probabilities, UserSetsDataset([c], [p], 5).targets[0], gram)
        for c, p in zip(contexts, phrases, strict=True)
        for probabilities in model.distribution(c)
    ]
    expected = torch.stack(per_context).mean()  # the padded contexts never count
    assert len(per_context) == 6 and torch.allclose(loss, expected, atol=1e-6)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_the_aligner_keeps_its_statistics_and_vocabulary_and_picks_its_top_phrases(tmp_path):
    """An e_sem whose users differ in a tiny part of a large shared value: standardised, the
    difference is what the MLP sees; statistics and vocabulary travel with the checkpoint."""
    torch.manual_seed(0)
    inputs = 5.0 + 0.01 * torch.randn(50, 4)
    model = _aligner(in_dim=4, dropout=0.5).eval()
    model.fit_standardisation(inputs)
    standardised = (inputs - model.input_mean) / model.input_std
    assert torch.allclose(standardised.mean(0), torch.zeros(4), atol=1e-3)
    assert torch.allclose(standardised.std(0), torch.ones(4), atol=1e-3)
    bundle = Aligners.of({"prefgen": model})
    bundle.save_pretrained(tmp_path)
    loaded = Aligners.from_pretrained(tmp_path)["prefgen"]
    assert torch.equal(loaded(inputs), model(inputs)) and loaded(inputs).shape == (50, 5)
    tokens = loaded.token_sets(inputs)
    best = model(inputs).topk(2).indices
    assert tokens.shape == (50, 2, 6) and torch.equal(tokens, torch.eye(5, 6)[best])
    with pytest.raises(KeyError, match="no aligner 'other'"):
        Aligners.from_pretrained(tmp_path)["other"]
    with pytest.raises(ValueError, match="at least 2"):
        AlignmentMlp(in_dim=4, out_dim=2, vocabulary_size=5, hidden_dim=8, tokens=1)


def test_the_picks_take_at_most_one_phrase_of_a_group_and_survive_a_checkpoint(tmp_path):
    """Phrases 0-2 are one group (say, colours), 3 and 4 two more: the best two groups are
    picked, each by its best phrase, whatever the runner-up of the first group scores."""
    model = _aligner(vocabulary=torch.eye(5, 6))
    model.set_vocabulary(torch.eye(5, 6), groups=[0, 0, 0, 1, 2])
    scores = torch.tensor([[3.0, 2.5, 0.0, 1.0, 2.0], [0.0, 0.1, 0.2, 5.0, 4.0]])
    assert model.picks(scores).tolist() == [[0, 4], [3, 4]]
    Aligners.of({"prefgen": model}).save_pretrained(tmp_path)
    loaded = Aligners.from_pretrained(tmp_path)["prefgen"]
    assert loaded.phrase_groups.tolist() == [0, 0, 0, 1, 2]
    assert loaded.picks(scores).tolist() == [[0, 4], [3, 4]]
    with pytest.raises(ValueError, match="1 phrase groups cannot give 2 tokens"):
        model.set_vocabulary(torch.eye(5, 6), groups=[0] * 5)
    with pytest.raises(ValueError, match="one group per phrase"):
        model.set_vocabulary(torch.eye(5, 6), groups=[0, 1])


@pytest.mark.parametrize("objective", ["mmd", "mse"])
def test_training_puts_a_users_mass_on_its_phrases(objective):
    """Two users, two phrases each, of six orthogonal ones: after training, each user's two
    most probable phrases are its own, and its tokens are their states."""
    torch.manual_seed(0)
    contexts = [torch.randn(6, 4) + 3, torch.randn(6, 4) - 3]
    phrases = [[0, 1], [4, 5]]
    model = _aligner(in_dim=4, vocabulary=torch.eye(6), hidden_dim=32)
    model.fit_standardisation(torch.cat(contexts))
    batch = UserSetsDataset.collate(list(UserSetsDataset(contexts, phrases, 6)))
    gram = gaussian_gram(model.vocabulary)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):
        optimizer.zero_grad()
        alignment_loss(model, batch, objective=objective, gram=gram)[0].backward()
        optimizer.step()
    with torch.no_grad():
        for context, own in zip(contexts, phrases, strict=True):
            picked = model.token_sets(context).argmax(dim=-1)
            assert all(sorted(row) == own for row in picked.tolist())
            assert set_mmd2([model.token_sets(context)], [torch.eye(6)[own]]) < 1e-6


def test_retrieval_ranks_phrases_by_score():
    scores = torch.tensor([[1.0, 0.9, 0.0, 0.0, 0.0, 0.1], [0.0, 0.0, 0.0, 0.0, 0.0, 1.0]])
    result = phrase_retrieval(scores, [[0, 1], [2]], k=2)
    # user 0: phrases 0 and 1 rank 1 and 2; user 1: phrase 2 ranks below 2
    assert result["recall_at_2"] == pytest.approx((1.0 + 0.0) / 2)
    assert result["phrases"] == 6 and result["mean_rank"] >= 1.5


def test_diversity_is_zero_for_parallel_and_one_for_orthogonal_rows():
    assert mean_pairwise_cosine_distance(torch.ones(4, 3) * torch.arange(1, 5)[:, None]) == (
        pytest.approx(0.0, abs=1e-6)
    )
    assert mean_pairwise_cosine_distance(torch.eye(3)) == pytest.approx(1.0)
