from kedro.pipeline import Node, Pipeline

from prefgen_kedro.pipelines.foundation import create_pipeline as create_foundation_pipeline
from prefgen_kedro.pipelines.foundation.nodes import replace_base_unet_manifest_entry


def create_pipeline(**kwargs) -> Pipeline:
    """The base UNet remade on the shipped conditioning CLIP and attribute oracle, its
    manifest entry replaced and the other entries kept."""
    return create_foundation_pipeline().only_nodes(
        "make_render_sets", "train_base_diffusion"
    ) + Pipeline(
        [
            Node(
                replace_base_unet_manifest_entry,
                [
                    "shipped_foundation_manifest",
                    "base_unet",
                    "base_unet_report",
                    "params:foundation.model_dirs",
                ],
                "foundation_manifest",
                name="replace_base_unet_manifest_entry",
            )
        ]
    )
