"""``PretrainedModelDataset``: a ``save_pretrained`` directory, loaded with ``from_pretrained``.

Works for anything with that pair of methods: transformers models, tokenizers and processors,
diffusers models, and the project's own modules (``huggingface_hub.PyTorchModelHubMixin`` or
diffusers ``ModelMixin`` + ``ConfigMixin``). Weights are written as safetensors, and a directory
holding pickled weights is refused on load (DESIGN.md §6).
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import logging
import os
import shutil
import tempfile
from copy import deepcopy
from pathlib import Path, PurePosixPath
from typing import Any

import fsspec
import torch
from kedro.io.core import (
    AbstractDataset,
    DatasetError,
    generate_timestamp,
    get_filepath_str,
    get_protocol_and_path,
)

from prefgen_kedro.provenance import files_digest

logger = logging.getLogger(__name__)

# Weight files that torch can only read by unpickling.
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_DTYPE_ARGS = ("dtype", "torch_dtype")


class PretrainedModelDataset(AbstractDataset[Any, Any]):
    """A model (or tokenizer, processor, ...) stored as a ``save_pretrained`` directory.

    Example catalog entry:

    ```yaml
    clip_model:
      type: prefgen_kedro.datasets.PretrainedModelDataset
      path: data/06_models/clip
      model_class: transformers.CLIPModel
      load_args:
        dtype: float32
    ```

    Saving writes to a temporary directory beside ``path`` and renames it into place; an
    existing ``path`` is first moved aside to ``{path}.previous-{timestamp}`` (with a warning),
    never deleted, unless it holds the same files (a reused training saves what it found):
    then it is kept as it is. Loading works from any fsspec filesystem (remote directories are
    copied to a temporary local one first); saving needs the local filesystem, where renames
    are atomic.
    """

    def __init__(
        self,
        *,
        path: str | os.PathLike,
        model_class: str,
        load_args: dict[str, Any] | None = None,
        save_args: dict[str, Any] | None = None,
        credentials: dict[str, Any] | None = None,
        fs_args: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        """Create a dataset for the directory ``path`` holding a ``model_class`` object.

        Args:
            path: The directory, optionally prefixed by an fsspec protocol (``s3://...``).
            model_class: Import path of the class whose ``from_pretrained`` loads it, e.g.
                ``transformers.CLIPModel`` or ``transformers.AutoProcessor``.
            load_args: Keyword arguments of ``from_pretrained``; ``dtype``/``torch_dtype`` may
                be given by name (``bfloat16``). ``trust_remote_code`` is refused.
            save_args: Keyword arguments of ``save_pretrained``; ``safe_serialization=True``
                is added where that method takes it.
            credentials: Credentials of the filesystem (as in kedro-datasets).
            fs_args: Arguments of the fsspec filesystem's constructor.
            metadata: Anything; ignored by Kedro.

        Raises:
            DatasetError: If ``model_class`` cannot be imported or has no ``from_pretrained``,
                or ``load_args`` asks for remote code.
        """
        _resolve_class(model_class)  # fail at catalog creation, not after a long run
        load_args = dict(load_args or {})
        if load_args.get("trust_remote_code"):
            raise DatasetError(f"{path}: trust_remote_code is not allowed (DESIGN.md §6)")
        protocol, fs_path = get_protocol_and_path(str(path))
        _fs_args = deepcopy(fs_args) or {}
        if protocol == "file":
            _fs_args.setdefault("auto_mkdir", True)
        self._protocol = protocol
        self._path = PurePosixPath(fs_path)
        self._fs = fsspec.filesystem(protocol, **(deepcopy(credentials) or {}), **_fs_args)
        self._model_class = model_class
        self._load_args = load_args
        self._save_args = dict(save_args or {})
        self.metadata = metadata

    def load(self) -> Any:
        """Return ``model_class.from_pretrained(path, **load_args)``."""
        cls = _resolve_class(self._model_class)
        location = get_filepath_str(self._path, self._protocol)
        if not self._fs.isdir(location):
            raise DatasetError(f"No saved directory at {location!r} to load a {cls.__name__}")
        pickled = [name for name in self._fs.find(location) if name.endswith(_PICKLE_SUFFIXES)]
        if pickled:
            raise DatasetError(
                f"{location!r} holds pickled weights {pickled}; refusing to unpickle them "
                "(re-save the model with safetensors)"
            )
        load_args = _with_torch_dtypes(self._load_args)
        # huggingface_hub's model mixin prints "Loading weights from local directory" to
        # stdout, a line outside the log; Kedro's own record says what is loaded.
        with contextlib.redirect_stdout(io.StringIO()):
            if self._protocol == "file":
                return cls.from_pretrained(location, **load_args)
            with tempfile.TemporaryDirectory() as local:
                self._fs.get(location.rstrip("/") + "/", local, recursive=True)
                return cls.from_pretrained(local, **load_args)

    def save(self, data: Any) -> None:
        """Write ``data.save_pretrained`` into ``path`` atomically, moving an old one aside."""
        if self._protocol != "file":
            raise NotImplementedError(
                f"PretrainedModelDataset saves only to the local filesystem (atomic rename); "
                f"got protocol {self._protocol!r} for {self._path}"
            )
        if not callable(getattr(data, "save_pretrained", None)):
            raise DatasetError(f"{type(data).__name__} has no save_pretrained method")
        cls = _resolve_class(self._model_class)
        # Auto* classes have no save_pretrained of their own and are no superclass of what they
        # load, so only a concrete class can be checked.
        if hasattr(cls, "save_pretrained") and not isinstance(data, cls):
            raise DatasetError(
                f"Expected a {self._model_class} to save at {self._path}, got {type(data).__name__}"
            )
        target = Path(str(self._path))
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            data.save_pretrained(str(staging), **_with_safe_serialization(data, self._save_args))
            if target.exists() and files_digest(staging) == files_digest(target):
                return
            if target.exists():
                previous = target.with_name(f"{target.name}.previous-{generate_timestamp()}")
                os.replace(target, previous)
                logger.warning("%s already existed; moved it aside to %s", target, previous)
            os.replace(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        self._fs.invalidate_cache(str(target))

    def _exists(self) -> bool:
        return self._fs.isdir(get_filepath_str(self._path, self._protocol))

    def _describe(self) -> dict[str, Any]:
        return {
            "path": self._path,
            "protocol": self._protocol,
            "model_class": self._model_class,
            "load_args": self._load_args,
            "save_args": self._save_args,
        }


def _resolve_class(import_path: str) -> type:
    module_name, _, class_name = import_path.rpartition(".")
    if not module_name:
        raise DatasetError(f"model_class {import_path!r} is not an import path like 'pkg.Class'")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as exc:
        raise DatasetError(f"model_class {import_path!r} cannot be imported: {exc}") from exc
    if not callable(getattr(cls, "from_pretrained", None)):
        raise DatasetError(f"model_class {import_path!r} has no from_pretrained method")
    return cls


def _with_torch_dtypes(load_args: dict[str, Any]) -> dict[str, Any]:
    """YAML can only name a dtype; ``from_pretrained`` wants the ``torch.dtype`` (or ``auto``)."""
    converted = dict(load_args)
    for key in _DTYPE_ARGS:
        value = converted.get(key)
        if isinstance(value, str) and value != "auto":
            dtype = getattr(torch, value.removeprefix("torch."), None)
            if not isinstance(dtype, torch.dtype):
                raise DatasetError(f"load_args {key}={value!r} is not a torch dtype")
            converted[key] = dtype
    return converted


def _with_safe_serialization(data: Any, save_args: dict[str, Any]) -> dict[str, Any]:
    """Add ``safe_serialization=True`` where ``save_pretrained`` names that parameter (diffusers
    does; recent transformers and huggingface_hub always write safetensors and have none)."""
    parameters = inspect.signature(data.save_pretrained).parameters
    if "safe_serialization" in parameters:
        return {"safe_serialization": True, **save_args}
    return save_args
