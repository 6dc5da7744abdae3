"""The ``diffusion`` pipeline."""

from kedro.pipeline import Node, Pipeline

from .nodes import (
    audit_taste_signal,
    evaluate_user_branches,
    make_user_conditions,
    train_user_branches,
)


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                make_user_conditions,
                [
                    "probe_contexts",
                    "context_embeddings",
                    "aligners",
                    "conditioning_clip",
                    "clip_tokenizer",
                    "raw_images",
                    "users",
                    "params:diffusion",
                ],
                "user_conditions",
                name="make_user_conditions",
            ),
            # The benchmark's audit of the test users' conditions, made with them: a run that
            # remakes user_conditions never leaves an audit of older ones behind.
            Node(
                audit_taste_signal,
                ["user_conditions", "users", "images", "params:evaluation"],
                "taste_signal_audit",
                name="audit_taste_signal",
                tags=["reporting"],
            ),
            Node(
                train_user_branches,
                [
                    "user_conditions",
                    "images",
                    "interactions",
                    "raw_images",
                    "diffusion_stack",
                    "params:diffusion",
                ],
                ["user_branches", "diffusion_training_report"],
                name="train_user_branches",
                tags=["training"],
            ),
            Node(
                evaluate_user_branches,
                [
                    "user_branches",
                    "user_conditions",
                    "users",
                    "images",
                    "interactions",
                    "diffusion_stack",
                    "evaluation_clip",
                    "attribute_oracle",
                    "foundation_mllm_with_processor",
                    "tuned_mllm_with_processor",
                    "raw_images",
                    "diffusion_training_report",
                    "params:diffusion",
                ],
                ["diffusion_metrics", "user_branch_grid"],
                name="evaluate_user_branches",
                tags=["reporting"],
            ),
        ],
        namespace="diffusion",
        # a group in kedro-viz; datasets keep their catalog names
        prefix_datasets_with_namespace=False,
    )
