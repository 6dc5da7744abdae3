"""``PictureFiles`` reads each picture when it is indexed (keeping the last within a budget),
as ``load_pictures`` reads them all; ``only`` and the lazy context sequences read through it."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from prefgen_kedro.data.pictures import (
    PictureFiles,
    load_pictures,
    only,
    picture_contexts,
    picture_list,
)
from prefgen_kedro.provenance import digest_of


class CountingLoaders(dict):
    """image id -> loader of a small picture (grey-scale, as a loader may give), counting
    the loads."""

    def __init__(self, n: int) -> None:
        rng = np.random.default_rng(0)
        self.loads = 0
        pictures = {f"i{k}": rng.integers(0, 256, (4, 5), dtype=np.uint8) for k in range(n)}
        super().__init__({key: self._loader(array) for key, array in pictures.items()})

    def _loader(self, array: np.ndarray):
        def load() -> Image.Image:
            self.loads += 1
            return Image.fromarray(array)

        return load


def test_picture_files_read_a_picture_when_indexed_and_keep_the_last_within_a_budget():
    loaders = CountingLoaders(6)
    pictures = PictureFiles(loaders, cache_bytes=2 * 4 * 5 * 3)  # room for two pictures
    assert loaders.loads == 0 and len(pictures) == 6 and "i3" in pictures and "x" not in pictures
    held = load_pictures(loaders)
    loaders.loads = 0
    picture = pictures["i2"]
    assert picture.shape == (4, 5, 3) and picture.dtype == np.uint8 and picture.flags.writeable
    assert np.array_equal(picture, held["i2"]) and loaders.loads == 1
    picture[:] = 0  # each read is a copy of its own
    assert np.array_equal(pictures["i2"], held["i2"]) and loaders.loads == 1
    pictures["i3"], pictures["i2"], pictures["i4"]  # i3, least recently used, makes room
    assert loaders.loads == 3
    pictures["i2"]
    assert loaders.loads == 3
    pictures["i3"]
    assert loaders.loads == 4
    with pytest.raises(KeyError):
        pictures["x"]
    assert digest_of(pictures) == digest_of(held)

    keeping_none = PictureFiles(loaders, cache_bytes=0)
    loaders.loads = 0
    keeping_none["i2"], keeping_none["i2"]
    assert loaders.loads == 2


def test_only_and_the_lazy_sequences_read_through_the_pictures():
    loaders = CountingLoaders(6)
    pictures, held = PictureFiles(loaders, cache_bytes=0), load_pictures(loaders)
    loaders.loads = 0
    some = only(pictures, ["i4", "i1", "i4"])
    assert list(some) == ["i4", "i1"] and "i2" not in some and loaders.loads == 0
    assert digest_of(some) == digest_of({"i1": held["i1"], "i4": held["i4"]})
    with pytest.raises(KeyError):
        some["i2"]
    with pytest.raises(KeyError, match="no picture"):
        only(pictures, ["nope"])

    loaders.loads = 0
    contexts = picture_contexts([["i0", "i1"], ["i2"]], [["i3"], ["i4", "i5"]], pictures)
    queries = picture_list(["i5", "i0"], pictures)
    assert len(contexts) == len(queries) == 2 and loaders.loads == 0
    (second,) = contexts[1:]
    assert loaders.loads == 3
    assert [p.tolist() for p in second.disliked] == [held["i4"].tolist(), held["i5"].tolist()]
    assert np.array_equal(queries[-1], held["i0"]) and np.array_equal(
        contexts[0].liked[1], held["i1"]
    )
    with pytest.raises(IndexError):
        queries[2]
