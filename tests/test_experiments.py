"""The experiments run, their questions are what they say, and their counting rules are the
project's."""

import importlib
from pathlib import Path

import numpy as np
import pytest

from prefgen_kedro.models.vqa import counting_rule_score

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def _import(name: str):
    # experiments/ is a folder of the project, not of the installed package.
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(PROJECT_ROOT))
        return importlib.import_module(f"experiments.{name}")


@pytest.fixture(scope="module")
def experiment():
    return _import("matching_saddle")


@pytest.fixture(scope="module")
def geometry():
    return _import("feature_geometry")


def test_questions_have_k_images_a_side_one_attribute_per_category(experiment):
    liked, disliked, query, label = experiment.sample_questions(np.random.default_rng(0), 64, 3)
    assert liked.shape[1:] == disliked.shape[1:] == (3, 5) and query.shape[1:] == (5,)
    assert 0.3 < label.mean() < 0.7
    for c, offset in enumerate(experiment.OFFSETS):
        size = experiment.SIZES[c]
        assert ((query[:, c] >= offset) & (query[:, c] < offset + size)).all()


def test_several_queries_a_context_are_of_either_side(experiment):
    rng = np.random.default_rng(3)
    liked, disliked, query, label = experiment.sample_questions(rng, 64, 2, queries=8)
    assert query.shape[1:] == (8, 5) and label.shape[1:] == (8,)
    assert 0.35 < label.mean() < 0.65
    assert len({tuple(q) for q in query[0]}) > 1  # not one image asked 8 times


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


@pytest.mark.parametrize(
    "condition", ["independent", "matching", "matching_text_readout", "matching_multi_query"]
)
def test_each_condition_trains_and_scores(experiment, condition):
    result = experiment.run(condition, steps=2, seed=0)
    assert result["seconds"] > 0
    assert all(0.0 <= result[f"K={k}"] <= 1.0 for k in experiment.EVAL_KS)


def test_geometry_questions_and_the_attribute_rule_are_the_counting_rule(geometry):
    renders = geometry.render_set(400, 1, 32)
    present = geometry.attribute_matrix(renders.styles)
    assert (present.sum(1) == len(geometry.SIZES)).all()
    ids = np.arange(100, 400)
    liked, disliked, query, label = geometry.sample_questions(
        np.random.default_rng(2), present, ids, 100, 3
    )
    assert np.isin(np.c_[liked, disliked, query], ids).all()
    assert not (liked == query[:, None]).any() and not (disliked == query[:, None]).any()
    shown = [set(np.flatnonzero(row)) for row in present]
    scores = np.array(
        [
            counting_rule_score([shown[i] for i in li], [shown[i] for i in di], shown[q])
            for li, di, q in zip(liked, disliked, query, strict=True)
        ]
    )
    expected = np.mean(np.where(scores == 0, 0.5, (scores > 0) == label))
    assert geometry.similarity_rule_accuracy(present, liked, disliked, query, label) == expected


def test_geometry_scores_every_row_on_the_shipped_clip(geometry):
    if not geometry.SHIPPED_CLIP.exists():
        pytest.skip("no shipped conditioning CLIP")
    result = geometry.run(n_renders=300, n_train=200, questions=40, probe_steps=2)
    assert set(result) == {
        "cls_cosine",
        "linear_probe",
        "category_softmax",
        "grouped_softmax",
        "attributes",
    }
    assert all(0.0 <= acc <= 1.0 for row in result.values() for acc in row.values())


@pytest.mark.parametrize(
    "condition",
    ["symbolic", "everything_shared_tags", "vocab_two_way", "everything_own_tags_two_way_copies"],
)
def test_real_structure_rows_train_and_score(condition):
    structure = _import("real_structure")
    result = structure.run(condition, steps=2)
    assert {f"K={k}" for k in structure.EVAL_KS} <= set(result)
    assert all(0.0 <= result[f"K={k}"] <= 1.0 for k in structure.EVAL_KS)


def test_real_structure_reads_each_query_at_its_last_token():
    structure = _import("real_structure")
    model = structure.StructuredJudge(
        text=True, markers="own", patch=True, answers=True, vocab=True
    )
    liked, disliked, query, label = structure.sample_questions(np.random.default_rng(0), 4, 2, 3)
    logits = model(liked, disliked, query, label)
    assert logits.shape == (len(liked), 3, structure.VOCABULARY)
    # Own tags: the markers' embeddings are not the tags.
    assert model.tags is not None and model.tags.data_ptr() != model.words.data_ptr()


def test_real_structure_copies_keep_labels_true():
    structure = _import("real_structure")
    rng = np.random.default_rng(0)
    liked, disliked, query, label = structure.sample_questions(rng, 50, 3, 4)
    copied = structure.copy_queries(rng, liked, disliked, query, label, 1.0)
    for row in range(len(label)):
        for q in range(label.shape[1]):
            side = liked[row] if label[row, q] else disliked[row]
            assert any((image == copied[row, q]).all() for image in side)
    assert (structure.copy_queries(rng, liked, disliked, query, label, 0.0) == query).all()


def test_reader_budget_audits_picks_as_the_benchmark_does(capsys):
    import torch

    from prefgen_kedro.models.probes import liked_targets
    from prefgen_kedro.world.vocabulary import ATTRIBUTE_IDS

    budget = _import("reader_budget")
    rng = np.random.default_rng(0)

    def users(n):
        return [list(rng.choice(ATTRIBUTE_IDS, 4, replace=False)) for _ in range(n)]

    training, validation = users(300), users(120)
    scorer = budget.Scorer(
        liked_targets(validation),
        validation,
        liked_targets(training),
        training,
        torch.randn(len(ATTRIBUTE_IDS), 16, generator=torch.Generator().manual_seed(0)),
    )

    def top4(scores):
        return scores.topk(4).indices

    scorer.report("perfect reader", lambda x: x, top4)
    scorer.report("blind reader", lambda x: torch.rand(x.shape), top4)
    perfect, blind = capsys.readouterr().out.splitlines()
    assert "liked precision 1.000  AUC 1.000" in perfect
    assert float(perfect.split()[-1]) > 0.85  # the 4 true phrases' states name the taste
    assert float(blind.split()[-1]) < 0.6
