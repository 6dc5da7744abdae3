from kedro.pipeline import Node, Pipeline

from prefgen_kedro.pipelines.foundation import create_pipeline as create_foundation_pipeline
from prefgen_kedro.pipelines.foundation.nodes import replace_mllm_manifest_entry


def create_pipeline(**kwargs) -> Pipeline:
    """The MLLM remade on the shipped conditioning CLIP, its manifest entry replaced and the
    other entries kept."""
    return create_foundation_pipeline().only_nodes("make_render_sets", "pretrain_mllm") + Pipeline(
        [
            Node(
                replace_mllm_manifest_entry,
                [
                    "shipped_foundation_manifest",
                    "foundation_mllm",
                    "mllm_report",
                    "params:foundation.model_dirs",
                ],
                "foundation_manifest",
                name="replace_mllm_manifest_entry",
            )
        ]
    )
