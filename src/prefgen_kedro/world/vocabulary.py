"""The agent world's vocabulary: subjects (the prompt's content) and 48 style attributes.

Every image shows one subject and exactly one attribute of each category, so every
attribute of every image is known, which gives the evaluation an exact preference oracle.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

# Bump when the pictures for the same (subject, attributes, seed) change: the shipped
# foundation models were trained on renders of one version and must be remade.
RENDERER_VERSION = "1"

SUBJECTS: tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "star",
    "heart",
    "house",
    "tree",
    "cross",
    "moon",
    "arrow",
)

SUBJECT_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (245, 135, 20),
    "yellow": (245, 215, 30),
    "lime": (150, 225, 40),
    "green": (25, 135, 55),
    "teal": (15, 145, 145),
    "cyan": (70, 210, 245),
    "blue": (35, 65, 205),
    "purple": (115, 45, 170),
    "magenta": (225, 45, 180),
    "pink": (250, 160, 195),
    "brown": (125, 75, 35),
}

BACKGROUND_COLOURS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 240),
    "black": (18, 18, 18),
    "grey": (128, 128, 128),
    "navy": (20, 30, 85),
    "beige": (225, 205, 165),
    "mint": (170, 232, 200),
    "lavender": (200, 185, 240),
    "peach": (252, 198, 165),
    "sky": (155, 205, 245),
    "olive": (110, 120, 35),
    "maroon": (110, 22, 40),
    "forest": (22, 72, 38),
}

PATTERNS: tuple[str, ...] = (
    "flat",
    "striped",
    "dotted",
    "checkered",
    "gradient",
    "outlined",
    "grainy",
    "two-tone",
)

# Each composition is a list of (centre x, centre y, radius) as fractions of the image size.
COMPOSITIONS: dict[str, tuple[tuple[float, float, float], ...]] = {
    "centred": ((0.5, 0.5, 0.32),),
    "large": ((0.5, 0.5, 0.46),),
    "small": ((0.5, 0.5, 0.2),),
    "left third": ((0.3, 0.5, 0.24),),
    "right third": ((0.7, 0.5, 0.24),),
    "top": ((0.5, 0.28, 0.24),),
    "bottom": ((0.5, 0.72, 0.24),),
    "several copies": ((0.27, 0.29, 0.2), (0.73, 0.29, 0.2), (0.5, 0.73, 0.2)),
}

TONES: tuple[str, ...] = (
    "natural",
    "pastel",
    "dark",
    "muted",
    "warm",
    "cool",
    "high-contrast",
    "vignette",
)

CATEGORIES: dict[str, tuple[str, ...]] = {
    "subject_colour": tuple(SUBJECT_COLOURS),
    "background": tuple(BACKGROUND_COLOURS),
    "pattern": PATTERNS,
    "composition": tuple(COMPOSITIONS),
    "tone": TONES,
}

# Everything a picture shows that a reader (oracle, CLIP heads) can name: the subject, then
# each category, with its classes.
HEADS: dict[str, tuple[str, ...]] = {"subject": SUBJECTS, **CATEGORIES}


@dataclass(frozen=True)
class Attribute:
    """One style attribute; ``id`` (``category:value``) is how tables and users name it."""

    category: str
    value: str

    @property
    def id(self) -> str:
        return f"{self.category}:{self.value}"

    @property
    def phrase(self) -> str:
        """The attribute as a short text phrase (the MMD alignment's target text)."""
        suffix = {
            "subject_colour": "subject",
            "background": "background",
            "pattern": "pattern",
            "composition": "composition",
            "tone": "tone",
        }[self.category]
        return f"{self.value} {suffix}"


ATTRIBUTES: tuple[Attribute, ...] = tuple(
    Attribute(category, value) for category, values in CATEGORIES.items() for value in values
)
ATTRIBUTE_IDS: tuple[str, ...] = tuple(attribute.id for attribute in ATTRIBUTES)
_BY_ID = {attribute.id: attribute for attribute in ATTRIBUTES}


def attribute(attribute_id: str) -> Attribute:
    """The attribute named ``category:value``; a ``KeyError`` names an unknown id."""
    try:
        return _BY_ID[attribute_id]
    except KeyError:
        raise KeyError(f"unknown attribute {attribute_id!r}; known: {ATTRIBUTE_IDS}") from None


def attribute_ids(style: dict[str, str]) -> list[str]:
    """The ids of a style given as ``{category: value}``, in category order."""
    return [f"{category}:{style[category]}" for category in CATEGORIES]


def attribute_matrix(styles: list[dict[str, str]]) -> np.ndarray:
    """(len(styles), 48) float32 0/1: which attributes each style shows, in ``ATTRIBUTE_IDS``
    order."""
    column = {attribute_id: i for i, attribute_id in enumerate(ATTRIBUTE_IDS)}
    present = np.zeros((len(styles), len(ATTRIBUTE_IDS)), np.float32)
    for row, style in enumerate(styles):
        present[row, [column[a] for a in attribute_ids(style)]] = 1.0
    return present


def caption(subject: str, style: Mapping[str, str]) -> str:
    """A caption, e.g. "a dotted orange star on a teal background, top, pastel" for a full
    style; a category missing from ``style`` is left unsaid ("a dotted star, top"; with no
    category, ``subject_prompt``'s "a star")."""
    words = [style[c] for c in ("pattern", "subject_colour") if c in style]
    text = " ".join(["a", *words, subject])
    if "background" in style:
        text += f" on a {style['background']} background"
    return ", ".join([text, *(style[c] for c in ("composition", "tone") if c in style)])


def said_caption(subject: str, attribute_ids: Sequence[str]) -> str:
    """``caption`` of ``subject`` saying the attributes named (``category:value``), the first
    of each category: "a striped star on a olive background" for ``["pattern:striped",
    "background:olive", "pattern:dotted"]``."""
    style: dict[str, str] = {}
    for attribute_id in attribute_ids:
        said = attribute(attribute_id)
        style.setdefault(said.category, said.value)
    return caption(subject, style)


def subject_prompt(subject: str) -> str:
    """The prompt that names only the subject (what a user asks a generator for)."""
    return f"a {subject}"


def world_hash() -> str:
    """A hash of the world's definition; foundation checkpoints record the one they saw."""
    definition = {
        "renderer_version": RENDERER_VERSION,
        "subjects": SUBJECTS,
        "subject_colours": SUBJECT_COLOURS,
        "background_colours": BACKGROUND_COLOURS,
        "patterns": PATTERNS,
        "compositions": COMPOSITIONS,
        "tones": TONES,
    }
    return hashlib.sha256(json.dumps(definition, sort_keys=True).encode()).hexdigest()[:16]
