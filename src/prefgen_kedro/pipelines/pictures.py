"""The ``raw_images`` partitions as arrays, for the nodes that show pictures to a model."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np


def load_pictures(raw_images: Mapping[str, Callable]) -> dict[str, np.ndarray]:
    """The ``raw_images`` partitions (image id → loader) as RGB uint8 arrays."""
    return {image_id: np.asarray(load().convert("RGB")) for image_id, load in raw_images.items()}
