"""``diffusion`` and ``evaluation`` on ``smoke`` with real users (the smoke world's tables
rewritten as the Pick-a-Pic ingestion writes them, ``smoke_real_users``): no oracle metric
anywhere, the judge's and CLIP's present and finite, and every prompt the caption of one of
the user's liked images outside the context its condition comes from."""

import json
import math

import pandas as pd
import pytest
from kedro.framework.project import pipelines
from kedro.framework.session import KedroSession
from kedro.framework.startup import bootstrap_project

from prefgen_kedro.models.user_adapter import UserBranches
from prefgen_kedro.pipelines.diffusion.nodes import make_user_conditions

ORACLE_METRICS = {"like_rate", "mean_utility", "utility", "subject_accuracy"}
ORACLE_COLUMNS = {"utility", "liked", "subject_correct"}
JUDGE_AND_CLIP = {"judge_p_yes", "clip_score", "clip_i"}


@pytest.fixture(scope="module")
def tables(smoke_real_users):
    return {
        name: pd.read_parquet(smoke_real_users / "02_intermediate" / f"{name}.parquet")
        for name in ("images", "interactions")
    }


def test_validation_scores_real_users_with_the_judge_and_clip(smoke_real_users):
    conditions = pd.read_parquet(smoke_real_users / "05_model_input" / "user_conditions.parquet")
    assert "true_sem" not in conditions
    branches = UserBranches.from_pretrained(smoke_real_users / "06_models" / "user_branches")
    assert "oracle_taste" not in branches.adapters

    metrics = json.loads((smoke_real_users / "08_reporting" / "diffusion_metrics.json").read_text())
    assert metrics["users"] > 0 and metrics["images_per_method"] > 0
    for method in {*branches.adapters, "base", "viper_style"}:
        scores = metrics[method]
        assert not ORACLE_METRICS & set(scores)
        assert set(scores) >= JUDGE_AND_CLIP
        assert all(math.isfinite(scores[k]) for k in JUDGE_AND_CLIP)
        assert 0.0 <= scores["judge_p_yes"] <= 1.0
        assert scores["images_per_second"] > 0


def test_prompts_are_held_out_captions_of_the_users_liked_images(smoke_real_users, tables):
    cases = pd.read_parquet(smoke_real_users / "05_model_input" / "evaluation_cases.parquet")
    caption = tables["images"].set_index("image_id")["caption"]
    interactions = tables["interactions"]
    liked = set(
        interactions.loc[interactions["label"] == 1, ["user_id", "image_id"]].itertuples(
            index=False, name=None
        )
    )
    assert len(cases) > 0
    for case in cases.itertuples():
        assert case.prompt == caption[case.real_image_id]
        assert (case.user_id, case.real_image_id) in liked
        assert case.real_image_id not in {*case.liked, *case.disliked}

    generations = pd.read_csv(
        smoke_real_users / "07_model_output" / "generations.csv", dtype={"user_id": str}
    )
    methods = generations[generations["method"] != "real"].groupby("method")
    drawn = {tuple(map(tuple, g[["user_id", "prompt", "seed"]].to_numpy())) for _, g in methods}
    assert len(drawn) == 1  # the same users, prompts and seeds for every method
    real = generations[generations["method"] == "real"]
    assert real["prompt"].tolist() == cases["prompt"].tolist()  # each prompt's own image


def test_the_benchmark_has_judge_and_clip_metrics_and_no_oracle_ones(smoke_real_users):
    reporting = smoke_real_users / "08_reporting"
    scores = pd.read_csv(reporting / "generation_scores.csv")
    assert not ORACLE_COLUMNS & set(scores)
    assert scores[list(JUDGE_AND_CLIP)].notna().all().all()

    metrics = pd.read_csv(reporting / "metrics.csv")
    assert not {*ORACLE_METRICS, "judge_oracle_agreement"} & set(metrics["metric"])
    for method in {*metrics["method"]}:
        measured = set(metrics.loc[metrics["method"] == method, "metric"])
        assert {*JUDGE_AND_CLIP, "fid", "kid"} <= measured
    assert metrics["mean"].map(math.isfinite).all()
    assert "win_rate_of_prefgen" in set(metrics["metric"])

    audit = json.loads((reporting / "taste_signal_audit.json").read_text())
    assert set(audit) == {"provenance"}  # no audit of real users: no known taste
    markdown = (reporting / "benchmark.md").read_text()
    assert "judge P(yes)" in markdown and "CLIP score" in markdown
    # no oracle column, not even an empty one
    assert "oracle like-rate %" not in markdown and "subject acc. %" not in markdown


def test_a_real_users_phrases_cannot_be_said_in_the_prompt(smoke_real_users, monkeypatch):
    """Their phrases are whole captions: a condition made with ``said_parts`` refuses,
    naming the key that says nothing (as ``conf/gpu`` does)."""
    project = smoke_real_users.parents[1]
    monkeypatch.chdir(project)
    bootstrap_project(project)
    with KedroSession.create(project_path=project, env="smoke") as session:
        context = session.load_context()
        catalog, params = context.catalog, context.params["diffusion"]
    params = params.model_copy(update={"variants": {"prefgen": ["e_sem_hat", "e_core"]}})
    (node,) = [n for n in pipelines["diffusion"].nodes if n.func is make_user_conditions]
    inputs = [catalog.load(name) for name in node.inputs if not name.startswith("params:")]
    with pytest.raises(ValueError, match=r"set diffusion.said_parts to \[\]"):
        make_user_conditions(*inputs, params)
