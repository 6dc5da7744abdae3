"""The ``foundation`` pipeline (not part of ``__default__``)."""

from kedro.pipeline import Node, Pipeline

from .nodes import (
    check_fid_network,
    make_render_sets,
    pretrain_mllm,
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
            ),
        ]
    )
