"""Turn local Pick-a-Pic v2 parquet shards into the canonical tables (DESIGN.md §4).

Each Pick-a-Pic row is one user's choice between two images generated for one caption. The
cleaning runs in stages, each counted in the report:

1. rows without a decisive label are dropped: ``has_label`` false, a tie (0.5/0.5) or any other
   label pair than 1/0 or 0/1;
2. users with fewer than ``min_choices_per_user`` decisive choices are dropped with all their
   rows. The count is taken before the image checks, so a kept user can end with fewer usable
   pairs when some of their images are corrupt;
3. every image of the remaining rows is decoded; a pair with a corrupt image (or no bytes) is
   dropped whole, since a preference needs both sides, and never stops the run;
4. an image whose bytes (sha1) or Pick-a-Pic uid were already kept is a duplicate: it is not
   stored again and its interaction points at the kept image (``image_id`` is the uid of the
   first occurrence). A pair whose two sides are the same image says nothing and is dropped;
5. kept images are center-cropped to a square and resized to ``image_size`` (RGB).

The chosen image becomes a liked interaction (label 1), the rejected one a disliked one (label 0).
Every row read ends in exactly one of ``dropped_no_decisive_label``,
``dropped_too_few_choices_rows``, ``dropped_pairs_with_corrupt_image``,
``dropped_identical_pairs`` and ``pairs_kept``; and ``2 * pairs_kept == images_kept +
duplicate_images``.
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageOps

from prefgen_kedro.data.splits import assign_splits
from prefgen_kedro.data.tables import (
    DISLIKED,
    IMAGES_COLUMNS,
    INTERACTIONS_COLUMNS,
    LIKED,
    SPLITS,
    USERS_COLUMNS,
    require_columns,
)

logger = logging.getLogger(__name__)

SOURCE = "pickapic"
# The first pass reads only these, so counting choices per user never touches image bytes.
LABEL_COLUMNS = ("user_id", "has_label", "label_0", "label_1")
PAIR_COLUMNS = (
    *LABEL_COLUMNS,
    "caption",
    "jpg_0",
    "jpg_1",
    "image_0_uid",
    "image_1_uid",
)
REPORT_KEYS = (
    "shards_read",
    "rows_read",
    "dropped_no_decisive_label",
    "dropped_too_few_choices_users",
    "dropped_too_few_choices_rows",
    "corrupt_images",
    "dropped_pairs_with_corrupt_image",
    "duplicate_images",
    "dropped_identical_pairs",
    "pairs_kept",
    "images_kept",
    "interactions_kept",
    "users_kept",
)


def ingest_pickapic(
    shard_dir: str | Path,
    *,
    min_choices_per_user: int,
    image_size: int,
    images_subdir: str,
    split_fractions: Mapping[str, float],
    seed: int,
    batch_size: int = 256,
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, dict[str, Image.Image], dict[str, int]]:
    """Clean the Pick-a-Pic v2 shards under ``shard_dir`` (see the module docstring).

    Returns ``(images, interactions, users, image_files, report)``: the three canonical tables,
    the resized images keyed by ``image_id`` (``images.path`` is
    ``f"{images_subdir}/{image_id}.png"``), and the per-stage counts, with users and
    interactions per split as ``users_<split>`` and ``interactions_<split>``. Users are split by
    ``assign_splits`` with ``split_fractions`` and ``seed``. At most ``batch_size`` rows of a
    shard are in memory at once, besides the kept images.
    """
    unknown = sorted(set(split_fractions) - set(SPLITS))
    if unknown:
        raise ValueError(f"split fractions: unknown split(s) {unknown}; expected {list(SPLITS)}")
    shards = list_shards(shard_dir)
    report: Counter[str] = Counter(shards_read=len(shards))

    choices = _count_decisive_choices(shards, batch_size, report)
    kept_users = {user for user, count in choices.items() if count >= min_choices_per_user}
    report["dropped_too_few_choices_users"] = len(choices) - len(kept_users)
    report["dropped_too_few_choices_rows"] = sum(
        count for user, count in choices.items() if user not in kept_users
    )

    store = _ImageStore(image_size, images_subdir)
    interaction_rows: list[dict[str, Any]] = []
    for row in _decisive_rows(shards, kept_users, batch_size):
        interaction_rows.extend(_ingest_pair(row, store, report))

    images = pd.DataFrame(store.rows, columns=list(IMAGES_COLUMNS))
    interactions = pd.DataFrame(interaction_rows, columns=list(INTERACTIONS_COLUMNS))
    interactions["label"] = interactions["label"].astype("int64")
    user_ids = sorted(set(interactions["user_id"]))
    splits = assign_splits(user_ids, split_fractions, seed)
    users = pd.DataFrame(
        {
            "user_id": user_ids,
            "split": [splits[user] for user in user_ids],
            "liked_attributes": [[] for _ in user_ids],
            "disliked_attributes": [[] for _ in user_ids],
        },
        columns=list(USERS_COLUMNS),
    )

    report["images_kept"] = len(images)
    report["interactions_kept"] = len(interactions)
    report["users_kept"] = len(users)
    counts = {key: report[key] for key in REPORT_KEYS}
    interaction_splits = interactions["user_id"].map(splits)
    for split in split_fractions:
        counts[f"users_{split}"] = int((users["split"] == split).sum())
        counts[f"interactions_{split}"] = int((interaction_splits == split).sum())
    logger.info("Pick-a-Pic ingestion of %s: %s", shard_dir, counts)
    return images, interactions, users, store.files, counts


def list_shards(shard_dir: str | Path) -> list[Path]:
    """The parquet shards of ``shard_dir`` (a folder, or one parquet file), sorted by name.

    Every shard's schema is checked up front, so a bad shard fails before hours of decoding.
    """
    path = Path(shard_dir)
    if not path.exists():
        raise FileNotFoundError(f"Pick-a-Pic shards: {path} does not exist")
    shards = [path] if path.is_file() else sorted(path.glob("*.parquet"))
    if not shards:
        raise FileNotFoundError(f"Pick-a-Pic shards: no *.parquet file in {path}")
    for shard in shards:
        names = pq.ParquetFile(shard).schema_arrow.names
        require_columns(
            pd.DataFrame(columns=names), PAIR_COLUMNS, where=f"Pick-a-Pic shard {shard}"
        )
    return shards


def _batches(
    shards: Iterable[Path], columns: tuple[str, ...], batch_size: int
) -> Iterator[pa.RecordBatch]:
    for shard in shards:
        yield from pq.ParquetFile(shard).iter_batches(batch_size=batch_size, columns=list(columns))


def _is_decisive(has_label: bool | None, label_0: float | None, label_1: float | None) -> bool:
    return bool(has_label) and {label_0, label_1} == {0.0, 1.0}


def _decisive_user_ids(batch: pa.RecordBatch) -> list[str | None]:
    """Each row's user id as a string when its label is decisive, else None."""
    users, has_labels, labels_0, labels_1 = (
        batch.column(name).to_pylist() for name in LABEL_COLUMNS
    )
    return [
        str(user) if _is_decisive(has_label, label_0, label_1) else None
        for user, has_label, label_0, label_1 in zip(
            users, has_labels, labels_0, labels_1, strict=True
        )
    ]


def _count_decisive_choices(
    shards: list[Path], batch_size: int, report: Counter[str]
) -> Counter[str]:
    """Decisive choices per user (first pass, label columns only); counts rows in ``report``."""
    choices: Counter[str] = Counter()
    for batch in _batches(shards, LABEL_COLUMNS, batch_size):
        users = _decisive_user_ids(batch)
        report["rows_read"] += batch.num_rows
        report["dropped_no_decisive_label"] += users.count(None)
        choices.update(user for user in users if user is not None)
    return choices


def _decisive_rows(
    shards: list[Path], kept_users: set[str], batch_size: int
) -> Iterator[dict[str, Any]]:
    """The decisive rows of ``kept_users`` (second pass); other rows' bytes are never copied."""
    for batch in _batches(shards, PAIR_COLUMNS, batch_size):
        keep = [user in kept_users for user in _decisive_user_ids(batch)]
        yield from batch.filter(pa.array(keep, type=pa.bool_())).to_pylist()


@dataclass(frozen=True)
class _Candidate:
    """One side of a pair, resolved: a kept image (``image`` None) or a newly decoded one."""

    uid: str
    digest: str
    image_id: str
    image: Image.Image | None


class _ImageStore:
    """The kept images, their ``images`` rows, and the uid and sha1 indexes that find duplicates."""

    def __init__(self, image_size: int, images_subdir: str) -> None:
        self.image_size = image_size
        self.images_subdir = images_subdir
        self.files: dict[str, Image.Image] = {}
        self.rows: list[dict[str, Any]] = []
        self._id_by_uid: dict[str, str] = {}
        self._id_by_digest: dict[str, str] = {}

    def resolve(self, uid: str, data: bytes | None) -> _Candidate | None:
        """The kept image ``uid`` or ``data`` duplicates, else the decoded one; None if corrupt."""
        if data is None:
            return None
        digest = hashlib.sha1(data).hexdigest()
        known = self._id_by_uid.get(uid) or self._id_by_digest.get(digest)
        if known is not None:
            return _Candidate(uid, digest, known, None)
        image = _decode_square(data, self.image_size)
        return None if image is None else _Candidate(uid, digest, uid, image)

    def keep(self, candidate: _Candidate, caption: str) -> None:
        """Index ``candidate`` and store its image when it is new."""
        self._id_by_uid.setdefault(candidate.uid, candidate.image_id)
        self._id_by_digest.setdefault(candidate.digest, candidate.image_id)
        if candidate.image is None:
            return
        self.files[candidate.image_id] = candidate.image
        self.rows.append(
            {
                "image_id": candidate.image_id,
                "path": f"{self.images_subdir}/{candidate.image_id}.png",
                "caption": caption,
                "subject": caption,
                "attributes": [],
                "source": SOURCE,
            }
        )


def _decode_square(data: bytes, size: int) -> Image.Image | None:
    """The image center-cropped and resized to ``size`` x ``size`` RGB; None if it won't decode."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            # load() decodes every pixel, so truncated data fails here rather than when saving.
            image.load()
            return ImageOps.fit(image.convert("RGB"), (size, size), Image.Resampling.LANCZOS)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None


def _ingest_pair(
    row: Mapping[str, Any], store: _ImageStore, report: Counter[str]
) -> list[dict[str, Any]]:
    """The liked and disliked interactions of one decisive row, or none if it is dropped."""
    first, second = (store.resolve(row[f"image_{side}_uid"], row[f"jpg_{side}"]) for side in (0, 1))
    if first is None or second is None:
        report["corrupt_images"] += (first is None) + (second is None)
        report["dropped_pairs_with_corrupt_image"] += 1
        return []
    if first.image_id == second.image_id or first.digest == second.digest:
        report["dropped_identical_pairs"] += 1
        return []
    report["pairs_kept"] += 1
    for candidate in (first, second):
        report["duplicate_images"] += candidate.image is None
        store.keep(candidate, row["caption"])
    # Labels are 1/0 or 0/1 here: the first pass let only decisive rows through.
    chosen, rejected = (first, second) if row["label_0"] == 1 else (second, first)
    user_id = str(row["user_id"])
    return [
        {"user_id": user_id, "image_id": chosen.image_id, "label": LIKED, "prompt": row["caption"]},
        {
            "user_id": user_id,
            "image_id": rejected.image_id,
            "label": DISLIKED,
            "prompt": row["caption"],
        },
    ]
