"""The ``raw_images`` partitions as arrays, for the nodes that show pictures to a model."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import pandas as pd

from prefgen_kedro.models.mllm import PreferenceContext


def load_pictures(raw_images: Mapping[str, Callable]) -> dict[str, np.ndarray]:
    """The ``raw_images`` partitions (image id → loader) as RGB uint8 arrays."""
    return {image_id: np.asarray(load().convert("RGB")) for image_id, load in raw_images.items()}


def preference_contexts(
    contexts: pd.DataFrame, pictures: Mapping[str, np.ndarray]
) -> dict[str, PreferenceContext]:
    """Each user's context as pictures: ``contexts`` is indexed by user id and has ``liked``
    and ``disliked`` image-id lists (one row per user)."""
    if not contexts.index.is_unique:
        raise ValueError("preference_contexts needs one context row per user")
    return {
        user_id: PreferenceContext([pictures[i] for i in liked], [pictures[i] for i in disliked])
        for user_id, liked, disliked in zip(
            contexts.index, contexts["liked"], contexts["disliked"], strict=True
        )
    }
