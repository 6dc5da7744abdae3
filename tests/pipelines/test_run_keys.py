"""Each trainer is keyed by the content of what it reads: the same inputs reuse the finished
run (and its report says so), and one changed value of any input trains afresh, where the
hand-built fingerprints they replace read a few values of one input."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from kedro.framework.session import KedroSession
from kedro.framework.startup import bootstrap_project
from PIL import Image

from prefgen_kedro.models.stack import MllmWithProcessor
from prefgen_kedro.params import AlignmentParams
from prefgen_kedro.pipelines.alignment.nodes import train_aligners
from prefgen_kedro.pipelines.diffusion.nodes import train_user_branches
from prefgen_kedro.pipelines.vqa_tuning.nodes import tune_mllm
from prefgen_kedro.training import TrainConfig


def reused(runs: dict[str, dict]) -> dict[str, bool]:
    return {name: entry["run"]["reused"] for name, entry in runs.items()}


def contexts(users: int, per_user: int, seed: int = 0) -> pd.DataFrame:
    """``context_embeddings`` of training users (8-wide e_sem), as probing writes them."""
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        [
            {"user_id": f"u{u}", "split": "train", "context": c, "e_sem": rng.normal(size=8)}
            for u in range(users)
            for c in range(per_user)
        ]
    )


def test_aligners_are_reused_for_the_same_contexts_only(tmp_path: Path) -> None:
    params = AlignmentParams(
        checkpoint_root=str(tmp_path),
        hidden_dim=8,
        dropout=0.0,
        tokens=2,
        bandwidth_factors=[1.0],
        retrieval_k=1,
        train=TrainConfig(max_steps=2, batch_size=2, learning_rate=1e-3),
    )
    targets = {
        "vocabulary": torch.randn(5, 6, generator=torch.Generator().manual_seed(0)),
        "phrase_ids": {f"u{u}": [u, u + 1] for u in range(4)},
        "phrase_groups": list(range(5)),
    }
    train = lambda frame: reused(train_aligners(frame, targets, params)[1])  # noqa: E731
    frame = contexts(users=4, per_user=3)
    assert train(frame) == {"prefgen": False, "prefgen_no_mmd": False}
    assert train(frame) == {"prefgen": True, "prefgen_no_mmd": True}
    # One value of the last user's last context (the old key read four of the first user's).
    changed = frame.copy()
    changed.at[len(frame) - 1, "e_sem"] = frame["e_sem"].iloc[-1] + np.eye(8)[-1] * 1e-3
    assert train(changed) == {"prefgen": False, "prefgen_no_mmd": False}
    # Another probing.contexts_per_user, or probing.seed: other contexts.
    assert train(contexts(users=4, per_user=4)) == {"prefgen": False, "prefgen_no_mmd": False}
    assert train(contexts(users=4, per_user=3, seed=1)) == {
        "prefgen": False,
        "prefgen_no_mmd": False,
    }


@pytest.fixture
def smoke_catalog(smoke_project: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, dict]:
    """The smoke project's catalog and validated parameters (of what the session ran)."""
    monkeypatch.chdir(smoke_project)
    bootstrap_project(smoke_project)
    with KedroSession.create(project_path=smoke_project, env="smoke") as session:
        context = session.load_context()
        return context.catalog, context.params


def test_vqa_tuning_retrains_for_one_start_weight_one_pixel_or_slot_positions(
    smoke_tuned, smoke_catalog, tmp_path
):
    catalog, all_params = smoke_catalog
    params = all_params["vqa_tuning"]
    first_stage = params.stages[0].model_copy(
        update={"train": params.stages[0].train.model_copy(update={"max_steps": 1})}
    )
    params = params.model_copy(
        update={"checkpoint_root": str(tmp_path), "stages": [first_stage], "curve_questions": 2}
    )
    processor = catalog.load("foundation_mllm_processor")
    examples = catalog.load("vqa_examples")
    raw_images = catalog.load("raw_images")

    def tune(mllm=None, pictures=raw_images, settings=params) -> bool:
        model = mllm if mllm is not None else catalog.load("foundation_mllm")
        _, report = tune_mllm(MllmWithProcessor(model, processor), examples, pictures, settings)
        return report["stages"][0]["run"]["reused"]

    assert tune() is False
    assert tune() is True
    start = catalog.load("foundation_mllm")
    with torch.no_grad():
        start.model.language_model.layers[0].mlp.down_proj.weight[-1, -1] += 1e-3
    assert tune(mllm=start) is False  # the old key read 64 values of each tensor
    # One pixel of a picture the stage shows, under the same image id.
    shown = examples.loc[(examples["split"] == "train") & (examples["stage"] == 0), "query"].iloc[0]
    pixels = np.asarray(raw_images[shown]().convert("RGB")).copy()
    pixels[0, 0, 0] ^= 1
    repainted = {**raw_images, shown: lambda: Image.fromarray(pixels)}
    assert tune(pictures=repainted) is False
    flipped = params.model_copy(update={"slot_positions": not params.slot_positions})
    assert tune(settings=flipped) is False


def test_user_branches_retrain_when_their_parts_or_the_base_unet_change(
    smoke_diffused, smoke_catalog, tmp_path
):
    catalog, all_params = smoke_catalog
    params = all_params["diffusion"].model_copy(
        update={
            "variants": {
                "prefgen": ["e_sem_hat", "e_core", "e_img"],
                "prefgen_no_img": ["e_sem_hat", "e_core"],
            },
            "checkpoint_root": str(tmp_path),
        }
    )
    conditions = catalog.load("user_conditions")
    images, interactions = catalog.load("images"), catalog.load("interactions")
    raw_images = catalog.load("raw_images")
    stack = catalog.load("diffusion_stack")

    def train(user_conditions: pd.DataFrame = conditions, unet=None) -> dict[str, bool]:
        unet = unet if unet is not None else catalog.load("base_unet")
        _, report = train_user_branches(
            user_conditions, images, interactions, raw_images, replace(stack, unet=unet), params
        )
        return reused(report["variants"])

    assert train() == {"prefgen": False, "prefgen_no_img": False}
    assert train() == {"prefgen": True, "prefgen_no_img": True}
    # Another e_img (diffusion.e_img): prefgen reads it and retrains, no_img is reused.
    other_e_img = conditions.assign(e_img=[vector[::-1].copy() for vector in conditions["e_img"]])
    assert train(other_e_img) == {"prefgen": False, "prefgen_no_img": True}
    unet = catalog.load("base_unet")
    with torch.no_grad():
        unet.conv_out.weight.view(-1)[-1] += 1e-3
    assert train(unet=unet) == {"prefgen": False, "prefgen_no_img": False}
