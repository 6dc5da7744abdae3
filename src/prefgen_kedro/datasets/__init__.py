"""Custom Kedro datasets."""

from prefgen_kedro.datasets.model_bundle_dataset import (
    DiffusionStackDataset,
    MllmWithProcessorDataset,
    ModelBundleDataset,
)
from prefgen_kedro.datasets.pretrained_model_dataset import PretrainedModelDataset

__all__ = [
    "DiffusionStackDataset",
    "MllmWithProcessorDataset",
    "ModelBundleDataset",
    "PretrainedModelDataset",
]
