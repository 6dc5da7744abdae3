"""Shipped foundation checkpoints: their manifest entries and the world check.

The foundation models stand in for hub checkpoints (DESIGN.md §2). Each ships with an
entry saying how it was made (command, seed, size, time, metrics, weight hashes) and which
agent world it saw; a later stage that loads one first checks that world is still today's.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

from pydantic import BaseModel
from torch import nn

from prefgen_kedro.provenance import RunKey, run_key
from prefgen_kedro.world.agent_world import RenderSet
from prefgen_kedro.world.vocabulary import world_hash


class StaleFoundationError(RuntimeError):
    """The shipped foundation models were made for another version of the agent world."""


def foundation_run_key(
    params: BaseModel, renders: RenderSet, *, watching: Iterable[str] = (), **inputs: object
) -> RunKey:
    """A foundation trainer's run key: its parameters (but the TrainConfig, which keys the
    run itself, and the ``watching`` ones, which only watch it train), every render with
    its caption, and ``inputs`` (the models it reads)."""
    return run_key(
        params.model_dump(exclude={"train", *watching}),
        renders=renders,
        captions=renders.captions,
        **inputs,
    )


def round_to_half(model: nn.Module) -> nn.Module:
    """fp16 round trip: the weights the shipped (fp16) checkpoint will hold, in fp32."""
    return model.half().float().eval()


def parameter_count(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def weight_hashes(directory: str | Path) -> dict[str, str]:
    """sha256 of every ``*.safetensors`` file in a saved model directory, by file name."""
    files = sorted(Path(directory).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{directory}: no .safetensors weights to hash")
    return {file.name: hashlib.sha256(file.read_bytes()).hexdigest() for file in files}


def manifest_entry(
    *,
    model: nn.Module,
    directory: str | Path,
    seed: int,
    wall_seconds: float,
    metrics: Mapping[str, object],
    extra: Mapping[str, object] | None = None,
) -> dict:
    """One model's entry: how to remake it and how to check it is the one shipped."""
    return {
        "command": "kedro " + " ".join(sys.argv[1:]),
        "seed": seed,
        "parameters": parameter_count(model),
        "wall_seconds": round(wall_seconds, 1),
        "metrics": dict(metrics),
        "sha256": weight_hashes(directory),
        "world_hash": world_hash(),
        **(extra or {}),
    }


def require_current_world(manifest: Mapping[str, Mapping], model_name: str) -> None:
    """Stop with a clear error unless ``model_name`` was made for today's agent world."""
    if model_name not in manifest:
        raise StaleFoundationError(
            f"the foundation manifest has no entry {model_name!r} (it has "
            f"{sorted(manifest)}); run `kedro run --pipelines foundation`"
        )
    made_for = manifest[model_name].get("world_hash")
    if made_for != world_hash():
        raise StaleFoundationError(
            f"foundation model {model_name!r} was made for agent world {made_for}, but the "
            f"world is now {world_hash()} (its vocabulary or renderer changed); remake the "
            "foundation models with `kedro run --pipelines foundation`"
        )
