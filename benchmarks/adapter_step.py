"""A user-branch training step vs. a bare diffusers UNet training step of the same size.

Project: the shipped base UNet, frozen, with the PrefGen variant's ``UserAdapter`` installed
(``UserConditionedUnet``), trained by ``prefgen_kedro.training.train`` with ``DiffusionLoss``
(caption and user dropout, Min-SNR weighting), as ``diffusion.train_user_branches`` does.
Reference: the same UNet loaded again, every weight trainable (diffusers'
``train_text_to_image``), text condition only: noise, ``add_noise``, the v-prediction MSE,
``backward``, AdamW, on one fixed batch. Same batch size, resolution and bf16 autocast (fp32
on a CPU without native bf16, as the trainer runs there: ``prefgen_kedro.precision``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel
from transformers import AutoConfig, CLIPModel, CLIPTokenizer

import prefgen_kedro.models.mllm  # noqa: F401 - registers the tiny MLLM's config class
from benchmarks import FOUNDATION
from benchmarks.timing import PRECISION_LABELS, Comparison, main, time_training
from prefgen_kedro.models.batches import TensorDictDataset
from prefgen_kedro.models.diffusion import DiffusionLoss, encode_prompts, to_diffusion_pixels
from prefgen_kedro.models.user_adapter import UserAdapter, UserConditionedUnet
from prefgen_kedro.precision import effective_precision
from prefgen_kedro.world.agent_world import render_set
from prefgen_kedro.world.vocabulary import subject_prompt

# As conf/base/parameters_diffusion.yml (diffusion.train and the prefgen variant).
TRAIN = {
    "batch_size": 16,
    "learning_rate": 1.0e-3,
    "weight_decay": 0.01,
    "warmup_steps": 20,
    "mixed_precision": "bf16",
    "seed": 61,
}
TOKENS_PER_PART = 4
CAPTION_DROPOUT, USER_DROPOUT, SNR_GAMMA = 0.1, 0.1, 5.0
SAMPLES = 64  # renders the trainer shuffles through (4 batches an epoch)


def run(quick: bool = False) -> Comparison:
    """Time both training steps, in turn; ``quick``: 1 warm-up and 2 timed steps each."""
    warmup, repeats = (1, 2) if quick else (3, 10)
    batch_size = TRAIN["batch_size"]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = effective_precision(TRAIN["mixed_precision"], device)
    unet = UNet2DConditionModel.from_pretrained(FOUNDATION / "base_unet", torch_dtype=torch.float32)
    scheduler = DDPMScheduler.from_pretrained(FOUNDATION / "noise_scheduler")
    clip = CLIPModel.from_pretrained(FOUNDATION / "conditioning_clip", dtype=torch.float32)
    tokenizer = CLIPTokenizer.from_pretrained(FOUNDATION / "clip_tokenizer")
    widths = _part_widths(unet, clip)
    dataset, empty = _training_set(unet, clip, tokenizer, widths)
    adapter = UserAdapter.for_unet(unet, widths, TOKENS_PER_PART, text_space_parts=["e_sem_hat"])
    loss = DiffusionLoss(
        scheduler,
        empty,
        CAPTION_DROPOUT,
        SNR_GAMMA,
        user_keys=tuple(adapter.part_names),
        user_dropout=USER_DROPOUT,
    )
    bare = UNet2DConditionModel.from_pretrained(FOUNDATION / "base_unet", torch_dtype=torch.float32)
    bare = bare.to(device).train()
    batch = {
        key: dataset.tensors[key][:batch_size].to(device)
        for key in ("pixel_values", "prompt_embeds")
    }
    optimizer = torch.optim.AdamW(
        bare.parameters(), lr=TRAIN["learning_rate"], weight_decay=TRAIN["weight_decay"]
    )
    project, reference = time_training(
        UserConditionedUnet(unet, adapter),
        dataset,
        loss,
        TRAIN,
        lambda: _bare_step(bare, scheduler, optimizer, batch, autocast=precision == "bf16"),
        warmup=warmup,
        repeats=repeats,
        trainable_parameters=adapter.trainable_parameters(key_values=False),
        description="benchmark: user branch",
    )
    size = unet.config.sample_size
    return Comparison(
        title="User-branch training step vs. bare UNet training step",
        call="step",
        unit="images",
        items=batch_size,
        labels=("user branch (project trainer)", "bare UNet (plain loop)"),
        project=project,
        reference=reference,
        details=(
            f"Batch {batch_size}, {size}×{size} pixels, {PRECISION_LABELS[precision]} on "
            f"{device.type}, {warmup} warm-up + {repeats} timed steps each, in turn. The branch "
            f"trains only the adapter ({_count(adapter):,} parameters; the UNet's "
            f"{_count(bare):,} are frozen but back-propagated through); the bare step trains "
            "every UNet weight."
        ),
    )


def _part_widths(unet: UNet2DConditionModel, clip: CLIPModel) -> dict[str, int]:
    """The parts of the prefgen variant, ``[ê_sem; e_core; e_img]``, as wide as the
    pipeline makes them from the shipped models."""
    mllm = AutoConfig.from_pretrained(FOUNDATION / "mllm")
    return {
        "e_sem_hat": unet.config.cross_attention_dim,  # the aligner's one text-space token
        "e_core": mllm.text_config.hidden_size,  # a mean of MLLM hidden states
        "e_img": clip.config.projection_dim,  # a CLIP image embedding
    }


def _training_set(
    unet: UNet2DConditionModel,
    clip: CLIPModel,
    tokenizer: CLIPTokenizer,
    widths: dict[str, int],
) -> tuple[TensorDictDataset, torch.Tensor]:
    """Agent-world renders with their subject prompts (as the pipeline's training samples)
    and random condition parts, plus the empty prompt's embedding."""
    renders = render_set(SAMPLES, seed=0, size=unet.config.sample_size)
    text_encoder = clip.text_model.eval()
    prompts = [subject_prompt(subject) for subject in renders.subjects]
    generator = torch.Generator().manual_seed(0)
    dataset = TensorDictDataset(
        pixel_values=to_diffusion_pixels(renders.images),
        prompt_embeds=encode_prompts(text_encoder, tokenizer, prompts),
        **{
            name: torch.randn(SAMPLES, width, generator=generator) for name, width in widths.items()
        },
    )
    return dataset, encode_prompts(text_encoder, tokenizer, [""])


def _bare_step(
    unet: UNet2DConditionModel,
    scheduler: DDPMScheduler,
    optimizer: torch.optim.Optimizer,
    batch: dict[str, torch.Tensor],
    *,
    autocast: bool,
) -> float:
    clean = batch["pixel_values"]
    noise = torch.randn_like(clean)
    timesteps = torch.randint(
        0, scheduler.config.num_train_timesteps, (len(clean),), device=clean.device
    )
    noisy = scheduler.add_noise(clean, noise, timesteps)
    if scheduler.config.prediction_type == "epsilon":
        target = noise
    else:
        target = scheduler.get_velocity(clean, noise, timesteps)
    with torch.autocast(clean.device.type, dtype=torch.bfloat16, enabled=autocast):
        prediction = unet(noisy, timesteps, encoder_hidden_states=batch["prompt_embeds"]).sample
    loss = F.mse_loss(prediction.float(), target)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    # The trainer reads every loss (its NaN check); reading it here also waits for a GPU.
    return loss.item()


def _count(module: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


if __name__ == "__main__":
    main(run, __doc__.splitlines()[0])
