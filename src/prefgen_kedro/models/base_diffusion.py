"""Training the base text-to-image model (the stand-in for Stable Diffusion) on renders,
and measuring the UNet that ships: its parameter models, ``train_base_unet``."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from PIL import Image
from pydantic import Field
from transformers import CLIPModel, PreTrainedTokenizerBase

from prefgen_kedro.foundation import foundation_run_key, round_to_half
from prefgen_kedro.models.diffusion import (
    DiffusionLoss,
    build_noise_scheduler,
    build_unet,
    diffusion_training_data,
    encode_prompts,
    grid_writer,
    prompt_adherence,
    sample,
    sample_grid,
)
from prefgen_kedro.models.fid import compute_fid_kid
from prefgen_kedro.models.oracle import AttributeOracle
from prefgen_kedro.params import StrictParams
from prefgen_kedro.training import TrainConfig, TrainResult, train
from prefgen_kedro.world.agent_world import RenderSet
from prefgen_kedro.world.vocabulary import subject_prompt

# Settings that only watch the training (grids, figures): not part of its run key.
WATCHING_SETTINGS = ("sampling", "grid_every", "grid_captions", "eval_captions")


class UnetArchitecture(StrictParams):
    block_out_channels: list[int]
    layers_per_block: int
    attention_head_dim: int | list[int]
    norm_num_groups: int = 32
    down_block_types: list[str] | None = None
    up_block_types: list[str] | None = None


class NoiseScheduleParams(StrictParams):
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    prediction_type: Literal["epsilon", "v_prediction"] = "v_prediction"


class SamplingParams(StrictParams):
    guidance_scale: float = Field(ge=1.0)
    num_inference_steps: int = Field(ge=1)
    batch_size: int = Field(ge=1)


class BaseDiffusionParams(StrictParams):
    architecture: UnetArchitecture
    noise_schedule: NoiseScheduleParams
    caption_dropout: float = Field(ge=0.0, le=1.0)
    # Each category left out of a render's caption with this probability (fixed per render),
    # so the model also knows prompts that name few categories, or only the subject.
    category_dropout: float = Field(default=0.0, ge=0.0, le=1.0)
    snr_gamma: float | None
    train: TrainConfig
    sampling: SamplingParams
    grid_every: int = Field(ge=1)  # training steps between validation grids
    grid_captions: int = Field(ge=1)
    eval_captions: int = Field(ge=2)  # held-out captions sampled for the quality figures


def train_base_unet(
    renders: RenderSet,
    heldout: RenderSet,
    conditioning_clip: CLIPModel,
    tokenizer: PreTrainedTokenizerBase,
    attribute_oracle: AttributeOracle,
    params: BaseDiffusionParams,
    *,
    checkpoint_root: str,
    grid_dir: str,
) -> tuple[UNet2DConditionModel, DDPMScheduler, TrainResult, dict, Image.Image]:
    """A pixel-space UNet conditioned on the frozen text tower of ``conditioning_clip``,
    trained on ``renders`` with their captions (validation grids of ``heldout`` captions in
    ``grid_dir``), then rounded to fp16 and measured (``base_unet_quality``). Returns the
    rounded UNet (fp32), its noise scheduler, the training result (keyed by
    ``foundation_run_key``), the figures and a grid of samples."""
    text_encoder = conditioning_clip.text_model.float().eval()
    oracle = attribute_oracle.float().eval()
    unet = build_unet(
        sample_size=renders.images.shape[1],
        in_channels=3,
        cross_attention_dim=conditioning_clip.config.text_config.hidden_size,
        seed=params.train.seed,
        **params.architecture.model_dump(),
    )
    noise_scheduler = build_noise_scheduler(**params.noise_schedule.model_dump())
    dataset, empty = diffusion_training_data(
        renders.images,
        renders.partial_captions(params.category_dropout, seed=params.train.seed),
        text_encoder,
        tokenizer,
    )
    shown = heldout.first(params.grid_captions)
    # Keyed after the captions are encoded, as the shipped run was: encoding sets the
    # tokenizer's padding state, which its digest reads.
    key = foundation_run_key(
        params,
        renders,
        watching=WATCHING_SETTINGS,
        conditioning_clip=conditioning_clip,
        clip_tokenizer=tokenizer,
    )
    result = train(
        unet,
        dataset,
        DiffusionLoss(noise_scheduler, empty, params.caption_dropout, params.snr_gamma),
        params.train,
        checkpoint_root=checkpoint_root,
        name="base_unet",
        key=key,
        on_log=grid_writer(
            unet,
            noise_scheduler,
            encode_prompts(text_encoder, tokenizer, shown.captions),
            empty,
            shown,
            Path(grid_dir),
            every=params.grid_every,
            seed=0,
            **params.sampling.model_dump(exclude={"batch_size"}),
        ),
    )
    unet = round_to_half(unet)
    metrics, grid = base_unet_quality(
        unet, noise_scheduler, text_encoder, tokenizer, oracle, heldout, empty, params
    )
    return unet, noise_scheduler, result, metrics, grid


def base_unet_quality(
    unet: UNet2DConditionModel,
    noise_scheduler: DDPMScheduler,
    text_encoder: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    oracle: AttributeOracle,
    heldout: RenderSet,
    empty: torch.Tensor,
    params: BaseDiffusionParams,
) -> tuple[dict, Image.Image]:
    """Samples of ``params.eval_captions`` held-out captions, and of their subjects alone
    (what a user asks a generator for): the oracle's prompt adherence and FID/KID against
    the held-out renders; and a grid of the first ``grid_captions`` samples."""
    asked = heldout.first(params.eval_captions)
    sampling = params.sampling.model_dump(exclude={"batch_size"})

    def samples_of(captions: list[str]):
        return sample(
            unet,
            noise_scheduler,
            encode_prompts(text_encoder, tokenizer, captions),
            empty,
            seeds=list(range(len(asked.captions))),
            batch_size=params.sampling.batch_size,
            **sampling,
        )

    samples = samples_of(asked.captions)
    subject_only = samples_of([subject_prompt(s) for s in asked.subjects])
    to_chw = lambda images: torch.from_numpy(images).permute(0, 3, 1, 2)  # noqa: E731
    metrics = {
        "prompt_adherence": prompt_adherence(oracle, samples, asked),
        "vs_heldout_renders": compute_fid_kid(to_chw(samples), to_chw(asked.images)),
        "subject_only_prompts": {
            "subject_accuracy": prompt_adherence(oracle, subject_only, asked)["subject"],
            "vs_heldout_renders": compute_fid_kid(to_chw(subject_only), to_chw(asked.images)),
        },
        "sampling": params.sampling.model_dump(),
    }
    grid = sample_grid(samples[: params.grid_captions], asked.images, asked.captions)
    return metrics, grid
