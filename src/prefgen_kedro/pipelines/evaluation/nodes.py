"""Nodes of ``evaluation``: the benchmark of DESIGN.md §5 on held-out test users.

Every method draws the same (prompt, seed) pairs for each test user's canonical context;
``real`` (the user's own held-out liked images) is a reference row, not a method. Each
image is scored per user (CLIP, judge, and the oracle where tastes are known), FID/KID are
computed per method against the images of other users, and every figure gets a bootstrap
interval over users.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import pandas as pd
from PIL import Image

from prefgen_kedro.benchmark import fidelity_by_method, generations_table, method_metrics
from prefgen_kedro.benchmark_report import benchmark_report
from prefgen_kedro.data.pictures import (
    context_pictures,
    generated_pictures,
    preference_contexts,
)
from prefgen_kedro.models.clip import EvaluationClip
from prefgen_kedro.models.oracle import AttributeOracle
from prefgen_kedro.models.stack import DiffusionStack, MllmWithProcessor
from prefgen_kedro.models.user_adapter import UserBranches
from prefgen_kedro.models.user_generation import (
    draw_prompts,
    oracle_preference,
    preference_scores,
    sample_methods,
)
from prefgen_kedro.params import DiffusionParams, EvaluationParams
from prefgen_kedro.world.agent_world import simulated_users, tastes_are_known


def make_evaluation_cases(
    user_conditions: pd.DataFrame,
    users: pd.DataFrame,
    images: pd.DataFrame,
    interactions: pd.DataFrame,
    params: EvaluationParams,
) -> pd.DataFrame:
    """One row per (test user, prompt): the user's canonical context and condition parts,
    the prompt and seed every method samples, and a held-out liked image of the user for
    the ``real`` row (``draw_prompts``: subject-only prompts for simulated users, held-out
    liked images' captions for real ones)."""
    canonical = (
        user_conditions[
            (user_conditions["split"] == params.split) & (user_conditions["context"] == 0)
        ]
        .set_index("user_id")
        .sort_index()
        .head(params.users)
    )
    if canonical.empty:
        raise ValueError(f"user_conditions has no canonical context of a {params.split!r} user")
    cases = draw_prompts(
        canonical,
        interactions,
        images,
        params.prompts_per_user,
        params.seed,
        subject_only=tastes_are_known(users),
    )
    return cases.join(canonical, on="user_id")


def generate_images(
    evaluation_cases: pd.DataFrame,
    user_branches: UserBranches,
    images: pd.DataFrame,
    diffusion_stack: DiffusionStack,
    foundation_mllm: MllmWithProcessor,
    raw_images: Mapping[str, Callable],
    diffusion: DiffusionParams,
    params: EvaluationParams,
) -> tuple[pd.DataFrame, dict[str, Image.Image], dict]:
    """Every method's image for every case (same prompts and seeds), plus the ``real``
    row; returns the ``generations`` table, the images keyed ``method/user_case`` and a
    report of sampling speed and what ``viper_style`` read."""
    canonical = evaluation_cases.drop_duplicates("user_id").set_index("user_id")
    pictures = context_pictures(canonical, raw_images, evaluation_cases["real_image_id"])
    samples = sample_methods(
        params.methods,
        evaluation_cases,
        stack=diffusion_stack,
        branches=user_branches.adapters,
        said={name: diffusion.said(name) for name in diffusion.active_variants},
        taste_reader=diffusion.viper_style.reader(foundation_mllm),
        contexts=preference_contexts(canonical, pictures),
        viper=diffusion.viper_style,
        sampling=diffusion.sampling.model_dump(),
    )
    generations, files = generations_table(
        samples.images, evaluation_cases, images, pictures, samples.said_prompts
    )
    return generations, files, samples.report(len(evaluation_cases))


def score_generations(
    generations: pd.DataFrame,
    generated_images: Mapping[str, Callable],
    evaluation_cases: pd.DataFrame,
    users: pd.DataFrame,
    raw_images: Mapping[str, Callable],
    evaluation_clip: EvaluationClip,
    attribute_oracle: AttributeOracle,
    tuned_mllm: MllmWithProcessor,
    diffusion: DiffusionParams,
    params: EvaluationParams,
) -> pd.DataFrame:
    """Per image: CLIP score (prompt vs image), CLIP-I (liked minus disliked context), the
    MLLM judge's P(yes) given the user's context (``preference_scores``), and in the agent
    world the oracle's utility, liked verdict and subject check."""
    pixels = generated_pictures(generations, generated_images)
    canonical = evaluation_cases.drop_duplicates("user_id").set_index("user_id")
    judge = diffusion.viper_style.reader(tuned_mllm, params.judge_batch_size)
    found = preference_scores(
        pixels,
        generations["prompt"].tolist(),
        generations["user_id"].tolist(),
        preference_contexts(canonical, context_pictures(canonical, raw_images)),
        evaluation_clip=evaluation_clip,
        judge=judge,
    )
    scores = pd.concat([generations, found.set_index(generations.index)], axis=1)
    if not tastes_are_known(users):
        return scores
    oracle = oracle_preference(
        attribute_oracle.float().eval(),
        pixels,
        generations["subject"].tolist(),
        simulated_users(users, generations["user_id"]),
    )
    return pd.concat([scores, oracle.set_index(scores.index)], axis=1)


def fidelity_metrics(
    generations: pd.DataFrame,
    generated_images: Mapping[str, Callable],
    users: pd.DataFrame,
    interactions: pd.DataFrame,
    raw_images: Mapping[str, Callable],
    params: EvaluationParams,
) -> pd.DataFrame:
    """FID and KID of each method against ``fid_reference_size`` renders of the
    ``fid_reference_split`` users (never test users), with bootstrap intervals over test
    users."""
    return fidelity_by_method(
        generations,
        generated_pictures(generations, generated_images),
        users,
        interactions,
        raw_images,
        params,
    )


def summarize_metrics(
    generation_scores: pd.DataFrame,
    fidelity: pd.DataFrame,
    taste_signal_audit: dict,
    params: EvaluationParams,
) -> pd.DataFrame:
    """``metrics``: one row per method × metric (``benchmark.method_metrics``) and the
    fidelity rows."""
    return pd.concat(
        [method_metrics(generation_scores, taste_signal_audit, params), fidelity],
        ignore_index=True,
    )


def write_benchmark_report(
    metrics: pd.DataFrame,
    generations: pd.DataFrame,
    generated_images: Mapping[str, Callable],
    evaluation_cases: pd.DataFrame,
    generation_report: dict,
    taste_signal_audit: dict,
    probe_metrics: pd.DataFrame,
    layer_selection: dict,
    alignment_metrics: dict,
    raw_images: Mapping[str, Callable],
    run_info: dict,
    input_lineage: dict,
    diffusion: DiffusionParams,
    params: EvaluationParams,
) -> tuple[str, str, dict[str, Image.Image]]:
    """``benchmark.md``, the self-contained ``benchmark.html`` and the figures the Markdown
    links (``benchmark/<name>.png``)."""
    report = benchmark_report(
        metrics,
        generations,
        generated_images,
        evaluation_cases,
        generation_report,
        taste_signal_audit,
        probe_metrics,
        layer_selection,
        alignment_metrics,
        raw_images,
        run_info,
        input_lineage,
        diffusion,
        params,
    )
    return report.to_markdown("benchmark"), report.to_html(), report.figures
