"""Benchmark statistics on cases with known answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from prefgen_kedro.models.metrics import (
    bootstrap_ci,
    bootstrap_set_statistic,
    clip_preference,
    clip_score,
    per_user_wins,
    win_rate,
)


def test_bootstrap_ci_covers_the_mean_and_matches_the_normal_approximation():
    rng = np.random.default_rng(0)
    values = rng.normal(0.3, 0.1, size=400)
    result = bootstrap_ci(values, resamples=4000, seed=1)
    assert result["n"] == 400 and result["mean"] == pytest.approx(values.mean())
    half_width = 1.96 * values.std(ddof=1) / np.sqrt(len(values))
    assert result["ci_low"] < result["mean"] < result["ci_high"]
    assert (result["ci_high"] - result["ci_low"]) / 2 == pytest.approx(half_width, rel=0.1)
    # a constant has a zero-width interval; the same seed gives the same interval
    assert bootstrap_ci(np.full(5, 0.7)) == {"mean": 0.7, "ci_low": 0.7, "ci_high": 0.7, "n": 5}
    assert bootstrap_ci(values, seed=3) == bootstrap_ci(values, seed=3)
    with pytest.raises(ValueError, match="non-empty"):
        bootstrap_ci(np.array([]))


def test_win_rate_counts_users_in_both_and_ties_as_half():
    ours = {"a": 1.0, "b": 0.5, "c": 0.2, "d": 9.0}
    theirs = {"a": 0.0, "b": 0.5, "c": 0.3, "e": 1.0}
    assert win_rate(ours, theirs) == {"win_rate": pytest.approx(1.5 / 3), "n": 3}
    with pytest.raises(ValueError, match="no user"):
        win_rate({"x": 1.0}, {"y": 1.0})


def test_clip_score_is_100_cos_clamped_at_zero():
    images = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    texts = torch.tensor([[2.0, 0.0], [-1.0, 0.0], [1.0, 1.0]])
    torch.testing.assert_close(clip_score(images, texts), torch.tensor([100.0, 0.0, 100 / 2**0.5]))


def test_clip_preference_is_liked_minus_disliked_similarity():
    image = torch.tensor([[1.0, 0.0]])
    liked = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # cos 1 and 0
    disliked = torch.tensor([[[-1.0, 0.0], [0.0, 1.0]]])  # cos -1 and 0
    torch.testing.assert_close(clip_preference(image, liked, disliked), torch.tensor([1.0]))


def test_bootstrap_set_statistic_reports_the_whole_set_and_brackets_it():
    rng = np.random.default_rng(0)
    groups = [rng.normal(0, 1, size=(3, 2)) for _ in range(40)]
    pooled = np.concatenate(groups)

    def spread(rows):  # biased by repeated rows, as FID is
        return float(np.var(rows[:, 0]))

    result = bootstrap_set_statistic(groups, spread, resamples=300, seed=2)
    assert result["mean"] == pytest.approx(spread(pooled)) and result["n"] == 40
    assert result["ci_low"] <= result["mean"] <= result["ci_high"]
    constant = bootstrap_set_statistic(groups, lambda rows: 5.0, resamples=20)
    assert (constant["ci_low"], constant["mean"], constant["ci_high"]) == (5.0, 5.0, 5.0)
    floored = bootstrap_set_statistic(groups, lambda rows: float(rows[0, 0]), floor=0.0)
    assert floored["ci_low"] >= 0.0
    with pytest.raises(ValueError, match="at least one"):
        bootstrap_set_statistic([], spread)


def test_per_user_wins_scores_each_shared_user():
    assert per_user_wins({"a": 2, "b": 1, "c": 1}, {"a": 1, "b": 1, "c": 3, "x": 0}) == {
        "a": 1.0,
        "b": 0.5,
        "c": 0.0,
    }
