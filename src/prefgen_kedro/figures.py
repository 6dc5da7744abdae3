"""The figures of the probing stage and of the benchmark report (matplotlib ``Figure``s,
made without pyplot's global state)."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
from matplotlib.figure import Figure


def probe_figure(metrics: pd.DataFrame, selection: dict) -> Figure:
    """Probe accuracy by MLLM layer for each task and metric, with the layer bands PrefGen
    reads (``e_sem``, ``e_core``) shaded and the inter-user chance level dotted."""
    figure = Figure(figsize=(6, 4))
    axis = figure.add_subplot()
    for (task, metric), rows in metrics.groupby(["task", "metric"]):
        axis.plot(rows["layer"], rows["accuracy"], marker="o", label=f"{task} {metric}")
    for name, colour in (("e_sem", "tab:green"), ("e_core", "tab:red")):
        layers = selection[name]
        axis.axvspan(min(layers) - 0.4, max(layers) + 0.4, color=colour, alpha=0.1, label=name)
    axis.axhline(selection["inter_user_chance"], color="grey", linestyle=":", linewidth=1)
    axis.set_xlabel("layer (0 = embeddings)")
    axis.set_ylabel("probe accuracy")
    axis.set_ylim(0, 1)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, loc="best")
    figure.tight_layout()
    return figure


def bar_figure(metrics: pd.DataFrame, methods: list[str]) -> Figure:
    """Like-rate, CLIP score and FID (those measured) of ``methods``: means with intervals."""
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


def alignment_figure(alignment_metrics: dict) -> Figure:
    """Diversity of the aligned tokens (targets, MMD, MSE) and their phrase recall@5."""
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


def vqa_learning_curve_figure(curve: Sequence[dict], metrics: dict) -> Figure:
    """Validation yes/no accuracy against training questions seen, with the reference
    accuracies of ``vqa_metrics`` as lines."""
    figure = Figure(figsize=(6, 4))
    axis = figure.add_subplot()
    if curve:
        frame = pd.DataFrame(curve)
        axis.plot(frame["questions_seen"], frame["val_accuracy"], marker="o", label="tuned MLLM")
    references = metrics["accuracy"]
    for name, style in (
        ("counting_rule", "--"),
        ("label_noise_ceiling", ":"),
        ("untuned", "-."),
        ("majority_class", (0, (1, 3))),
    ):
        if name in references:
            axis.axhline(references[name], linestyle=style, color="grey", linewidth=1)
            # At the axes' left edge whatever the x range (x = 0 lies left of the first point).
            axis.annotate(
                name.replace("_", " "),
                (0.01, references[name]),
                xycoords=("axes fraction", "data"),
                fontsize=7,
                va="bottom",
            )
    axis.set_xlabel("training questions seen")
    axis.set_ylabel(f"validation yes/no accuracy (K={metrics['k']})")
    axis.set_ylim(0.3, 1.0)
    axis.grid(alpha=0.3)
    axis.legend(loc="lower right")
    figure.tight_layout()
    return figure
