"""The ``probing`` pipeline."""

from kedro.pipeline import Node, Pipeline

from .nodes import build_user_embeddings, fit_probes, read_hidden_states, sample_probe_contexts


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                sample_probe_contexts,
                ["interactions", "users", "params:probing"],
                "probe_contexts",
                name="sample_probe_contexts",
            ),
            Node(
                read_hidden_states,
                [
                    "tuned_mllm_with_processor",
                    "probe_contexts",
                    "images",
                    "interactions",
                    "users",
                    "raw_images",
                    "params:probing",
                ],
                "hidden_states",
                name="read_hidden_states",
            ),
            Node(
                fit_probes,
                ["hidden_states", "probe_contexts", "params:probing"],
                ["probe_metrics", "layer_selection", "probe_accuracy_plot"],
                name="fit_probes",
                tags=["training"],
            ),
            Node(
                build_user_embeddings,
                [
                    "hidden_states",
                    "layer_selection",
                    "probe_contexts",
                    "images",
                    "users",
                    "conditioning_clip",
                    "clip_tokenizer",
                    "raw_images",
                    "params:probing",
                ],
                ["context_embeddings", "user_embeddings"],
                name="build_user_embeddings",
            ),
        ],
        namespace="probing",
        # a group in kedro-viz; datasets keep their catalog names
        prefix_datasets_with_namespace=False,
    )
