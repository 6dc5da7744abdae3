"""The ``foundation`` pipeline (not part of ``__default__``), and the two that remake one
of its models only: ``foundation_mllm`` and ``foundation_unet``."""

from collections.abc import Callable

from kedro.pipeline import Node, Pipeline

from .nodes import (
    check_fid_network,
    make_render_sets,
    pretrain_mllm,
    replace_base_unet_manifest_entry,
    replace_mllm_manifest_entry,
    train_attribute_oracle,
    train_base_diffusion,
    train_conditioning_clip,
    train_evaluation_clip,
    write_foundation_manifest,
)


def create_pipeline(**kwargs) -> Pipeline:
    checkpoints = "params:foundation.checkpoint_root"
    return Pipeline(
        [
            Node(
                make_render_sets,
                "params:foundation.renders",
                [
                    "conditioning_clip_renders",
                    "evaluation_clip_renders",
                    "attribute_oracle_renders",
                    "base_diffusion_renders",
                    "mllm_renders",
                    "heldout_renders",
                ],
                name="make_render_sets",
            ),
            Node(
                train_conditioning_clip,
                [
                    "conditioning_clip_renders",
                    "heldout_renders",
                    "params:foundation.conditioning_clip",
                    checkpoints,
                ],
                ["conditioning_clip", "clip_tokenizer", "conditioning_clip_report"],
                name="train_conditioning_clip",
                tags=["training"],
            ),
            Node(
                train_evaluation_clip,
                [
                    "evaluation_clip_renders",
                    "heldout_renders",
                    "params:foundation.evaluation_clip",
                    checkpoints,
                ],
                ["evaluation_clip", "evaluation_clip_report"],
                name="train_evaluation_clip",
                tags=["training"],
            ),
            Node(
                train_attribute_oracle,
                [
                    "attribute_oracle_renders",
                    "heldout_renders",
                    "params:foundation.attribute_oracle",
                    checkpoints,
                ],
                ["attribute_oracle", "attribute_oracle_report"],
                name="train_attribute_oracle",
                tags=["training"],
            ),
            Node(
                train_base_diffusion,
                [
                    "base_diffusion_renders",
                    "heldout_renders",
                    "conditioning_clip",
                    "clip_tokenizer",
                    "attribute_oracle",
                    "params:foundation.base_diffusion",
                    checkpoints,
                    "params:foundation.base_diffusion_grid_dir",
                ],
                ["base_unet", "noise_scheduler", "base_unet_report", "base_diffusion_grid"],
                name="train_base_diffusion",
                tags=["training"],
            ),
            Node(
                pretrain_mllm,
                [
                    "mllm_renders",
                    "heldout_renders",
                    "conditioning_clip",
                    "params:foundation.mllm",
                    checkpoints,
                ],
                ["foundation_mllm", "foundation_mllm_processor", "mllm_report"],
                name="pretrain_mllm",
                tags=["training"],
            ),
            Node(
                check_fid_network,
                ["heldout_renders", "params:foundation.fid_check"],
                "fid_report",
                name="check_fid_network",
            ),
            Node(
                write_foundation_manifest,
                [
                    "conditioning_clip",
                    "evaluation_clip",
                    "attribute_oracle",
                    "base_unet",
                    "foundation_mllm",
                    "conditioning_clip_report",
                    "evaluation_clip_report",
                    "attribute_oracle_report",
                    "base_unet_report",
                    "mllm_report",
                    "fid_report",
                    "params:foundation.model_dirs",
                ],
                ["foundation_manifest", "encoders_metrics"],
                name="write_foundation_manifest",
                tags=["reporting"],
            ),
        ],
        namespace="foundation",
        # a group in kedro-viz; datasets keep their catalog names
        prefix_datasets_with_namespace=False,
    )


def create_mllm_pipeline(**kwargs) -> Pipeline:
    """The MLLM remade on the shipped conditioning CLIP, its manifest entry replaced and the
    other entries kept."""
    return _remake_one(
        "pretrain_mllm", replace_mllm_manifest_entry, "foundation_mllm", "mllm_report"
    )


def create_unet_pipeline(**kwargs) -> Pipeline:
    """The base UNet remade on the shipped conditioning CLIP and attribute oracle, its
    manifest entry replaced and the other entries kept."""
    return _remake_one(
        "train_base_diffusion", replace_base_unet_manifest_entry, "base_unet", "base_unet_report"
    )


def _remake_one(
    trainer: str, replace_entry: Callable[..., dict], model: str, report: str
) -> Pipeline:
    """`foundation` cut down to the renders and one trainer, then its manifest entry replaced."""
    kept = create_pipeline().only_nodes("foundation.make_render_sets", f"foundation.{trainer}")
    return kept + Pipeline(
        [
            Node(
                replace_entry,
                ["shipped_foundation_manifest", model, report, "params:foundation.model_dirs"],
                "foundation_manifest",
                name=replace_entry.__name__,
            )
        ],
        namespace="foundation",
        prefix_datasets_with_namespace=False,
    )
