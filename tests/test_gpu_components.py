"""The ``gpu`` environment's wiring, on this machine: its configuration loads and validates,
and each hub component, built from its real config with random weights (nothing is
downloaded) and a few layers where depth only costs time, plugs into the project's code.

Widths are the real ones: Qwen2-VL-2B's 1536-d states give ``e_sem``/``e_core`` (means over
layers), CLIP ViT-L/14's 768-d image projection gives ``e_img``, and ``ê_sem`` lives in SD
1.5's 768-d text space (one token). Each test skips, saying why, when the machine has less
free memory than it needs (its measured peak resident memory, plus headroom).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import psutil
import pytest
import torch
from accelerate.commands.config.config_args import ClusterConfig
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0
from kedro.config import OmegaConfigLoader
from kedro.framework.session import KedroSession
from kedro.framework.startup import bootstrap_project
from safetensors.torch import save_file
from transformers import CLIPConfig, CLIPModel, Qwen2VLConfig, Qwen2VLForConditionalGeneration

from prefgen_kedro import settings
from prefgen_kedro.datasets import PretrainedModelDataset
from prefgen_kedro.minihub import HUB_SD15_UNET as SD15_UNET
from prefgen_kedro.minihub import HUB_SD15_VAE as SD15_VAE
from prefgen_kedro.minihub import SD15_SCHEDULER
from prefgen_kedro.models.alignment import text_embeddings
from prefgen_kedro.models.clip import (
    OPEN_CLIP_CONFIG,
    OPEN_CLIP_WEIGHTS,
    EvaluationClip,
    conditioning_clip_encoders,
    evaluation_clip_encoders,
)
from prefgen_kedro.models.clip_tokenizer import save_clip_tokenizer
from prefgen_kedro.models.diffusion import DiffusionLoss, encode_latents, encode_prompts
from prefgen_kedro.models.mllm import (
    MllmPreferenceModel,
    PreferenceContext,
    VqaDataset,
    add_lora,
    frozen_parameters,
    vqa_loss,
)
from prefgen_kedro.models.user_adapter import (
    UserAdapter,
    UserConditionedUnet,
    choose_image_embedding,
    install_user_adapter,
)
from prefgen_kedro.models.vqa import sample_vqa_examples, vqa_corpus
from prefgen_kedro.params import DiffusionParams, VqaTuningParams
from prefgen_kedro.training import train
from prefgen_kedro.world.agent_world import generate_agent_world

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONF = PROJECT_ROOT / "conf"

# openai/clip-vit-large-patch14 (its text tower is SD 1.5's text encoder), one layer a tower.
CLIP_VIT_L14 = {
    "projection_dim": 768,
    "text_config": {
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_attention_heads": 12,
        "num_hidden_layers": 1,  # 12
        "max_position_embeddings": 77,
        "hidden_act": "quick_gelu",
        "vocab_size": 49408,
    },
    "vision_config": {
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_attention_heads": 16,
        "num_hidden_layers": 1,  # 24
        "image_size": 224,
        "patch_size": 14,
        "hidden_act": "quick_gelu",
    },
}
# Qwen/Qwen2-VL-2B-Instruct with 2 of its 28 language and 2 of its 32 vision layers; the
# token ids come from the test's small tokenizer.
QWEN2_VL_2B_TEXT = {
    "vocab_size": 151936,
    "hidden_size": 1536,
    "intermediate_size": 8960,
    "num_hidden_layers": 2,  # 28
    "num_attention_heads": 12,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
}
QWEN2_VL_2B_VISION = {
    "depth": 2,  # 32
    "embed_dim": 1280,
    "hidden_size": 1536,
    "num_heads": 16,
    "mlp_ratio": 4,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
}
# laion/CLIP-ViT-H-14-laion2B-s32B-b79K is open_clip's ViT-H-14 (its bundled config).
VIT_H14_LAYERS_KEPT = 1  # of 32 vision and 24 text layers


def require_free_memory(gib: float, what: str) -> None:
    available = psutil.virtual_memory().available / 2**30
    if available < gib:
        pytest.skip(f"{what} needs ~{gib:g} GiB of free memory; {available:.1f} GiB is free")


@pytest.fixture(scope="module")
def gpu_config() -> OmegaConfigLoader:
    return OmegaConfigLoader(conf_source=str(CONF), env="gpu", **settings.CONFIG_LOADER_ARGS)


def load_as_gpu_catalog(gpu_config: OmegaConfigLoader, name: str, path: Path) -> Any:
    """What the gpu catalog's entry ``name`` loads from ``path``, on the CPU: its class and
    load arguments, without the device placement (no GPU here)."""
    entry = dict(gpu_config["catalog"][name])
    assert entry.pop("type") == "prefgen_kedro.datasets.PretrainedModelDataset"
    load_args = {
        key: value
        for key, value in entry.pop("load_args", {}).items()
        if key not in {"device_map", "map_location"}
    }
    return PretrainedModelDataset(**{**entry, "path": path, "load_args": load_args}).load()


def pictures(n: int, size: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), np.uint8) for _ in range(n)]


# ---- configuration ------------------------------------------------------------------------


def test_gpu_environment_validates_and_reads_every_foundation_model_from_the_hub_folder(
    gpu_config,
):
    bootstrap_project(PROJECT_ROOT)
    with KedroSession.create(project_path=PROJECT_ROOT, env="gpu") as session:
        context = session.load_context()
        params = context.params  # Kedro's ParameterValidator: every pipeline's models
        catalog = context.catalog
    diffusion = params["diffusion"]
    assert isinstance(diffusion, DiffusionParams) and diffusion.gradient_checkpointing
    # Pick-a-Pic users have no known taste, so nothing reads a perfect ê_sem (true_sem).
    assert "prefgen" in diffusion.active_variants
    assert "oracle_taste" not in diffusion.active_variants
    evaluation = params["evaluation"]
    assert "oracle_taste" not in evaluation.methods + evaluation.references
    vqa = params["vqa_tuning"]
    assert isinstance(vqa, VqaTuningParams) and vqa.lora is not None
    assert vqa.lora.gradient_checkpointing and not vqa.slot_positions
    assert all(stage.train.mixed_precision == "bf16" for stage in vqa.stages)
    # Every stand-in the foundation pipeline makes comes from a downloaded checkpoint,
    # except the attribute oracle (it reads the agent world's renders only).
    hub = {
        "foundation_mllm",
        "foundation_mllm_processor",
        "base_unet",
        "base_vae",
        "noise_scheduler",
        "clip_tokenizer",
        "conditioning_clip",
        "evaluation_clip",
    }
    entries = gpu_config["catalog"]
    assert all(entries[name]["path"].startswith("data/06_models/hub/") for name in hub)
    assert all(name in catalog for name in hub)
    models = {name for name in hub if "load_args" in entries[name]}
    assert all({"device_map", "map_location"} & set(entries[name]["load_args"]) for name in models)
    accelerate = ClusterConfig.from_yaml_file(CONF / "gpu" / "accelerate_multi_gpu.yaml")
    assert (accelerate.distributed_type, accelerate.mixed_precision) == ("MULTI_GPU", "bf16")
    assert accelerate.num_machines == 1


# ---- Stable Diffusion 1.5, its text encoder and CLIP image encoder ------------------------


@pytest.fixture
def sd15_unet() -> UNet2DConditionModel:
    require_free_memory(8, "the SD 1.5-size UNet test (3.4 GB of float32 weights, 5.3 GB peak)")
    torch.manual_seed(0)
    return UNet2DConditionModel.from_config(SD15_UNET).eval()


@pytest.fixture
def conditioning(gpu_config, tmp_path_factory):
    """The ViT-L/14-size conditioning CLIP and SD 1.5's tokenizer (the same BPE as the one
    the project builds), loaded as the gpu catalog loads them."""
    folder = tmp_path_factory.mktemp("clip")
    save_clip_tokenizer(folder / "tokenizer")
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(**CLIP_VIT_L14)).save_pretrained(folder / "clip")
    return (
        load_as_gpu_catalog(gpu_config, "conditioning_clip", folder / "clip").eval(),
        load_as_gpu_catalog(gpu_config, "clip_tokenizer", folder / "tokenizer"),
    )


def test_user_branch_on_an_sd15_size_unet_learns_from_vae_latents_and_gpu_world_parts(
    sd15_unet, conditioning, gpu_config, tmp_path
):
    clip, tokenizer = conditioning
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD15_SCHEDULER))
    scheduler = load_as_gpu_catalog(gpu_config, "noise_scheduler", tmp_path / "scheduler")
    assert scheduler.config.prediction_type == "epsilon"
    torch.manual_seed(0)
    AutoencoderKL.from_config(SD15_VAE).save_pretrained(tmp_path / "vae")
    vae = load_as_gpu_catalog(gpu_config, "base_vae", tmp_path / "vae")

    # Each part of two users' conditions as the gpu world makes it: e_img from each one's
    # liked pictures, ê_sem in the aligner's target space, e_core as wide as Qwen2-VL's states.
    params = DiffusionParams.model_validate(gpu_config["parameters"]["diffusion"])
    encode_images, _ = conditioning_clip_encoders(clip, tokenizer)
    e_img = torch.stack(
        [
            choose_image_embedding(encode_images(np.stack(pictures(3, 64, user))), params.e_img)
            for user in range(2)
        ]
    )
    e_sem_hat = text_embeddings(clip, tokenizer, ["pastel", "dotted"])
    e_core = torch.randn(2, QWEN2_VL_2B_TEXT["hidden_size"])
    parts = {"e_sem_hat": e_sem_hat, "e_core": e_core, "e_img": e_img}
    assert {name: part.shape[1] for name, part in parts.items()} == {
        "e_sem_hat": 768,
        "e_core": 1536,
        "e_img": 768,
    }
    text = encode_prompts(clip.text_model, tokenizer, ["a cat", "a dog", ""])
    latents = encode_latents(vae, pictures(2, 64))  # 64 px -> 8×8 latents
    assert text.shape == (3, 77, 768) and latents.shape == (2, 4, 8, 8)

    adapter = UserAdapter.for_unet(
        sd15_unet,
        {name: part.shape[1] for name, part in parts.items()},
        params.tokens_per_part,
        [name for name in parts if name in params.text_space_parts],
    )
    assert set(adapter.projections) == {"e_core", "e_img"}  # ê_sem goes in as one token
    model = UserConditionedUnet(sd15_unet, adapter)
    loss = DiffusionLoss(scheduler, text[2:], caption_dropout=0.0, user_keys=tuple(parts))
    batch = {"pixel_values": latents, "prompt_embeds": text[:2], **parts}

    def adapter_gradients() -> dict[str, torch.Tensor]:
        adapter.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # the same noise and timesteps
        value, _ = loss(model, batch)
        value.backward()
        return {name: p.grad.clone() for name, p in adapter.named_parameters()}

    torch.nn.init.ones_(adapter.norm.weight)  # as after some training (it starts at zero)
    plain = adapter_gradients()
    assert all(p.grad is None for p in sd15_unet.parameters())  # the UNet stays frozen
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in plain.values())
    assert params.gradient_checkpointing
    sd15_unet.enable_gradient_checkpointing()  # as train_user_branches does with it
    try:
        checkpointed = adapter_gradients()
    finally:
        sd15_unet.disable_gradient_checkpointing()
    for name, gradient in plain.items():
        torch.testing.assert_close(checkpointed[name], gradient, rtol=1e-4, atol=1e-6)

    # At user scale 0 the branched UNet is the bare one.
    timestep = torch.tensor([500, 500])
    with torch.no_grad():
        tokens = adapter.tokens(parts)
        install_user_adapter(sd15_unet, adapter, scale=0.0)
        branched = sd15_unet(
            latents, timestep, text[:2], cross_attention_kwargs={"user_tokens": tokens}
        ).sample
        sd15_unet.set_attn_processor(AttnProcessor2_0())
        bare = sd15_unet(latents, timestep, text[:2]).sample
    assert branched.shape == latents.shape
    torch.testing.assert_close(branched, bare, rtol=1e-5, atol=1e-5)


# ---- Qwen2-VL-2B with LoRA ----------------------------------------------------------------


def test_lora_from_the_gpu_parameters_trains_only_lora_weights_of_a_qwen2_vl_2b_size_model(
    gpu_config, make_qwen2_vl_processor, tmp_path
):
    require_free_memory(5, "the Qwen2-VL-2B-width test (0.8 GB of bf16 weights, 3.5 GB peak)")
    if torch.backends.cpu.get_cpu_capability() not in ("AVX512", "AVX512_BF16", "AMX"):
        # Without AVX-512, bf16 matmuls are emulated: alone on an AVX2 CPU this test ran for
        # over 7 minutes (stopped), where the whole suite takes 140 s on an AVX-512 one.
        pytest.skip("bf16 at Qwen2-VL-2B width needs a CPU with AVX-512 to fit CI's budget")
    world = generate_agent_world(
        n_users=2,
        images_per_user=8,
        n_liked_attributes=2,
        n_disliked_attributes=2,
        label_noise=0.0,
        image_size=32,
        split_fractions={"train": 1.0},
        images_subdir="images",
        seed=0,
    )
    examples = sample_vqa_examples(
        world.images,
        world.interactions,
        world.users,
        splits=["train"],
        k=2,
        samples_per_user=1,
        seed=0,
        with_reasons=True,
    )
    processor = make_qwen2_vl_processor(vqa_corpus(world.images["caption"]))
    processor.save_pretrained(tmp_path / "mllm")
    vocabulary = processor.tokenizer.get_vocab()
    config = Qwen2VLConfig(
        text_config=QWEN2_VL_2B_TEXT,
        vision_config=QWEN2_VL_2B_VISION,
        image_token_id=vocabulary["<|image_pad|>"],
        video_token_id=vocabulary["<|video_pad|>"],
        vision_start_token_id=vocabulary["<|vision_start|>"],
        vision_end_token_id=vocabulary["<|vision_end|>"],
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    Qwen2VLForConditionalGeneration(config).to(torch.bfloat16).save_pretrained(tmp_path / "mllm")
    mllm = load_as_gpu_catalog(gpu_config, "foundation_mllm", tmp_path / "mllm")
    processor = load_as_gpu_catalog(gpu_config, "foundation_mllm_processor", tmp_path / "mllm")
    assert mllm.dtype == torch.bfloat16 and mllm.config._attn_implementation == "sdpa"

    params = VqaTuningParams.model_validate(gpu_config["parameters"]["vqa_tuning"])
    model = add_lora(mllm, **params.lora.model_dump())
    frozen = {id(p) for p in frozen_parameters(mllm)}  # as tune_mllm freezes it
    trainable = [p for p in model.parameters() if p.requires_grad and id(p) not in frozen]
    before = {name: value.clone() for name, value in model.state_dict().items()}
    dataset = VqaDataset(examples[:2], world.pictures, processor)
    # One step of the first stage's recipe (bf16, its learning rate), without warm-up (whose
    # first step has a learning rate of 0).
    stage = params.stages[0].train.model_copy(
        update={
            "max_steps": 1,
            "batch_size": 2,
            "gradient_accumulation_steps": 1,
            "warmup_steps": 0,
        }
    )
    result = train(
        model,
        dataset,
        vqa_loss,
        stage,
        checkpoint_root=tmp_path / "checkpoints",
        name="qwen2_vl_lora",
        collate_fn=dataset.collate,
        trainable_parameters=trainable,
    )
    assert result.steps == 1 and np.isfinite(result.history[-1]["loss"])
    after = model.state_dict()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    layers = range(QWEN2_VL_2B_TEXT["num_hidden_layers"])
    projections = {f"layers.{i}.self_attn.{p}_proj" for i in layers for p in "qkvo"}
    assert changed and all("lora_" in name for name in changed)
    assert {name.split("language_model.")[1].split(".lora_")[0] for name in changed} == projections

    # Probing reads 1536-d states: e_sem and e_core are means over chosen layers.
    contexts = [
        PreferenceContext(
            [world.pictures[i] for i in e.liked], [world.pictures[i] for i in e.disliked]
        )
        for e in examples[:2]
    ]
    states = MllmPreferenceModel(model, processor, batch_size=2).hidden_states(contexts)
    assert states.shape == (2, QWEN2_VL_2B_TEXT["num_hidden_layers"] + 1, 1536)


# ---- evaluation CLIP: open_clip ViT-H-14 ------------------------------------------------


def test_evaluation_clip_reads_an_open_clip_vit_h14_size_hub_folder(gpu_config, tmp_path):
    require_free_memory(3, "the ViT-H-14-width open_clip test (2 GB peak)")
    model_cfg = open_clip.get_model_config("ViT-H-14")
    model_cfg["vision_cfg"]["layers"] = model_cfg["text_cfg"]["layers"] = VIT_H14_LAYERS_KEPT
    torch.manual_seed(0)
    model = EvaluationClip(model_cfg).eval()
    (tmp_path / OPEN_CLIP_CONFIG).write_text(json.dumps({"model_cfg": model_cfg}))
    save_file(model.model.state_dict(), tmp_path / OPEN_CLIP_WEIGHTS)
    loaded = load_as_gpu_catalog(gpu_config, "evaluation_clip", tmp_path)
    encode_images, encode_texts = evaluation_clip_encoders(loaded)
    images = np.stack(pictures(2, 64))
    assert encode_images(images).shape == (2, 1024) and encode_texts(["a cat"]).shape == (1, 1024)
    torch.testing.assert_close(encode_images(images), evaluation_clip_encoders(model)[0](images))
