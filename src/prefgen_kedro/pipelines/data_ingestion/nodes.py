"""Nodes of ``data_ingestion``: pick the source, return the canonical tables and pictures."""

from __future__ import annotations

from typing import Literal

import pandas as pd
from PIL import Image
from pydantic import Field

from prefgen_kedro.data.pickapic import ingest_pickapic
from prefgen_kedro.params import StrictParams
from prefgen_kedro.world.agent_world import generate_agent_world


class AgentWorldParams(StrictParams):
    n_users: int = Field(gt=0)
    images_per_user: int = Field(ge=2)
    n_liked_attributes: int = Field(ge=1)
    n_disliked_attributes: int = Field(ge=1)
    label_noise: float = Field(ge=0.0, lt=0.5)
    image_size: int = Field(ge=8)
    split_fractions: dict[Literal["train", "val", "test"], float]
    seed: int


class PickapicParams(StrictParams):
    shard_dir: str
    fetch: str | None = None  # how to get the shards, as a run that lacks them says
    min_choices_per_user: int = Field(ge=1)
    image_size: int = Field(ge=8)
    split_fractions: dict[Literal["train", "val", "test"], float]
    seed: int
    batch_size: int = Field(gt=0)
    workers: int = Field(ge=1)
    work_dir: str | None


class DataIngestionParams(StrictParams):
    source: Literal["agent", "pickapic"]
    images_subdir: str
    agent_world: AgentWorldParams
    pickapic: PickapicParams


def ingest(
    params: DataIngestionParams,
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, dict[str, Image.Image], dict]:
    """Make ``images``, ``interactions``, ``users``, the pictures and a report from the
    source the parameters pick."""
    if params.source == "agent":
        world = generate_agent_world(
            **params.agent_world.model_dump(), images_subdir=params.images_subdir
        )
        pictures = {image_id: Image.fromarray(array) for image_id, array in world.pictures.items()}
        return world.images, world.interactions, world.users, pictures, world.report
    return ingest_pickapic(
        params.pickapic.shard_dir,
        min_choices_per_user=params.pickapic.min_choices_per_user,
        image_size=params.pickapic.image_size,
        images_subdir=params.images_subdir,
        split_fractions=params.pickapic.split_fractions,
        seed=params.pickapic.seed,
        batch_size=params.pickapic.batch_size,
        workers=params.pickapic.workers,
        work_dir=params.pickapic.work_dir,
    )
