"""assign_splits: disjoint, complete, sized by the fractions, and deterministic."""

import pytest

from prefgen_kedro.data.splits import assign_splits

FRACTIONS = {"train": 0.8, "val": 0.1, "test": 0.1}
USER_IDS = [f"user-{index}" for index in range(10)]


def test_every_user_gets_exactly_one_split_sized_by_the_fractions() -> None:
    splits = assign_splits(USER_IDS, FRACTIONS, seed=0)

    assert sorted(splits) == sorted(USER_IDS)
    sizes = {name: list(splits.values()).count(name) for name in FRACTIONS}
    assert sizes == {"train": 8, "val": 1, "test": 1}


def test_same_seed_gives_same_splits_whatever_the_input_order() -> None:
    first = assign_splits(USER_IDS, FRACTIONS, seed=3)

    assert assign_splits(list(reversed(USER_IDS)) + USER_IDS[:2], FRACTIONS, seed=3) == first
    assert any(assign_splits(USER_IDS, FRACTIONS, seed=seed) != first for seed in range(4, 10))


def test_rounding_never_drops_a_user() -> None:
    splits = assign_splits(USER_IDS[:7], {"train": 1 / 3, "val": 1 / 3, "test": 1 / 3}, seed=1)

    assert sorted(splits) == sorted(USER_IDS[:7])


@pytest.mark.parametrize(
    ("fractions", "message"),
    [
        ({"train": 0.5, "val": 0.1}, "sum to"),
        ({"train": 1.2, "val": -0.2}, "negative"),
        ({}, "at least one"),
    ],
)
def test_bad_fractions_are_rejected(fractions: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        assign_splits(USER_IDS, fractions, seed=0)
