"""The VQA samples: balanced, the query never in the context, reasons from the user's taste."""

from __future__ import annotations

import pandas as pd
import pytest

from prefgen_kedro.data.tables import DISLIKED, LIKED
from prefgen_kedro.models.vqa import (
    DISLIKED_MARKER,
    IMAGE_PLACEHOLDER,
    LIKED_MARKER,
    QUERY_MARKER,
    build_prompt,
    counting_rule_accuracy,
    counting_rule_score,
    examples_from_table,
    examples_table,
    parse_taste,
    sample_vqa_examples,
    taste_text,
    vqa_corpus,
)
from prefgen_kedro.world.agent_world import generate_agent_world
from prefgen_kedro.world.vocabulary import attribute


@pytest.fixture(scope="module")
def world():
    return generate_agent_world(
        n_users=10,
        images_per_user=12,
        n_liked_attributes=3,
        n_disliked_attributes=3,
        label_noise=0.2,
        image_size=8,
        split_fractions={"train": 0.6, "val": 0.2, "test": 0.2},
        images_subdir="images",
        seed=0,
    )


def sample(world, **overrides):
    settings = {
        "splits": ["train", "val"],
        "k": 2,
        "samples_per_user": 6,
        "seed": 0,
        "with_reasons": True,
    } | overrides
    return sample_vqa_examples(world.images, world.interactions, world.users, **settings)


def test_samples_are_balanced_from_the_right_users_and_never_show_the_query(world):
    examples = sample(world)
    users = world.users.set_index("user_id")
    wanted = set(users.index[users["split"].isin(["train", "val"])])
    assert {example.user_id for example in examples} == wanted
    assert len(examples) == 6 * len(wanted)
    assert sum(example.label == LIKED for example in examples) == len(examples) // 2
    labels = world.interactions.set_index(["user_id", "image_id"])["label"]
    for example in examples:
        assert example.query not in example.liked + example.disliked
        assert len(example.liked) == len(example.disliked) == 2
        assert len(set(example.liked)) == 2 and len(set(example.disliked)) == 2
        assert labels[example.user_id, example.query] == example.label
        assert all(labels[example.user_id, i] == LIKED for i in example.liked)
        assert all(labels[example.user_id, i] == DISLIKED for i in example.disliked)
        assert example.answer.startswith("Yes" if example.label == LIKED else "No")


def test_reasons_are_the_users_attributes_the_query_shows(world):
    images = world.images.set_index("image_id")
    users = world.users.set_index("user_id")
    with_reason = 0
    for example in sample(world):
        side = "liked_attributes" if example.label == LIKED else "disliked_attributes"
        present = [
            attribute(a).value
            for a in images.loc[example.query, "attributes"]
            if a in set(users.loc[example.user_id, side])
        ]
        word = "Yes" if example.label == LIKED else "No"
        if not present:  # a flipped label: nothing of that side to name
            assert example.answer == word
            continue
        with_reason += 1
        listed = (
            present[0] if len(present) == 1 else ", ".join(present[:-1]) + " and " + present[-1]
        )
        assert example.answer == f"{word}, because it is {listed}"
    assert with_reason > 0
    assert {example.answer for example in sample(world, with_reasons=False)} == {"Yes", "No"}


def test_pickapic_reason_is_the_query_caption():
    images = pd.DataFrame(
        {
            "image_id": [f"i{j}" for j in range(6)],
            "path": "x",
            "caption": [f"caption {j}" for j in range(6)],
            "subject": "",
            "attributes": [[] for _ in range(6)],
            "source": "pickapic",
        }
    )
    interactions = pd.DataFrame(
        {
            "user_id": "p1",
            "image_id": images["image_id"],
            "label": [1, 0, 1, 0, 1, 0],
            "prompt": "a prompt",
        }
    )
    users = pd.DataFrame(
        {
            "user_id": ["p1"],
            "split": ["train"],
            "liked_attributes": [[]],
            "disliked_attributes": [[]],
        }
    )
    examples = sample_vqa_examples(
        images,
        interactions,
        users,
        splits=["train"],
        k=2,
        samples_per_user=4,
        seed=1,
        with_reasons=True,
    )
    captions = images.set_index("image_id")["caption"]
    for example in examples:
        word = "Yes" if example.label == LIKED else "No"
        assert example.answer == f"{word}, it shows {captions[example.query]}"


def test_sampling_is_deterministic_and_skips_short_histories(world, caplog):
    assert sample(world) == sample(world)
    assert sample(world) != sample(world, seed=1)
    counts = world.interactions.groupby("user_id")["label"].agg(["sum", "count"])
    smaller_side = pd.concat([counts["sum"], counts["count"] - counts["sum"]], axis=1).min(axis=1)
    k = int(smaller_side.max()) - 1
    kept = set(smaller_side.index[smaller_side > k])
    assert kept != set(smaller_side.index), "the fixture should have users with flipped labels"
    with caplog.at_level("WARNING"):
        examples = sample(world, k=k, splits=["train", "val", "test"])
    assert {example.user_id for example in examples} == kept
    assert "skipped" in caplog.text
    with pytest.raises(ValueError, match="no user"):
        sample(world, k=k + 1)
    with pytest.raises(ValueError, match="unknown split"):
        sample(world, splits=["training"])


def test_questions_sharing_a_context_are_consecutive_turns_it_never_shows(world):
    single = sample(world, samples_per_user=5)
    examples = sample(world, samples_per_user=5, questions_per_context=3)
    # The first user's queries and labels as asked one a context (later users' differ: fewer
    # contexts are drawn), 3 to a context, then the last 2.
    assert [(e.query, e.label) for e in examples[:5]] == [(e.query, e.label) for e in single[:5]]
    assert [e.turn for e in examples] == [0, 1, 2, 0, 1] * (len(examples) // 5)
    chats: list[list] = []
    for example in examples:
        if example.turn == 0:
            chats.append([])
        chats[-1].append(example)
    for chat in chats:
        assert len({(e.user_id, e.liked, e.disliked) for e in chat}) == 1
        assert not {e.query for e in chat} & {*chat[0].liked, *chat[0].disliked}
    assert sample(world, questions_per_context=3) == sample(world, questions_per_context=3)
    with pytest.raises(ValueError, match="questions_per_context"):
        sample(world, questions_per_context=0)


def test_prompt_has_one_marked_placeholder_per_image_in_group_order():
    prompt = build_prompt(3, 2)
    assert prompt.count(IMAGE_PLACEHOLDER) == 6
    assert prompt.count(LIKED_MARKER + IMAGE_PLACEHOLDER) == 3
    assert prompt.count(DISLIKED_MARKER + IMAGE_PLACEHOLDER) == 2
    assert prompt.index(LIKED_MARKER) < prompt.index(DISLIKED_MARKER) < prompt.index(QUERY_MARKER)
    assert QUERY_MARKER not in build_prompt(3, 2, with_query=False)


def test_examples_round_trip_through_parquet(world, tmp_path):
    examples = sample(world)
    examples_table(examples).to_parquet(tmp_path / "vqa.parquet")
    assert examples_from_table(pd.read_parquet(tmp_path / "vqa.parquet")) == examples


def test_corpus_holds_captions_question_and_answers(world):
    corpus = vqa_corpus(world.images["caption"])
    assert set(world.images["caption"]) <= set(corpus)
    assert {"Yes", "No", "Does the user like this image?"} <= set(corpus)


def test_counting_rule_counts_liked_minus_disliked_occurrences_and_halves_ties():
    liked = [["a", "b"], ["a", "c"]]
    disliked = [["b", "d"]]
    assert counting_rule_score(liked, disliked, ["a", "x"]) == 2
    assert counting_rule_score(liked, disliked, ["b"]) == 0
    assert counting_rule_score(liked, disliked, ["d", "b"]) == -1
    # right, tie (half), wrong, right
    assert counting_rule_accuracy([2, 0, -1, -3], [LIKED, LIKED, LIKED, DISLIKED]) == 2.5 / 4
    with pytest.raises(ValueError, match="as many scores"):
        counting_rule_accuracy([1], [])


def test_taste_answer_reads_back():
    text = taste_text(["dotted", "red"], ["night"])
    assert text == "likes: dotted, red. dislikes: night."
    assert parse_taste(text) == (["dotted", "red"], ["night"])
    assert parse_taste("likes: . dislikes: teal, dark.") == ([], ["teal", "dark"])
    assert parse_taste("Yes") == ([], [])
