"""The ``raw_images`` partitions as arrays, for the nodes that show pictures to a model."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from itertools import chain

import numpy as np
import pandas as pd

from prefgen_kedro.models.mllm import PreferenceContext


def load_pictures(raw_images: Mapping[str, Callable]) -> dict[str, np.ndarray]:
    """The ``raw_images`` partitions (image id → loader) as RGB uint8 arrays (writable: an
    image processor turns them into tensors, which warns on PIL's read-only views)."""
    return {image_id: np.array(load().convert("RGB")) for image_id, load in raw_images.items()}


def context_pictures(
    contexts: pd.DataFrame, raw_images: Mapping[str, Callable], also: Iterable[str] = ()
) -> dict[str, np.ndarray]:
    """The pictures of ``contexts``' ``liked`` and ``disliked`` images and of ``also``, and
    no others: a real-user image table need not fit in memory."""
    wanted = {*chain(*contexts["liked"]), *chain(*contexts["disliked"]), *also}
    return load_pictures({image_id: raw_images[image_id] for image_id in wanted})


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


def generated_pictures(
    generations: pd.DataFrame, generated_images: Mapping[str, Callable]
) -> np.ndarray:
    """The ``generations`` images in table order, uint8 (N, H, W, 3)."""
    missing = sorted(set(generations["image"]) - set(generated_images))
    if missing:
        raise KeyError(f"generated_images has no file for generations rows {missing[:5]}")
    return np.stack(
        [np.asarray(generated_images[key]().convert("RGB")) for key in generations["image"]]
    )
