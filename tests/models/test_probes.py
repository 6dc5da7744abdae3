import pytest
import torch

from prefgen_kedro.models.probes import (
    fit_linear_probe,
    layerwise_accuracy,
    mean_auc,
    select_layers,
    top_k_accuracy,
)


def clustered(n_per_class: int, n_classes: int, separation: float, seed: int):
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_classes, 8, generator=generator) * separation
    labels = torch.arange(n_classes).repeat_interleave(n_per_class)
    return centres[labels] + torch.randn(len(labels), 8, generator=generator), labels


def test_probe_separates_separable_classes_and_is_reproducible():
    train, train_labels = clustered(30, 5, separation=4.0, seed=0)
    test, test_labels = clustered(30, 5, separation=4.0, seed=0)
    probe = fit_linear_probe(train, train_labels, 5, seed=3)
    assert top_k_accuracy(probe, test, test_labels) > 0.95
    again = fit_linear_probe(train, train_labels, 5, seed=3)
    assert torch.equal(probe.linear.weight, again.linear.weight)


def test_layerwise_accuracy_follows_how_separable_each_layer_is():
    # Layer 0 carries no class signal, layer 1 a lot: accuracy must say so.
    noise, labels = clustered(40, 4, separation=0.0, seed=1)
    signal, _ = clustered(40, 4, separation=5.0, seed=1)
    features = torch.stack([noise, signal], dim=1)
    results = layerwise_accuracy(features, labels, features, labels, 4, top_k=(1, 2))
    assert results[1]["top1"] > 0.95 > results[0]["top1"]
    assert all(r["top2"] >= r["top1"] for r in results)


def test_select_layers_takes_the_top_and_the_inter_user_peak():
    accuracy = [0.1, 0.2, 0.5, 0.9, 0.95, 0.9, 0.6, 0.4, 0.3]  # 8 layers + embeddings
    chosen = select_layers(accuracy, semantic_top=4, core_window=3, core_search_from=0.25)
    assert chosen == {"e_sem": [5, 6, 7, 8], "e_core": [3, 4, 5]}
    # Restricted to the upper half, the best window starts at layer 4.
    assert select_layers(accuracy, core_search_from=0.5)["e_core"] == [4, 5, 6]
    with pytest.raises(ValueError, match="within the 8 layers"):
        select_layers(accuracy, semantic_top=9)


def test_multilabel_probe_and_auc_recover_planted_columns():
    generator = torch.Generator().manual_seed(0)
    targets = (torch.rand(400, 3, generator=generator) < 0.3).float()
    # columns 0 and 1 are written into the features, column 2 is not
    features = torch.cat([targets[:, :2] * 2.0, torch.zeros(400, 1)], dim=1)
    features = features + 0.5 * torch.randn(400, 3, generator=generator)
    probe = fit_linear_probe(features[:300], targets[:300], 3, seed=1)
    scores = probe.logits(features[300:])
    assert mean_auc(scores[:, :2], targets[300:, :2]) > 0.95
    assert abs(mean_auc(scores[:, 2:], targets[300:, 2:]) - 0.5) < 0.15
    # ties count half; a column with one class is skipped
    assert (
        mean_auc(torch.tensor([[1.0, 0.0], [1.0, 1.0]]), torch.tensor([[1.0, 1.0], [0.0, 1.0]]))
        == 0.5
    )
    with pytest.raises(ValueError, match="both"):
        mean_auc(torch.ones(2, 1), torch.ones(2, 1))
