"""Simulated users: weighted liked and disliked attributes and the utility they imply."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from prefgen_kedro.world.vocabulary import ATTRIBUTE_IDS


@dataclass(frozen=True)
class SimulatedUser:
    """A user whose taste is known exactly: utility = Σ liked weights − Σ disliked weights."""

    user_id: str
    liked: dict[str, float]
    disliked: dict[str, float]

    def __post_init__(self) -> None:
        overlap = set(self.liked) & set(self.disliked)
        if overlap:
            raise ValueError(f"user {self.user_id}: attributes both liked and disliked: {overlap}")

    def utility(self, attribute_ids: Iterable[str]) -> float:
        """Σ liked weights present − Σ disliked weights present."""
        present = set(attribute_ids)
        return sum(w for a, w in self.liked.items() if a in present) - sum(
            w for a, w in self.disliked.items() if a in present
        )

    def likes(self, attribute_ids: Iterable[str]) -> bool:
        """The noiseless label: liked when the utility is positive."""
        return self.utility(attribute_ids) > 0


def make_user(
    user_id: str,
    n_liked: int,
    n_disliked: int,
    rng: np.random.Generator,
    weight_range: tuple[float, float] = (0.5, 1.5),
) -> SimulatedUser:
    """A user with ``n_liked`` + ``n_disliked`` distinct attributes and uniform weights."""
    if n_liked + n_disliked > len(ATTRIBUTE_IDS):
        raise ValueError(
            f"user {user_id}: {n_liked} liked + {n_disliked} disliked exceed the "
            f"{len(ATTRIBUTE_IDS)} attributes of the vocabulary"
        )
    chosen = rng.choice(len(ATTRIBUTE_IDS), size=n_liked + n_disliked, replace=False)
    weights = rng.uniform(*weight_range, size=len(chosen)).round(3)
    ids = [ATTRIBUTE_IDS[i] for i in chosen]
    return SimulatedUser(
        user_id=user_id,
        liked=dict(zip(ids[:n_liked], weights[:n_liked].tolist(), strict=True)),
        disliked=dict(zip(ids[n_liked:], weights[n_liked:].tolist(), strict=True)),
    )
