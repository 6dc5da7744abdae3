"""Datasets of models that travel together: each part is a dataset of its own (a
``PretrainedModelDataset`` folder), and one catalog entry loads them all as one object of
``prefgen_kedro.models.stack``.

- ``DiffusionStackDataset`` — a ``DiffusionStack`` (UNet, optional VAE, noise schedule,
  conditioning CLIP and tokenizer); read-only: the foundation pipeline writes each part
  under its own entry.
- ``MllmWithProcessorDataset`` — a ``MllmWithProcessor``; saving writes the model only.

Every ``load`` loads every part afresh: a node may change what it gets (the user-branch
training casts the UNet to float32 and installs attention processors on it), and no other
node may see those changes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, ClassVar

from kedro.io.core import AbstractDataset, DatasetError

from prefgen_kedro.models.stack import DiffusionStack, MllmWithProcessor


class ModelBundleDataset(AbstractDataset[Any, Any]):
    """Loads ``bundle`` (a frozen dataclass) from one dataset per field; a subclass names the
    bundle, the parts that may be absent and the parts ``save`` writes."""

    bundle: ClassVar[type]
    optional_parts: ClassVar[frozenset[str]] = frozenset()
    saved_parts: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        *,
        parts: Mapping[str, dict[str, Any] | None],
        metadata: dict[str, Any] | None = None,
    ) -> None:
        """Create the dataset of each part from its catalog configuration.

        Args:
            parts: Each field of the bundle → the configuration of the dataset that holds it
                (as a catalog entry is written: ``type`` and its arguments), or ``None`` for
                an absent optional part.
            metadata: Anything; ignored by Kedro.

        Raises:
            DatasetError: If a part is unknown, missing, or absent without being optional, or
                its configuration does not make a dataset.
        """
        fields = [field.name for field in dataclasses.fields(self.bundle)]
        unknown, missing = sorted(set(parts) - set(fields)), sorted(set(fields) - set(parts))
        if unknown or missing:
            raise DatasetError(
                f"{type(self).__name__} takes the parts {fields}; unknown: {unknown}, "
                f"missing: {missing} (an optional part that is absent is given as null)"
            )
        datasets: dict[str, AbstractDataset | None] = {}
        for part in fields:
            config = parts[part]
            if config is None and part not in self.optional_parts:
                raise DatasetError(f"{type(self).__name__} needs its {part!r} part")
            datasets[part] = None if config is None else AbstractDataset.from_config(part, config)
        self._parts = datasets
        self.metadata = metadata

    @property
    def parts(self) -> Mapping[str, AbstractDataset | None]:
        """The dataset of each part (``None`` for an absent one)."""
        return MappingProxyType(self._parts)

    def load(self) -> Any:
        """Every part, loaded afresh, as one ``bundle``."""
        loaded = {}
        for part, dataset in self._parts.items():
            try:
                loaded[part] = None if dataset is None else dataset.load()
            except DatasetError as error:
                raise DatasetError(f"part {part!r} could not be loaded: {error}") from error
        return self.bundle(**loaded)

    def save(self, data: Any) -> None:
        """Write the ``saved_parts`` of ``data``, each to its own dataset."""
        if not self.saved_parts:
            raise DatasetError(
                f"{type(self).__name__} is read-only: each of its parts is written under its "
                "own catalog entry"
            )
        if not isinstance(data, self.bundle):
            raise DatasetError(f"Expected a {self.bundle.__name__}, got {type(data).__name__}")
        for part in self.saved_parts:
            self._parts[part].save(getattr(data, part))

    def _exists(self) -> bool:
        return all(dataset.exists() for dataset in self._parts.values() if dataset is not None)

    def _describe(self) -> dict[str, Any]:
        described = {
            part: {"type": type(dataset).__name__, **dataset._describe()}
            for part, dataset in self._parts.items()
            if dataset is not None
        }
        return {"parts": {part: described.get(part) for part in self._parts}}


class DiffusionStackDataset(ModelBundleDataset):
    """A ``DiffusionStack``, each part a dataset of its own; read-only.

    Example catalog entry (each part's configuration written once, under its own entry):

    ```yaml
    diffusion_stack:
      type: prefgen_kedro.datasets.DiffusionStackDataset
      parts:
        unet: ${base_unet}
        vae: null                # a pixel-space UNet: no VAE
        scheduler: ${noise_scheduler}
        clip: ${conditioning_clip}
        tokenizer: ${clip_tokenizer}
    ```
    """

    bundle = DiffusionStack
    optional_parts = frozenset({"vae"})


class MllmWithProcessorDataset(ModelBundleDataset):
    """A ``MllmWithProcessor``, the model and the processor each a dataset of its own.

    Saving writes the model alone: a tuning changes the model's weights, never how its
    inputs are processed, so a tuned MLLM is read with the processor it was tuned with
    (which may lie in a folder the run only reads, such as a downloaded checkpoint).

    ```yaml
    tuned_mllm_with_processor:
      type: prefgen_kedro.datasets.MllmWithProcessorDataset
      parts:
        model: ${tuned_mllm}
        processor: ${foundation_mllm_processor}
    ```
    """

    bundle = MllmWithProcessor
    saved_parts = ("model",)
