"""Map-style datasets, the form every trainer here is fed: ``TensorDictDataset`` over aligned
tensors it holds, ``RowsDataset`` over columns read when a sample is asked for (rows kept
once however many samples share them, or in a ``RowFile`` on disk)."""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from prefgen_kedro.provenance import StreamedTensor


def class_indices(
    names: Mapping[str, Sequence[str]], classes: Mapping[str, Sequence[str]]
) -> dict[str, torch.Tensor]:
    """For each head of ``classes``, the index of every name of ``names[head]`` among it."""
    return {
        head: torch.tensor([list(options).index(name) for name in names[head]])
        for head, options in classes.items()
    }


def scratch_folder(parent: str | Path, prefix: str) -> Path:
    """A new folder ``parent/<prefix><pid>-<random>`` for this process's row files. Folders of
    the same ``prefix`` left by processes that no longer run (a killed run) are removed
    first; another live run's are kept."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    for leftover in parent.glob(f"{prefix}*-*"):
        owner = leftover.name[len(prefix) :].split("-", 1)[0]
        if owner.isdigit() and not _process_runs(int(owner)):
            shutil.rmtree(leftover, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=parent))


def _process_runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it runs, under another user
        pass
    return True


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


class RowFile:
    """Rows of one shape and dtype in a file: appended in order, read back a few at a time
    with ``os.pread``, so the rows a caller is not holding stay in the page cache, not in
    the process's memory (no memory map either: its pages would count as the process's).
    A ``RowFile`` pickles as its path (a launched training process reads the same file)."""

    def __init__(self, path: str | Path, row_shape: Sequence[int], dtype: torch.dtype) -> None:
        self.path = Path(path)
        self.row_shape = tuple(row_shape)
        self.dtype = dtype
        self.row_bytes = math.prod(self.row_shape) * torch.empty((), dtype=dtype).element_size()
        self.path.touch()
        self.rows = self.path.stat().st_size // self.row_bytes

    def __len__(self) -> int:
        return self.rows

    def append(self, rows: torch.Tensor) -> None:
        """Write ``rows`` (N, *row_shape) of the file's dtype after the last row."""
        if rows.dtype != self.dtype or tuple(rows.shape[1:]) != self.row_shape:
            raise ValueError(
                f"rows of {rows.dtype} {tuple(rows.shape[1:])} for a file of {self.dtype} "
                f"{self.row_shape}"
            )
        with self.path.open("ab") as file:
            file.write(rows.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
        self.rows += len(rows)

    def __getitem__(self, indices: int | Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Row ``indices`` (one row), or the rows at ``indices`` stacked, as a new tensor."""
        if isinstance(indices, int):
            return self._read(indices, 1)[0]
        wanted = torch.as_tensor(indices, dtype=torch.long).reshape(-1).tolist()
        if not wanted:
            return torch.empty((0, *self.row_shape), dtype=self.dtype)
        first = wanted[0]
        if wanted == list(range(first, first + len(wanted))):  # one read
            return self._read(first, len(wanted))
        return torch.stack([self._read(index, 1)[0] for index in wanted])

    def _read(self, start: int, count: int) -> torch.Tensor:
        if start < 0 or start + count > self.rows:
            raise IndexError(f"rows {start}..{start + count - 1} of a file of {self.rows}")
        with self.path.open("rb") as file:
            data = bytearray(
                os.pread(file.fileno(), count * self.row_bytes, start * self.row_bytes)
            )
        return torch.frombuffer(data, dtype=self.dtype).reshape(count, *self.row_shape)


@dataclass(frozen=True)
class Column:
    """A dataset column: sample ``i`` is ``rows[index[i]]`` (``rows[i]`` without an index), so
    a row many samples share (a prompt's text states, a context's condition) is kept once."""

    rows: torch.Tensor | RowFile
    index: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.rows) if self.index is None else len(self.index)

    @property
    def shape(self) -> tuple[int, ...]:
        row_shape = self.rows.row_shape if isinstance(self.rows, RowFile) else self.rows.shape[1:]
        return (len(self), *row_shape)

    @property
    def dtype(self) -> torch.dtype:
        return self.rows.dtype

    def take(self, samples: torch.Tensor) -> torch.Tensor:
        """The rows of ``samples`` (a 1-D index tensor), stacked."""
        return self.rows[samples if self.index is None else self.index[samples]]


class RowsDataset(Dataset):
    """Item ``i`` is ``{name: column's sample i}``, read when it is asked for (from memory, or
    from a ``RowFile`` on disk), as ``TensorDictDataset`` gives the same values from tensors
    it holds; ``streamed(name)`` is a column for ``provenance.digest_of``, with the digest of
    the tensor it would be."""

    BLOCK_BYTES = 1 << 24  # rows read at once by ``streamed``

    def __init__(self, **columns: Column) -> None:
        lengths = {name: len(column) for name, column in columns.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"columns differ in length: {lengths}")
        self.columns = columns

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        at = torch.tensor([index])
        return {name: column.take(at)[0] for name, column in self.columns.items()}

    def streamed(self, name: str) -> StreamedTensor:
        column = self.columns[name]
        shape = column.shape
        row_bytes = math.prod(shape[1:]) * torch.empty((), dtype=column.dtype).element_size()
        step = max(1, self.BLOCK_BYTES // max(row_bytes, 1))

        def blocks() -> Iterator[torch.Tensor]:
            for start in range(0, shape[0], step):
                yield column.take(torch.arange(start, min(start + step, shape[0])))

        return StreamedTensor(column.dtype, shape, blocks)
