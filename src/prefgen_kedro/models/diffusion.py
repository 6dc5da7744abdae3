"""The base text-to-image model: a diffusers ``UNet2DConditionModel`` in pixel space.

It stands in for Stable Diffusion in the agent world and is built, trained, saved and
sampled the way SD is: conditioned through cross-attention on the last hidden states of a
frozen CLIP text tower, noise added by a ``DDPMScheduler``, sampled with DDIM and
classifier-free guidance. Pixel space, not latent: the agent world's stripes and dots are
2 px wide at 32×32; a small f=2 ``AutoencoderKL`` blurred them (the oracle read the pattern
of only 26% of its reconstructions) and its 16×16 UNet trained only ~1.3× faster (82 vs 61
img/s on 2 cores). The sampler still takes an optional ``vae`` and ``encode_latents``
gives a latent model's training samples, so a latent model (SD 1.5) trains and samples
through the same functions.

Public API:

- ``build_unet``, ``build_noise_scheduler`` — the model and its training noise schedule.
- ``encode_prompts`` — texts -> last hidden states (N, L, D) of a frozen CLIP text tower.
- ``encode_latents`` — pictures -> a VAE's scaled latents, a latent UNet's clean samples.
- ``diffusion_training_data`` — pixels plus precomputed caption embeddings, and the
  empty-prompt embedding that caption dropout swaps in.
- ``DiffusionLoss`` — ``compute_loss(model, batch)`` for ``prefgen_kedro.training.train``.
- ``sample`` — batched DDIM with guidance, one seed per image, extra UNet conditioning.
- ``generate`` / ``prompt_adherence`` — sample held-out captions and read them back with
  the attribute oracle; ``sample_grid`` and ``grid_writer`` — validation grids.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from PIL import Image, ImageDraw, ImageFont
from torch import nn
from transformers import PreTrainedTokenizerBase

from prefgen_kedro.models.batches import TensorDictDataset
from prefgen_kedro.models.oracle import AttributeOracle
from prefgen_kedro.precision import effective_precision
from prefgen_kedro.world.agent_world import RenderSet


def build_unet(
    *,
    sample_size: int,
    in_channels: int,
    block_out_channels: Sequence[int],
    layers_per_block: int,
    cross_attention_dim: int,
    attention_head_dim: int | Sequence[int],
    down_block_types: Sequence[str] | None = None,
    up_block_types: Sequence[str] | None = None,
    norm_num_groups: int = 32,
    seed: int,
) -> UNet2DConditionModel:
    """A ``UNet2DConditionModel`` from a config, randomly initialised with ``seed``.

    By default the first (full-resolution) level has no attention, where self-attention
    would cost the most, and every lower level has self- and cross-attention; pass the
    block types to get another shape (SD 1.5: three ``CrossAttnDownBlock2D`` then a
    ``DownBlock2D``). ``attention_head_dim`` means what diffusers' config means by it: for
    this class it is the number of heads per block (SD 1.5: 8).
    """
    levels = len(block_out_channels)
    if down_block_types is None:
        down_block_types = ["DownBlock2D"] + ["CrossAttnDownBlock2D"] * (levels - 1)
    if up_block_types is None:
        up_block_types = ["CrossAttnUpBlock2D"] * (levels - 1) + ["UpBlock2D"]
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=in_channels,
        down_block_types=tuple(down_block_types),
        up_block_types=tuple(up_block_types),
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=(
            attention_head_dim if isinstance(attention_head_dim, int) else tuple(attention_head_dim)
        ),
        norm_num_groups=norm_num_groups,
    )


def build_noise_scheduler(
    *,
    num_train_timesteps: int = 1000,
    beta_schedule: str = "squaredcos_cap_v2",
    prediction_type: str = "v_prediction",
) -> DDPMScheduler:
    """The training noise schedule, saved beside the UNet as SD saves its ``scheduler``.

    The cosine schedule suits small images (the linear one leaves them recognisable at the
    last step); ``trailing`` spacing makes a few-step DDIM start from the noisiest step.
    """
    return DDPMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_schedule=beta_schedule,
        prediction_type=prediction_type,
        clip_sample=True,
        timestep_spacing="trailing",
    )


@torch.no_grad()
def encode_prompts(
    text_encoder: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    batch_size: int = 256,
) -> torch.Tensor:
    """Prompts -> float32 last hidden states (N, L, D) on the CPU, as SD conditions its UNet.

    ``text_encoder`` is a ``CLIPTextModel`` or a ``CLIPModel``'s ``text_model``; prompts are
    padded to the tokenizer's ``model_max_length`` (no attention mask, as in SD), so every
    embedding has the same length. ``no_grad``, not ``inference_mode``: the embeddings feed
    the UNet's trainable key/value projections, which must save them for backward.
    """
    device = next(text_encoder.parameters()).device
    chunks = []
    for start in range(0, len(prompts), batch_size):
        tokens = tokenizer(
            list(prompts[start : start + batch_size]),
            padding="max_length",
            truncation=True,
            return_tensors="pt",
        )
        output = text_encoder(input_ids=tokens.input_ids.to(device))
        chunks.append(output.last_hidden_state.float().cpu())
    return torch.cat(chunks)


def to_diffusion_pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1], the model's pixel space."""
    return torch.as_tensor(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


@torch.no_grad()
def encode_latents(
    vae: AutoencoderKL, images: Sequence[np.ndarray] | np.ndarray, batch_size: int = 32
) -> torch.Tensor:
    """uint8 pictures (H, W, 3) -> float32 latents (N, C, H/f, W/f) on the CPU, scaled by
    ``vae.config.scaling_factor``: what a latent UNet (SD 1.5) denoises, as its sampler's
    ``vae`` decodes them. The posterior's mean, not a draw, so a training set made from the
    same pictures is the same. Pictures are stacked one batch at a time, so a large set is
    never held as float pixels."""
    parameter = next(vae.parameters())
    chunks = []
    for start in range(0, len(images), batch_size):
        pixels = to_diffusion_pixels(np.stack(images[start : start + batch_size]))
        posterior = vae.encode(pixels.to(parameter.device, parameter.dtype)).latent_dist
        chunks.append((posterior.mean * vae.config.scaling_factor).float().cpu())
    return torch.cat(chunks)


def to_uint8_images(pixels: torch.Tensor) -> np.ndarray:
    """float (N, 3, H, W) in [-1, 1] -> uint8 (N, H, W, 3)."""
    scaled = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round()
    return scaled.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def diffusion_training_data(
    images: np.ndarray,
    captions: Sequence[str],
    text_encoder: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
) -> tuple[TensorDictDataset, torch.Tensor]:
    """(``pixel_values`` + ``prompt_embeds`` per image, the empty prompt's (1, L, D) embedding).

    The text tower is frozen, so each caption is encoded once here rather than every step.
    """
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    dataset = TensorDictDataset(
        pixel_values=to_diffusion_pixels(images),
        prompt_embeds=encode_prompts(text_encoder, tokenizer, captions),
    )
    return dataset, encode_prompts(text_encoder, tokenizer, [""])


@dataclass
class DiffusionLoss:
    """``compute_loss(model, batch)``: the denoising MSE of the scheduler's prediction type
    (the unweighted MSE is also reported as the metric ``mse``).

    ``batch`` holds ``pixel_values`` (the clean sample: pixels, or ``encode_latents`` for a
    latent UNet) and ``prompt_embeds`` (and the ``user_keys`` of a user-conditioned model);
    each caption is replaced by ``empty_prompt_embeds`` with probability ``caption_dropout``,
    which teaches the unconditional model that classifier-free guidance needs. With
    ``snr_gamma`` the per-sample loss is Min-SNR-γ weighted (Hang et al., 2023). All
    randomness is drawn from torch's global RNG, which the trainer checkpoints.
    """

    noise_scheduler: DDPMScheduler
    empty_prompt_embeds: torch.Tensor
    caption_dropout: float = 0.1
    snr_gamma: float | None = 5.0
    # A user branch's parts (batch keys) go to the model as ``user_parts``; each sample's
    # are zeroed (the "no user" condition) with probability ``user_dropout``.
    user_keys: tuple[str, ...] = ()
    user_dropout: float = 0.0

    def __call__(
        self, model: nn.Module, batch: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        clean = batch["pixel_values"]
        prompt_embeds = batch["prompt_embeds"]
        n = clean.shape[0]
        noise = torch.randn_like(clean)
        timesteps = torch.randint(
            0, self.noise_scheduler.config.num_train_timesteps, (n,), device=clean.device
        )
        dropped = torch.rand(n, device=clean.device) < self.caption_dropout
        empty = self.empty_prompt_embeds.to(prompt_embeds)
        prompt_embeds = torch.where(dropped[:, None, None], empty, prompt_embeds)

        noisy = self.noise_scheduler.add_noise(clean, noise, timesteps)
        prediction_type = self.noise_scheduler.config.prediction_type
        if prediction_type == "epsilon":
            target = noise
        elif prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(clean, noise, timesteps)
        else:
            raise ValueError(f"unsupported prediction_type {prediction_type!r}")
        extra = {}
        if self.user_keys:
            kept = (torch.rand(n, device=clean.device) >= self.user_dropout)[:, None]
            extra["user_parts"] = {key: batch[key] * kept for key in self.user_keys}
        prediction = model(noisy, timesteps, encoder_hidden_states=prompt_embeds, **extra).sample
        per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none")
        per_sample = per_sample.mean(dim=tuple(range(1, per_sample.ndim)))
        metrics = {"mse": per_sample.mean().item()}
        if self.snr_gamma is None:
            return per_sample.mean(), metrics
        alphas = self.noise_scheduler.alphas_cumprod.to(clean.device)[timesteps]
        snr = alphas / (1 - alphas)
        # Min-SNR-γ weights the squared x0 error by min(snr, γ); the squared v error is
        # (snr + 1) times, the squared epsilon error snr times, the squared x0 error.
        divisor = snr + 1 if prediction_type == "v_prediction" else snr
        weight = snr.clamp(max=self.snr_gamma) / divisor
        return (per_sample * weight).mean(), metrics


def _per_image(tree: Any, index: slice) -> Any:
    """``tree`` with every tensor cut to ``index`` along its first (per-image) dimension."""
    if isinstance(tree, torch.Tensor):
        return tree[index]
    if isinstance(tree, Mapping):
        return {key: _per_image(value, index) for key, value in tree.items()}
    return tree


def _stacked(negative: Any, positive: Any) -> Any:
    """The guidance batch ``[negative; positive]`` of two same-shaped condition trees."""
    if isinstance(positive, torch.Tensor):
        return torch.cat([negative, positive])
    if isinstance(positive, Mapping):
        return {key: _stacked(negative[key], value) for key, value in positive.items()}
    return positive


def _to_unet(tree: Any, device: torch.device, dtype: torch.dtype) -> Any:
    if isinstance(tree, torch.Tensor):
        return tree.to(device, dtype) if tree.is_floating_point() else tree.to(device)
    if isinstance(tree, Mapping):
        return {key: _to_unet(value, device, dtype) for key, value in tree.items()}
    return tree


@torch.no_grad()
def sample(
    unet: UNet2DConditionModel,
    scheduler: Any,
    prompt_embeds: torch.Tensor,
    negative_embeds: torch.Tensor | None = None,
    *,
    guidance_scale: float,
    num_inference_steps: int,
    seeds: Sequence[int],
    extra_condition: Mapping[str, Any] | None = None,
    negative_extra_condition: Mapping[str, Any] | None = None,
    extra_guidance_scale: float | None = None,
    batch_size: int = 64,
    vae: AutoencoderKL | None = None,
    mixed_precision: str = "no",
) -> np.ndarray:
    """Deterministic DDIM (eta 0) with classifier-free guidance -> uint8 (N, H, W, 3).

    ``prompt_embeds`` is (N, L, D), one row per image; ``negative_embeds`` is (N, L, D) or
    (1, L, D) (usually the empty prompt) and is needed when ``guidance_scale != 1``.
    ``scheduler`` is any diffusers scheduler whose config describes the training noise; a
    fresh ``DDIMScheduler`` is built from it, so the caller's object is never stepped.
    Image ``i`` starts from ``torch.Generator().manual_seed(seeds[i])`` noise, so a seed gives
    the same picture whatever else shares its batch (up to float rounding, which multithreaded
    kernels may do differently for another batch size: at most one uint8 level).

    ``extra_condition`` is passed to every UNet call as keyword arguments (e.g.
    ``cross_attention_kwargs`` or ``added_cond_kwargs``), so a user branch plugs in through
    attention processors without changing callers. Every tensor in it, at any depth of
    nested mappings, is per image (first dimension N) and is cut into the same batches as
    the prompts; anything else is passed unchanged. Under guidance the unconditional half
    gets ``negative_extra_condition`` (default: the same as ``extra_condition``). With
    ``extra_guidance_scale`` the two conditions get their own scales (compositional
    guidance, as InstructPix2Pix does for its two): ``ε(∅, ∅') + guidance_scale ·
    (ε(c, ∅') − ε(∅, ∅')) + extra_guidance_scale · (ε(c, e) − ε(c, ∅'))`` with ``c`` the
    prompt, ``e`` the extra condition and ``∅'`` the negative one. With ``vae`` the UNet
    works in its latent space and images are decoded, as in SD. ``mixed_precision="bf16"``
    runs the UNet under bf16 autocast (twice as fast on a CPU with AVX512-BF16; in float32 on
    a CPU without native bf16, see ``precision``); the scheduler arithmetic stays in float32.
    """
    if mixed_precision not in ("no", "bf16"):
        raise ValueError(f"mixed_precision must be 'no' or 'bf16', got {mixed_precision!r}")
    n = len(seeds)
    if prompt_embeds.shape[0] != n:
        raise ValueError(f"{prompt_embeds.shape[0]} prompt embeddings but {n} seeds")
    guided = guidance_scale != 1.0 or extra_guidance_scale is not None
    if guided and negative_embeds is None:
        raise ValueError("guidance needs negative_embeds (e.g. the empty prompt)")
    if extra_guidance_scale is not None and negative_extra_condition is None:
        raise ValueError("extra_guidance_scale needs negative_extra_condition")
    if guided:
        negative_embeds = negative_embeds.expand(n, -1, -1)
    extra_condition = dict(extra_condition or {})
    if negative_extra_condition is None:
        negative_extra_condition = extra_condition

    ddim = DDIMScheduler.from_config(scheduler.config)
    ddim.set_timesteps(num_inference_steps)
    device, dtype = unet.device, unet.dtype
    autocast = effective_precision(mixed_precision, device) == "bf16"
    size = unet.config.sample_size
    shape = (unet.config.in_channels, size, size)
    was_training = unet.training
    unet.eval()
    images = []
    try:
        for start in range(0, n, batch_size):
            index = slice(start, min(start + batch_size, n))
            latents = (
                torch.stack(
                    [
                        torch.randn(shape, generator=torch.Generator().manual_seed(s))
                        for s in seeds[index]
                    ]
                ).to(device)
                * ddim.init_noise_sigma
            )
            # The branches evaluated each step, stacked on the batch dimension.
            texts = [prompt_embeds[index]]
            extras = [_per_image(extra_condition, index)]
            if guided:
                texts.insert(0, negative_embeds[index])
                extras.insert(0, _per_image(negative_extra_condition, index))
            if extra_guidance_scale is not None:  # the prompt without the extra condition
                texts.insert(1, prompt_embeds[index])
                extras.insert(1, extras[0])
            condition = torch.cat(texts).to(device, dtype)
            extra = extras[0]
            for more in extras[1:]:
                extra = _stacked(extra, more)
            extra = _to_unet(extra, device, dtype)
            for timestep in ddim.timesteps:
                model_input = torch.cat([latents] * len(texts))
                model_input = ddim.scale_model_input(model_input, timestep).to(dtype)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                    outputs = unet(
                        model_input, timestep, encoder_hidden_states=condition, **extra
                    ).sample.float()
                output = _guided(outputs.chunk(len(texts)), guidance_scale, extra_guidance_scale)
                latents = ddim.step(output, timestep, latents).prev_sample
            if vae is not None:
                latents = vae.decode(
                    (latents / vae.config.scaling_factor).to(vae.dtype)
                ).sample.float()
            images.append(to_uint8_images(latents))
    finally:
        unet.train(was_training)
    return np.concatenate(images)


def _guided(
    outputs: Sequence[torch.Tensor], guidance_scale: float, extra_guidance_scale: float | None
) -> torch.Tensor:
    """Combine the branch outputs: [conditional], [∅, conditional] or [∅, prompt, full]."""
    if len(outputs) == 1:
        return outputs[0]
    if len(outputs) == 2:
        unconditional, conditional = outputs
        return unconditional + guidance_scale * (conditional - unconditional)
    unconditional, prompt_only, full = outputs
    return (
        unconditional
        + guidance_scale * (prompt_only - unconditional)
        + extra_guidance_scale * (full - prompt_only)
    )


def generate(
    unet: UNet2DConditionModel,
    scheduler: Any,
    text_encoder: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    guidance_scale: float,
    num_inference_steps: int,
    seed: int,
    batch_size: int = 64,
) -> np.ndarray:
    """One image per prompt (image ``i`` from seed ``seed + i``), guided against the empty
    prompt: the plain text-to-image call."""
    return sample(
        unet,
        scheduler,
        encode_prompts(text_encoder, tokenizer, prompts),
        encode_prompts(text_encoder, tokenizer, [""]),
        guidance_scale=guidance_scale,
        num_inference_steps=num_inference_steps,
        seeds=[seed + i for i in range(len(prompts))],
        batch_size=batch_size,
    )


def prompt_adherence(
    oracle: AttributeOracle, images: np.ndarray, asked: RenderSet
) -> dict[str, float]:
    """Share of ``images`` whose oracle reading equals what ``asked``'s caption asked for,
    per oracle head (subject and each attribute category); image ``i`` answers caption ``i``."""
    if len(images) != len(asked.subjects):
        raise ValueError(f"{len(images)} images for {len(asked.subjects)} captions")
    read = oracle.predict(images)
    truth = asked.labels()
    return {
        head: float(np.mean(np.asarray(read[head]) == np.asarray(truth[head])))
        for head in oracle.heads
    }


def sample_grid(
    samples: np.ndarray,
    references: np.ndarray | None = None,
    captions: Sequence[str] | None = None,
    *,
    columns: int = 4,
    scale: int = 4,
) -> Image.Image:
    """A PIL grid: each cell is a sample, the real render beside it if given, and its
    caption under it if given; pixels are enlarged ``scale`` times (nearest) to be seen."""
    n, height, width, _ = samples.shape
    panels = 1 if references is None else 2
    cell_w, cell_h = panels * width * scale, height * scale
    caption_h = 0 if captions is None else 24
    rows = math.ceil(n / columns)
    pad = 4
    grid = Image.new(
        "RGB",
        (columns * (cell_w + pad) + pad, rows * (cell_h + caption_h + pad) + pad),
        (255, 255, 255),
    )
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    for i in range(n):
        x = pad + (i % columns) * (cell_w + pad)
        y = pad + (i // columns) * (cell_h + caption_h + pad)
        tiles = [samples[i]] if references is None else [samples[i], references[i]]
        for k, tile in enumerate(tiles):
            enlarged = Image.fromarray(tile).resize((width * scale, height * scale), Image.NEAREST)
            grid.paste(enlarged, (x + k * width * scale, y))
        if captions is not None:
            _draw_wrapped(draw, captions[i], (x, y + cell_h + 1), cell_w, font)
    return grid


def _draw_wrapped(
    draw: ImageDraw.ImageDraw, text: str, origin: tuple[int, int], width: int, font: Any
) -> None:
    """At most two lines of ``text`` within ``width`` pixels (the rest is cut)."""
    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if line and draw.textlength(candidate, font=font) > width:
            lines.append(line)
            line = word
        else:
            line = candidate
    lines.append(line)
    x, y = origin
    for k, part in enumerate(lines[:2]):
        draw.text((x, y + 11 * k), part, fill=(0, 0, 0), font=font)


def grid_writer(
    unet: UNet2DConditionModel,
    scheduler: Any,
    prompt_embeds: torch.Tensor,
    negative_embeds: torch.Tensor,
    references: RenderSet,
    directory: str | Path,
    *,
    every: int,
    guidance_scale: float,
    num_inference_steps: int,
    seed: int,
) -> Callable[[int, dict[str, float]], None]:
    """An ``on_log`` callback for ``train`` that writes ``step-{step:06d}.png`` (samples of
    ``references``' captions beside the renders) every ``every`` steps, from fixed seeds so
    grids of successive steps compare. ``every`` should be a multiple of ``log_every``."""
    directory = Path(directory)
    captions = references.captions

    def write(step: int, entry: dict[str, float]) -> None:
        if step % every:
            return
        samples = sample(
            unet,
            scheduler,
            prompt_embeds,
            negative_embeds,
            guidance_scale=guidance_scale,
            num_inference_steps=num_inference_steps,
            seeds=[seed + i for i in range(len(captions))],
        )
        directory.mkdir(parents=True, exist_ok=True)
        grid = sample_grid(samples, references.images, captions)
        partial = directory / f".tmp-step-{step:06d}.png"
        grid.save(partial)
        partial.replace(directory / f"step-{step:06d}.png")

    return write
