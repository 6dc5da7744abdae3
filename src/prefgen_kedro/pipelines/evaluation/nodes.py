"""Nodes of ``evaluation``: the benchmark of DESIGN.md §5 on held-out test users.

Every method draws the same (prompt, seed) pairs for each test user's canonical context;
``real`` (the user's own held-out liked images) is a reference row, not a method. Each
image is scored per user (CLIP, judge, and the oracle where tastes are known), FID/KID are
computed per method against the images of other users, and every figure gets a bootstrap
interval over users.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping

import numpy as np
import pandas as pd
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from PIL import Image
from transformers import CLIPModel, PreTrainedModel, PreTrainedTokenizerBase, ProcessorMixin

from prefgen_kedro.benchmark_report import REAL, benchmark_report
from prefgen_kedro.data.pictures import (
    context_pictures,
    generated_pictures,
    load_pictures,
    preference_contexts,
)
from prefgen_kedro.models.clip import EvaluationClip
from prefgen_kedro.models.fid import ReferenceStatistics, inception_features
from prefgen_kedro.models.metrics import (
    bootstrap_ci,
    bootstrap_set_statistic,
    per_user_wins,
)
from prefgen_kedro.models.mllm import MllmPreferenceModel
from prefgen_kedro.models.oracle import AttributeOracle
from prefgen_kedro.models.user_adapter import UserBranches
from prefgen_kedro.models.user_generation import (
    draw_prompts,
    image_prompts,
    oracle_preference,
    preference_scores,
    sample_methods,
)
from prefgen_kedro.params import DiffusionParams, EvaluationParams
from prefgen_kedro.world.agent_world import simulated_users, tastes_are_known

# The taste-audit source behind each row: what the method is conditioned on (for ``real``,
# the context itself, read by the counting rule: the most any condition can carry).
CONDITIONED_ON = {
    REAL: "counting_rule",
    "oracle_taste": "true_sem",
    "oracle_state": "oracle_state_hat",
    "prefgen": "e_sem_hat",
    "prefgen_no_mmd": "e_sem_hat_no_mmd",
    "ip_adapter": "e_img",
    "mean_clip": "mean_clip",
}


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
    base_unet: UNet2DConditionModel,
    base_vae: AutoencoderKL | None,
    noise_scheduler: DDPMScheduler,
    conditioning_clip: CLIPModel,
    clip_tokenizer: PreTrainedTokenizerBase,
    tuned_mllm: PreTrainedModel,
    mllm_processor: ProcessorMixin,
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
        unet=base_unet.float().eval(),
        scheduler=noise_scheduler,
        text_encoder=conditioning_clip.text_model.float().eval(),
        tokenizer=clip_tokenizer,
        branches=user_branches.adapters,
        taste_reader=MllmPreferenceModel(
            tuned_mllm,
            mllm_processor,
            slot_positions=diffusion.viper_style.mllm_slot_positions,
            batch_size=diffusion.viper_style.batch_size,
        ),
        contexts=preference_contexts(canonical, pictures),
        viper_beta=diffusion.viper_style.beta,
        sampling=diffusion.sampling.model_dump(),
        vae=base_vae,
    )
    report = {
        "cases": len(evaluation_cases),
        "images_per_second": samples.images_per_second,
        "viper_style_tastes": {
            user: {"liked": liked, "disliked": disliked}
            for user, (liked, disliked) in samples.tastes.items()
        },
    }
    generated = dict(samples.images)
    # At the generated size: a latent UNet's images (SD 1.5: 512 px) can be larger than the
    # ingested ones (Pick-a-Pic: 256 px), and every scorer takes one stack of images.
    height, width = next(iter(generated.values())).shape[1:3]
    generated[REAL] = np.stack(
        [_resized(pictures[i], width, height) for i in evaluation_cases["real_image_id"]]
    )
    subject_of = images.set_index("image_id")["subject"]
    prompt_of = image_prompts(images)
    rows, files = [], {}
    for method, pixels in generated.items():
        real = method == REAL
        for case, picture in zip(evaluation_cases.itertuples(), pixels, strict=True):
            key = f"{method}/{case.user_id}_{case.case}"
            files[key] = Image.fromarray(picture)
            rows.append(
                {
                    "method": method,
                    "user_id": case.user_id,
                    "case": case.case,
                    "subject": subject_of[case.real_image_id] if real else case.subject,
                    "prompt": prompt_of[case.real_image_id] if real else case.prompt,
                    "seed": None if real else case.seed,
                    "image": key,
                }
            )
    return pd.DataFrame(rows), files, report


def _resized(picture: np.ndarray, width: int, height: int) -> np.ndarray:
    if picture.shape[:2] == (height, width):
        return picture
    return np.asarray(Image.fromarray(picture).resize((width, height), Image.Resampling.LANCZOS))


def score_generations(
    generations: pd.DataFrame,
    generated_images: Mapping[str, Callable],
    evaluation_cases: pd.DataFrame,
    users: pd.DataFrame,
    raw_images: Mapping[str, Callable],
    evaluation_clip: EvaluationClip,
    attribute_oracle: AttributeOracle,
    tuned_mllm: PreTrainedModel,
    mllm_processor: ProcessorMixin,
    diffusion: DiffusionParams,
    params: EvaluationParams,
) -> pd.DataFrame:
    """Per image: CLIP score (prompt vs image), CLIP-I (liked minus disliked context), the
    MLLM judge's P(yes) given the user's context (``preference_scores``), and in the agent
    world the oracle's utility, liked verdict and subject check."""
    pixels = generated_pictures(generations, generated_images)
    canonical = evaluation_cases.drop_duplicates("user_id").set_index("user_id")
    judge = MllmPreferenceModel(
        tuned_mllm,
        mllm_processor,
        slot_positions=diffusion.viper_style.mllm_slot_positions,
        batch_size=params.judge_batch_size,
    )
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
    reference_users = set(users.loc[users["split"] == params.fid_reference_split, "user_id"])
    available = sorted(
        set(interactions.loc[interactions["user_id"].isin(reference_users), "image_id"])
    )
    if len(available) < params.fid_reference_size:
        raise ValueError(
            f"evaluation.fid_reference_split={params.fid_reference_split!r} has "
            f"{len(available)} renders; fid_reference_size={params.fid_reference_size} "
            "needs that many"
        )
    rng = np.random.default_rng(params.seed)
    reference_ids = sorted(rng.choice(available, params.fid_reference_size, replace=False))
    pictures = load_pictures({i: raw_images[i] for i in reference_ids})
    reference = np.stack([pictures[i] for i in reference_ids])
    reference_features = inception_features(
        reference.transpose(0, 3, 1, 2),
        batch_size=params.inception_batch_size,
        # The name is the content: new renders get new features, never stale ones.
        cache_name="reference-" + hashlib.sha256(reference.tobytes()).hexdigest()[:16],
        cache_root=params.fid_cache_root,
    )
    features = inception_features(
        generated_pictures(generations, generated_images).transpose(0, 3, 1, 2),
        batch_size=params.inception_batch_size,
    )
    reference_statistics = ReferenceStatistics(reference_features)
    statistics = {"fid": (reference_statistics.fid, 0.0), "kid": (reference_statistics.kid, None)}
    rows = []
    for method, table in generations.groupby("method", sort=False):
        groups = [features[g.index] for _, g in table.groupby("user_id")]
        for metric, (statistic, floor) in statistics.items():
            rows.append(
                {
                    "method": method,
                    "metric": metric,
                    **bootstrap_set_statistic(
                        groups,
                        statistic,
                        resamples=params.bootstrap.set_resamples,
                        level=params.bootstrap.level,
                        seed=params.bootstrap.seed,
                        floor=floor,
                    ),
                }
            )
    return pd.DataFrame(rows)


def summarize_metrics(
    generation_scores: pd.DataFrame,
    fidelity: pd.DataFrame,
    taste_signal_audit: dict,
    params: EvaluationParams,
) -> pd.DataFrame:
    """``metrics``: one row per method × metric (mean, ci_low, ci_high, n over users),
    including the per-user win-rate of ``reference_method`` over each other method (oracle
    utility in the agent world, judge P(yes) otherwise), judge–oracle agreement and, where
    the audit measured it, the taste AUC of what each method is conditioned on
    (``CONDITIONED_ON``; no interval: one probe over all users)."""
    scores = generation_scores.copy()
    per_image = ["clip_score", "clip_i", "judge_p_yes"]
    if "utility" in scores:
        scores["like_rate"] = scores["liked"].astype(float)
        scores["subject_accuracy"] = scores["subject_correct"].astype(float)
        scores["judge_oracle_agreement"] = (
            (scores["judge_p_yes"] > 0.5) == scores["liked"]
        ).astype(float)
        per_image = [
            "like_rate",
            "utility",
            *per_image,
            "subject_accuracy",
            "judge_oracle_agreement",
        ]
    per_user = scores.groupby(["method", "user_id"], sort=False)[per_image].mean()
    rows = [
        {"method": method, "metric": metric, **_ci(per_user.loc[method, metric], params)}
        for method in scores["method"].unique()
        for metric in per_image
    ]
    preference = "utility" if "utility" in scores else "judge_p_yes"
    ours = params.reference_method
    if ours in per_user.index.get_level_values("method"):
        for method in scores["method"].unique():
            if method in (ours, REAL):
                continue
            wins = per_user_wins(
                per_user.loc[ours, preference].to_dict(), per_user.loc[method, preference].to_dict()
            )
            rows.append(
                {
                    "method": method,
                    "metric": f"win_rate_of_{ours}",
                    **_ci(list(wins.values()), params),
                }
            )
    for method, part in CONDITIONED_ON.items():
        if method in set(scores["method"]) and part in taste_signal_audit.get("auc", {}):
            auc = taste_signal_audit["auc"][part]
            rows.append(
                {
                    "method": method,
                    "metric": "taste_auc",
                    "mean": auc,
                    "ci_low": np.nan,
                    "ci_high": np.nan,
                    "n": taste_signal_audit["users"],
                }
            )
    return pd.concat([pd.DataFrame(rows), fidelity], ignore_index=True)


def _ci(values, params: EvaluationParams) -> dict[str, float]:
    return bootstrap_ci(
        np.asarray(values, dtype=float),
        resamples=params.bootstrap.resamples,
        level=params.bootstrap.level,
        seed=params.bootstrap.seed,
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
