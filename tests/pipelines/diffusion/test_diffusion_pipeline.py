"""The ``diffusion`` pipeline on ``smoke``: conditions without copying, every variant
trained and scored, the branch/bare step ratio measured."""

import json

import pandas as pd

from prefgen_kedro.models.user_adapter import UserBranches


def test_diffusion_runs_on_smoke(smoke_diffused):
    data = smoke_diffused

    conditions = pd.read_parquet(data / "05_model_input" / "user_conditions.parquet")
    users = pd.read_parquet(data / "02_intermediate" / "users.parquet")
    assert set(conditions["user_id"]) == set(users["user_id"])
    parts = {"e_sem_hat", "e_sem_hat_no_mmd", "e_core", "e_img", "mean_clip", "true_sem"}
    assert parts <= set(conditions)
    # a perfect ê_sem: one text-space state (e_sem_hat's width) per liked attribute
    row = conditions.iloc[0]
    liked = users.set_index("user_id").loc[row["user_id"], "liked_attributes"]
    assert len(row["true_sem"]) == len(liked) * len(row["e_sem_hat"])

    branches = UserBranches.from_pretrained(data / "06_models" / "user_branches")
    expected = {
        "prefgen",
        "prefgen_no_mmd",
        "prefgen_no_core",
        "prefgen_no_sem",
        "prefgen_no_img",
        "ip_adapter",
        "mean_clip",
        "oracle_taste",
    }
    assert set(branches.adapters) == expected
    assert branches.adapters["ip_adapter"].part_names == ["e_img"]

    metrics = json.loads((data / "08_reporting" / "diffusion_metrics.json").read_text())
    for method in expected | {"base", "viper_style"}:
        assert 0 <= metrics[method]["like_rate"] <= 1
        assert metrics[method]["images_per_second"] > 0
    assert 0 <= metrics["viper_style"]["taste_answers_read"] <= 1
    steps = metrics["training"]["step_seconds"]
    assert steps["ratio_branch_to_bare"] > 0
    assert metrics["training"]["training_samples"] > 0
    assert (data / "08_reporting" / "user_branch_grid.png").stat().st_size > 0
