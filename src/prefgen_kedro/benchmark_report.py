"""The benchmark report: what the evaluation measured, as Markdown and HTML with figures.

``benchmark_report`` assembles it from the evaluation's tables; ``verdict`` states the
reference method against the project's targets (parameters, ``evaluation.targets``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import pandas as pd
from PIL import Image

from prefgen_kedro.benchmark import REAL, SIGNAL_LADDER
from prefgen_kedro.data.pictures import generated_pictures, load_pictures
from prefgen_kedro.figures import alignment_figure, bar_figure, probe_figure
from prefgen_kedro.params import DiffusionParams, EvaluationParams, TargetParams
from prefgen_kedro.report import Report, labelled_rows, metric_table

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


def _case_words(simulated: bool, prompts_per_user: int) -> tuple[str, str, str]:
    """How the report names a user's prompts, what is drawn alike for every method and the
    FID reference's kind."""
    several = prompts_per_user > 1
    if simulated:
        return "subject-only prompt" + "s" * several, "subjects", "renders"
    caption = " the caption of one of the user's liked images outside its context"
    return ("prompts, each" if several else "prompt,") + caption, "prompts", "images"


def benchmark_report(
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
) -> Report:
    """The benchmark report of a run: its tables, the verdict against ``params.targets``,
    the signal ladder, the figures and per-user grids; ``input_lineage``
    (``hooks.ProvenanceHook``) gives the digests of the models its inputs were made from."""
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
    prompts, drawn, reference_kind = _case_words(simulated, params.prompts_per_user)
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
        + delivery(diffusion, ours)
        + (
            " `oracle_taste` is fed a perfect ê_sem (the simulated user's liked-attribute "
            "phrases) and `oracle_state` a perfect summary of the context through PrefGen's "
            "aligner: what PrefGen's delivery makes of perfect information, not methods either."
            if "oracle_taste" in present
            else ""
        )
        + " Bold: best among methods."
    )
    report.heading("Preference alignment")
    report.table(*metric_table(metrics, methods, preference_columns, contenders))
    report.heading("Fidelity and prompt adherence")
    report.table(*metric_table(metrics, methods, fidelity_columns, contenders))
    report.paragraph(verdict(metrics, ours, params.targets))
    ladder = [m for m in SIGNAL_LADDER if m in present]
    if "taste_auc" in measured and len(ladder) > 1:
        report.heading("Signal ladder")
        report.paragraph(
            "Where a user's taste is lost, from the user's own liked images down to PrefGen. "
            "Taste AUC: how well a linear probe reads the user's liked attributes from what the "
            'row is conditioned on (see "Where the signal comes from"; for `real`, the '
            "context itself by the counting rule). `oracle_taste` is fed a perfect ê_sem; "
            "`oracle_state` is a perfect summary of the context (its attribute counts, liked "
            "minus disliked) through PrefGen's MMD aligner, delivered as PrefGen's ê_sem is. "
            "Reference rows are never ranked."
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
    report.figure("bars", bar_figure(metrics, [*methods, *ablations]), "Means with 95 % CIs.")
    report.heading("Where the signal comes from")
    if taste_signal_audit.get("auc"):
        report.paragraph(
            "How much of each test user's taste survives each stage: a multi-label linear "
            "probe reads the user's liked attributes from one context's vector (trained on "
            "training users), mean ROC AUC over attributes (0.5: nothing). The counting "
            "rule scores attributes by their count in the liked minus the disliked context "
            "(the ground truth the context shows: the ceiling). `mean_clip` and `e_img` are "
            "CLIP image embeddings; `e_core`, `e_sem_hat` (MMD) and `e_sem_hat_no_mmd` (MSE) "
            "come from the MLLM's hidden states. `counting_rule_picks` are the counting "
            "rule's own picks as the aligners' phrase states: the most that as many said "
            "phrases carry for this probe."
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
        alignment_figure(alignment_metrics),
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
            user_grid(user_id, generations, generated_images, evaluation_cases, raw_images),
            f"User {user_id}: liked and disliked context, then each method's images for "
            + ("the prompts " if params.prompts_per_user > 1 else "the prompt ")
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
    return report


def delivery(diffusion: DiffusionParams, method: str) -> str:
    """A sentence on how ``method``'s condition reaches the UNet: the parts its prompt says
    and those its user branch reads (empty for a method that is no user variant)."""
    if method not in diffusion.active_variants:
        return ""
    said, branch = diffusion.said(method), diffusion.branch_parts(method)
    ways = [f"its prompt says the attributes named by {_names(said)}"] if said else []
    if branch:
        ways.append(f"its user branch reads {_names(branch)}")
    return f" How `{method}`'s condition reaches the UNet: {'; '.join(ways)}."


def _names(parts: list[str]) -> str:
    return ", ".join(f"`{part}`" for part in parts)


def verdict(metrics: pd.DataFrame, ours: str, targets: TargetParams) -> str:
    """The project's bar for ``ours`` (``targets``), stated from the measured numbers."""
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
        f"(bar: {targets.like_rate_gain:+g}, "
        f"{'met' if gain >= targets.like_rate_gain else 'not met'}); "
        + (
            "it beats every baseline"
            if not beaten
            else f"baselines at or above it: {', '.join(beaten)}"
        )
        + f"; its FID is {fid_ratio:.2f}× `base`'s (bar: ≤ {targets.fid_ratio:.2f}, "
        f"{'met' if fid_ratio <= targets.fid_ratio else 'not met'})."
    )


def user_grid(
    user_id: str,
    generations: pd.DataFrame,
    generated_images: Mapping[str, Callable],
    evaluation_cases: pd.DataFrame,
    raw_images: Mapping[str, Callable],
) -> Image.Image:
    """One user's liked and disliked context, then a row of images per method."""
    case = evaluation_cases[evaluation_cases["user_id"] == user_id].iloc[0]
    context = load_pictures({i: raw_images[i] for i in [*case["liked"], *case["disliked"]]})
    rows = [
        ("liked", [context[i] for i in case["liked"]]),
        ("disliked", [context[i] for i in case["disliked"]]),
    ]
    mine = generations[generations["user_id"] == user_id]
    for method, table in mine.groupby("method", sort=False):
        rows.append((method, list(generated_pictures(table, generated_images))))
    return labelled_rows(rows)
