"""Turn local Pick-a-Pic v2 parquet shards into the canonical tables (DESIGN.md §4).

Each Pick-a-Pic row is one user's choice between two images generated for one caption. The
cleaning runs in stages, each counted in the report:

1. rows without a decisive label are dropped, each counted by why: unlabelled (``has_label``
   false), a tie (0.5/0.5) or any other label pair than 1/0 or 0/1;
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
Every row read ends in exactly one of ``dropped_unlabelled``, ``dropped_ties``,
``dropped_other_labels``, ``dropped_too_few_choices_rows``, ``dropped_pairs_with_corrupt_image``,
``dropped_identical_pairs`` and ``pairs_kept``; and ``2 * pairs_kept == images_kept +
duplicate_images``. Shards with no row, or a cleaning stage that drops every row or every
user, stop the ingestion with an ``EmptyIngestionError`` naming that stage: empty tables would
only fail later, far from the cause.

The shards are streamed in record batches of ``batch_size`` rows, in two passes. The first reads
only the label columns, to count each user's decisive choices. The second, the expensive one,
decodes each shard's images into a per-shard partial result (the shard's pairs without their
bytes, and each distinct image of the shard resized, keyed by sha1); shards are decoded by
``workers`` processes in parallel. Stages 2-5 then run on the partials in shard order, so "first
occurrence" and every count are the same whatever the batch size, the number of workers, or
which partials a resumed run reused. With a ``work_dir``, each decoded shard's partial is saved
there and a re-run reuses it, so a killed run loses only the shards it was decoding.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import multiprocessing
import os
import pickle
import re
from collections import Counter, deque
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageOps

from prefgen_kedro.console import progress
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
from prefgen_kedro.errors import BadInputError

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
# Why a row's label is not decisive (stage 1), each counted in the report as dropped_<reason>.
UNDECIDED = ("unlabelled", "ties", "other_labels")
REPORT_KEYS = (
    "shards_read",
    "rows_read",
    *(f"dropped_{reason}" for reason in UNDECIDED),
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
# Part of every partial's fingerprint: bump it when _ShardPairs or the decoding changes, so that
# partials saved by older code are decoded again rather than reused.
PARTIAL_FORMAT = 1


class EmptyIngestionError(BadInputError):
    """The shards hold no row, or a cleaning stage dropped every row or every user."""


def ingest_pickapic(
    shard_dir: str | Path,
    *,
    min_choices_per_user: int,
    image_size: int,
    images_subdir: str,
    split_fractions: Mapping[str, float],
    seed: int,
    batch_size: int = 256,
    workers: int = 1,
    work_dir: str | Path | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, dict[str, Image.Image], dict[str, int]]:
    """Clean the Pick-a-Pic v2 shards under ``shard_dir`` (see the module docstring).

    Returns ``(images, interactions, users, image_files, report)``: the three canonical tables,
    the resized images keyed by ``image_id`` (``images.path`` is
    ``f"{images_subdir}/{image_id}.png"``), and the per-stage counts, with users and
    interactions per split as ``users_<split>`` and ``interactions_<split>``. Users are split by
    ``assign_splits`` with ``split_fractions`` and ``seed``.

    ``workers`` processes decode shards in parallel; each holds at most ``batch_size`` rows of
    its shard at once, besides that shard's decoded images. With ``work_dir``, each decoded
    shard is saved there (``<shard>.<fingerprint>.pickle``) and reused by a later run with the
    same shard file, ``image_size`` and kept users of that shard. The result does not depend on
    ``batch_size``, ``workers`` or ``work_dir``.
    """
    unknown = sorted(set(split_fractions) - set(SPLITS))
    if unknown:
        raise ValueError(f"split fractions: unknown split(s) {unknown}; expected {list(SPLITS)}")
    if workers < 1:
        raise ValueError(f"Pick-a-Pic workers: {workers}; expected at least 1")
    shards = list_shards(shard_dir)
    report: Counter[str] = Counter(shards_read=len(shards))

    choices_by_shard = [
        _count_decisive_choices(shard, batch_size, report)
        for shard in progress(shards, desc="Pick-a-Pic: count choices", unit="shard")
    ]
    choices: Counter[str] = Counter()
    for shard_choices in choices_by_shard:
        choices.update(shard_choices)
    _require_rows(shard_dir, shards, report, choices)
    kept_users = {user for user, count in choices.items() if count >= min_choices_per_user}
    if not kept_users:
        raise EmptyIngestionError(
            f"Pick-a-Pic shards in {shard_dir}: stage 2 (too few choices) dropped every user: "
            f"none of the {len(choices)} users with a decisive choice has "
            f"min_choices_per_user={min_choices_per_user} (the most: {max(choices.values())}); "
            "lower data_ingestion.pickapic.min_choices_per_user or add shards"
        )
    report["dropped_too_few_choices_users"] = len(choices) - len(kept_users)
    report["dropped_too_few_choices_rows"] = sum(
        count for user, count in choices.items() if user not in kept_users
    )

    jobs = []
    for shard, shard_choices in zip(shards, choices_by_shard, strict=True):
        # Only the shard's own kept users, so a user kept or dropped elsewhere leaves it valid.
        shard_users = kept_users.intersection(shard_choices)
        partial = None
        if work_dir is not None:
            partial = _partial_path(Path(work_dir), shard, shard_users, image_size)
        jobs.append(_ShardJob(shard, shard_users, image_size, batch_size, partial))
    if work_dir is not None:
        Path(work_dir).mkdir(parents=True, exist_ok=True)
        reused = sum(job.partial.exists() for job in jobs if job.partial is not None)
        logger.info(
            "Pick-a-Pic: %d of %d shards already decoded in %s", reused, len(jobs), work_dir
        )

    store = _ImageStore(image_size, images_subdir)
    interaction_rows: list[dict[str, Any]] = []
    decoded = _in_shard_order(jobs, workers)
    for shard_pairs in progress(decoded, total=len(jobs), desc="Pick-a-Pic: decode", unit="shard"):
        for pair in shard_pairs.pairs:
            interaction_rows.extend(_ingest_pair(pair, shard_pairs.pixels, store, report))

    if not interaction_rows:
        raise EmptyIngestionError(
            f"Pick-a-Pic shards in {shard_dir}: stages 3-4 (corrupt images, identical pairs) "
            f"dropped every pair of the {len(kept_users)} kept users: "
            f"{report['dropped_pairs_with_corrupt_image']} with a corrupt image, "
            f"{report['dropped_identical_pairs']} of one image twice"
        )
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


def _require_rows(
    shard_dir: str | Path, shards: list[Path], report: Counter[str], choices: Counter[str]
) -> None:
    """Stop if the shards hold no row, or stage 1 dropped every one."""
    if not report["rows_read"]:
        raise EmptyIngestionError(
            f"Pick-a-Pic shards in {shard_dir}: the {len(shards)} shard(s) hold no row "
            f"({', '.join(shard.name for shard in shards[:5])}{', ...' if len(shards) > 5 else ''})"
        )
    if not choices:
        counts = ", ".join(f"{report[f'dropped_{reason}']} {reason}" for reason in UNDECIDED)
        raise EmptyIngestionError(
            f"Pick-a-Pic shards in {shard_dir}: stage 1 (decisive labels) dropped every one of "
            f"the {report['rows_read']} rows ({counts})"
        )


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


@contextmanager
def _naming_shard(shard: Path) -> Iterator[None]:
    """Re-raise any error with the shard it happened in, so hours into a run it can be found."""
    try:
        yield
    except Exception as error:
        raise RuntimeError(f"Pick-a-Pic shard {shard}: {type(error).__name__}: {error}") from error


def _batches(shard: Path, columns: tuple[str, ...], batch_size: int) -> Iterator[pa.RecordBatch]:
    with pq.ParquetFile(shard) as file:
        yield from file.iter_batches(batch_size=batch_size, columns=list(columns))


def _undecided(has_label: bool | None, label_0: float | None, label_1: float | None) -> str | None:
    """Why a row's label is not decisive (one of ``UNDECIDED``), or None if it is."""
    if not has_label:
        return "unlabelled"
    if {label_0, label_1} == {0.0, 1.0}:
        return None
    return "ties" if label_0 == label_1 == 0.5 else "other_labels"


def _decisions(batch: pa.RecordBatch) -> list[tuple[str, str | None]]:
    """Each row's user id (a string) and why its label is not decisive (None: it is)."""
    users, has_labels, labels_0, labels_1 = (
        batch.column(name).to_pylist() for name in LABEL_COLUMNS
    )
    return [
        (str(user), _undecided(has_label, label_0, label_1))
        for user, has_label, label_0, label_1 in zip(
            users, has_labels, labels_0, labels_1, strict=True
        )
    ]


def _count_decisive_choices(shard: Path, batch_size: int, report: Counter[str]) -> Counter[str]:
    """Decisive choices per user in ``shard`` (first pass, label columns only); counts rows in
    ``report``."""
    choices: Counter[str] = Counter()
    with _naming_shard(shard):
        for batch in _batches(shard, LABEL_COLUMNS, batch_size):
            report["rows_read"] += batch.num_rows
            for user, undecided in _decisions(batch):
                if undecided is None:
                    choices[user] += 1
                else:
                    report[f"dropped_{undecided}"] += 1
    return choices


@dataclass(frozen=True, slots=True)
class _Pair:
    """A decisive row of a kept user, its image bytes replaced by their sha1 (None: no bytes)."""

    user_id: str
    caption: str
    first_is_chosen: bool
    uids: tuple[str, str]
    digests: tuple[str | None, str | None]


@dataclass(frozen=True)
class _ShardPairs:
    """A shard's partial result: its ``pairs`` in row order and, for each distinct image bytes
    (sha1), the image decoded, cropped and resized as RGB bytes, or None if it won't decode."""

    pairs: list[_Pair]
    pixels: dict[str, bytes | None]


@dataclass(frozen=True)
class _ShardJob:
    """What a worker needs to decode one shard (or reuse it from ``partial``)."""

    shard: Path
    kept_users: set[str]
    image_size: int
    batch_size: int
    partial: Path | None


def _partial_path(work_dir: Path, shard: Path, kept_users: set[str], image_size: int) -> Path:
    """Where the decoded ``shard`` is saved, named by a fingerprint of all it depends on."""
    stat = shard.stat()
    inputs = [PARTIAL_FORMAT, shard.name, stat.st_size, stat.st_mtime_ns, image_size]
    fingerprint = hashlib.sha256(json.dumps([*inputs, sorted(kept_users)]).encode())
    return work_dir / f"{shard.name}.{fingerprint.hexdigest()[:16]}.pickle"


def _in_shard_order(jobs: list[_ShardJob], workers: int) -> Iterator[_ShardPairs]:
    """Each job's decoded shard, in job order, decoded by up to ``workers`` processes."""
    processes = min(workers, len(jobs))
    if processes == 1:
        for job in jobs:
            with _naming_shard(job.shard):
                shard_pairs = _read_or_decode_shard(job)
            yield shard_pairs
        return
    # spawn, not fork: the node may run in a process with threads (Kedro, torch), which fork can
    # deadlock.
    pool = ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"))
    waiting = iter(jobs)
    try:
        # At most two shards per process ahead of the one merged, so the partials that wait for
        # an earlier, slower shard stay few.
        running: deque[tuple[Path, Future[_ShardPairs]]] = deque(
            (job.shard, pool.submit(_read_or_decode_shard, job))
            for job in islice(waiting, 2 * processes)
        )
        while running:
            shard, future = running.popleft()
            with _naming_shard(shard):
                shard_pairs = future.result()
            next_job = next(waiting, None)
            if next_job is not None:
                running.append((next_job.shard, pool.submit(_read_or_decode_shard, next_job)))
            yield shard_pairs
    finally:
        # On an error the running shards finish (and keep their partials); queued ones never start.
        pool.shutdown(cancel_futures=True)


def _read_or_decode_shard(job: _ShardJob) -> _ShardPairs:
    """The job's shard from its saved partial when there is one, else decoded (and saved)."""
    if job.partial is not None and job.partial.exists():
        with job.partial.open("rb") as file:
            return pickle.load(file)
    shard_pairs = _decode_shard(job.shard, job.kept_users, job.image_size, job.batch_size)
    if job.partial is not None:
        _save_partial(shard_pairs, job.partial, job.shard.name)
    return shard_pairs


def _decode_shard(
    shard: Path, kept_users: set[str], image_size: int, batch_size: int
) -> _ShardPairs:
    """The decisive pairs of ``kept_users`` in ``shard`` (second pass), each distinct image
    decoded once; other rows' bytes are never copied."""
    pairs: list[_Pair] = []
    pixels: dict[str, bytes | None] = {}
    for batch in _batches(shard, PAIR_COLUMNS, batch_size):
        keep = [undecided is None and user in kept_users for user, undecided in _decisions(batch)]
        for row in batch.filter(pa.array(keep, type=pa.bool_())).to_pylist():
            digests = []
            for data in (row["jpg_0"], row["jpg_1"]):
                digest = None if data is None else hashlib.sha1(data).hexdigest()
                if digest is not None and digest not in pixels:
                    pixels[digest] = _decode_square(data, image_size)
                digests.append(digest)
            pairs.append(
                _Pair(
                    user_id=str(row["user_id"]),
                    caption=row["caption"],
                    # Labels are 1/0 or 0/1 here: only decisive rows are let through.
                    first_is_chosen=row["label_0"] == 1,
                    uids=(row["image_0_uid"], row["image_1_uid"]),
                    digests=(digests[0], digests[1]),
                )
            )
    return _ShardPairs(pairs, pixels)


def _save_partial(shard_pairs: _ShardPairs, path: Path, shard_name: str) -> None:
    """Save ``shard_pairs`` at ``path`` atomically, and remove the shard's superseded partials."""
    temporary = path.with_name(f"{path.name}.tmp")
    with temporary.open("wb") as file:
        pickle.dump(shard_pairs, file, protocol=pickle.HIGHEST_PROTOCOL)
        file.flush()
        os.fsync(file.fileno())
    # A rename is atomic: a killed run leaves a whole partial or none, never half of one.
    temporary.replace(path)
    # Partials saved with other parameters hold as many images as this one; keep disk use to one
    # per shard. Only this shard's partials in work_dir match.
    superseded = re.compile(rf"{re.escape(shard_name)}\.[0-9a-f]{{16}}\.pickle(\.tmp)?")
    for other in path.parent.iterdir():
        if other != path and superseded.fullmatch(other.name):
            other.unlink()


@dataclass(frozen=True)
class _Candidate:
    """One side of a pair, resolved: a kept image (``pixels`` None) or a new one."""

    uid: str
    digest: str
    image_id: str
    pixels: bytes | None


class _ImageStore:
    """The kept images, their ``images`` rows, and the uid and sha1 indexes that find duplicates."""

    def __init__(self, image_size: int, images_subdir: str) -> None:
        self.image_size = image_size
        self.images_subdir = images_subdir
        self.files: dict[str, Image.Image] = {}
        self.rows: list[dict[str, Any]] = []
        self._id_by_uid: dict[str, str] = {}
        self._id_by_digest: dict[str, str] = {}

    def resolve(
        self, uid: str, digest: str | None, pixels: Mapping[str, bytes | None]
    ) -> _Candidate | None:
        """The kept image ``uid`` or ``digest`` duplicates, else the new one; None if corrupt."""
        if digest is None:
            return None
        known = self._id_by_uid.get(uid) or self._id_by_digest.get(digest)
        if known is not None:
            return _Candidate(uid, digest, known, None)
        square = pixels[digest]
        return None if square is None else _Candidate(uid, digest, uid, square)

    def keep(self, candidate: _Candidate, caption: str) -> None:
        """Index ``candidate`` and store its image when it is new."""
        self._id_by_uid.setdefault(candidate.uid, candidate.image_id)
        self._id_by_digest.setdefault(candidate.digest, candidate.image_id)
        if candidate.pixels is None:
            return
        size = (self.image_size, self.image_size)
        self.files[candidate.image_id] = Image.frombytes("RGB", size, candidate.pixels)
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


def _decode_square(data: bytes, size: int) -> bytes | None:
    """The image center-cropped and resized to ``size`` x ``size``, as RGB bytes; None if it
    won't decode."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            # load() decodes every pixel, so truncated data fails here rather than when saving.
            image.load()
            square = ImageOps.fit(image.convert("RGB"), (size, size), Image.Resampling.LANCZOS)
            return square.tobytes()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None


def _ingest_pair(
    pair: _Pair, pixels: Mapping[str, bytes | None], store: _ImageStore, report: Counter[str]
) -> list[dict[str, Any]]:
    """The liked and disliked interactions of one decisive pair, or none if it is dropped."""
    first, second = (
        store.resolve(uid, digest, pixels)
        for uid, digest in zip(pair.uids, pair.digests, strict=True)
    )
    if first is None or second is None:
        report["corrupt_images"] += (first is None) + (second is None)
        report["dropped_pairs_with_corrupt_image"] += 1
        return []
    if first.image_id == second.image_id or first.digest == second.digest:
        report["dropped_identical_pairs"] += 1
        return []
    report["pairs_kept"] += 1
    for candidate in (first, second):
        report["duplicate_images"] += candidate.pixels is None
        store.keep(candidate, pair.caption)
    chosen, rejected = (first, second) if pair.first_is_chosen else (second, first)
    return [
        {
            "user_id": pair.user_id,
            "image_id": chosen.image_id,
            "label": LIKED,
            "prompt": pair.caption,
        },
        {
            "user_id": pair.user_id,
            "image_id": rejected.image_id,
            "label": DISLIKED,
            "prompt": pair.caption,
        },
    ]
