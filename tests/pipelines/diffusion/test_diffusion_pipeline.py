"""The ``diffusion`` pipeline on ``smoke``: conditions without copying, the parts each
variant says in its prompt and those its branch reads, every variant trained and scored;
and its training node on a latent UNet with a VAE, as SD 1.5 in ``gpu``."""

import json
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
from diffusers import AutoencoderKL
from kedro.framework.project import pipelines
from kedro.framework.session import KedroSession
from kedro.framework.startup import bootstrap_project

from prefgen_kedro.models.diffusion import build_unet
from prefgen_kedro.models.user_adapter import UserBranches
from prefgen_kedro.params import DiffusionParams
from prefgen_kedro.pipelines.diffusion.nodes import make_user_conditions, train_user_branches
from prefgen_kedro.world.vocabulary import ATTRIBUTE_IDS


def test_diffusion_runs_on_smoke(smoke_diffused):
    data = smoke_diffused

    conditions = pd.read_parquet(data / "05_model_input" / "user_conditions.parquet")
    users = pd.read_parquet(data / "02_intermediate" / "users.parquet")
    assert set(conditions["user_id"]) == set(users["user_id"])
    parts = {
        "e_sem_hat",
        "e_sem_hat_no_mmd",
        "oracle_state_hat",
        "e_core",
        "e_img",
        "mean_clip",
        "true_sem",
        "counting_rule_picks",
    }
    assert parts <= set(conditions)
    # a perfect ê_sem: one text-space state per liked attribute, as many as ê_sem's tokens
    row = conditions.iloc[0]
    liked = users.set_index("user_id").loc[row["user_id"], "liked_attributes"]
    assert len(row["true_sem"]) == len(row["e_sem_hat"]) == len(liked) * 16  # smoke text width

    # ê_sem and the references are said in the prompt: the attributes their states are
    for part in ("e_sem_hat", "e_sem_hat_no_mmd", "oracle_state_hat"):
        named = conditions[f"{part}_attributes"]
        assert named.map(len).eq(len(liked)).all()
        # one attribute a category, as the aligner picks them
        assert named.map(lambda ids: len({a.split(":")[0] for a in ids}) == len(ids)).all()
    liked_of = users.set_index("user_id")["liked_attributes"].map(list)
    for user_id, said in zip(conditions["user_id"], conditions["true_sem_attributes"], strict=True):
        assert list(said) == liked_of[user_id]
    # the counting rule's picks: the best-counted attribute of each of the best categories
    column = {a: i for i, a in enumerate(ATTRIBUTE_IDS)}
    for summary, picked in zip(
        conditions["context_summary"], conditions["counting_rule_picks_attributes"], strict=True
    ):
        best = {}
        for attribute_id, count in zip(ATTRIBUTE_IDS, summary, strict=True):
            category = attribute_id.split(":")[0]
            best[category] = max(best.get(category, -np.inf), count)
        assert len(picked) == len(liked)
        assert all(summary[column[a]] == best[a.split(":")[0]] for a in picked)
        unpicked = set(best) - {a.split(":")[0] for a in picked}
        assert min(best[a.split(":")[0]] for a in picked) >= max(best[c] for c in unpicked)

    branches = UserBranches.from_pretrained(data / "06_models" / "user_branches")
    branched = {
        "prefgen",
        "prefgen_no_mmd",
        "prefgen_no_core",
        "prefgen_no_sem",
        "prefgen_no_img",
        "ip_adapter",
        "mean_clip",
    }
    assert set(branches.adapters) == branched  # the references say all they read
    assert branches.adapters["ip_adapter"].part_names == ["e_img"]
    assert branches.adapters["prefgen"].part_names == ["e_core", "e_img"]
    expected = branched | {"oracle_taste", "oracle_state"}

    metrics = json.loads((data / "08_reporting" / "diffusion_metrics.json").read_text())
    for method in expected | {"base", "viper_style"}:
        assert 0 <= metrics[method]["like_rate"] <= 1
        assert metrics[method]["images_per_second"] > 0
    assert 0 <= metrics["viper_style"]["taste_answers_read"] <= 1
    assert metrics["training"]["training_samples"] > 0
    assert (data / "08_reporting" / "user_branch_grid.png").stat().st_size > 0


def test_user_branches_train_on_vae_latents_when_the_unet_is_a_latent_one(
    smoke_diffused, smoke_project, tmp_path, monkeypatch
):
    """The node SD 1.5 goes through in ``gpu``: a latent UNet and its VAE (tiny here), on
    the smoke run's conditions and pictures."""
    monkeypatch.chdir(smoke_project)
    bootstrap_project(smoke_project)
    with KedroSession.create(project_path=smoke_project, env="smoke") as session:
        context = session.load_context()
        catalog, params = context.catalog, context.params["diffusion"]
    stack = catalog.load("diffusion_stack")
    assert stack.vae is None  # smoke's base model works in pixel space
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=4,
    )
    picture = next(iter(catalog.load("raw_images").values()))()
    unet = build_unet(
        sample_size=picture.width // 2,  # the VAE halves the side
        in_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        cross_attention_dim=stack.clip.config.text_config.hidden_size,
        attention_head_dim=2,
        norm_num_groups=4,
        seed=0,
    )
    params = params.model_copy(
        update={
            "variants": {"prefgen": ["e_sem_hat", "e_core", "e_img"]},
            "checkpoint_root": str(tmp_path),
            "train": params.train.model_copy(update={"max_steps": 1}),
        }
    )
    branches, report = train_user_branches(
        catalog.load("user_conditions"),
        catalog.load("images"),
        catalog.load("interactions"),
        catalog.load("raw_images"),
        replace(stack, unet=unet, vae=vae),
        params,
    )
    assert set(branches.adapters) == {"prefgen"}
    assert report["variants"]["prefgen"]["said"] == ["e_sem_hat"]
    assert report["variants"]["prefgen"]["steps"] == 1
    assert np.isfinite(report["variants"]["prefgen"]["learning_curve"][-1]["loss"])


def test_only_parts_that_name_attributes_can_be_said(smoke_diffused, smoke_project, monkeypatch):
    monkeypatch.chdir(smoke_project)
    bootstrap_project(smoke_project)
    with KedroSession.create(project_path=smoke_project, env="smoke") as session:
        context = session.load_context()
        catalog, params = context.catalog, context.params["diffusion"]
    params = params.model_copy(update={"said_parts": ["e_sem_hat", "e_core"]})
    (node,) = [n for n in pipelines["diffusion"].nodes if n.func is make_user_conditions]
    inputs = [catalog.load(name) for name in node.inputs if not name.startswith("params:")]
    with pytest.raises(ValueError, match=r"said_parts \['e_core'\] name no attributes"):
        make_user_conditions(*inputs, params)


def test_a_variant_says_its_said_parts_and_its_branch_reads_the_rest(smoke_project):
    bootstrap_project(smoke_project)
    with KedroSession.create(project_path=smoke_project, env="smoke") as session:
        params = DiffusionParams.model_validate(session.load_context().params["diffusion"])
    assert params.said("prefgen") == ["e_sem_hat"]
    assert params.branch_parts("prefgen") == ["e_core", "e_img"]
    assert params.said("prefgen_no_sem") == [] and params.branch_parts("oracle_taste") == []
