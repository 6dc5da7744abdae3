"""Project pipelines."""

from __future__ import annotations

from kedro.framework.project import find_pipelines
from kedro.pipeline import Pipeline

from prefgen_kedro.pipelines.foundation.pipeline import create_mllm_pipeline, create_unet_pipeline

# `foundation` makes the stand-ins for hub checkpoints; they ship with the repository,
# so the default run starts from them the way a researcher starts from a download.
# `foundation_mllm` and `foundation_unet` remake only the MLLM or the base UNet stand-in.
NOT_IN_DEFAULT = ("foundation", "foundation_mllm", "foundation_unet")


def register_pipelines() -> dict[str, Pipeline]:
    """Register the project's pipelines; ``__default__`` is every one but the foundation ones."""
    pipelines = find_pipelines(raise_errors=True)
    pipelines["foundation_mllm"] = create_mllm_pipeline()
    pipelines["foundation_unet"] = create_unet_pipeline()
    pipelines["__default__"] = sum(
        (pipe for name, pipe in pipelines.items() if name not in NOT_IN_DEFAULT), Pipeline([])
    )
    return pipelines
