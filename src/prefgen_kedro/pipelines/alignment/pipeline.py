"""The ``alignment`` pipeline."""

from kedro.pipeline import Node, Pipeline

from .nodes import evaluate_alignment, make_alignment_targets, train_aligners


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                make_alignment_targets,
                ["users", "images", "interactions", "conditioning_clip", "clip_tokenizer"],
                "alignment_targets",
                name="make_alignment_targets",
            ),
            Node(
                train_aligners,
                ["context_embeddings", "alignment_targets", "params:alignment"],
                ["aligners", "alignment_training_report"],
                name="train_aligners",
                tags=["training"],
            ),
            Node(
                evaluate_alignment,
                [
                    "aligners",
                    "context_embeddings",
                    "user_embeddings",
                    "alignment_targets",
                    "alignment_training_report",
                    "params:alignment",
                ],
                ["alignment_metrics", "aligned_user_embeddings"],
                name="evaluate_alignment",
                tags=["reporting"],
            ),
        ],
        namespace="alignment",
        # a group in kedro-viz; datasets keep their catalog names
        prefix_datasets_with_namespace=False,
    )
