"""The ``evaluation`` pipeline."""

from kedro.pipeline import Node, Pipeline

from .nodes import (
    fidelity_metrics,
    generate_images,
    make_evaluation_cases,
    score_generations,
    summarize_metrics,
    write_benchmark_report,
)


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                make_evaluation_cases,
                ["user_conditions", "users", "images", "interactions", "params:evaluation"],
                "evaluation_cases",
                name="make_evaluation_cases",
            ),
            Node(
                generate_images,
                [
                    "evaluation_cases",
                    "user_branches",
                    "images",
                    "diffusion_stack",
                    "foundation_mllm_with_processor",
                    "raw_images",
                    "params:diffusion",
                    "params:evaluation",
                ],
                ["generations", "generated_images", "generation_report"],
                name="generate_images",
            ),
            Node(
                score_generations,
                [
                    "generations",
                    "generated_images",
                    "evaluation_cases",
                    "users",
                    "raw_images",
                    "evaluation_clip",
                    "attribute_oracle",
                    "tuned_mllm_with_processor",
                    "params:diffusion",
                    "params:evaluation",
                ],
                "generation_scores",
                name="score_generations",
                tags=["reporting"],
            ),
            Node(
                fidelity_metrics,
                [
                    "generations",
                    "generated_images",
                    "users",
                    "interactions",
                    "raw_images",
                    "params:evaluation",
                ],
                "fidelity",
                name="fidelity_metrics",
                tags=["reporting"],
            ),
            Node(
                summarize_metrics,
                ["generation_scores", "fidelity", "taste_signal_audit", "params:evaluation"],
                "metrics",
                name="summarize_metrics",
                tags=["reporting"],
            ),
            Node(
                write_benchmark_report,
                [
                    "metrics",
                    "generations",
                    "generated_images",
                    "evaluation_cases",
                    "generation_report",
                    "taste_signal_audit",
                    "probe_metrics",
                    "layer_selection",
                    "alignment_metrics",
                    "raw_images",
                    "run_info",
                    "input_lineage",
                    "params:diffusion",
                    "params:evaluation",
                ],
                ["benchmark_markdown", "benchmark_html", "benchmark_figures"],
                name="write_benchmark_report",
                tags=["reporting"],
            ),
        ],
        namespace="evaluation",
        # a group in kedro-viz; datasets keep their catalog names
        prefix_datasets_with_namespace=False,
    )
