"""The preference-oriented VQA dataset as pure data: which images a sample shows and its answer.

A sample is one user's context (K liked and K disliked images of their history), a query
image from the same history that the context never contains, and the answer: "Yes"/"No",
then, with reasons, why. In the agent world the reason names the user's liked (for "Yes")
or disliked (for "No") attributes that the query shows ("Yes, because it is dotted and
pastel"); Pick-a-Pic images have no attributes, so their reason is the query's caption.
Several questions may share a context (``turn`` > 0: asked after the previous one in the
same chat), as the MLLM's pretraining conversations do.

The chat text (``build_prompt``) marks every image with its group's marker token right
before its placeholder: the prototype learned preference comparison only once each group had
a distinct marker (and the slot-aligned positions of ``mllm.py``, which find slots by them).

Public API: ``VqaExample``, ``sample_vqa_examples``, ``build_prompt``, ``vqa_corpus``,
``examples_table`` / ``examples_from_table``, ``sample_contexts``, ``counting_rule_score`` /
``counting_rule_scores`` / ``counting_rule_accuracy`` / ``context_summary`` (the reference a
reader of the attributes reaches), the placeholder and marker strings, and ``YES`` / ``NO``.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

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
from prefgen_kedro.world.vocabulary import ATTRIBUTE_IDS, ATTRIBUTES, attribute

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
TASTE_QUESTION = "What does the user like and dislike?"
LIKES, DISLIKES = "likes:", "dislikes:"


@dataclass(frozen=True)
class VqaExample:
    """One preference question: a user's context, a query image and the answer."""

    user_id: str
    liked: tuple[str, ...]
    disliked: tuple[str, ...]
    query: str
    answer: str
    label: int  # LIKED (1) or DISLIKED (0): the query's label in the user's history
    turn: int = 0  # > 0: a follow-up about the previous example's context, in the same chat


def taste_text(liked: Sequence[str], disliked: Sequence[str]) -> str:
    """The answer to ``TASTE_QUESTION``: "likes: dotted, red. dislikes: night." """
    return f"{LIKES} {', '.join(liked)}. {DISLIKES} {', '.join(disliked)}."


def parse_taste(text: str) -> tuple[list[str], list[str]]:
    """Inverse of ``taste_text`` for a generated answer; unreadable parts give empty lists."""
    liked: list[str] = []
    disliked: list[str] = []
    for part in (piece.strip() for piece in text.split(".")):
        for prefix, into in ((DISLIKES, disliked), (LIKES, liked)):
            if part.startswith(prefix):
                into += [w.strip() for w in part.removeprefix(prefix).split(",") if w.strip()]
                break
    return liked, disliked


def build_prompt(
    k_liked: int, k_disliked: int, *, with_query: bool = True, question: str = QUESTION
) -> str:
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
        parts.append(query_prompt(question))
    elif question != QUESTION:
        parts.append(question)
    return "\n".join(parts)


def query_prompt(question: str = QUESTION) -> str:
    """``question`` about one query image: "Does the user like this image? <query><image>"."""
    return f"{question} {QUERY_MARKER}{IMAGE_PLACEHOLDER}"


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
    questions_per_context: int = 1,
) -> list[VqaExample]:
    """Balanced yes/no questions for every user of ``splits``, deterministic in ``seed``.

    Each user's queries alternate between their liked and disliked images (the first side
    drawn at random, so an odd ``samples_per_user`` stays balanced over users) and cycle
    through a shuffled order of that side, so no query repeats before all have been asked.
    Context: ``k`` liked and ``k`` disliked images of the history, never a query asked about
    it; every ``questions_per_context`` consecutive questions of a user share one (their
    ``turn`` counts from 0). Users whose history has fewer than ``k`` + (the queries a
    context asks of that side) images on a side are skipped, with a warning.
    """
    require_columns(images, IMAGES_COLUMNS, "sample_vqa_examples: images")
    require_columns(interactions, INTERACTIONS_COLUMNS, "sample_vqa_examples: interactions")
    require_columns(users, USERS_COLUMNS, "sample_vqa_examples: users")
    unknown = set(splits) - set(SPLITS)
    if unknown:
        raise ValueError(f"unknown split(s) {sorted(unknown)}; known: {SPLITS}")
    if min(k, samples_per_user, questions_per_context) < 1:
        raise ValueError(
            "k, samples_per_user and questions_per_context must be ≥ 1, got "
            f"{k}, {samples_per_user} and {questions_per_context}"
        )
    # Alternating sides: a context is asked about at most this many images of one side.
    needed = k + (min(questions_per_context, samples_per_user) + 1) // 2

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
        if min(len(history[LIKED]), len(history[DISLIKED])) < needed:
            skipped.append(user.user_id)
            continue
        opinions = {LIKED: set(user.liked_attributes), DISLIKED: set(user.disliked_attributes)}
        orders = {label: _shuffled(ids, rng) for label, ids in history.items()}
        first = int(rng.integers(2))
        for start in range(0, samples_per_user, questions_per_context):
            asked = range(start, min(start + questions_per_context, samples_per_user))
            labels = [LIKED if (s + first) % 2 == 0 else DISLIKED for s in asked]
            queries = [
                orders[label][(s // 2) % len(orders[label])]
                for s, label in zip(asked, labels, strict=True)
            ]
            liked = _draw(history[LIKED], k, rng, excluding=queries)
            disliked = _draw(history[DISLIKED], k, rng, excluding=queries)
            assert not set(queries) & {*liked, *disliked}, "a context never shows its queries"
            for turn, (query, label) in enumerate(zip(queries, labels, strict=True)):
                answer = answer_text(label)
                if with_reasons:
                    row = by_image.loc[query]
                    present = [
                        attribute(a).value for a in row["attributes"] if a in opinions[label]
                    ]
                    caption = None if len(row["attributes"]) else row["caption"]
                    answer = answer_text(label, present, caption)
                examples.append(
                    VqaExample(user.user_id, liked, disliked, query, answer, label, turn)
                )
    if skipped:
        logger.warning(
            "sample_vqa_examples: skipped %d user(s) with fewer than %d liked or disliked "
            "images (k=%d), e.g. %s",
            len(skipped),
            needed,
            k,
            skipped[:5],
        )
    if not examples:
        raise ValueError(f"no user of splits {list(splits)} has {needed} images per side")
    return examples


def sample_contexts(
    interactions: pd.DataFrame, users: pd.DataFrame, *, k: int, n_contexts: int, seed: int
) -> pd.DataFrame:
    """``n_contexts`` contexts of ``k`` liked + ``k`` disliked images for every user.

    Context 0 is the user's canonical one, the first ``k`` of each side in history order
    (what a user shows a generator; later stages use it for the user embeddings); the
    others are random subsets of the history. Columns: ``user_id``, ``split``, ``context``,
    ``liked``, ``disliked``. Users with fewer than ``k`` images on a side are an error.
    """
    require_columns(interactions, INTERACTIONS_COLUMNS, "sample_contexts: interactions")
    require_columns(users, USERS_COLUMNS, "sample_contexts: users")
    rng = np.random.default_rng(seed)
    sides = {
        user_id: {
            label: rows.loc[rows["label"] == label, "image_id"].tolist()
            for label in (LIKED, DISLIKED)
        }
        for user_id, rows in interactions.groupby("user_id", sort=False)
    }
    rows = []
    for user in users.sort_values("user_id").itertuples(index=False):
        history = sides.get(user.user_id, {LIKED: [], DISLIKED: []})
        short = {label: len(ids) for label, ids in history.items() if len(ids) < k}
        if short:
            raise ValueError(
                f"user {user.user_id} has {short} images (label: count) but k={k} are needed "
                "per side"
            )
        for context in range(n_contexts):
            drawn = {
                label: tuple(ids[:k])
                if context == 0
                else tuple(ids[i] for i in rng.choice(len(ids), k, replace=False))
                for label, ids in history.items()
            }
            rows.append(
                {
                    "user_id": user.user_id,
                    "split": user.split,
                    "context": context,
                    "liked": drawn[LIKED],
                    "disliked": drawn[DISLIKED],
                }
            )
    return pd.DataFrame(rows)


def _shuffled(ids: Sequence[str], rng: np.random.Generator) -> list[str]:
    return [ids[i] for i in rng.permutation(len(ids))]


def _draw(
    ids: Sequence[str], k: int, rng: np.random.Generator, *, excluding: Collection[str]
) -> tuple[str, ...]:
    """``k`` distinct ids of ``ids`` not in ``excluding``, in random order."""
    pool = [i for i in ids if i not in excluding]
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
            turn=int(row["turn"]),
        )
        for row in table.to_dict("records")
    ]


def vqa_corpus(captions: Iterable[str], prompts: Sequence[str] = ()) -> list[str]:
    """Text to train a tokenizer on: the captions, every answer word, and the question parts
    plus ``prompts`` (other fixed prompt texts) as often as the captions, since every sample
    carries them: BPE then merges them into few tokens, and sequences stay short."""
    captions = list(captions)
    words = [item.value for item in ATTRIBUTES]
    groups = [words[i : i + 3] for i in range(0, len(words), 3)]
    fixed = [YES, NO, LIKED_INTRO, DISLIKED_INTRO, QUESTION, TASTE_QUESTION, *prompts]
    return [
        *captions,
        *fixed * max(1, len(captions)),
        *(answer_text(label, [word]) for label in (LIKED, DISLIKED) for word in words),
        *(answer_text(label, group) for label in (LIKED, DISLIKED) for group in groups),
        *(taste_text(group, group[::-1]) for group in groups),
    ]


def counting_rule_score(
    liked: Sequence[Collection[str]], disliked: Sequence[Collection[str]], query: Collection[str]
) -> int:
    """Σ over the query's attributes of (liked context images showing it − disliked ones).

    The rule a reader of the true attributes would apply to a context: no weights, no
    knowledge of the user beyond the context; its sign is its answer (0 is a coin flip).
    """
    return sum(
        sum(a in image for image in liked) - sum(a in image for image in disliked) for a in query
    )


def context_summary(
    liked: Sequence[Collection[str]], disliked: Sequence[Collection[str]]
) -> np.ndarray:
    """A perfect summary of what a context shows, one value per attribute (``ATTRIBUTE_IDS``
    order): the liked images showing it minus the disliked ones (float32). Its value at an
    attribute is the counting rule's score of a query showing that attribute alone."""
    column = {attribute_id: i for i, attribute_id in enumerate(ATTRIBUTE_IDS)}
    summary = np.zeros(len(column), np.float32)
    for images, sign in ((liked, 1.0), (disliked, -1.0)):
        for image in images:
            summary[[column[a] for a in image]] += sign
    return summary


def counting_rule_scores(
    questions: Iterable, attributes: Mapping[Any, Collection[str]]
) -> list[int]:
    """``counting_rule_score`` of each question (anything with ``liked``, ``disliked`` and
    ``query`` image keys), reading each image's attributes from ``attributes``."""
    return [
        counting_rule_score(
            [attributes[i] for i in q.liked],
            [attributes[i] for i in q.disliked],
            attributes[q.query],
        )
        for q in questions
    ]


def counting_rule_accuracy(scores: Sequence[int], labels: Sequence[int]) -> float:
    """Accuracy of answering "Yes" for a positive score; a zero score counts as half right
    (a fair coin's expectation), so the figure is exact, not one draw."""
    if len(scores) != len(labels) or not len(scores):
        raise ValueError(f"need as many scores as labels (≥ 1), got {len(scores)}, {len(labels)}")
    hits = [
        0.5 if score == 0 else float((score > 0) == (label == LIKED))
        for score, label in zip(scores, labels, strict=True)
    ]
    return sum(hits) / len(hits)
