"""Custom Kedro datasets."""

from prefgen_kedro.datasets.pretrained_model_dataset import PretrainedModelDataset

__all__ = ["PretrainedModelDataset"]
