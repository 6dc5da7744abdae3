"""Models that only work together, held together: what a node loads as one catalog input.

- ``DiffusionStack`` — the base text-to-image model: its UNet, the VAE whose latents a latent
  UNet works on (``None`` for a pixel-space one, as in the agent world), the noise schedule
  and the conditioning CLIP with its tokenizer (the CLIP's text tower encodes the prompts the
  UNet reads; its vision tower gives ``e_img``).
- ``MllmWithProcessor`` — an MLLM and the processor that turns chats and pictures into its
  inputs.

``prefgen_kedro.datasets.DiffusionStackDataset`` and ``MllmWithProcessorDataset`` load them,
each part from its own folder, afresh on every load.
"""

from __future__ import annotations

from dataclasses import dataclass

from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPModel, PreTrainedModel, PreTrainedTokenizerBase, ProcessorMixin


@dataclass(frozen=True)
class DiffusionStack:
    """The base model's parts (see the module docstring)."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL | None
    scheduler: DDPMScheduler
    clip: CLIPModel
    tokenizer: PreTrainedTokenizerBase


@dataclass(frozen=True)
class MllmWithProcessor:
    """An MLLM and its processor."""

    model: PreTrainedModel
    processor: ProcessorMixin
