"""A map-style dataset over aligned tensors, the form every trainer here is fed."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch.utils.data import Dataset


def class_indices(
    names: Mapping[str, Sequence[str]], classes: Mapping[str, Sequence[str]]
) -> dict[str, torch.Tensor]:
    """For each head of ``classes``, the index of every name of ``names[head]`` among it."""
    return {
        head: torch.tensor([list(options).index(name) for name in names[head]])
        for head, options in classes.items()
    }


class TensorDictDataset(Dataset):
    """Item ``i`` is ``{name: tensor[i]}``; the default collate stacks them into a batch."""

    def __init__(self, **tensors: torch.Tensor) -> None:
        lengths = {name: len(tensor) for name, tensor in tensors.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"tensors differ in length: {lengths}")
        self.tensors = tensors

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values())))

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {name: tensor[index] for name, tensor in self.tensors.items()}
