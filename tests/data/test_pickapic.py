"""Pick-a-Pic v2 ingestion on a two-shard fixture holding one case of every cleaning stage, and
on a six-shard one whose duplicates span shards, run in tiny batches, in parallel and resumed."""

import io
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from prefgen_kedro.data import pickapic
from prefgen_kedro.data.pickapic import EmptyIngestionError, ingest_pickapic
from prefgen_kedro.data.splits import assign_splits
from prefgen_kedro.data.tables import (
    IMAGES_COLUMNS,
    INTERACTIONS_COLUMNS,
    USERS_COLUMNS,
)

SCHEMA = pa.schema(
    [
        ("caption", pa.string()),
        ("jpg_0", pa.binary()),
        ("jpg_1", pa.binary()),
        ("label_0", pa.float64()),
        ("label_1", pa.float64()),
        ("user_id", pa.int64()),
        ("ranking_id", pa.int64()),
        ("image_0_uid", pa.string()),
        ("image_1_uid", pa.string()),
        ("has_label", pa.bool_()),
        ("are_different", pa.bool_()),
        ("best_image_uid", pa.string()),
        ("model_0", pa.string()),
        ("model_1", pa.string()),
        ("created_at", pa.timestamp("us")),
    ]
)
SPLIT_FRACTIONS = {"train": 0.5, "val": 0.5, "test": 0.0}
CORRUPT = b"\x89PNG\r\n\x1a\n not really an image"


def _image_bytes(shade: int, image_format: str = "PNG", size: tuple[int, int] = (10, 10)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (shade, 255 - shade, 90)).save(buffer, format=image_format)
    return buffer.getvalue()


# u1 is not square, so it also exercises the center crop; u2 is a JPEG.
IMAGES = {
    "u1": _image_bytes(10, size=(12, 8)),
    "u2": _image_bytes(20, "JPEG"),
    **{f"u{index}": _image_bytes(10 * index) for index in range(3, 23)},
}


def _row(
    caption: str,
    user_id: int,
    uids: tuple[str, str],
    labels: tuple[float, float],
    *,
    has_label: bool = True,
    image_bytes: tuple[bytes, bytes] | None = None,
) -> dict[str, Any]:
    jpg_0, jpg_1 = image_bytes or (IMAGES[uids[0]], IMAGES[uids[1]])
    return {
        "caption": caption,
        "jpg_0": jpg_0,
        "jpg_1": jpg_1,
        "label_0": labels[0],
        "label_1": labels[1],
        "user_id": user_id,
        "ranking_id": 0,
        "image_0_uid": uids[0],
        "image_1_uid": uids[1],
        "has_label": has_label,
        "are_different": jpg_0 != jpg_1,
        "best_image_uid": uids[0] if labels[0] > labels[1] else uids[1],
        "model_0": "sd-1.5",
        "model_1": "sdxl",
        "created_at": datetime(2023, 5, 1),
    }


SHARDS = {
    "shard-000.parquet": [
        _row("a red fox", 1, ("u1", "u2"), (1.0, 0.0)),
        _row("a blue car", 1, ("u3", "u4"), (0.0, 1.0)),
        _row("a tie", 1, ("u5", "u6"), (0.5, 0.5)),
        _row("user 3 only chose once", 3, ("u7", "u8"), (1.0, 0.0)),
    ],
    "shard-001.parquet": [
        _row("not labelled", 1, ("u9", "u10"), (1.0, 0.0), has_label=False),
        # u11 holds u1's bytes under another uid: a duplicate by content.
        _row(
            "same fox again",
            2,
            ("u11", "u12"),
            (1.0, 0.0),
            image_bytes=(IMAGES["u1"], IMAGES["u12"]),
        ),
        _row("a broken image", 2, ("u13", "u14"), (0.0, 1.0), image_bytes=(CORRUPT, IMAGES["u14"])),
        # u1 again, same uid and bytes: a duplicate the user now rejects.
        _row("fox versus owl", 2, ("u1", "u15"), (0.0, 1.0)),
        _row("twice the same", 2, ("u16", "u17"), (1.0, 0.0), image_bytes=(IMAGES["u16"],) * 2),
    ],
}


def _write_shards(folder: Path, shards: dict[str, list[dict[str, Any]]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in shards.items():
        pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), folder / name)
    return folder


def _ingest(shard_dir: Path) -> tuple[Any, ...]:
    return ingest_pickapic(
        shard_dir,
        min_choices_per_user=2,
        image_size=8,
        images_subdir="pickapic_images",
        split_fractions=SPLIT_FRACTIONS,
        seed=0,
        batch_size=2,
    )


@pytest.fixture(scope="module")
def ingested(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, ...]:
    return _ingest(_write_shards(tmp_path_factory.mktemp("pickapic"), SHARDS))


def test_report_counts_every_stage_exactly(ingested: tuple[Any, ...]) -> None:
    *_, report = ingested

    assert report == {
        "shards_read": 2,
        "rows_read": 9,
        "dropped_unlabelled": 1,
        "dropped_ties": 1,
        "dropped_other_labels": 0,
        "dropped_too_few_choices_users": 1,
        "dropped_too_few_choices_rows": 1,
        "corrupt_images": 1,
        "dropped_pairs_with_corrupt_image": 1,
        "duplicate_images": 2,
        "dropped_identical_pairs": 1,
        "pairs_kept": 4,
        "images_kept": 6,
        "interactions_kept": 8,
        "users_kept": 2,
        "users_train": 1,
        "interactions_train": 4,
        "users_val": 1,
        "interactions_val": 4,
        "users_test": 0,
        "interactions_test": 0,
    }


def test_chosen_is_liked_and_rejected_is_disliked(ingested: tuple[Any, ...]) -> None:
    _, interactions, *_ = ingested

    assert list(interactions.columns) == list(INTERACTIONS_COLUMNS)
    assert set(interactions.itertuples(index=False, name=None)) == {
        ("1", "u1", 1, "a red fox"),
        ("1", "u2", 0, "a red fox"),
        ("1", "u4", 1, "a blue car"),
        ("1", "u3", 0, "a blue car"),
        # Duplicates point at the first kept image, u1.
        ("2", "u1", 1, "same fox again"),
        ("2", "u12", 0, "same fox again"),
        ("2", "u15", 1, "fox versus owl"),
        ("2", "u1", 0, "fox versus owl"),
    }
    assert len(interactions) == 8


def test_images_table_and_files_hold_each_kept_image_once(ingested: tuple[Any, ...]) -> None:
    images, _, _, image_files, _ = ingested

    assert list(images.columns) == list(IMAGES_COLUMNS)
    assert list(images["image_id"]) == ["u1", "u2", "u3", "u4", "u12", "u15"]
    assert list(images["path"]) == [f"pickapic_images/{uid}.png" for uid in images["image_id"]]
    assert images.loc[0, "caption"] == images.loc[0, "subject"] == "a red fox"
    assert set(images["source"]) == {"pickapic"}
    assert all(list(attributes) == [] for attributes in images["attributes"])
    assert set(image_files) == set(images["image_id"])
    assert all(image.size == (8, 8) and image.mode == "RGB" for image in image_files.values())


def test_users_are_split_deterministically(ingested: tuple[Any, ...]) -> None:
    _, _, users, _, _ = ingested

    assert list(users.columns) == list(USERS_COLUMNS)
    assert list(users["user_id"]) == ["1", "2"]
    assert dict(zip(users["user_id"], users["split"], strict=True)) == assign_splits(
        ["1", "2"], SPLIT_FRACTIONS, seed=0
    )
    assert all(list(liked) == [] for liked in users["liked_attributes"])
    assert all(list(disliked) == [] for disliked in users["disliked_attributes"])


def test_a_shard_missing_columns_is_named_with_the_columns(tmp_path: Path) -> None:
    shard_dir = _write_shards(tmp_path, {"shard-000.parquet": SHARDS["shard-000.parquet"]})
    pq.write_table(
        pa.Table.from_pylist(SHARDS["shard-001.parquet"], schema=SCHEMA).drop_columns(
            ["jpg_1", "caption"]
        ),
        shard_dir / "shard-001.parquet",
    )

    with pytest.raises(ValueError, match="shard-001.parquet") as error:
        _ingest(shard_dir)
    assert "'caption'" in str(error.value)
    assert "'jpg_1'" in str(error.value)


def test_a_missing_shard_folder_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"

    with pytest.raises(FileNotFoundError, match="nowhere"):
        _ingest(missing)


def test_a_folder_without_parquet_files_is_named(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()

    with pytest.raises(FileNotFoundError, match="empty"):
        _ingest(tmp_path / "empty")


def test_an_unknown_split_name_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="holdout"):
        ingest_pickapic(
            _write_shards(tmp_path, SHARDS),
            min_choices_per_user=1,
            image_size=8,
            images_subdir="pickapic_images",
            split_fractions={"train": 0.5, "holdout": 0.5},
            seed=0,
        )


def test_the_tables_round_trip_through_parquet(ingested: tuple[Any, ...], tmp_path: Path) -> None:
    images, interactions, users, _, _ = ingested

    for name, table in {"images": images, "interactions": interactions, "users": users}.items():
        table.to_parquet(tmp_path / f"{name}.parquet")
        assert len(pd.read_parquet(tmp_path / f"{name}.parquet")) == len(table)


# Every cleaning stage again, with first occurrences and their duplicates in different shards;
# users 1, 2 and 4 have four decisive choices each, spread over shards.
MULTI_SHARDS = {
    "shard-000.parquet": [
        _row("a red fox", 1, ("u1", "u2"), (1.0, 0.0)),
        _row("a blue car", 2, ("u3", "u4"), (0.0, 1.0)),
        _row("a tie", 1, ("u5", "u6"), (0.5, 0.5)),
    ],
    "shard-001.parquet": [
        # u1 again, by uid: a duplicate of shard-000's image.
        _row("fox versus cat", 1, ("u5", "u1"), (1.0, 0.0)),
        # u6 is first seen here, in a pair dropped for its corrupt side, so it is not kept yet.
        _row("a broken image", 2, ("u13", "u6"), (0.0, 1.0), image_bytes=(CORRUPT, IMAGES["u6"])),
        _row("user 3 only chose once", 3, ("u7", "u8"), (1.0, 0.0)),
    ],
    "shard-002.parquet": [
        # u9 holds u3's bytes: a duplicate by content of shard-000's image.
        _row(
            "same car again", 2, ("u9", "u8"), (1.0, 0.0), image_bytes=(IMAGES["u3"], IMAGES["u8"])
        ),
        _row("not labelled", 1, ("u10", "u11"), (1.0, 0.0), has_label=False),
        _row("twice the same", 1, ("u16", "u17"), (1.0, 0.0), image_bytes=(IMAGES["u16"],) * 2),
    ],
    "shard-003.parquet": [
        _row("owl versus cat", 2, ("u6", "u12"), (0.0, 1.0)),
        # A kept uid whose bytes won't decode is found by its uid, before any decoding.
        _row("fox, broken", 1, ("u2", "u14"), (1.0, 0.0), image_bytes=(CORRUPT, IMAGES["u14"])),
        _row("user 4 starts", 4, ("u15", "u18"), (1.0, 0.0)),
    ],
    "shard-004.parquet": [
        _row("user 4 goes on", 4, ("u18", "u19"), (0.0, 1.0)),
        _row(
            "u15 by content",
            4,
            ("u20", "u21"),
            (1.0, 0.0),
            image_bytes=(IMAGES["u20"], IMAGES["u15"]),
        ),
        _row("u19 by uid", 4, ("u19", "u22"), (0.0, 1.0)),
    ],
    # Nothing kept: the shard's partial result is empty.
    "shard-005.parquet": [_row("user 5 only tied", 5, ("u10", "u11"), (0.5, 0.5))],
}
MULTI_SHARD_NAMES = list(MULTI_SHARDS)


def _ingest_multi(shard_dir: Path, **options: Any) -> tuple[Any, ...]:
    return ingest_pickapic(
        shard_dir,
        **{
            "min_choices_per_user": 2,
            "image_size": 8,
            "images_subdir": "pickapic_images",
            "split_fractions": SPLIT_FRACTIONS,
            "seed": 0,
            **options,
        },
    )


def _assert_same_ingestion(actual: tuple[Any, ...], expected: tuple[Any, ...]) -> None:
    for actual_table, expected_table in zip(actual[:3], expected[:3], strict=True):
        pd.testing.assert_frame_equal(actual_table, expected_table)
    actual_files, expected_files = actual[3], expected[3]
    assert list(actual_files) == list(expected_files)
    assert all(
        actual_files[image_id].tobytes() == image.tobytes()
        for image_id, image in expected_files.items()
    )
    assert actual[4] == expected[4]


def _count_decoded_shards(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the shards decoded from here on (in this process), in order."""
    decoded: list[str] = []
    decode_shard = pickapic._decode_shard

    def counting(shard: Path, *args: Any) -> Any:
        decoded.append(shard.name)
        return decode_shard(shard, *args)

    monkeypatch.setattr(pickapic, "_decode_shard", counting)
    return decoded


@pytest.fixture(scope="module")
def multi_shard_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_shards(tmp_path_factory.mktemp("pickapic_multi"), MULTI_SHARDS)


@pytest.fixture(scope="module")
def one_batch_run(multi_shard_dir: Path) -> tuple[Any, ...]:
    return _ingest_multi(multi_shard_dir, batch_size=1000)


def test_cleaning_across_shards_counts_every_stage(one_batch_run: tuple[Any, ...]) -> None:
    images, interactions, users, _, report = one_batch_run

    assert {
        "shards_read": 6,
        "rows_read": 16,
        "dropped_unlabelled": 1,
        "dropped_ties": 2,
        "dropped_other_labels": 0,
        "dropped_too_few_choices_users": 1,
        "dropped_too_few_choices_rows": 1,
        "corrupt_images": 1,
        "dropped_pairs_with_corrupt_image": 1,
        "duplicate_images": 6,
        "dropped_identical_pairs": 1,
        "pairs_kept": 10,
        "images_kept": 14,
        "interactions_kept": 20,
        "users_kept": 3,
    }.items() <= report.items()
    assert list(images["image_id"]) == [
        *("u1", "u2", "u3", "u4", "u5", "u8", "u6", "u12", "u14", "u15", "u18", "u19", "u20"),
        "u22",
    ]
    assert list(users["user_id"]) == ["1", "2", "4"]
    # Duplicates point at the first kept image, whichever shard it came from.
    assert set(interactions["image_id"]) == set(images["image_id"])
    assert ("2", "u3", 1, "same car again") in set(interactions.itertuples(index=False, name=None))


def test_tiny_batches_give_the_one_batch_result(
    multi_shard_dir: Path, one_batch_run: tuple[Any, ...]
) -> None:
    _assert_same_ingestion(_ingest_multi(multi_shard_dir, batch_size=1), one_batch_run)


def test_two_workers_give_the_one_worker_result_and_save_every_shard(
    multi_shard_dir: Path, one_batch_run: tuple[Any, ...], tmp_path: Path
) -> None:
    work_dir = tmp_path / "shards"

    parallel = _ingest_multi(multi_shard_dir, batch_size=2, workers=2, work_dir=work_dir)

    _assert_same_ingestion(parallel, one_batch_run)
    # One partial per shard, saved by the worker processes: <shard>.<fingerprint>.pickle
    assert sorted(path.name.rsplit(".", 2)[0] for path in work_dir.iterdir()) == MULTI_SHARD_NAMES


def test_a_killed_run_resumes_from_its_finished_shards(
    multi_shard_dir: Path,
    one_batch_run: tuple[Any, ...],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    work_dir = tmp_path / "shards"
    decode_shard = pickapic._decode_shard

    def killed_at_third_shard(shard: Path, *args: Any) -> Any:
        if shard.name == "shard-002.parquet":
            raise MemoryError("killed")
        return decode_shard(shard, *args)

    monkeypatch.setattr(pickapic, "_decode_shard", killed_at_third_shard)
    with pytest.raises(RuntimeError, match="shard-002.parquet"):
        _ingest_multi(multi_shard_dir, batch_size=2, work_dir=work_dir)
    assert len(list(work_dir.glob("*.pickle"))) == 2
    monkeypatch.undo()

    decoded = _count_decoded_shards(monkeypatch)
    resumed = _ingest_multi(multi_shard_dir, batch_size=2, work_dir=work_dir)

    _assert_same_ingestion(resumed, one_batch_run)
    assert decoded == MULTI_SHARD_NAMES[2:]
    # A third run decodes nothing.
    _assert_same_ingestion(_ingest_multi(multi_shard_dir, work_dir=work_dir), one_batch_run)
    assert decoded == MULTI_SHARD_NAMES[2:]


def test_changed_parameters_decode_again_and_replace_only_their_partials(
    multi_shard_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    work_dir = tmp_path / "shards"
    _ingest_multi(multi_shard_dir, work_dir=work_dir)
    (work_dir / "notes.txt").write_text("mine")
    (work_dir / "shard-000.parquet.backup").write_text("mine too")
    decoded = _count_decoded_shards(monkeypatch)

    resized = _ingest_multi(multi_shard_dir, image_size=12, work_dir=work_dir)

    assert decoded == MULTI_SHARD_NAMES
    _assert_same_ingestion(resized, _ingest_multi(multi_shard_dir, image_size=12))
    assert len(list(work_dir.glob("*.pickle"))) == len(MULTI_SHARD_NAMES)
    assert not list(work_dir.glob("*.tmp"))
    assert (work_dir / "notes.txt").read_text() == "mine"
    assert (work_dir / "shard-000.parquet.backup").read_text() == "mine too"


@pytest.mark.parametrize(
    ("shards", "stage"),
    [
        ({"shard-000.parquet": []}, "hold no row"),
        (
            {
                "shard-000.parquet": [
                    _row("a tie", 1, ("u1", "u2"), (0.5, 0.5)),
                    _row("not labelled", 1, ("u3", "u4"), (1.0, 0.0), has_label=False),
                    _row("both chosen", 2, ("u5", "u6"), (1.0, 1.0)),
                ]
            },
            r"stage 1 \(decisive labels\) dropped every one of the 3 rows "
            r"\(1 unlabelled, 1 ties, 1 other_labels\)",
        ),
        (
            {
                "shard-000.parquet": [
                    _row("one choice each", u, ("u1", "u2"), (1.0, 0.0)) for u in (1, 2)
                ]
            },
            r"stage 2 \(too few choices\) dropped every user: none of the 2 users .* "
            r"min_choices_per_user=2 \(the most: 1\)",
        ),
        (
            {
                "shard-000.parquet": [
                    _row(
                        "broken", 1, ("u1", "u2"), (1.0, 0.0), image_bytes=(CORRUPT, IMAGES["u2"])
                    ),
                    _row(
                        "twice the same",
                        1,
                        ("u3", "u4"),
                        (0.0, 1.0),
                        image_bytes=(IMAGES["u3"],) * 2,
                    ),
                ]
            },
            r"stages 3-4 .* dropped every pair of the 1 kept users: 1 with a corrupt image, 1 of "
            "one image twice",
        ),
    ],
    ids=["no rows", "no decisive label", "no user with enough choices", "no usable pair"],
)
def test_a_stage_that_empties_the_data_stops_the_ingestion_naming_it(
    tmp_path: Path, shards: dict[str, list[dict[str, Any]]], stage: str
) -> None:
    with pytest.raises(EmptyIngestionError, match=stage):
        _ingest(_write_shards(tmp_path, shards))
