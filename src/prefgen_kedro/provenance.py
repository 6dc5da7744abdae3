"""What an artifact was made from: content digests, training-run keys and lineage checks.

A researcher who changes one thing and re-runs one pipeline must be able to trust what is
shown (DESIGN.md §4). Three pieces serve that:

- ``digest_of(value)`` — a digest (16 hex digits of sha256) of a value's *content*: every
  weight of a torch module (and its config), every cell of a table, every pixel of an array
  or picture, a pydantic model's fields, nested dicts and lists. Equal content gives an
  equal digest in any process; two values that differ anywhere give different ones.
  ``files_digest(path)`` is the same for the bytes of a file or of a folder's files.
  ``StreamedTensor`` stands for a tensor too large to hold: its digest is that tensor's,
  read a block of rows at a time.
- ``run_key(params, **inputs) -> RunKey`` — the key of a training run: the digest of its
  validated parameters and of every input it reads, with each input's digest kept
  (``RunKey.inputs``) so reports can say what the run was made from. ``training.train``
  names its checkpoint folder by it: a matching folder is resumed (or, finished, reused),
  and any change of a weight, a table cell or a pixel trains afresh.
- ``lineage_conflicts(lineages)`` — given, for each input of a step, the digests of every
  artifact it was made from (its lineage), the artifacts that the inputs saw in different
  versions; ``StaleInputError`` names them. ``hooks.ProvenanceHook`` keeps the lineages.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pydantic
import torch
from PIL import Image
from torch import nn

from prefgen_kedro.errors import BadInputError

DIGEST_LENGTH = 16
# A model folder's own record of its provenance: not part of the folder's content digest.
PROVENANCE_FILE = "provenance.json"
_CHUNK = 1 << 20


class StaleInputError(BadInputError):
    """The inputs of a step were made from different versions of one artifact."""


@dataclass(frozen=True)
class RunKey:
    """The key of a training run: ``digest`` of its parameters and inputs, and each input's
    digest by name (``"params"`` for the parameters)."""

    digest: str
    inputs: Mapping[str, str]


@dataclass(frozen=True)
class StreamedTensor:
    """A tensor of ``dtype`` and ``shape`` read in blocks of consecutive rows (``blocks()``
    yields them in order), never held whole: ``digest_of`` gives it the digest of the tensor
    it stands for."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    blocks: Callable[[], Iterator[torch.Tensor]]


def digest_of(value: Any) -> str:
    """The content digest of ``value`` (see the module docstring); raises ``TypeError`` for a
    type it cannot read, rather than guess. A ``RunKey``'s digest is its own."""
    if isinstance(value, RunKey):
        return value.digest
    hasher = hashlib.sha256()
    _feed(hasher, value)
    return hasher.hexdigest()[:DIGEST_LENGTH]


def run_key(params: Any, **inputs: Any) -> RunKey:
    """The key of a run made by ``params`` from ``inputs`` (each digested by ``digest_of``;
    a ``RunKey`` among them stands for the run it keys, e.g. the stage a run continues)."""
    digests = {"params": digest_of(params)}
    digests.update((name, digest_of(value)) for name, value in inputs.items())
    return RunKey(digest_of(digests), digests)


def files_digest(path: str | Path, *, skip: Iterable[str] = (PROVENANCE_FILE,)) -> str:
    """The digest of a file's bytes, or of a folder's files (their paths relative to it and
    their bytes); top-level names in ``skip`` and hidden files (temporary writes) are left
    out."""
    root = Path(path)
    if root.is_file():
        return _file_sha256(root)[:DIGEST_LENGTH]
    skipped = set(skip)
    hasher = hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        relative = file.relative_to(root)
        if relative.parts[0] in skipped or any(part.startswith(".") for part in relative.parts):
            continue
        hasher.update(f"{relative.as_posix()}\0{_file_sha256(file)}\0".encode())
    return hasher.hexdigest()[:DIGEST_LENGTH]


def lineage_conflicts(
    lineages: Mapping[str, Mapping[str, str]],
) -> dict[str, dict[str, list[str]]]:
    """For each artifact that the inputs saw in more than one version: version (digest) →
    the inputs made from it. ``lineages`` maps each input to the digests of the artifacts it
    was made from, itself included."""
    versions: dict[str, dict[str, list[str]]] = {}
    for input_name, lineage in lineages.items():
        for artifact, digest in lineage.items():
            versions.setdefault(artifact, {}).setdefault(digest, []).append(input_name)
    return {artifact: seen for artifact, seen in versions.items() if len(seen) > 1}


def require_consistent(lineages: Mapping[str, Mapping[str, str]], inputs_of: str) -> None:
    """Raise ``StaleInputError`` naming every artifact the inputs saw in different versions
    and which input saw which; ``inputs_of`` names what they are the inputs of."""
    conflicts = lineage_conflicts(lineages)
    if not conflicts:
        return
    lines = []
    for artifact, seen in sorted(conflicts.items()):
        described = [
            ", ".join(
                f"{artifact} itself is {digest}"
                if name == artifact
                else f"{name} was made from {artifact} {digest}"
                for name in sorted(names)
            )
            for digest, names in seen.items()
        ]
        lines.append(f"{artifact}: " + "; but ".join(described))
    raise StaleInputError(
        f"The inputs of {inputs_of} were made from different versions of "
        f"{', '.join(sorted(conflicts))}; remake the older ones from the current "
        "upstream artifacts (re-run the pipelines between them, or the whole `kedro run`).\n  "
        + "\n  ".join(lines)
    )


def write_json_atomic(path: Path, payload: Mapping[str, Any]) -> None:
    """Write ``payload`` as indented JSON to ``.tmp-<name>`` beside ``path``, then rename."""
    partial = path.with_name(f".tmp-{path.name}")
    partial.write_text(json.dumps(payload, indent=2, sort_keys=True))
    partial.replace(path)


def _file_sha256(path: Path) -> str:
    hasher = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(_CHUNK):
            hasher.update(chunk)
    return hasher.hexdigest()


def _feed(hasher: Any, value: Any) -> None:
    """Feed ``value``'s content to ``hasher``, each piece tagged with its kind and length so
    that no two different values give the same byte stream."""
    if value is None:
        hasher.update(b"N")
    elif isinstance(value, bool | np.bool_):
        hasher.update(b"B1" if value else b"B0")
    elif isinstance(value, int | np.integer):
        _tagged(hasher, b"I", str(int(value)).encode())
    elif isinstance(value, float | np.floating):
        _tagged(hasher, b"F", float(value).hex().encode())
    elif isinstance(value, str):
        _tagged(hasher, b"S", value.encode())
    elif isinstance(value, bytes):
        _tagged(hasher, b"Y", value)
    elif isinstance(value, RunKey):
        _tagged(hasher, b"K", value.digest.encode())  # inside a container
    elif isinstance(value, pydantic.BaseModel):
        _feed(hasher, value.model_dump(mode="json"))
    elif isinstance(value, torch.Tensor | StreamedTensor):
        _feed_tensor(hasher, value)
    elif isinstance(value, np.ndarray):
        _feed_array(hasher, value)
    elif isinstance(value, pd.DataFrame):
        _tagged(hasher, b"D", str(value.shape).encode())
        _feed(hasher, value.index.to_numpy())
        for column in value.columns:
            _feed(hasher, str(column))
            _feed(hasher, value[column].to_numpy())
    elif isinstance(value, pd.Series):
        _tagged(hasher, b"E", str(value.name).encode())
        _feed(hasher, value.index.to_numpy())
        _feed(hasher, value.to_numpy())
    elif isinstance(value, Image.Image):
        _tagged(hasher, b"P", f"{value.mode} {value.size}".encode())
        hasher.update(value.tobytes())
    elif isinstance(value, nn.Module):
        _feed_module(hasher, value)
    elif isinstance(value, Mapping):
        _tagged(hasher, b"M", str(len(value)).encode())
        for key in sorted(value, key=str):
            _feed(hasher, str(key))
            _feed(hasher, value[key])
    elif isinstance(value, list | tuple):
        _tagged(hasher, b"L", str(len(value)).encode())
        for item in value:
            _feed(hasher, item)
    elif isinstance(value, set | frozenset):
        _feed(hasher, sorted(digest_of(item) for item in value))
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        _tagged(hasher, b"C", type(value).__name__.encode())
        for field in dataclasses.fields(value):
            _feed(hasher, field.name)
            _feed(hasher, getattr(value, field.name))
    elif callable(getattr(value, "save_pretrained", None)):
        _feed_saved(hasher, value)  # tokenizers, processors, schedulers
    else:
        raise TypeError(f"digest_of cannot read a {type(value).__name__}")


def _tagged(hasher: Any, tag: bytes, payload: bytes) -> None:
    hasher.update(tag + str(len(payload)).encode() + b":")
    hasher.update(payload)


def _feed_tensor(hasher: Any, tensor: torch.Tensor | StreamedTensor) -> None:
    if isinstance(tensor, StreamedTensor):
        _feed_streamed(hasher, tensor)
        return
    flat = tensor.detach().cpu().contiguous()
    _tagged(hasher, b"T", f"{flat.dtype} {tuple(flat.shape)}".encode())
    # Reinterpreted as bytes: numpy has no bfloat16, and the bits are the content.
    hasher.update(flat.reshape(-1).view(torch.uint8).numpy().tobytes())


def _feed_streamed(hasher: Any, value: StreamedTensor) -> None:
    """As ``_feed_tensor`` feeds the tensor ``value`` stands for, a block at a time."""
    _tagged(hasher, b"T", f"{value.dtype} {tuple(value.shape)}".encode())
    rows = 0
    for block in value.blocks():
        if block.dtype != value.dtype or tuple(block.shape[1:]) != tuple(value.shape[1:]):
            raise ValueError(
                f"a block of {block.dtype} {tuple(block.shape)} in a streamed "
                f"{value.dtype} {tuple(value.shape)}"
            )
        rows += len(block)
        hasher.update(block.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    if rows != value.shape[0]:
        raise ValueError(f"a streamed tensor of {value.shape[0]} rows gave {rows}")


def _feed_array(hasher: Any, array: np.ndarray) -> None:
    if array.dtype == object:  # list cells of a table, strings: item by item
        _feed(hasher, array.tolist() if array.ndim == 1 else list(array))
        return
    _tagged(hasher, b"A", f"{array.dtype.str} {array.shape}".encode())
    hasher.update(np.ascontiguousarray(array).tobytes())


def _feed_module(hasher: Any, module: nn.Module) -> None:
    """Every state tensor (name, dtype, shape, all values) and the config, if it has one,
    without the fields that only say where it was loaded from or by which version."""
    _tagged(hasher, b"W", type(module).__name__.encode())
    config = getattr(module, "config", None)
    if config is not None:
        _feed(hasher, _settings(config.to_dict() if hasattr(config, "to_dict") else config))
    for name, tensor in module.state_dict().items():
        _feed(hasher, name)
        _feed_tensor(hasher, tensor)


def _settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """A config without the fields that say where it was loaded from or by which version."""
    return {
        key: _settings(value) if isinstance(value, Mapping) else value
        for key, value in config.items()
        if not str(key).startswith("_") and not str(key).endswith("_version")
    }


def _feed_saved(hasher: Any, value: Any) -> None:
    """Objects without weights (tokenizers, processors, schedulers): what they save."""
    with tempfile.TemporaryDirectory() as folder:
        value.save_pretrained(folder)
        _tagged(hasher, b"Z", type(value).__name__.encode())
        hasher.update(files_digest(folder, skip=()).encode())
