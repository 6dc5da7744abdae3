import numpy as np
import pytest

from prefgen_kedro.world.agent_world import generate_agent_world, user_from_row
from prefgen_kedro.world.render import render
from prefgen_kedro.world.users import SimulatedUser, make_user
from prefgen_kedro.world.vocabulary import (
    ATTRIBUTE_IDS,
    ATTRIBUTES,
    CATEGORIES,
    SUBJECTS,
    attribute_ids,
    caption,
    world_hash,
)

BASE_STYLE = {
    "subject_colour": "red",
    "background": "white",
    "pattern": "flat",
    "composition": "centred",
    "tone": "natural",
}


def small_world(**overrides):
    settings = dict(
        n_users=20,
        images_per_user=10,
        n_liked_attributes=4,
        n_disliked_attributes=4,
        label_noise=0.0,
        image_size=16,
        split_fractions={"train": 0.6, "val": 0.2, "test": 0.2},
        images_subdir="01_raw/images",
        seed=7,
    )
    return generate_agent_world(**settings | overrides)


def test_vocabulary_is_large_enough():
    assert len(ATTRIBUTES) >= 48
    assert len(CATEGORIES) >= 5
    assert len(SUBJECTS) >= 8
    assert len(set(ATTRIBUTE_IDS)) == len(ATTRIBUTE_IDS)


def test_render_is_deterministic():
    first = render("star", BASE_STYLE, seed=3, size=32)
    assert first.shape == (32, 32, 3)
    assert first.dtype == np.uint8
    np.testing.assert_array_equal(first, render("star", BASE_STYLE, seed=3, size=32))


@pytest.mark.parametrize("attribute", ATTRIBUTES, ids=lambda a: a.id)
def test_every_attribute_changes_the_pixels(attribute):
    base = dict(BASE_STYLE)
    # Compare against another value of the same category, all else (seed too) equal.
    other_value = next(v for v in CATEGORIES[attribute.category] if v != attribute.value)
    changed, reference = dict(base), dict(base)
    changed[attribute.category] = attribute.value
    reference[attribute.category] = other_value
    difference = np.abs(
        render("house", changed, seed=1, size=32).astype(int)
        - render("house", reference, seed=1, size=32).astype(int)
    )
    assert difference.mean() > 1.0


def test_every_subject_is_drawn_differently():
    renders = [render(subject, BASE_STYLE, seed=1, size=32) for subject in SUBJECTS]
    for i in range(len(renders)):
        for j in range(i + 1, len(renders)):
            assert np.abs(renders[i].astype(int) - renders[j].astype(int)).mean() > 1.0


def test_caption_names_subject_and_every_attribute():
    text = caption("star", BASE_STYLE)
    assert text == "a flat red star on a white background, centred, natural"


def test_utility_arithmetic():
    user = SimulatedUser(
        "u", liked={"pattern:dotted": 1.0, "tone:pastel": 0.5}, disliked={"background:black": 2.0}
    )
    assert user.utility(["pattern:dotted"]) == 1.0
    assert user.utility(["pattern:dotted", "tone:pastel"]) == 1.5
    assert user.utility(["pattern:dotted", "background:black"]) == -1.0
    assert user.utility(["composition:top"]) == 0.0
    assert not user.likes(["composition:top"])


def test_liked_and_disliked_attributes_are_disjoint():
    rng = np.random.default_rng(0)
    for i in range(50):
        user = make_user(f"u{i}", 6, 6, rng)
        assert not set(user.liked) & set(user.disliked)
    with pytest.raises(ValueError, match="both liked and disliked"):
        SimulatedUser("u", liked={"tone:dark": 1.0}, disliked={"tone:dark": 1.0})


def test_histories_are_balanced_and_labels_follow_utility_without_noise():
    world = small_world()
    labels = world.interactions.groupby("user_id")["label"].agg(["sum", "count"])
    assert (labels["sum"] * 2 == labels["count"]).all()
    assert ((world.interactions["utility"] > 0) == (world.interactions["label"] == 1)).all()
    # The ground truth in the users table reproduces every utility.
    users = {row["user_id"]: user_from_row(row) for _, row in world.users.iterrows()}
    merged = world.interactions.merge(world.images, on="image_id")
    for _, row in merged.iterrows():
        assert users[row["user_id"]].utility(row["attributes"]) == pytest.approx(row["utility"])


def test_label_noise_rate():
    world = small_world(n_users=100, images_per_user=40, label_noise=0.2, image_size=8)
    flipped = (world.interactions["utility"] > 0) != (world.interactions["label"] == 1)
    assert flipped.mean() == pytest.approx(0.2, abs=0.03)
    assert world.report["label_noise_measured"] == pytest.approx(flipped.mean())


def test_splits_are_disjoint_and_cover_all_users():
    world = small_world()
    splits = world.users.groupby("split")["user_id"].apply(set)
    assert set(splits.index) == {"train", "val", "test"}
    assert sum(len(s) for s in splits) == len(world.users) == world.users["user_id"].nunique()


def test_world_is_deterministic():
    a, b = small_world(), small_world()
    assert a.images.equals(b.images) and a.interactions.equals(b.interactions)
    assert all(np.array_equal(a.pictures[k], b.pictures[k]) for k in a.pictures)


def test_images_carry_their_attributes():
    world = small_world()
    row = world.images.iloc[0]
    style = dict(a.split(":", 1) for a in row["attributes"])
    assert attribute_ids(style) == list(row["attributes"])
    assert caption(row["subject"], style) == row["caption"]


def test_world_hash_is_stable():
    assert world_hash() == world_hash()
    assert len(world_hash()) == 16
