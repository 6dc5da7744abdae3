"""The ``raw_images`` partitions as arrays, for the nodes that show pictures to a model.

``PictureFiles`` reads a picture when it is indexed and keeps at most a bounded number of
bytes of them, so what a node holds is what it is using (a batch, and the pictures it used
last), not the image table; ``only`` narrows it to some ids, and
``picture_contexts``/``picture_list`` are sequences of contexts and pictures read an item (a
batch, when sliced) at a time. ``load_pictures``/``context_pictures`` read a few pictures
once, for the nodes that show the same small set many times (validation, evaluation).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from itertools import chain
from typing import Any, TypeVar, overload

import numpy as np
import pandas as pd

from prefgen_kedro.models.mllm import PreferenceContext

T = TypeVar("T")


def _rgb(load: Callable) -> np.ndarray:
    return np.array(load().convert("RGB"))


class PictureFiles(Mapping[str, np.ndarray]):
    """The ``raw_images`` partitions (image id → loader) as a mapping whose item is the
    picture, loaded when indexed: RGB uint8 (H, W, 3), writable (an image processor turns
    it into a tensor, which warns on PIL's read-only views), the array ``load_pictures``
    gives, a copy of its own each time. The last pictures read are kept, up to
    ``cache_bytes`` (least recently used out first): a user's pictures recur in every
    context and question about it, and reading the agent world's contexts was mostly
    decoding the same files again."""

    def __init__(self, raw_images: Mapping[str, Callable], cache_bytes: int = 128 * 2**20) -> None:
        self.loaders = raw_images
        self.cache_bytes = cache_bytes
        self._kept: OrderedDict[str, np.ndarray] = OrderedDict()
        self._kept_bytes = 0

    def __getitem__(self, image_id: str) -> np.ndarray:
        picture = self._kept.get(image_id)
        if picture is None:
            picture = _rgb(self.loaders[image_id])
            self._keep(image_id, picture)
        else:
            self._kept.move_to_end(image_id)
        return picture.copy()

    def _keep(self, image_id: str, picture: np.ndarray) -> None:
        if picture.nbytes > self.cache_bytes:
            return
        self._kept[image_id] = picture
        self._kept_bytes += picture.nbytes
        while self._kept_bytes > self.cache_bytes:
            _, dropped = self._kept.popitem(last=False)
            self._kept_bytes -= dropped.nbytes

    def __contains__(self, image_id: object) -> bool:
        return image_id in self.loaders

    def __iter__(self) -> Iterator[str]:
        return iter(self.loaders)

    def __len__(self) -> int:
        return len(self.loaders)


class _Only(Mapping[str, np.ndarray]):
    def __init__(self, pictures: Mapping[str, np.ndarray], ids: Iterable[str]) -> None:
        self.pictures = pictures
        self.ids = dict.fromkeys(ids)
        missing = [image_id for image_id in self.ids if image_id not in pictures]
        if missing:
            raise KeyError(f"no picture for {missing[:5]}")

    def __getitem__(self, image_id: str) -> np.ndarray:
        if image_id not in self.ids:
            raise KeyError(image_id)
        return self.pictures[image_id]

    def __contains__(self, image_id: object) -> bool:
        return image_id in self.ids

    def __iter__(self) -> Iterator[str]:
        return iter(self.ids)

    def __len__(self) -> int:
        return len(self.ids)


def only(pictures: Mapping[str, np.ndarray], ids: Iterable[str]) -> Mapping[str, np.ndarray]:
    """``pictures`` narrowed to ``ids`` (each once), read through it when indexed: its
    ``provenance.digest_of`` is that of the dict of those pictures, read one at a time."""
    return _Only(pictures, ids)


class LazySequence(Sequence[T]):
    """``item(i)`` for ``i`` below ``length``, made when indexed (a slice: a list of them)."""

    def __init__(self, length: int, item: Callable[[int], T]) -> None:
        self.length = length
        self.item = item

    def __len__(self) -> int:
        return self.length

    @overload
    def __getitem__(self, index: int) -> T: ...
    @overload
    def __getitem__(self, index: slice) -> list[T]: ...
    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [self.item(i) for i in range(*index.indices(self.length))]
        if not -self.length <= index < self.length:
            raise IndexError(index)
        return self.item(index % self.length)


def picture_contexts(
    liked: Sequence[Sequence[str]],
    disliked: Sequence[Sequence[str]],
    pictures: Mapping[str, np.ndarray],
) -> Sequence[PreferenceContext]:
    """The context of each ``(liked[i], disliked[i])`` image-id lists, its pictures read from
    ``pictures`` when the context is indexed (``MllmPreferenceModel`` slices a batch)."""
    if len(liked) != len(disliked):
        raise ValueError(f"{len(liked)} liked lists but {len(disliked)} disliked ones")
    return LazySequence(
        len(liked),
        lambda i: PreferenceContext(
            [pictures[image_id] for image_id in liked[i]],
            [pictures[image_id] for image_id in disliked[i]],
        ),
    )


def picture_list(ids: Sequence[str], pictures: Mapping[str, np.ndarray]) -> Sequence[np.ndarray]:
    """The pictures of ``ids`` in order, each read when indexed."""
    return LazySequence(len(ids), lambda i: pictures[ids[i]])


def load_pictures(raw_images: Mapping[str, Callable]) -> dict[str, np.ndarray]:
    """The ``raw_images`` partitions (image id → loader) as RGB uint8 arrays (writable: an
    image processor turns them into tensors, which warns on PIL's read-only views)."""
    return {image_id: _rgb(load) for image_id, load in raw_images.items()}


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
