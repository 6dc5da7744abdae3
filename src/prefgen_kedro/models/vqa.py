"""The preference-oriented VQA dataset as pure data: which images a sample shows and its answer.

A sample is one user's context (K liked and K disliked images of their history), a query
image from the same history that the context never contains, and the answer: "Yes"/"No",
then, with reasons, why. In the agent world the reason names the user's liked (for "Yes")
or disliked (for "No") attributes that the query shows ("Yes, because it is dotted and
pastel"); Pick-a-Pic images have no attributes, so their reason is the query's caption.

The chat text (``build_prompt``) marks every image with its group's marker token right
before its placeholder: the prototype learned preference comparison only once each group had
a distinct marker (and the slot-aligned positions of ``mllm.py``, which find slots by them).

Public API: ``VqaExample``, ``sample_vqa_examples``, ``build_prompt``, ``vqa_corpus``,
``examples_table`` / ``examples_from_table``, the placeholder and marker strings, and
``YES`` / ``NO``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from prefgen_kedro.data.tables import (
    DISLIKED,
    IMAGES_COLUMNS,
    INTERACTIONS_COLUMNS,
    LIKED,
    SPLITS,
    USERS_COLUMNS,
    require_columns,
)
from prefgen_kedro.world.vocabulary import ATTRIBUTES, attribute

logger = logging.getLogger(__name__)

IMAGE_PLACEHOLDER = "<image>"
LIKED_MARKER = "<liked>"
DISLIKED_MARKER = "<disliked>"
QUERY_MARKER = "<query>"
MARKERS = (LIKED_MARKER, DISLIKED_MARKER, QUERY_MARKER)
YES, NO = "Yes", "No"

LIKED_INTRO = "I like these images:"
DISLIKED_INTRO = "I don't like these images:"
QUESTION = "Does the user like this image?"


@dataclass(frozen=True)
class VqaExample:
    """One preference question: a user's context, a query image and the answer."""

    user_id: str
    liked: tuple[str, ...]
    disliked: tuple[str, ...]
    query: str
    answer: str
    label: int  # LIKED (1) or DISLIKED (0): the query's label in the user's history


def build_prompt(k_liked: int, k_disliked: int, *, with_query: bool = True) -> str:
    """The question text with one ``IMAGE_PLACEHOLDER`` per image, each after its marker.

    ``build_prompt(1, 1)`` is three lines: ``I like these images: <liked><image>``,
    ``I don't like these images: <disliked><image>``, ``Does the user like this image?
    <query><image>`` (the last one only ``with_query``).
    """
    parts = [
        f"{LIKED_INTRO} " + (LIKED_MARKER + IMAGE_PLACEHOLDER) * k_liked,
        f"{DISLIKED_INTRO} " + (DISLIKED_MARKER + IMAGE_PLACEHOLDER) * k_disliked,
    ]
    if with_query:
        parts.append(f"{QUESTION} {QUERY_MARKER}{IMAGE_PLACEHOLDER}")
    return "\n".join(parts)


def answer_text(label: int, reasons: Sequence[str] = (), caption: str | None = None) -> str:
    """ "Yes"/"No", then the reason words ("because it is a and b") or the caption, if any."""
    word = YES if label == LIKED else NO
    if reasons:
        listed = reasons[0] if len(reasons) == 1 else f"{', '.join(reasons[:-1])} and {reasons[-1]}"
        return f"{word}, because it is {listed}"
    if caption:
        return f"{word}, it shows {caption}"
    return word


def sample_vqa_examples(
    images: pd.DataFrame,
    interactions: pd.DataFrame,
    users: pd.DataFrame,
    *,
    splits: Sequence[str],
    k: int,
    samples_per_user: int,
    seed: int,
    with_reasons: bool,
) -> list[VqaExample]:
    """Balanced yes/no questions for every user of ``splits``, deterministic in ``seed``.

    Each user's queries alternate between their liked and disliked images (the first side
    drawn at random, so an odd ``samples_per_user`` stays balanced over users) and cycle
    through a shuffled order of that side, so no query repeats before all have been asked.
    Context: ``k`` liked and ``k`` disliked images of the history, never the query. Users
    whose history has fewer than ``k + 1`` images on a side are skipped, with a warning.
    """
    require_columns(images, IMAGES_COLUMNS, "sample_vqa_examples: images")
    require_columns(interactions, INTERACTIONS_COLUMNS, "sample_vqa_examples: interactions")
    require_columns(users, USERS_COLUMNS, "sample_vqa_examples: users")
    unknown = set(splits) - set(SPLITS)
    if unknown:
        raise ValueError(f"unknown split(s) {sorted(unknown)}; known: {SPLITS}")
    if k < 1 or samples_per_user < 1:
        raise ValueError(f"k and samples_per_user must be ≥ 1, got {k} and {samples_per_user}")

    chosen = users[users["split"].isin(splits)].sort_values("user_id")
    by_image = images.set_index("image_id")
    histories = {
        user_id: {
            label: rows.loc[rows["label"] == label, "image_id"].tolist()
            for label in (LIKED, DISLIKED)
        }
        for user_id, rows in interactions.groupby("user_id", sort=False)
    }
    rng = np.random.default_rng(seed)
    examples: list[VqaExample] = []
    skipped = []
    for user in chosen.itertuples(index=False):
        history = histories.get(user.user_id, {LIKED: [], DISLIKED: []})
        if min(len(history[LIKED]), len(history[DISLIKED])) < k + 1:
            skipped.append(user.user_id)
            continue
        opinions = {LIKED: set(user.liked_attributes), DISLIKED: set(user.disliked_attributes)}
        orders = {label: _shuffled(ids, rng) for label, ids in history.items()}
        first = int(rng.integers(2))
        for s in range(samples_per_user):
            label = LIKED if (s + first) % 2 == 0 else DISLIKED
            query = orders[label][(s // 2) % len(orders[label])]
            liked = _draw(history[LIKED], k, rng, excluding=query)
            disliked = _draw(history[DISLIKED], k, rng, excluding=query)
            assert query not in liked + disliked, "the context must never contain the query"
            answer = answer_text(label)
            if with_reasons:
                row = by_image.loc[query]
                present = [attribute(a).value for a in row["attributes"] if a in opinions[label]]
                caption = None if len(row["attributes"]) else row["caption"]
                answer = answer_text(label, present, caption)
            examples.append(VqaExample(user.user_id, liked, disliked, query, answer, label))
    if skipped:
        logger.warning(
            "sample_vqa_examples: skipped %d user(s) with fewer than %d liked or disliked "
            "images (k=%d), e.g. %s",
            len(skipped),
            k + 1,
            k,
            skipped[:5],
        )
    if not examples:
        raise ValueError(f"no user of splits {list(splits)} has k+1={k + 1} images per side")
    return examples


def _shuffled(ids: Sequence[str], rng: np.random.Generator) -> list[str]:
    return [ids[i] for i in rng.permutation(len(ids))]


def _draw(
    ids: Sequence[str], k: int, rng: np.random.Generator, *, excluding: str
) -> tuple[str, ...]:
    """``k`` distinct ids of ``ids`` other than ``excluding``, in random order."""
    pool = [i for i in ids if i != excluding]
    return tuple(pool[i] for i in rng.choice(len(pool), k, replace=False))


def examples_table(examples: Iterable[VqaExample]) -> pd.DataFrame:
    """The examples as a table (one row each), e.g. to store as parquet."""
    return pd.DataFrame([asdict(example) for example in examples])


def examples_from_table(table: pd.DataFrame) -> list[VqaExample]:
    """Inverse of ``examples_table`` (parquet returns list columns as arrays)."""
    return [
        VqaExample(
            user_id=row["user_id"],
            liked=tuple(row["liked"]),
            disliked=tuple(row["disliked"]),
            query=row["query"],
            answer=row["answer"],
            label=int(row["label"]),
        )
        for row in table.to_dict("records")
    ]


def vqa_corpus(captions: Iterable[str]) -> list[str]:
    """Text to train a tokenizer on: the captions, the question parts and every answer word."""
    words = [item.value for item in ATTRIBUTES]
    groups = [words[i : i + 3] for i in range(0, len(words), 3)]
    return [
        *captions,
        YES,
        NO,
        LIKED_INTRO,
        DISLIKED_INTRO,
        QUESTION,
        *(answer_text(label, [word]) for label in (LIKED, DISLIKED) for word in words),
        *(answer_text(label, group) for label in (LIKED, DISLIKED) for group in groups),
    ]
