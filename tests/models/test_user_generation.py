"""Prompts every method shares, and the oracle's verdicts on hand-made renders."""

from pathlib import Path

import numpy as np
import pytest

from prefgen_kedro.models.oracle import AttributeOracle
from prefgen_kedro.models.user_generation import draw_subject_prompts, oracle_preference
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
