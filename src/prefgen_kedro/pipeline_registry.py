"""Project pipelines."""

from __future__ import annotations

from kedro.pipeline import Pipeline

from prefgen_kedro.pipelines import (
    alignment,
    data_ingestion,
    diffusion,
    evaluation,
    foundation,
    probing,
    vqa_tuning,
)
from prefgen_kedro.pipelines.foundation.pipeline import create_mllm_pipeline, create_unet_pipeline

# PrefGen's stages in the order they run; `__default__` is all of them.
STAGES = {
    "data_ingestion": data_ingestion,
    "vqa_tuning": vqa_tuning,
    "probing": probing,
    "alignment": alignment,
    "diffusion": diffusion,
    "evaluation": evaluation,
}


def register_pipelines() -> dict[str, Pipeline]:
    """Register the project's pipelines. `foundation` makes the stand-ins for hub checkpoints;
    they ship with the repository, so the default run starts from them the way a researcher
    starts from a download. `foundation_mllm` and `foundation_unet` remake only the MLLM or
    the base UNet stand-in. (Listed here rather than found by folder: the two remakes are
    cut from `foundation`, not pipelines of their own.)"""
    pipelines = {name: stage.create_pipeline() for name, stage in STAGES.items()}
    pipelines["__default__"] = sum(pipelines.values(), Pipeline([]))
    pipelines["foundation"] = foundation.create_pipeline()
    pipelines["foundation_mllm"] = create_mllm_pipeline()
    pipelines["foundation_unet"] = create_unet_pipeline()
    return pipelines
