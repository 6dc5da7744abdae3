"""Content digests, run keys and the lineage check."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch import nn

from prefgen_kedro.params import StrictParams
from prefgen_kedro.provenance import (
    PROVENANCE_FILE,
    StaleInputError,
    digest_of,
    files_digest,
    lineage_conflicts,
    require_consistent,
    run_key,
)


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2))


def test_a_module_digest_covers_every_weight() -> None:
    model = make_model()
    assert digest_of(model) == digest_of(make_model())
    assert digest_of(model) != digest_of(make_model(seed=1))
    before = digest_of(model)
    with torch.no_grad():
        model[0].weight[40, 17] += 1e-3  # far past a tensor's first values
    assert digest_of(model) != before
    assert digest_of(model.half()) != digest_of(model.float())  # the dtype is content too


def table() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "user_id": ["a", "b"],
            "liked": [["i1", "i2"], ["i3"]],
            "e_sem": [np.arange(3, dtype=np.float32), np.ones(3, dtype=np.float32)],
        }
    )


def test_a_table_digest_covers_every_cell_including_list_cells() -> None:
    assert digest_of(table()) == digest_of(table())
    changed = table()
    changed.at[1, "e_sem"] = np.array([1, 1, 1.0001], dtype=np.float32)
    assert digest_of(changed) != digest_of(table())
    relisted = table()
    relisted.at[0, "liked"] = ["i1", "i9"]
    assert digest_of(relisted) != digest_of(table())
    # What parquet gives back (list cells as arrays) digests as what was written.
    assert digest_of(table()) == digest_of(
        table().assign(liked=[np.array(x, dtype=object) for x in table()["liked"]])
    )


def test_pictures_params_and_nesting() -> None:
    pixels = np.zeros((4, 4, 3), np.uint8)
    other = pixels.copy()
    other[3, 3, 2] = 1
    assert digest_of({"x": pixels}) != digest_of({"x": other})
    assert digest_of(Image.fromarray(pixels)) != digest_of(Image.fromarray(other))

    class Settings(StrictParams):
        steps: int
        rate: float

    assert digest_of(Settings(steps=2, rate=0.1)) == digest_of({"rate": 0.1, "steps": 2})
    assert digest_of(Settings(steps=2, rate=0.1)) != digest_of(Settings(steps=2, rate=0.2))
    assert digest_of([1, 2]) != digest_of([[1, 2]]) != digest_of("12")
    assert digest_of(1) != digest_of(1.0) != digest_of(True)
    with pytest.raises(TypeError, match="object"):
        digest_of(object())


def test_run_key_names_each_input_and_chains() -> None:
    first = run_key({"lr": 1e-3}, model=make_model(), data=table())
    assert set(first.inputs) == {"params", "model", "data"}
    assert first == run_key({"lr": 1e-3}, model=make_model(), data=table())
    assert first.digest != run_key({"lr": 2e-3}, model=make_model(), data=table()).digest
    assert first.digest != run_key({"lr": 1e-3}, model=make_model(1), data=table()).digest
    assert run_key({}, previous=first).inputs["previous"] == first.digest


def test_files_digest_follows_bytes_not_the_provenance_record(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.bin").write_bytes(b"abc")
    (tmp_path / "sub" / "b.bin").write_bytes(b"def")
    before = files_digest(tmp_path)
    (tmp_path / PROVENANCE_FILE).write_text("{}")
    (tmp_path / ".a.bin.tmp").write_text("half")
    assert files_digest(tmp_path) == before
    (tmp_path / "sub" / "b.bin").write_bytes(b"deg")
    assert files_digest(tmp_path) != before
    assert files_digest(tmp_path / "a.bin") != files_digest(tmp_path / "sub" / "b.bin")


def test_inputs_made_from_different_versions_are_refused_naming_both() -> None:
    lineages = {
        "taste_signal_audit": {"taste_signal_audit": "a1", "user_conditions": "new"},
        "metrics": {"metrics": "m1", "generations": "g1", "user_conditions": "old"},
        "images": {"images": "i1"},
    }
    assert lineage_conflicts(lineages) == {
        "user_conditions": {"new": ["taste_signal_audit"], "old": ["metrics"]}
    }
    with pytest.raises(StaleInputError) as error:
        require_consistent(lineages, "write_benchmark_report")
    message = str(error.value)
    assert message.startswith("The inputs of write_benchmark_report were made from different")
    assert "taste_signal_audit was made from user_conditions new" in message
    assert "metrics was made from user_conditions old" in message

    # The artifact itself, read beside something made from its older version.
    with pytest.raises(StaleInputError, match="tuned_mllm itself is v2"):
        require_consistent(
            {"tuned_mllm": {"tuned_mllm": "v2"}, "aligner": {"tuned_mllm": "v1"}}, "diffusion"
        )
    require_consistent({"a": {"x": "1"}, "b": {"x": "1", "b": "2"}}, "fine")
