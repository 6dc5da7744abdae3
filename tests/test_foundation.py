import pytest
import torch

from prefgen_kedro.foundation import (
    StaleFoundationError,
    manifest_entry,
    require_current_world,
    weight_hashes,
)
from prefgen_kedro.world.vocabulary import world_hash


def test_current_world_passes():
    require_current_world({"oracle": {"world_hash": world_hash()}}, "oracle")


def test_other_world_stops_with_the_command_to_run():
    with pytest.raises(StaleFoundationError, match="kedro run --pipelines foundation"):
        require_current_world({"oracle": {"world_hash": "0123456789abcdef"}}, "oracle")


def test_missing_entry_is_named():
    with pytest.raises(StaleFoundationError, match="'oracle'"):
        require_current_world({}, "oracle")


def test_manifest_entry_hashes_the_saved_weights(tmp_path):
    model = torch.nn.Linear(3, 2)
    from safetensors.torch import save_file

    save_file(model.state_dict(), tmp_path / "model.safetensors")
    entry = manifest_entry(
        model=model, directory=tmp_path, seed=1, wall_seconds=2.04, metrics={"acc": 1.0}
    )
    assert entry["parameters"] == 8
    assert entry["world_hash"] == world_hash()
    assert entry["sha256"] == weight_hashes(tmp_path)
    assert len(entry["sha256"]["model.safetensors"]) == 64
    with pytest.raises(FileNotFoundError, match="no .safetensors"):
        weight_hashes(tmp_path / "missing")
