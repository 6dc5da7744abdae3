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
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from matplotlib.figure import Figure
from PIL import Image
from pydantic import Field
from transformers import CLIPModel, PreTrainedModel, PreTrainedTokenizerBase, ProcessorMixin

from prefgen_kedro.models.clip import EvaluationClip
from prefgen_kedro.models.fid import ReferenceStatistics, inception_features
from prefgen_kedro.models.metrics import (
    bootstrap_ci,
    bootstrap_set_statistic,
    per_user_wins,
)
from prefgen_kedro.models.oracle import AttributeOracle
from prefgen_kedro.models.probes import fit_linear_probe, mean_auc
from prefgen_kedro.models.user_adapter import UserBranches
from prefgen_kedro.models.user_generation import (
    draw_prompts,
    image_prompts,
    oracle_preference,
    preference_scores,
    sample_methods,
)
from prefgen_kedro.models.vqa import context_summary
from prefgen_kedro.pipelines.diffusion.nodes import DiffusionParams, preference_reader
from prefgen_kedro.pipelines.params import StrictParams
from prefgen_kedro.pipelines.pictures import (
    context_pictures,
    load_pictures,
    preference_contexts,
)
from prefgen_kedro.pipelines.probing.nodes import probe_figure
from prefgen_kedro.report import Report, labelled_rows, metric_table
from prefgen_kedro.world.agent_world import simulated_users, tastes_are_known
from prefgen_kedro.world.vocabulary import ATTRIBUTE_IDS

REAL = "real"
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
# The signal ladder: from the user's own liked images down to PrefGen, each rung with the
# taste AUC of its condition and its like-rate, so a reader sees where the taste is lost.
SIGNAL_LADDER = (REAL, "oracle_taste", "oracle_state", "prefgen")


class BootstrapParams(StrictParams):
    resamples: int = Field(ge=10)  # per-user means (cheap)
    set_resamples: int = Field(ge=10)  # FID/KID (one Fréchet distance each)
    level: float = Field(gt=0.0, lt=1.0)
    seed: int


class EvaluationParams(StrictParams):
    split: str
    users: int | None = Field(default=None, ge=1)  # the first this many (by id); null: all
    prompts_per_user: int = Field(ge=1)
    seed: int
    methods: list[str]
    references: list[str]  # rows shown for scale, never ranked (e.g. oracle_taste)
    reference_method: str  # the method whose per-user win-rate over the others is reported
    fid_reference_split: str
    fid_reference_size: int = Field(ge=2)  # renders drawn (with ``seed``) from that split
    fid_cache_root: str
    inception_batch_size: int = Field(ge=1)
    judge_batch_size: int = Field(ge=1)
    bootstrap: BootstrapParams
    grid_users: int = Field(ge=1)


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
        taste_reader=preference_reader(tuned_mllm, mllm_processor, diffusion.viper_style),
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
    pixels = _pictures_of(generations, generated_images)
    canonical = evaluation_cases.drop_duplicates("user_id").set_index("user_id")
    judge = preference_reader(
        tuned_mllm, mllm_processor, diffusion.viper_style, params.judge_batch_size
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
        _pictures_of(generations, generated_images).transpose(0, 3, 1, 2),
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


def _pictures_of(generations: pd.DataFrame, generated_images: Mapping[str, Callable]) -> np.ndarray:
    """The ``generations`` images in table order, uint8 (N, H, W, 3)."""
    missing = sorted(set(generations["image"]) - set(generated_images))
    if missing:
        raise KeyError(f"generated_images has no file for generations rows {missing[:5]}")
    return np.stack(
        [np.asarray(generated_images[key]().convert("RGB")) for key in generations["image"]]
    )


# metric -> (column title, higher is better, display scale)
PREFERENCE_COLUMNS = {
    "like_rate": ("oracle like-rate %", True, 100),
    "utility": ("oracle utility", True, 1),
    "judge_p_yes": ("judge P(yes)", True, 1),
    "clip_i": ("CLIP-I", True, 1),
}
FIDELITY_COLUMNS = {
    "clip_score": ("CLIP score", True, 1),
    "subject_accuracy": ("subject acc. %", True, 100),
    "fid": ("FID ↓", False, 1),
    "kid": ("KID ×1000 ↓", False, 1000),
}
BASELINES = ("base", "ip_adapter", "mean_clip", "viper_style")


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
    links (``benchmark/<name>.png``); ``input_lineage`` (``hooks.ProvenanceHook``) gives the
    digests of the models its inputs were made from."""
    ours = params.reference_method
    present = set(metrics["method"])
    methods = [m for m in (REAL, *BASELINES, ours, *params.references) if m in present]
    ablations = [m for m in metrics["method"].unique() if m.startswith(f"{ours}_")]
    contenders = [m for m in methods if m not in (REAL, *params.references)]
    n_users = evaluation_cases["user_id"].nunique()
    measured = set(metrics["metric"])
    # Real users have no oracle: its columns are left out rather than shown empty.
    preference_columns = {k: v for k, v in PREFERENCE_COLUMNS.items() if k in measured}
    fidelity_columns = {k: v for k, v in FIDELITY_COLUMNS.items() if k in measured}
    simulated = "like_rate" in measured
    prompts, drawn, reference_kind = (
        ("subject-only prompts", "subjects", "renders")
        if simulated
        else (
            "prompts, each the caption of one of the user's liked images outside its context",
            "prompts",
            "images",
        )
    )
    real_row = (
        "each user's own held-out liked renders: a ceiling for the preference columns"
        if simulated
        else "the liked image each prompt is the caption of, the user's own choice for it: "
        "a reference for every column"
    )
    report = Report("PrefGen benchmark")
    report.paragraph(
        f"Made by `{run_info['command']}` (Kedro env `{run_info['env']}`) on "
        f"{run_info['started']}. {n_users} held-out `{params.split}` users, each with its "
        f"canonical context of {len(evaluation_cases['liked'].iloc[0])} liked + "
        f"{len(evaluation_cases['disliked'].iloc[0])} disliked images and "
        f"{params.prompts_per_user} {prompts}: {len(evaluation_cases)} images per method, "
        f"the same {drawn} and seeds for every method (prompt seed {params.seed}). "
        f"Sampling: DDIM {diffusion.sampling.num_inference_steps} steps, prompt guidance "
        f"{diffusion.sampling.guidance_scale}, user guidance "
        f"{diffusion.sampling.user_guidance_scale}, {diffusion.sampling.mixed_precision} "
        f"autocast. Brackets: {params.bootstrap.level:.0%} percentile bootstrap over users "
        f"({params.bootstrap.resamples} resamples; FID/KID {params.bootstrap.set_resamples}, "
        "moved by the bootstrap's bias estimate; "
        f"bootstrap seed {params.bootstrap.seed}). FID/KID: standard FID Inception, against "
        f"{params.fid_reference_size} {reference_kind} of the `{params.fid_reference_split}` "
        "users; "
        "with this few images FID "
        "carries a large small-sample bias, so compare methods with each other, not with "
        f"published FIDs. `real` is {real_row}, not a method."
        + (
            " `oracle_taste` is the user branch fed a perfect ê_sem (the text-space states of "
            "the simulated user's liked-attribute phrases) and `oracle_state` a perfect summary "
            "of the context through PrefGen's aligner: what the branch makes of perfect "
            "information, not methods either."
            if "oracle_taste" in present
            else ""
        )
        + " Bold: best among methods."
    )
    report.heading("Preference alignment")
    report.table(*metric_table(metrics, methods, preference_columns, contenders))
    report.heading("Fidelity and prompt adherence")
    report.table(*metric_table(metrics, methods, fidelity_columns, contenders))
    report.paragraph(_verdict(metrics, ours))
    ladder = [m for m in SIGNAL_LADDER if m in present]
    if "taste_auc" in measured and len(ladder) > 1:
        report.heading("Signal ladder")
        report.paragraph(
            "Where a user's taste is lost, from the user's own liked images down to PrefGen. "
            "Taste AUC: how well a linear probe reads the user's liked attributes from what the "
            'row is conditioned on (see "Where the signal comes from"; for `real`, the '
            "context itself by the counting rule). `oracle_taste` is the branch fed a perfect "
            "ê_sem; `oracle_state` is a perfect summary of the context (its attribute counts, "
            "liked minus disliked) through PrefGen's MMD aligner and branch recipe. Reference "
            "rows are never ranked."
        )
        report.table(
            *metric_table(
                metrics,
                ladder,
                {
                    "taste_auc": ("taste AUC of the condition", True, 1),
                    "like_rate": ("oracle like-rate %", True, 100),
                },
                [],
            )
        )
    win = f"win_rate_of_{ours}"
    if win in set(metrics["metric"]):
        report.heading(f"Per-user win-rate of `{ours}`")
        others = [m for m in (*BASELINES, *ablations, *params.references) if m in present]
        report.table(*metric_table(metrics, others, {win: (f"{ours} wins %", True, 100)}, []))
    if ablations:
        report.heading("Ablations")
        columns = {**preference_columns, **fidelity_columns}
        report.table(*metric_table(metrics, [ours, *ablations], columns))
    if "judge_oracle_agreement" in set(metrics["metric"]):
        report.heading("How far to trust the judge")
        report.paragraph(
            "Share of images where the MLLM judge (P(yes) > 0.5) agrees with the simulated "
            "user's noiseless verdict; 50 % is a coin."
        )
        agreement = {"judge_oracle_agreement": ("judge–oracle agreement %", True, 100)}
        report.table(*metric_table(metrics, methods + ablations, agreement, []))
    report.figure("bars", _bar_figure(metrics, [*methods, *ablations]), "Means with 95 % CIs.")
    report.heading("Where the signal comes from")
    if taste_signal_audit.get("auc"):
        report.paragraph(
            "How much of each test user's taste survives each stage: a multi-label linear "
            "probe reads the user's liked attributes from one context's vector (trained on "
            "training users), mean ROC AUC over attributes (0.5: nothing). The counting "
            "rule scores attributes by their count in the liked minus the disliked context "
            "(the ground truth the context shows: the ceiling). `mean_clip` and `e_img` are "
            "CLIP image embeddings; `e_core`, `e_sem_hat` (MMD) and `e_sem_hat_no_mmd` (MSE) "
            "come from the MLLM's hidden states."
        )
        report.table(
            pd.DataFrame(
                {"taste AUC": [f"{v:.3f}" for v in taste_signal_audit["auc"].values()]},
                index=list(taste_signal_audit["auc"]),
            )
        )
    report.figure(
        "probe_accuracy_by_layer",
        probe_figure(probe_metrics, layer_selection),
        "Linear-probe accuracy by MLLM layer (the bands are the layers PrefGen reads).",
    )
    report.figure(
        "alignment_mmd_vs_mse",
        _alignment_figure(alignment_metrics),
        "Aligned semantic embeddings: MMD keeps users apart where MSE collapses them.",
    )
    report.heading("Images")
    speeds = generation_report["images_per_second"]
    report.paragraph(
        "Sampling speed (images/s, this machine): "
        + ", ".join(f"{method} {speed}" for method, speed in speeds.items())
        + "."
    )
    for user_id in evaluation_cases["user_id"].unique()[: params.grid_users]:
        report.figure(
            f"grid_{user_id}",
            _user_grid(user_id, generations, generated_images, evaluation_cases, raw_images),
            f"User {user_id}: liked and disliked context, then each method's images for "
            "the prompts "
            + ", ".join(evaluation_cases.loc[evaluation_cases["user_id"] == user_id, "subject"])
            + " (same seeds; `real` shows held-out liked renders).",
        )
    if run_info.get("nodes"):
        report.heading("Where the time went")
        nodes = pd.DataFrame(run_info["nodes"]).set_index("node")
        report.paragraph(
            f"Wall time and peak resident memory of every node this run finished before the "
            f"report ({nodes['seconds'].sum():.0f} s in all, this machine); the whole run's "
            "table is `timings.json` beside this report."
        )
        report.table(
            pd.DataFrame(
                {
                    "seconds": nodes["seconds"].map("{:.1f}".format),
                    "peak RSS GB": nodes["peak_rss_gb"].map("{:.2f}".format),
                },
                index=nodes.index,
            )
        )
    if input_lineage.get("models"):
        report.heading("Models evaluated")
        report.paragraph(
            "Every model the figures above were made from, by the digest of its files; each "
            "model folder's `provenance.json` says what it was made from in turn. A run whose "
            "inputs come from different versions of one of them stops instead of reporting."
        )
        models = input_lineage["models"]
        report.table(pd.DataFrame({"digest": list(models.values())}, index=list(models)))
    return report.to_markdown("benchmark"), report.to_html(), report.figures


def _verdict(metrics: pd.DataFrame, ours: str) -> str:
    """The project's bar for PrefGen, stated from the measured numbers."""
    indexed = metrics.set_index(["method", "metric"])["mean"]
    if (ours, "like_rate") not in indexed or ("base", "like_rate") not in indexed:
        return "No oracle like-rate for both the reference method and `base`: no verdict."
    gain = 100 * (indexed[(ours, "like_rate")] - indexed[("base", "like_rate")])
    beaten = [
        m
        for m in BASELINES
        if (m, "like_rate") in indexed and indexed[(m, "like_rate")] >= indexed[(ours, "like_rate")]
    ]
    fid_ratio = indexed.get((ours, "fid"), np.nan) / indexed.get(("base", "fid"), np.nan)
    return (
        f"Verdict: `{ours}` changes the oracle like-rate by {gain:+.1f} points over `base` "
        f"(bar: +25, {'met' if gain >= 25 else 'not met'}); "
        + (
            "it beats every baseline"
            if not beaten
            else f"baselines at or above it: {', '.join(beaten)}"
        )
        + f"; its FID is {fid_ratio:.2f}× `base`'s (bar: ≤ 1.10, "
        f"{'met' if fid_ratio <= 1.10 else 'not met'})."
    )


def _bar_figure(metrics: pd.DataFrame, methods: list[str]) -> Figure:
    shown = [("like_rate", "oracle like-rate"), ("clip_score", "CLIP score"), ("fid", "FID")]
    shown = [(m, t) for m, t in shown if m in set(metrics["metric"])]
    figure = Figure(figsize=(4 * len(shown), 3.6))
    for k, (metric, title) in enumerate(shown):
        axis = figure.add_subplot(1, len(shown), k + 1)
        rows = metrics[metrics["metric"] == metric].set_index("method").reindex(methods).dropna()
        errors = [rows["mean"] - rows["ci_low"], rows["ci_high"] - rows["mean"]]
        axis.bar(range(len(rows)), rows["mean"], yerr=errors, capsize=3, color="tab:blue")
        axis.set_xticks(range(len(rows)), rows.index, rotation=60, ha="right", fontsize=7)
        axis.set_title(title)
        axis.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    return figure


def _alignment_figure(alignment_metrics: dict) -> Figure:
    figure = Figure(figsize=(8, 3.2))
    diversity, recall = figure.add_subplot(1, 2, 1), figure.add_subplot(1, 2, 2)
    names = ["prefgen", "prefgen_no_mmd"]
    labels = ["targets", "MMD (prefgen)", "MSE (no_mmd)"]
    diversity.bar(
        labels,
        [alignment_metrics["targets"]["diversity"]]
        + [alignment_metrics[n]["diversity_across_users"] for n in names],
        color=["grey", "tab:blue", "tab:orange"],
    )
    diversity.set_title("diversity of the tokens (cosine distance)", fontsize=9)
    recall.bar(
        labels[1:],
        [100 * alignment_metrics[n]["retrieval"]["recall_at_5"] for n in names],
        color=["tab:blue", "tab:orange"],
    )
    recall.set_title("phrase retrieval recall@5 %", fontsize=9)
    figure.tight_layout()
    return figure


def _user_grid(user_id, generations, generated_images, evaluation_cases, raw_images) -> Image.Image:
    case = evaluation_cases[evaluation_cases["user_id"] == user_id].iloc[0]
    context = load_pictures({i: raw_images[i] for i in [*case["liked"], *case["disliked"]]})
    rows = [
        ("liked", [context[i] for i in case["liked"]]),
        ("disliked", [context[i] for i in case["disliked"]]),
    ]
    mine = generations[generations["user_id"] == user_id]
    for method, table in mine.groupby("method", sort=False):
        rows.append((method, list(_pictures_of(table, generated_images))))
    return labelled_rows(rows)


# What the taste audit probes, where a run has it: CLIP image embeddings, the MLLM's states,
# every aligner's part, and the perfect ê_sem.
AUDITED_PARTS = (
    "mean_clip",
    "e_img",
    "e_core",
    "e_sem",
    "e_sem_hat",
    "e_sem_hat_no_mmd",
    "oracle_state_hat",
    "true_sem",
)


def audit_taste_signal(
    user_conditions: pd.DataFrame,
    users: pd.DataFrame,
    images: pd.DataFrame,
    params: EvaluationParams,
) -> dict:
    """How much of each user's taste every stage's output still carries: for each source,
    a multi-label linear probe predicts the user's liked attributes from one context's
    vector (trained on training users' contexts, tested on ``split`` users' contexts) and
    its mean ROC AUC is reported (0.5: nothing). The counting rule on the context images'
    true attributes is the ceiling the context allows. Agent world only (real users have
    no known attributes): elsewhere an empty audit."""
    if not tastes_are_known(users):
        return {}
    columns = {a: i for i, a in enumerate(ATTRIBUTE_IDS)}
    liked = users.set_index("user_id")["liked_attributes"]
    shown = images.set_index("image_id")["attributes"]

    def taste(rows: pd.DataFrame) -> torch.Tensor:
        targets = torch.zeros(len(rows), len(columns))
        for r, user_id in enumerate(rows["user_id"]):
            targets[r, [columns[a] for a in liked[user_id]]] = 1.0
        return targets

    train = user_conditions[user_conditions["split"] == "train"]
    test = user_conditions[user_conditions["split"] == params.split]
    counting_rule = np.stack(
        [
            context_summary(shown[list(liked_ids)], shown[list(disliked_ids)])
            for liked_ids, disliked_ids in zip(test["liked"], test["disliked"], strict=True)
        ]
    )
    audit = {
        "split": params.split,
        "users": int(test["user_id"].nunique()),
        "contexts": len(test),
        "auc": {"counting_rule": mean_auc(torch.from_numpy(counting_rule), taste(test))},
    }
    for part in (part for part in AUDITED_PARTS if part in user_conditions):
        probe = fit_linear_probe(
            torch.from_numpy(np.stack(train[part].to_list())).float(),
            taste(train),
            len(columns),
            seed=params.seed,
        )
        scores = probe.logits(torch.from_numpy(np.stack(test[part].to_list())).float())
        audit["auc"][part] = mean_auc(scores, taste(test))
    return audit
