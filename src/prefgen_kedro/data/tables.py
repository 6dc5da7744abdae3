"""The canonical tables every source is turned into (DESIGN.md §4).

Each table is a pandas DataFrame with one row per thing; ``require_columns`` is the one
place that checks a table has what later stages read.
"""

from __future__ import annotations

import pandas as pd

IMAGES_COLUMNS = ("image_id", "path", "caption", "subject", "attributes", "source")
INTERACTIONS_COLUMNS = ("user_id", "image_id", "label", "prompt")
USERS_COLUMNS = ("user_id", "split", "liked_attributes", "disliked_attributes")
SPLITS = ("train", "val", "test")
LIKED, DISLIKED = 1, 0


def require_columns(table: pd.DataFrame, columns: tuple[str, ...], where: str) -> None:
    """Raise a ``ValueError`` naming ``where`` and every column of ``columns`` it lacks."""
    missing = [column for column in columns if column not in table.columns]
    if missing:
        raise ValueError(f"{where}: missing column(s) {missing}; has {list(table.columns)}")
