"""The ``vqa_tuning`` pipeline."""

from kedro.pipeline import Node, Pipeline

from .nodes import evaluate_vqa, make_vqa_examples, tune_mllm


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                make_vqa_examples,
                ["images", "interactions", "users", "params:vqa_tuning"],
                "vqa_examples",
                name="make_vqa_examples",
            ),
            Node(
                tune_mllm,
                [
                    "foundation_mllm_with_processor",
                    "vqa_examples",
                    "raw_images",
                    "params:vqa_tuning",
                ],
                ["tuned_mllm_with_processor", "vqa_tuning_report"],
                name="tune_mllm",
                tags=["training"],
            ),
            Node(
                evaluate_vqa,
                [
                    "foundation_mllm_with_processor",
                    "tuned_mllm_with_processor",
                    "vqa_examples",
                    "raw_images",
                    "images",
                    "interactions",
                    "vqa_tuning_report",
                    "params:vqa_tuning",
                ],
                ["vqa_metrics", "vqa_learning_curve"],
                name="evaluate_vqa",
                tags=["reporting"],
            ),
        ],
        namespace="vqa_tuning",
        # a group in kedro-viz; datasets keep their catalog names
        prefix_datasets_with_namespace=False,
    )
