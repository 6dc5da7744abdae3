"""``RowsDataset`` gives what ``TensorDictDataset`` gives for the same tensors, reading rows
from memory or from a ``RowFile`` when a sample is asked for, and its streamed columns have
the digests of those tensors."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys

import pytest
import torch

from prefgen_kedro.models.batches import (
    Column,
    RowFile,
    RowsDataset,
    TensorDictDataset,
    scratch_folder,
)
from prefgen_kedro.provenance import StreamedTensor, digest_of, run_key


def test_a_row_file_reads_back_what_was_appended_and_travels_as_its_path(tmp_path):
    rows = torch.randn(7, 3, 2, generator=torch.Generator().manual_seed(0))
    file = RowFile(tmp_path / "rows.bin", (3, 2), torch.float32)
    file.append(rows[:4])
    file.append(rows[4:])
    assert len(file) == 7 and file.path.stat().st_size == rows.numel() * 4
    assert torch.equal(file[5], rows[5])
    assert torch.equal(file[torch.tensor([6, 0, 6])], rows[[6, 0, 6]])
    assert torch.equal(file[range(2, 5)], rows[2:5])  # one read
    assert torch.equal(pickle.loads(pickle.dumps(file))[3], rows[3])
    assert torch.equal(RowFile(file.path, (3, 2), torch.float32)[6], rows[6])  # reopened
    with pytest.raises(IndexError):
        file[7]
    with pytest.raises(ValueError, match="rows of"):
        file.append(rows.double())


def test_rows_dataset_items_and_digests_are_those_of_the_tensors_it_stands_for(tmp_path):
    generator = torch.Generator().manual_seed(1)
    clean = torch.randn(10, 3, 4, 4, generator=generator)
    prompts = torch.randn(3, 5, 6, generator=generator)
    which_prompt = torch.tensor([0, 2, 2, 1, 0, 0, 1, 2, 2, 0])
    parts = torch.randn(4, 8, generator=generator)
    which_context = torch.tensor([0, 0, 1, 1, 1, 2, 2, 3, 3, 3])
    file = RowFile(tmp_path / "clean.bin", (3, 4, 4), torch.float32)
    file.append(clean)
    prompt_file = RowFile(tmp_path / "prompts.bin", (5, 6), torch.float32)
    prompt_file.append(prompts)
    streamed = RowsDataset(
        pixel_values=Column(file),
        prompt_embeds=Column(prompt_file, which_prompt),
        e_core=Column(parts, which_context),
    )
    held = TensorDictDataset(
        pixel_values=clean, prompt_embeds=prompts[which_prompt], e_core=parts[which_context]
    )
    assert len(streamed) == len(held) == 10
    for index in range(10):
        mine, theirs = streamed[index], held[index]
        assert list(mine) == list(theirs)
        assert all(torch.equal(mine[key], theirs[key]) for key in theirs)
    streamed.BLOCK_BYTES = 100  # several blocks a column
    for key, tensor in held.tensors.items():
        assert streamed.columns[key].shape == tuple(tensor.shape)
        assert digest_of(streamed.streamed(key)) == digest_of(tensor)
    assert run_key({}, samples={k: streamed.streamed(k) for k in held.tensors}) == run_key(
        {}, samples=held.tensors
    )
    with pytest.raises(ValueError, match="differ in length"):
        RowsDataset(a=Column(parts), b=Column(clean))


def test_a_streamed_tensor_that_gives_other_rows_than_it_claims_is_refused():
    rows = torch.zeros(4, 2)
    with pytest.raises(ValueError, match="of 5 rows gave 4"):
        digest_of(StreamedTensor(torch.float32, (5, 2), lambda: iter([rows])))
    with pytest.raises(ValueError, match="a block of"):
        digest_of(StreamedTensor(torch.float32, (4, 3), lambda: iter([rows])))


def test_a_scratch_folder_clears_what_killed_runs_left_and_keeps_live_ones(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    left_by_killed = tmp_path / f".tmp-rows-{dead.pid}-abc"
    left_by_live = tmp_path / f".tmp-rows-{os.getppid()}-def"
    someone_elses = tmp_path / f".tmp-other-{dead.pid}-ghi"
    for folder in (left_by_killed, left_by_live, someone_elses):
        folder.mkdir()
        (folder / "clean.bin").write_bytes(b"rows")
    made = scratch_folder(tmp_path, ".tmp-rows-")
    assert made.is_dir() and made.name.startswith(f".tmp-rows-{os.getpid()}-")
    assert not left_by_killed.exists()
    assert left_by_live.exists() and someone_elses.exists()
    assert scratch_folder(tmp_path / "new", ".tmp-rows-").parent == tmp_path / "new"
