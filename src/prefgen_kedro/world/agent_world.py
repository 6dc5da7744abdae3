"""The agent dataset: simulated users, each with a history of liked and disliked renders.

Each history is drawn so that it is informative and balanced: every image carries at
least one attribute the user has an opinion on (utility ≠ 0), half of the images are
truly liked and half truly disliked, and then a configurable share of labels is flipped,
as real users are noisy. The flip rate sets the Bayes ceiling of any preference model.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd

from prefgen_kedro.console import progress
from prefgen_kedro.data.splits import assign_splits
from prefgen_kedro.data.tables import DISLIKED, LIKED
from prefgen_kedro.world.render import render
from prefgen_kedro.world.users import SimulatedUser, make_user
from prefgen_kedro.world.vocabulary import (
    CATEGORIES,
    SUBJECTS,
    attribute,
    attribute_ids,
    caption,
    subject_prompt,
)

SOURCE = "agent"  # ``images.source`` of the renders (Pick-a-Pic's: ``data.pickapic.SOURCE``)


@dataclass(frozen=True)
class AgentWorld:
    """The canonical tables of one generated world plus the pictures to write."""

    images: pd.DataFrame
    interactions: pd.DataFrame
    users: pd.DataFrame
    pictures: dict[str, np.ndarray]
    report: dict


def random_style(rng: np.random.Generator) -> dict[str, str]:
    """One value per category, uniformly."""
    return {category: values[rng.integers(len(values))] for category, values in CATEGORIES.items()}


def random_render(rng: np.random.Generator, size: int) -> tuple[str, dict[str, str], np.ndarray]:
    """A random subject and style, rendered: for pretraining encoders on the world."""
    subject = SUBJECTS[rng.integers(len(SUBJECTS))]
    style = random_style(rng)
    return subject, style, render(subject, style, int(rng.integers(2**31)), size)


def _informative_style(
    user: SimulatedUser, want_liked: bool, rng: np.random.Generator
) -> dict[str, str]:
    """A style whose true label is ``want_liked``: plant one attribute of that side, redraw
    until the utility has the wanted sign (cheap: the planted attribute usually decides)."""
    side = list(user.liked if want_liked else user.disliked)
    while True:
        style = random_style(rng)
        planted = attribute(side[rng.integers(len(side))])
        style[planted.category] = planted.value
        utility = user.utility(attribute_ids(style))
        if utility != 0 and (utility > 0) == want_liked:
            return style


def generate_agent_world(
    *,
    n_users: int,
    images_per_user: int,
    n_liked_attributes: int,
    n_disliked_attributes: int,
    label_noise: float,
    image_size: int,
    split_fractions: Mapping[str, float],
    images_subdir: str,
    seed: int,
    user_prefix: str = "u",
) -> AgentWorld:
    """Generate users, their balanced histories and the renders, deterministically."""
    if images_per_user < 2 or images_per_user % 2:
        raise ValueError(f"images_per_user must be even and ≥ 2, got {images_per_user}")
    if not 0.0 <= label_noise < 0.5:
        raise ValueError(f"label_noise must be in [0, 0.5), got {label_noise}")
    rng = np.random.default_rng(seed)
    users = [
        make_user(f"{user_prefix}{i:04d}", n_liked_attributes, n_disliked_attributes, rng)
        for i in range(n_users)
    ]
    splits = assign_splits([user.user_id for user in users], split_fractions, seed)

    image_rows, interaction_rows, pictures = [], [], {}
    flips = 0
    for user in progress(users, desc="agent world", unit="user"):
        wanted = [True, False] * (images_per_user // 2)
        for j, want_liked in enumerate(wanted):
            image_id = f"{user.user_id}-{j:03d}"
            subject = SUBJECTS[rng.integers(len(SUBJECTS))]
            style = _informative_style(user, want_liked, rng)
            image_seed = int(rng.integers(2**31))
            pictures[image_id] = render(subject, style, image_seed, image_size)
            flipped = bool(rng.random() < label_noise)
            flips += flipped
            image_rows.append(
                {
                    "image_id": image_id,
                    "path": f"{images_subdir}/{image_id}.png",
                    "caption": caption(subject, style),
                    "subject": subject,
                    "attributes": attribute_ids(style),
                    "source": SOURCE,
                    "seed": image_seed,
                }
            )
            interaction_rows.append(
                {
                    "user_id": user.user_id,
                    "image_id": image_id,
                    "label": LIKED if want_liked != flipped else DISLIKED,
                    "prompt": subject_prompt(subject),
                    "utility": user.utility(attribute_ids(style)),
                }
            )

    users_table = pd.DataFrame(
        {
            "user_id": [user.user_id for user in users],
            "split": [splits[user.user_id] for user in users],
            "liked_attributes": [list(user.liked) for user in users],
            "disliked_attributes": [list(user.disliked) for user in users],
            "liked_weights": [list(user.liked.values()) for user in users],
            "disliked_weights": [list(user.disliked.values()) for user in users],
        }
    )
    interactions = pd.DataFrame(interaction_rows)
    report = {
        "source": SOURCE,
        "users": n_users,
        "users_per_split": users_table["split"].value_counts().sort_index().to_dict(),
        "images": len(image_rows),
        "interactions": len(interactions),
        "liked_share": float(interactions["label"].mean()),
        "labels_flipped": flips,
        "label_noise_measured": flips / max(len(interactions), 1),
        "image_size": image_size,
    }
    return AgentWorld(pd.DataFrame(image_rows), interactions, users_table, pictures, report)


def user_from_row(row: Mapping) -> SimulatedUser:
    """Rebuild a simulated user from a row of the ``users`` table (the oracle's view)."""
    return SimulatedUser(
        user_id=row["user_id"],
        liked=dict(zip(row["liked_attributes"], row["liked_weights"], strict=True)),
        disliked=dict(zip(row["disliked_attributes"], row["disliked_weights"], strict=True)),
    )


def tastes_are_known(users: pd.DataFrame) -> bool:
    """Whether ``users`` are simulated (their weighted attributes known, as the oracle
    metrics need), not real people (Pick-a-Pic users have no attributes)."""
    return "liked_weights" in users.columns and bool(users["liked_attributes"].map(len).gt(0).all())


def simulated_users(users: pd.DataFrame, user_ids: Iterable[str]) -> list[SimulatedUser]:
    """The simulated user behind each id of ``user_ids``, in order, from the users table."""
    by_user = users.set_index("user_id")
    user_ids = list(user_ids)
    missing = sorted(set(user_ids) - set(by_user.index))
    if missing:
        raise KeyError(f"the users table has no rows for user ids {missing[:5]}")
    return [user_from_row({"user_id": u, **by_user.loc[u].to_dict()}) for u in user_ids]


@dataclass(frozen=True)
class RenderSet:
    """Random renders with their ground truth, for pretraining and checking encoders."""

    subjects: list[str]
    styles: list[dict[str, str]]
    images: np.ndarray  # (N, size, size, 3) uint8
    group_size: int = 1  # consecutive renders that share some categories

    @property
    def captions(self) -> list[str]:
        return [caption(s, style) for s, style in zip(self.subjects, self.styles, strict=True)]

    def partial_captions(self, drop_probability: float, seed: int) -> list[str]:
        """One caption per render with each category left unsaid with ``drop_probability``
        (independently, drawn with ``seed``): at 0.5 every subset of the categories is as
        likely, the subject-only prompt and the full caption among them."""
        if not 0.0 <= drop_probability <= 1.0:
            raise ValueError(f"drop_probability must be in [0, 1], got {drop_probability}")
        kept = np.random.default_rng(seed).random((len(self.styles), len(CATEGORIES)))
        kept = kept >= drop_probability
        return [
            caption(subject, {c: style[c] for c, keep in zip(CATEGORIES, row, strict=True) if keep})
            for subject, style, row in zip(self.subjects, self.styles, kept, strict=True)
        ]

    def first(self, n: int) -> RenderSet:
        """The first ``n`` renders (ungrouped)."""
        return RenderSet(self.subjects[:n], self.styles[:n], self.images[:n])

    def labels(self) -> dict[str, list[str]]:
        """The true class of every image for the subject and each category."""
        return {"subject": self.subjects} | {
            category: [style[category] for style in self.styles] for category in CATEGORIES
        }


def render_set(
    n: int, seed: int, size: int, group_size: int = 1, shared: tuple[str, ...] = ()
) -> RenderSet:
    """``n`` random renders, deterministic in ``seed``.

    With ``group_size`` > 1, consecutive groups share the ``shared`` categories and draw
    the rest (and the subject) anew: contrastive training on such groups has to tell
    apart what the shared, easy attributes (colours) cannot, like subject and layout.
    """
    if n % group_size:
        raise ValueError(f"n={n} is not a multiple of group_size={group_size}")
    unknown = set(shared) - set(CATEGORIES)
    if unknown:
        raise ValueError(f"shared categories {sorted(unknown)} are not in {list(CATEGORIES)}")
    rng = np.random.default_rng(seed)
    subjects, styles, images = [], [], np.empty((n, size, size, 3), np.uint8)
    group_style: dict[str, str] = {}
    for i in progress(range(n), desc=f"render {n}", unit="img", mininterval=2.0):
        if i % group_size == 0:
            group_style = random_style(rng)
        subject = SUBJECTS[rng.integers(len(SUBJECTS))]
        style = random_style(rng) | {c: group_style[c] for c in shared}
        images[i] = render(subject, style, int(rng.integers(2**31)), size)
        subjects.append(subject)
        styles.append(style)
    return RenderSet(subjects, styles, images, group_size)
