"""The symbolic matching experiment runs, its questions are what it says, and its counting
rule is the project's."""

import importlib
from pathlib import Path

import numpy as np
import pytest

from prefgen_kedro.models.vqa import counting_rule_score

PROJECT_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def experiment():
    # experiments/ is a folder of the project, not of the installed package.
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(PROJECT_ROOT))
        return importlib.import_module("experiments.matching_saddle")


def test_questions_have_k_images_a_side_one_attribute_per_category(experiment):
    liked, disliked, query, label = experiment.sample_questions(np.random.default_rng(0), 64, 3)
    assert liked.shape[1:] == disliked.shape[1:] == (3, 5) and query.shape[1:] == (5,)
    assert 0.3 < label.mean() < 0.7
    for c, offset in enumerate(experiment.OFFSETS):
        size = experiment.SIZES[c]
        assert ((query[:, c] >= offset) & (query[:, c] < offset + size)).all()


def test_counting_rule_matches_the_projects(experiment):
    liked, disliked, query, label = experiment.sample_questions(np.random.default_rng(1), 200, 4)
    scores = np.array(
        [
            counting_rule_score([set(i) for i in li], [set(i) for i in di], set(q))
            for li, di, q in zip(liked, disliked, query, strict=True)
        ]
    )
    expected = np.mean(np.where(scores == 0, 0.5, (scores > 0) == label))
    assert experiment.counting_rule_accuracy(liked, disliked, query, label) == expected


@pytest.mark.parametrize("condition", ["independent", "matching", "matching_text_readout"])
def test_each_condition_trains_and_scores(experiment, condition):
    result = experiment.run(condition, steps=2, seed=0)
    assert result["seconds"] > 0
    assert all(0.0 <= result[f"K={k}"] <= 1.0 for k in experiment.EVAL_KS)
