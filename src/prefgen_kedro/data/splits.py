"""Deterministic, disjoint train/val/test assignment of users."""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence


def assign_splits(
    user_ids: Sequence[str], fractions: Mapping[str, float], seed: int
) -> dict[str, str]:
    """Map every distinct user id to one split name of ``fractions``.

    The ids are sorted, shuffled with ``seed`` and cut into consecutive blocks, one per split in
    the order of ``fractions``; a block ends at the rounded cumulative fraction, so the blocks
    always cover every user exactly once. The result depends only on the set of ids, the
    fractions and the seed, never on the order the ids arrive in.
    """
    _check_fractions(fractions)
    shuffled = sorted(set(user_ids))
    random.Random(seed).shuffle(shuffled)
    assignment: dict[str, str] = {}
    last_split = list(fractions)[-1]
    start, cumulative = 0, 0.0
    for split, fraction in fractions.items():
        cumulative += fraction
        # The last block takes the rest: fractions may sum to a hair under one.
        end = len(shuffled) if split == last_split else round(cumulative * len(shuffled))
        assignment.update(dict.fromkeys(shuffled[start:end], split))
        start = end
    return assignment


def _check_fractions(fractions: Mapping[str, float]) -> None:
    if not fractions:
        raise ValueError("split fractions: need at least one split")
    negative = {split: value for split, value in fractions.items() if value < 0}
    if negative:
        raise ValueError(f"split fractions: negative fraction(s) {negative}")
    total = sum(fractions.values())
    if not math.isclose(total, 1.0, abs_tol=1e-6):
        raise ValueError(f"split fractions: {dict(fractions)} sum to {total}, not 1")
