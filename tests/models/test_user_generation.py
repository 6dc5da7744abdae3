"""Prompts every method shares (subject-only for simulated users, held-out captions for
real ones), the prompts that say a variant's parts or ``viper_style``'s reading, and the
oracle's verdicts on hand-made renders."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from prefgen_kedro.models.oracle import AttributeOracle
from prefgen_kedro.models.user_generation import (
    draw_prompts,
    draw_subject_prompts,
    image_prompts,
    oracle_preference,
    said_column,
    said_prompts,
    viper_style_embeds,
    viper_style_prompts,
)
from prefgen_kedro.params import ViperStyleParams
from prefgen_kedro.world.render import render
from prefgen_kedro.world.users import SimulatedUser
from prefgen_kedro.world.vocabulary import HEADS

FOUNDATION = Path(__file__).resolve().parents[2] / "data" / "06_models" / "foundation"


def test_prompts_are_drawn_per_user_with_distinct_seeds_and_reproducibly():
    cases = draw_subject_prompts(["u1", "u2", "u3"], 2, seed=4)
    assert cases["user_id"].tolist() == ["u1", "u1", "u2", "u2", "u3", "u3"]
    assert cases["case"].tolist() == [0, 1, 0, 1, 0, 1]
    assert cases["seed"].is_unique and set(cases["subject"]) <= set(HEADS["subject"])
    assert cases.equals(draw_subject_prompts(["u1", "u2", "u3"], 2, seed=4))
    with pytest.raises(ValueError, match="prompts_per_user"):
        draw_subject_prompts(["u1"], 0, seed=4)


def _real_world() -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Two Pick-a-Pic-like users: ``1`` has a and g (liked in one pair, disliked in another)
    in its context and likes c, d (twice), e (a blank caption) and f (c's caption) outside
    it; ``2`` has one held-out like. Returns (contexts, images, interactions)."""
    prompts = ["a cat", "a dog", "a red fox", "an owl", " ", "a red fox", "a hen", "a cow", "a pig"]
    captions = dict(zip("abcdefghi", prompts, strict=True))
    images = pd.DataFrame(
        {
            "image_id": list(captions),
            "caption": list(captions.values()),
            "subject": list(captions.values()),
            "source": "pickapic",
        }
    )
    # One interaction per column, in history order (label 1: liked).
    interactions = pd.DataFrame(
        {
            "user_id": list("111111111222"),
            "image_id": list("abcdgdefghbi"),
            "label": [int(c) for c in "101101111101"],
        }
    )
    contexts = pd.DataFrame(
        {"liked": [("a",), ("h",)], "disliked": [("b", "g"), ("b",)]},
        index=pd.Index(["1", "2"], name="user_id"),
    )
    return contexts, images, interactions


def test_real_users_get_distinct_captions_of_held_out_liked_images_reproducibly():
    contexts, images, interactions = _real_world()
    cases = draw_prompts(contexts, interactions, images, 2, seed=3, subject_only=False)
    # g is liked but also in the context; e asks for nothing; f repeats c's prompt; user 2
    # has one held-out like (i) for two prompts and is left out.
    assert cases["user_id"].tolist() == ["1", "1"]
    assert set(cases["real_image_id"]) == {"c", "d"}
    caption = images.set_index("image_id")["caption"]
    assert cases["prompt"].tolist() == caption[cases["real_image_id"]].tolist()
    assert cases["subject"].tolist() == cases["prompt"].tolist()
    assert cases["seed"].is_unique
    assert cases.equals(draw_prompts(contexts, interactions, images, 2, 3, subject_only=False))

    one = draw_prompts(contexts, interactions, images, 1, seed=3, subject_only=False)
    assert one["user_id"].tolist() == ["1", "2"] and one["real_image_id"].iloc[1] == "i"
    with pytest.raises(ValueError, match="no user has 3 liked images"):
        draw_prompts(contexts, interactions, images, 3, seed=3, subject_only=False)


def test_simulated_users_get_subject_prompts_and_their_first_held_out_likes():
    contexts, images, interactions = _real_world()
    cases = draw_prompts(contexts, interactions, images, 2, seed=4, subject_only=True)
    subjects = draw_subject_prompts(["1"], 2, seed=4)
    assert cases.drop(columns="real_image_id").equals(subjects)
    assert cases["prompt"].tolist() == [f"a {s}" for s in cases["subject"]]
    assert cases["real_image_id"].tolist() == ["c", "d"]  # history order, outside the context


def test_a_render_is_asked_for_by_its_subject_a_real_image_by_its_caption():
    images = pd.DataFrame(
        {
            "image_id": ["r", "p"],
            "caption": ["a red star on white, striped", "a fox in the snow, oil painting"],
            "subject": ["star", "a fox in the snow, oil painting"],
            "source": ["agent", "pickapic"],
        }
    )
    prompts = image_prompts(images)
    assert prompts.to_dict() == {"r": "a star", "p": "a fox in the snow, oil painting"}


def test_a_variant_says_its_parts_attributes_in_the_caption_of_the_subject():
    cases = pd.DataFrame(
        {
            "subject": ["star", "arrow"],
            said_column("e_sem_hat"): [
                ["pattern:striped", "background:olive"],
                ["tone:pastel", "pattern:dotted", "pattern:striped"],
            ],
            said_column("true_sem"): [["subject_colour:pink"], ["composition:top"]],
        }
    )
    assert said_prompts(cases, ["e_sem_hat"]) == [
        "a striped star on a olive background",
        "a dotted arrow, pastel",  # one value a category: the first named
    ]
    assert said_prompts(cases, ["true_sem", "e_sem_hat"]) == [
        "a striped pink star on a olive background",
        "a dotted arrow, top, pastel",
    ]
    with pytest.raises(KeyError, match="oracle_state_hat_attributes"):
        said_prompts(cases, ["oracle_state_hat"])


@pytest.mark.parametrize("delivery", ["arithmetic", "prompt"])
def test_viper_style_delivers_the_words_the_mllm_read(delivery):
    """``arithmetic`` moves the prompt's states by the words' states against the empty
    prompt; ``prompt`` says the liked words after the prompt and negates the disliked."""
    texts = {"": 0.0, "a star": 1.0, "striped, pink": 10.0, "night": 100.0}
    texts["a star, striped, pink"] = 1000.0

    def encode(prompts):
        return torch.tensor([texts[p] for p in prompts]).view(-1, 1, 1)

    cases = pd.DataFrame({"user_id": ["u"], "prompt": ["a star"]})
    viper = ViperStyleParams(delivery=delivery, beta=0.5, mllm_slot_positions=True, batch_size=1)
    positive, negative = viper_style_embeds(
        {"u": (["striped", "pink"], ["night"])},
        cases,
        encode(cases["prompt"]),
        encode([""]),
        encode,
        viper,
    )
    if delivery == "arithmetic":
        assert positive.item() == 1.0 + 0.5 * (10.0 - 100.0) and negative.item() == 0.0
    else:
        assert positive.item() == 1000.0 and negative.item() == 100.0
        assert viper_style_prompts({"u": (["striped", "pink"], ["night"])}, cases) == [
            "a star, striped, pink"
        ]


def test_oracle_like_rate_on_renders_made_to_be_liked_or_disliked():
    oracle = AttributeOracle.from_pretrained(FOUNDATION / "attribute_oracle").eval()
    user = SimulatedUser("u", liked={"tone:dark": 1.0}, disliked={"pattern:striped": 1.0})
    base = {"subject_colour": "red", "background": "white", "composition": "centred"}
    liked_style = {**base, "pattern": "flat", "tone": "dark"}
    disliked_style = {**base, "pattern": "striped", "tone": "natural"}
    images = np.stack(
        [render("circle", liked_style, seed, oracle.image_size) for seed in range(4)]
        + [render("circle", disliked_style, seed, oracle.image_size) for seed in range(4)]
    )
    scores = oracle_preference(oracle, images, ["circle"] * 4 + ["star"] * 4, [user] * 8)
    assert scores["liked"].tolist() == [True] * 4 + [False] * 4
    assert scores["utility"].tolist() == [1.0] * 4 + [-1.0] * 4
    assert scores["subject_correct"].tolist() == [True] * 4 + [False] * 4
    with pytest.raises(ValueError, match="images"):
        oracle_preference(oracle, images, ["circle"], [user])
