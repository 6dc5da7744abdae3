"""The benchmark's measurements (DESIGN.md §5): per-method metrics with intervals over
users, FID/KID against reference renders, and which condition part each method reads.

Every method draws the same (prompt, seed) pairs for each test user's canonical context;
``real`` (the user's own held-out liked images) is a reference row, not a method.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
from PIL import Image

from prefgen_kedro.data.pictures import load_pictures
from prefgen_kedro.models.fid import ReferenceStatistics, inception_features
from prefgen_kedro.models.metrics import bootstrap_ci, bootstrap_set_statistic, per_user_wins
from prefgen_kedro.models.user_generation import image_prompts
from prefgen_kedro.params import EvaluationParams

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


def method_metrics(
    generation_scores: pd.DataFrame, taste_signal_audit: dict, params: EvaluationParams
) -> pd.DataFrame:
    """One row per method × metric (mean, ci_low, ci_high, n over users), including the
    per-user win-rate of ``reference_method`` over each other method (oracle utility in the
    agent world, judge P(yes) otherwise), judge–oracle agreement and, where the audit
    measured it, the taste AUC of what each method is conditioned on (``CONDITIONED_ON``;
    no interval: one probe over all users)."""
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
    return pd.DataFrame(rows)


def _ci(values, params: EvaluationParams) -> dict[str, float]:
    return bootstrap_ci(
        np.asarray(values, dtype=float),
        resamples=params.bootstrap.resamples,
        level=params.bootstrap.level,
        seed=params.bootstrap.seed,
    )


def fidelity_by_method(
    generations: pd.DataFrame,
    pictures_generated: np.ndarray,
    users: pd.DataFrame,
    interactions: pd.DataFrame,
    raw_images: Mapping[str, Callable],
    params: EvaluationParams,
) -> pd.DataFrame:
    """FID and KID of each method's ``pictures_generated`` (``generations`` order) against
    ``fid_reference_size`` renders of the ``fid_reference_split`` users, with bootstrap
    intervals over users."""
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
        pictures_generated.transpose(0, 3, 1, 2),
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


def generations_table(
    generated_by_method: Mapping[str, np.ndarray],
    evaluation_cases: pd.DataFrame,
    images: pd.DataFrame,
    pictures: Mapping[str, np.ndarray],
    said_prompts: Mapping[str, Sequence[str]] | None = None,
) -> tuple[pd.DataFrame, dict[str, Image.Image]]:
    """Every method's images (one per case, in case order) plus the ``real`` row (each
    case's held-out liked image): the ``generations`` table and the images keyed
    ``method/user_case``. ``prompt`` is what the user asked for (CLIP score reads it);
    ``sampled_prompt`` what the method's text encoder read: a method's ``said_prompts``
    where it said more, else the prompt (empty for ``real``)."""
    said_prompts = said_prompts or {}
    generated = dict(generated_by_method)
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
        sampled = said_prompts.get(method, [None] * len(evaluation_cases))
        for case, picture, said in zip(evaluation_cases.itertuples(), pixels, sampled, strict=True):
            key = f"{method}/{case.user_id}_{case.case}"
            files[key] = Image.fromarray(picture)
            rows.append(
                {
                    "method": method,
                    "user_id": case.user_id,
                    "case": case.case,
                    "subject": subject_of[case.real_image_id] if real else case.subject,
                    "prompt": prompt_of[case.real_image_id] if real else case.prompt,
                    "sampled_prompt": "" if real else said or case.prompt,
                    "seed": None if real else case.seed,
                    "image": key,
                }
            )
    return pd.DataFrame(rows), files


def _resized(picture: np.ndarray, width: int, height: int) -> np.ndarray:
    if picture.shape[:2] == (height, width):
        return picture
    return np.asarray(Image.fromarray(picture).resize((width, height), Image.Resampling.LANCZOS))
