"""Deterministic renderer: (subject, style, seed) -> RGB picture.

Shapes are drawn at ``SUPERSAMPLING`` times the size and box-filtered down, so edges are
anti-aliased and small copies stay legible. Pattern periods scale with the image, so a
stripe or a dot is a few pixels wide at any size.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from prefgen_kedro.world.vocabulary import (
    BACKGROUND_COLOURS,
    CATEGORIES,
    COMPOSITIONS,
    SUBJECT_COLOURS,
    SUBJECTS,
)

SUPERSAMPLING = 4
JITTER = 0.03  # fraction of the size a subject may move, so no two renders are identical


def _polygon(cx: float, cy: float, r: float, points: list[tuple[float, float]]) -> list:
    return [(cx + x * r, cy + y * r) for x, y in points]


def _star_points(n: int = 5, inner: float = 0.45) -> list[tuple[float, float]]:
    points = []
    for k in range(2 * n):
        radius = 1.0 if k % 2 == 0 else inner
        angle = -math.pi / 2 + k * math.pi / n
        points.append((radius * math.cos(angle), radius * math.sin(angle)))
    return points


def _draw_subject(draw: ImageDraw.ImageDraw, subject: str, cx: float, cy: float, r: float) -> None:
    """Draw the subject's silhouette (value 255) centred at (cx, cy) with radius r."""
    box = (cx - r, cy - r, cx + r, cy + r)
    if subject == "circle":
        draw.ellipse(box, fill=255)
    elif subject == "square":
        s = 0.82 * r
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=255)
    elif subject == "triangle":
        draw.polygon(_polygon(cx, cy, r, [(0, -1), (0.95, 0.8), (-0.95, 0.8)]), fill=255)
    elif subject == "star":
        draw.polygon(_polygon(cx, cy, r, _star_points()), fill=255)
    elif subject == "heart":
        lobe = 0.5 * r
        draw.ellipse((cx - r, cy - 0.8 * r, cx, cy - 0.8 * r + 2 * lobe), fill=255)
        draw.ellipse((cx, cy - 0.8 * r, cx + r, cy - 0.8 * r + 2 * lobe), fill=255)
        draw.polygon(_polygon(cx, cy, r, [(-0.97, -0.15), (0.97, -0.15), (0, 0.95)]), fill=255)
    elif subject == "house":
        draw.rectangle((cx - 0.7 * r, cy - 0.1 * r, cx + 0.7 * r, cy + 0.9 * r), fill=255)
        draw.polygon(_polygon(cx, cy, r, [(0, -0.95), (0.95, -0.1), (-0.95, -0.1)]), fill=255)
    elif subject == "tree":
        draw.polygon(_polygon(cx, cy, r, [(0, -1), (0.85, 0.45), (-0.85, 0.45)]), fill=255)
        draw.rectangle((cx - 0.2 * r, cy + 0.4 * r, cx + 0.2 * r, cy + r), fill=255)
    elif subject == "cross":
        arm = 0.32 * r
        draw.rectangle((cx - arm, cy - r, cx + arm, cy + r), fill=255)
        draw.rectangle((cx - r, cy - arm, cx + r, cy + arm), fill=255)
    elif subject == "moon":
        draw.ellipse(box, fill=255)
        draw.ellipse((cx - 0.35 * r, cy - 1.05 * r, cx + 1.35 * r, cy + 0.65 * r), fill=0)
    elif subject == "arrow":
        draw.rectangle((cx - r, cy - 0.25 * r, cx + 0.1 * r, cy + 0.25 * r), fill=255)
        draw.polygon(_polygon(cx, cy, r, [(0.0, -0.8), (1.0, 0.0), (0.0, 0.8)]), fill=255)
    else:
        raise ValueError(f"unknown subject {subject!r}; known: {SUBJECTS}")


def _subject_mask(
    subject: str, copy: tuple[float, float, float], size: int, outline: bool
) -> np.ndarray:
    """Coverage in [0, 1] of one copy ``(cx, cy, r)`` of the subject (or of its outline)."""
    cx, cy, r = copy
    big = size * SUPERSAMPLING
    canvas = Image.new("L", (big, big), 0)
    _draw_subject(ImageDraw.Draw(canvas), subject, cx * big, cy * big, r * big)
    if outline:
        # Keep a ring ~size/14 px wide: the shape minus its erosion.
        width = max(3, round(big / 14)) | 1
        canvas = Image.fromarray(
            np.asarray(canvas) - np.asarray(canvas.filter(ImageFilter.MinFilter(width)))
        )
    small = canvas.resize((size, size), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32)[..., None] / 255.0


def _contrast(colour: np.ndarray) -> np.ndarray:
    """White for dark colours, black for light ones: the second colour of a pattern."""
    luminance = float(colour @ np.array([0.299, 0.587, 0.114]))
    return np.ones(3, np.float32) if luminance < 0.55 else np.zeros(3, np.float32)


def _fill(
    pattern: str,
    colour: np.ndarray,
    copy: tuple[float, float, float],
    size: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """The fill (H, W, 3) in [0, 1] of one copy ``(cx, cy, r)`` of the subject."""
    cx, cy, r = copy
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    period = size / 8
    other = _contrast(colour)
    mix = 0.65 * other + 0.35 * colour
    if pattern in ("flat", "outlined"):
        second = np.zeros((size, size, 1), np.float32)
    elif pattern == "striped":
        second = (((x + y) // (period / 2)) % 2)[..., None]
    elif pattern == "dotted":
        dx = (x % period) - period / 2 + 0.5
        dy = (y % period) - period / 2 + 0.5
        second = (np.hypot(dx, dy) < period * 0.3)[..., None].astype(np.float32)
    elif pattern == "checkered":
        second = (((x // (period / 2)) + (y // (period / 2))) % 2)[..., None]
    elif pattern == "gradient":
        # Top to bottom across the copy itself, so small copies show the whole ramp.
        top = (cy - r) * size
        second = np.clip((y - top) / (2 * r * size), 0.0, 1.0)[..., None] * 0.9
    elif pattern == "grainy":
        grain = rng.normal(0.0, 0.22, size=(size, size, 1)).astype(np.float32)
        return np.clip(colour + grain, 0.0, 1.0)
    elif pattern == "two-tone":
        second = (x + 0.5 > cx * size)[..., None].astype(np.float32)
    else:
        raise ValueError(f"unknown pattern {pattern!r}; known: {CATEGORIES['pattern']}")
    return colour * (1 - second) + mix * second


def _vignette(image: np.ndarray) -> np.ndarray:
    size = image.shape[0]
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1) - 0.5
    return image * np.clip(1.0 - 2.2 * (x**2 + y**2), 0.0, 1.0)[..., None]


def _muted(image: np.ndarray) -> np.ndarray:
    grey = image @ np.array([0.299, 0.587, 0.114], np.float32)
    return 0.3 * image + 0.7 * grey[..., None]


_TONE_FUNCTIONS = {
    "natural": lambda image: image,
    "pastel": lambda image: 0.5 * image + 0.48,
    "dark": lambda image: 0.45 * image,
    "muted": _muted,
    "warm": lambda image: (
        image * np.array([0.85, 0.8, 0.55], np.float32) + np.array([0.15, 0.07, 0.0], np.float32)
    ),
    "cool": lambda image: (
        image * np.array([0.55, 0.8, 0.85], np.float32) + np.array([0.0, 0.07, 0.15], np.float32)
    ),
    "high-contrast": lambda image: (image - 0.5) * 1.9 + 0.5,
    "vignette": _vignette,
}


def _apply_tone(image: np.ndarray, tone: str) -> np.ndarray:
    if tone not in _TONE_FUNCTIONS:
        raise ValueError(f"unknown tone {tone!r}; known: {CATEGORIES['tone']}")
    return _TONE_FUNCTIONS[tone](image)


def render(subject: str, style: dict[str, str], seed: int, size: int) -> np.ndarray:
    """Render one picture as a (size, size, 3) uint8 array.

    ``style`` maps every category of ``CATEGORIES`` to one of its values. The same
    arguments always give the same pixels; ``seed`` moves the subject a little and draws
    the grain.
    """
    missing = [category for category in CATEGORIES if category not in style]
    if missing:
        raise ValueError(f"style {style} lacks categories {missing}")
    rng = np.random.default_rng(seed)
    image = np.empty((size, size, 3), np.float32)
    image[:] = np.array(BACKGROUND_COLOURS[style["background"]], np.float32) / 255.0
    colour = np.array(SUBJECT_COLOURS[style["subject_colour"]], np.float32) / 255.0
    outline = style["pattern"] == "outlined"
    for x, y, r in COMPOSITIONS[style["composition"]]:
        copy = (x + rng.uniform(-JITTER, JITTER), y + rng.uniform(-JITTER, JITTER), r)
        alpha = _subject_mask(subject, copy, size, outline)
        image = image * (1 - alpha) + _fill(style["pattern"], colour, copy, size, rng) * alpha
    image = _apply_tone(image, style["tone"])
    return (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
