"""The base text-to-image model: training through the shared trainer, the sampler's
determinism, guidance and extra conditioning, and the save/load round trip."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.models.attention_processor import Attention, AttnProcessor
from torch import nn

from prefgen_kedro.datasets import PretrainedModelDataset
from prefgen_kedro.models.clip import build_conditioning_clip
from prefgen_kedro.models.clip_tokenizer import build_clip_tokenizer
from prefgen_kedro.models.diffusion import (
    DiffusionLoss,
    build_noise_scheduler,
    build_unet,
    diffusion_training_data,
    encode_latents,
    encode_prompts,
    generate,
    grid_writer,
    prompt_adherence,
    sample,
    sample_grid,
    to_diffusion_pixels,
)
from prefgen_kedro.training import TrainConfig, train
from prefgen_kedro.world.agent_world import RenderSet, render_set

SIZE = 16
WIDTH = 16  # text width = cross-attention width


@pytest.fixture(scope="module")
def text_tower() -> tuple[nn.Module, object]:
    tokenizer = build_clip_tokenizer(model_max_length=24)
    clip = build_conditioning_clip(
        image_size=SIZE,
        patch_size=4,
        vision_width=16,
        vision_layers=1,
        text_width=WIDTH,
        text_layers=1,
        heads=2,
        projection_dim=16,
        max_text_length=24,
        vocab_size=len(tokenizer),
        seed=0,
    )
    return clip.text_model.eval(), tokenizer


@pytest.fixture(scope="module")
def renders() -> RenderSet:
    return render_set(8, seed=5, size=SIZE)


def tiny_unet(seed: int = 0, in_channels: int = 3, sample_size: int = SIZE) -> UNet2DConditionModel:
    return build_unet(
        sample_size=sample_size,
        in_channels=in_channels,
        block_out_channels=(8, 16),
        layers_per_block=1,
        cross_attention_dim=WIDTH,
        attention_head_dim=2,
        norm_num_groups=4,
        seed=seed,
    )


def tiny_config(**overrides: object) -> TrainConfig:
    settings = {
        "max_steps": 4,
        "batch_size": 4,
        "learning_rate": 1e-3,
        "warmup_steps": 1,
        "checkpoint_every": 2,
        "log_every": 2,
    }
    return TrainConfig(**{**settings, **overrides})


def test_encode_prompts_pads_to_one_length_per_prompt(text_tower) -> None:
    encoder, tokenizer = text_tower
    embeds = encode_prompts(encoder, tokenizer, ["a red circle", "", "a red circle"], batch_size=2)
    assert embeds.shape == (3, 24, WIDTH) and embeds.dtype == torch.float32
    assert not embeds.requires_grad
    torch.testing.assert_close(embeds[0], embeds[2])  # batching does not change a prompt


class Interrupted(Exception):
    """Stands in for a killed process."""


def test_trains_and_resumes_bit_for_bit(tmp_path: Path, text_tower, renders) -> None:
    data, empty = diffusion_training_data(renders.images, renders.captions, *text_tower)
    assert set(data[0]) == {"pixel_values", "prompt_embeds"} and empty.shape == (1, 24, WIDTH)
    assert data.tensors["pixel_values"].min() >= -1 and data.tensors["pixel_values"].max() <= 1
    loss = DiffusionLoss(build_noise_scheduler(), empty, caption_dropout=0.5)

    reference = tiny_unet()
    initial = [param.detach().clone() for param in reference.parameters()]
    result = train(reference, data, loss, tiny_config(), checkpoint_root=tmp_path / "a", name="u")
    assert result.steps == 4
    assert all(np.isfinite(entry["loss"]) and "mse" in entry for entry in result.history)
    assert any(not torch.equal(a, b) for a, b in zip(initial, reference.parameters(), strict=True))

    def crash_at_step_4(step: int, entry: dict[str, float]) -> None:
        if step == 4:
            raise Interrupted

    with pytest.raises(Interrupted):
        train(
            tiny_unet(),
            data,
            loss,
            tiny_config(),
            checkpoint_root=tmp_path / "b",
            name="u",
            on_log=crash_at_step_4,
        )
    resumed = tiny_unet(seed=9)
    again = train(resumed, data, loss, tiny_config(), checkpoint_root=tmp_path / "b", name="u")
    assert again.resumed_from == 2
    # Noise, timesteps and caption dropout come from the global RNG the trainer restores.
    for a, b in zip(reference.parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("snr_gamma", [None, 5.0])
def test_loss_is_a_finite_scalar(prediction_type: str, snr_gamma: float | None) -> None:
    torch.manual_seed(0)
    batch = {
        "pixel_values": torch.rand(3, 3, SIZE, SIZE) * 2 - 1,
        "prompt_embeds": torch.randn(3, 5, WIDTH),
    }
    loss = DiffusionLoss(
        build_noise_scheduler(prediction_type=prediction_type),
        torch.zeros(1, 5, WIDTH),
        snr_gamma=snr_gamma,
    )
    value, metrics = loss(tiny_unet(), batch)
    assert value.ndim == 0 and torch.isfinite(value)
    assert set(metrics) == {"mse"}


def assert_same_pictures(actual: np.ndarray, expected: np.ndarray) -> None:
    """Equal up to one uint8 level: with several threads, float kernels may round the last
    bit differently for another batch size, which can flip a pixel's rounding."""
    assert actual.shape == expected.shape
    assert np.abs(actual.astype(int) - expected.astype(int)).max() <= 1


def test_sampler_is_deterministic_per_seed() -> None:
    unet, scheduler = tiny_unet(), build_noise_scheduler()
    prompts = torch.randn(5, 6, WIDTH)
    empty = torch.zeros(1, 6, WIDTH)
    kwargs = {"guidance_scale": 3.0, "num_inference_steps": 3}
    first = sample(
        unet, scheduler, prompts, empty, seeds=[10, 11, 12, 13, 14], batch_size=5, **kwargs
    )
    assert first.shape == (5, SIZE, SIZE, 3) and first.dtype == np.uint8
    again = sample(
        unet, scheduler, prompts, empty, seeds=[10, 11, 12, 13, 14], batch_size=5, **kwargs
    )
    np.testing.assert_array_equal(first, again)
    # Other companions, order and batch size: each image still depends only on its seed.
    picked = [3, 0, 4]
    regrouped = sample(
        unet, scheduler, prompts[picked], empty, seeds=[13, 10, 14], batch_size=2, **kwargs
    )
    assert_same_pictures(regrouped, first[picked])
    other_seed = sample(unet, scheduler, prompts[:1], empty, seeds=[99], **kwargs)
    assert not np.array_equal(first[0], other_seed[0])


def test_classifier_free_guidance() -> None:
    unet, scheduler = tiny_unet(), build_noise_scheduler()
    prompts = torch.randn(3, 6, WIDTH)
    empty = torch.zeros(1, 6, WIDTH)
    seeds = [1, 2, 3]
    plain = sample(unet, scheduler, prompts, guidance_scale=1.0, num_inference_steps=3, seeds=seeds)
    guided = sample(
        unet, scheduler, prompts, empty, guidance_scale=4.0, num_inference_steps=3, seeds=seeds
    )
    assert not np.array_equal(plain, guided)
    # With the prompt as its own negative, guidance adds nothing: u + g (c - u) = c.
    self_negative = sample(
        unet, scheduler, prompts, prompts, guidance_scale=4.0, num_inference_steps=3, seeds=seeds
    )
    assert_same_pictures(self_negative, plain)
    with pytest.raises(ValueError, match="negative_embeds"):
        sample(unet, scheduler, prompts, guidance_scale=2.0, num_inference_steps=3, seeds=seeds)
    with pytest.raises(ValueError, match="seeds"):
        sample(unet, scheduler, prompts, guidance_scale=1.0, num_inference_steps=3, seeds=[1])


class UserBranchProcessor(nn.Module):
    """A stand-in for the later user branch: a cross-attention processor that adds a
    projection of per-image ``user_tokens`` (from ``cross_attention_kwargs``) and records
    the batch sizes it saw."""

    def __init__(self, user_dim: int, channels: int, seen: list[torch.Tensor]) -> None:
        super().__init__()
        self.project = nn.Linear(user_dim, channels)
        self.seen = seen

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        user_tokens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        out = AttnProcessor()(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        self.seen.append(user_tokens)
        return out + self.project(user_tokens).mean(dim=1, keepdim=True)


def with_user_branch(unet: UNet2DConditionModel, user_dim: int) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    processors = {}
    for name in unet.attn_processors:
        if name.endswith("attn2.processor"):
            module = unet.get_submodule(name.removesuffix(".processor"))
            channels = module.to_out[0].out_features
            processors[name] = UserBranchProcessor(user_dim, channels, seen)
        else:
            processors[name] = AttnProcessor()
    unet.set_attn_processor(processors)
    return seen


def test_extra_condition_reaches_the_attention_processors() -> None:
    unet, scheduler = tiny_unet(), build_noise_scheduler()
    seen = with_user_branch(unet, user_dim=7)
    prompts = torch.randn(4, 6, WIDTH)
    empty = torch.zeros(1, 6, WIDTH)
    users = torch.randn(4, 2, 7)
    no_user = torch.zeros(4, 2, 7)

    def run(user_tokens: torch.Tensor, picked: list[int], batch_size: int) -> np.ndarray:
        return sample(
            unet,
            scheduler,
            prompts[picked],
            empty,
            guidance_scale=3.0,
            num_inference_steps=2,
            seeds=[100 + i for i in picked],
            extra_condition={"cross_attention_kwargs": {"user_tokens": user_tokens[picked]}},
            negative_extra_condition={"cross_attention_kwargs": {"user_tokens": no_user[picked]}},
            batch_size=batch_size,
        )

    with_users = run(users, [0, 1, 2, 3], batch_size=3)
    # Batches of 3 then 1, doubled for guidance: [unconditional; conditional] halves.
    assert [len(tokens) for tokens in seen] == [6] * (len(seen) // 2) + [2] * (len(seen) // 2)
    torch.testing.assert_close(seen[0][:3], no_user[:3])
    torch.testing.assert_close(seen[0][3:], users[:3])
    assert not np.array_equal(with_users, run(no_user, [0, 1, 2, 3], batch_size=3))
    # Per-image tensors follow their image into any batch.
    assert_same_pictures(run(users, [2, 0], batch_size=2), with_users[[2, 0]])


def tiny_vae() -> AutoencoderKL:
    """An f=2 ``AutoencoderKL`` with 4 latent channels, as SD's (f=8) has."""
    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=SIZE,
    )


def test_latent_model_is_decoded_by_its_vae() -> None:
    vae = tiny_vae()
    unet = tiny_unet(in_channels=4, sample_size=SIZE // 2)
    images = sample(
        unet,
        build_noise_scheduler(),
        torch.randn(2, 6, WIDTH),
        guidance_scale=1.0,
        num_inference_steps=2,
        seeds=[0, 1],
        vae=vae,
    )
    assert images.shape == (2, SIZE, SIZE, 3) and images.dtype == np.uint8


def test_training_latents_are_the_scaled_posterior_mean_batch_by_batch() -> None:
    vae = tiny_vae().eval()
    pictures = [
        np.random.default_rng(i).integers(0, 256, (SIZE, SIZE, 3), np.uint8) for i in range(3)
    ]
    latents = encode_latents(vae, pictures, batch_size=2)
    assert latents.shape == (3, 4, SIZE // 2, SIZE // 2) and latents.dtype == torch.float32
    with torch.no_grad():
        whole = vae.encode(to_diffusion_pixels(np.stack(pictures))).latent_dist.mean
    torch.testing.assert_close(latents, whole * vae.config.scaling_factor)
    # the same pictures give the same training samples (no posterior draw)
    assert torch.equal(encode_latents(vae, np.stack(pictures)), encode_latents(vae, pictures))


def test_round_trip_through_the_pretrained_model_dataset(tmp_path: Path) -> None:
    unet, scheduler = tiny_unet(seed=3), build_noise_scheduler()
    unet_set = PretrainedModelDataset(
        path=tmp_path / "unet", model_class="diffusers.UNet2DConditionModel"
    )
    scheduler_set = PretrainedModelDataset(
        path=tmp_path / "scheduler", model_class="diffusers.DDPMScheduler"
    )
    unet_set.save(unet)
    scheduler_set.save(scheduler)
    assert (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    loaded_unet, loaded_scheduler = unet_set.load(), scheduler_set.load()
    assert isinstance(loaded_scheduler, DDPMScheduler)
    assert loaded_scheduler.config.prediction_type == scheduler.config.prediction_type
    kwargs = {"guidance_scale": 2.0, "num_inference_steps": 3, "seeds": [4, 5]}
    prompts, empty = torch.randn(2, 6, WIDTH), torch.zeros(1, 6, WIDTH)
    np.testing.assert_array_equal(
        sample(unet, scheduler, prompts, empty, **kwargs),
        sample(loaded_unet, loaded_scheduler, prompts, empty, **kwargs),
    )


class TruthfulOracle:
    """Reads back exactly what each render shows, so adherence is 1 on the renders."""

    def __init__(self, renders: RenderSet) -> None:
        self.heads = renders.labels()
        self.renders = renders

    def predict(self, images: np.ndarray) -> dict[str, list[str]]:
        assert len(images) == len(self.renders.subjects)
        return self.renders.labels()


def test_prompt_adherence_and_generation(text_tower, renders) -> None:
    oracle = TruthfulOracle(renders)
    assert prompt_adherence(oracle, renders.images, renders) == dict.fromkeys(oracle.heads, 1.0)
    other = render_set(8, seed=6, size=SIZE)
    assert min(prompt_adherence(oracle, renders.images, other).values()) < 1.0
    images = generate(
        tiny_unet(),
        build_noise_scheduler(),
        *text_tower,
        renders.captions[:3],
        guidance_scale=2.0,
        num_inference_steps=2,
        seed=0,
    )
    assert images.shape == (3, SIZE, SIZE, 3)


def test_grids(tmp_path: Path, text_tower, renders) -> None:
    grid = sample_grid(renders.images[:5], renders.images[:5], renders.captions[:5], columns=2)
    assert grid.size[0] > 2 * 2 * SIZE * 4 and grid.size[1] > 3 * SIZE * 4
    writer = grid_writer(
        tiny_unet(),
        build_noise_scheduler(),
        encode_prompts(*text_tower, renders.captions[:2]),
        encode_prompts(*text_tower, [""]),
        RenderSet(renders.subjects[:2], renders.styles[:2], renders.images[:2]),
        tmp_path / "grids",
        every=4,
        guidance_scale=2.0,
        num_inference_steps=2,
        seed=0,
    )
    writer(2, {})
    writer(4, {})
    assert [path.name for path in (tmp_path / "grids").iterdir()] == ["step-000004.png"]
