"""Nodes of ``foundation``: make the agent world's stand-ins for hub checkpoints.

Each trainer node builds a model from its config, trains it with the shared trainer
(resumable), rounds it to fp16 (what ships) and measures that rounded model on held-out
renders, so the manifest's figures are the shipped model's.
"""

from __future__ import annotations

import functools
import time

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from PIL import Image
from pydantic import Field
from transformers import CLIPModel, CLIPTokenizer, PreTrainedModel, ProcessorMixin

from prefgen_kedro.foundation import foundation_run_key, manifest_entry, round_to_half
from prefgen_kedro.models.base_diffusion import (
    BaseDiffusionParams,
    train_base_unet,
)
from prefgen_kedro.models.batches import class_indices
from prefgen_kedro.models.clip import (
    ClipWithAttributeHeads,
    EvaluationClip,
    build_conditioning_clip,
    build_evaluation_clip,
    clip_training_data,
    clip_with_heads_loss,
    conditioning_clip_encoders,
    evaluation_clip_encoders,
    zero_shot_accuracy,
)
from prefgen_kedro.models.clip_tokenizer import build_clip_tokenizer
from prefgen_kedro.models.fid import compute_fid_kid
from prefgen_kedro.models.mllm_pretraining import MllmPretrainParams, pretrain
from prefgen_kedro.models.oracle import (
    AttributeOracle,
    head_accuracy,
    oracle_loss,
    oracle_training_data,
)
from prefgen_kedro.params import StrictParams
from prefgen_kedro.training import TrainConfig, TrainResult, train
from prefgen_kedro.world.agent_world import RenderSet, render_set
from prefgen_kedro.world.vocabulary import HEADS


class RenderSetParams(StrictParams):
    n: int = Field(gt=1)
    seed: int
    group_size: int = Field(default=1, ge=1)
    shared: tuple[str, ...] = ()


class FoundationRendersParams(StrictParams):
    image_size: int = Field(ge=8)
    conditioning_clip: RenderSetParams
    evaluation_clip: RenderSetParams
    attribute_oracle: RenderSetParams
    base_diffusion: RenderSetParams
    mllm: RenderSetParams
    heldout: RenderSetParams


class ConditioningClipArchitecture(StrictParams):
    patch_size: int
    vision_width: int
    vision_layers: int
    text_width: int
    text_layers: int
    heads: int
    projection_dim: int
    max_text_length: int


class EvaluationClipArchitecture(StrictParams):
    patch_size: int
    vision_width: int
    vision_layers: int
    text_width: int
    text_layers: int
    heads: int
    embed_dim: int
    context_length: int


class OracleArchitecture(StrictParams):
    width: int


class ConditioningClipParams(StrictParams):
    architecture: ConditioningClipArchitecture
    head_weight: float = Field(ge=0.0)  # weight of the auxiliary attribute heads' loss
    train: TrainConfig


class EvaluationClipParams(StrictParams):
    architecture: EvaluationClipArchitecture
    head_weight: float = Field(ge=0.0)  # weight of the auxiliary attribute heads' loss
    train: TrainConfig


class AttributeOracleParams(StrictParams):
    architecture: OracleArchitecture
    train: TrainConfig


class FidCheckParams(StrictParams):
    images_per_set: int = Field(ge=2)


def make_render_sets(
    params: FoundationRendersParams,
) -> tuple[RenderSet, RenderSet, RenderSet, RenderSet, RenderSet, RenderSet]:
    """Separate renders (own seeds) for each model and a held-out set for all checks."""
    return tuple(
        render_set(part.n, part.seed, params.image_size, part.group_size, part.shared)
        for part in (
            params.conditioning_clip,
            params.evaluation_clip,
            params.attribute_oracle,
            params.base_diffusion,
            params.mllm,
            params.heldout,
        )
    )


def _heads() -> dict[str, list[str]]:
    """The classes every attribute head reads, as lists (they go into saved configs)."""
    return {head: list(classes) for head, classes in HEADS.items()}


def _report(result: TrainResult, seed: int, metrics: dict, started: float) -> dict:
    return {
        "seed": seed,
        **result.summary(),
        # Time of this call; a run resumed from a checkpoint (run.resumed_from) trained
        # those steps in an earlier call (trained_seconds: the steps' time over all calls).
        "wall_seconds": time.perf_counter() - started,
        "metrics": metrics,
    }


def _train_clip(
    clip: CLIPModel | EvaluationClip,
    input_ids: torch.Tensor,
    renders: RenderSet,
    params: ConditioningClipParams | EvaluationClipParams,
    checkpoint_root: str,
    name: str,
) -> TrainResult:
    """Contrastive training on grouped renders with the auxiliary attribute heads."""
    heads = _heads()
    labels = class_indices(renders.labels(), heads)
    return train(
        ClipWithAttributeHeads(clip, {head: len(classes) for head, classes in heads.items()}),
        clip_training_data(
            renders.images, input_ids, renders.images.shape[1], renders.group_size, labels
        ),
        functools.partial(clip_with_heads_loss, head_weight=params.head_weight),
        params.train,
        checkpoint_root=checkpoint_root,
        name=name,
        key=foundation_run_key(params, renders, input_ids=input_ids),
    )


def train_conditioning_clip(
    renders: RenderSet, heldout: RenderSet, params: ConditioningClipParams, checkpoint_root: str
) -> tuple[CLIPModel, CLIPTokenizer, dict]:
    """The conditioning CLIP (transformers) and its tokenizer (open_clip's BPE)."""
    started = time.perf_counter()
    tokenizer = build_clip_tokenizer(model_max_length=params.architecture.max_text_length)
    model = build_conditioning_clip(
        image_size=renders.images.shape[1],
        vocab_size=len(tokenizer),
        seed=params.train.seed,
        **params.architecture.model_dump(),
    )
    input_ids = tokenizer(
        renders.captions, padding="max_length", truncation=True, return_tensors="pt"
    ).input_ids
    result = _train_clip(model, input_ids, renders, params, checkpoint_root, "conditioning_clip")
    model = round_to_half(model)
    metrics = zero_shot_accuracy(
        *conditioning_clip_encoders(model, tokenizer),
        heldout.images,
        heldout.subjects,
        heldout.styles,
    )
    return model.half(), tokenizer, _report(result, params.train.seed, metrics, started)


def train_evaluation_clip(
    renders: RenderSet, heldout: RenderSet, params: EvaluationClipParams, checkpoint_root: str
) -> tuple[EvaluationClip, dict]:
    """The evaluation CLIP (open_clip, its own seed and renders), only for CLIP score."""
    started = time.perf_counter()
    model = build_evaluation_clip(
        image_size=renders.images.shape[1],
        seed=params.train.seed,
        **params.architecture.model_dump(),
    )
    input_ids = model.tokenize(renders.captions)
    result = _train_clip(model, input_ids, renders, params, checkpoint_root, "evaluation_clip")
    model = round_to_half(model)
    metrics = zero_shot_accuracy(
        *evaluation_clip_encoders(model), heldout.images, heldout.subjects, heldout.styles
    )
    return model.half(), _report(result, params.train.seed, metrics, started)


def train_attribute_oracle(
    renders: RenderSet, heldout: RenderSet, params: AttributeOracleParams, checkpoint_root: str
) -> tuple[AttributeOracle, dict]:
    """The attribute oracle: reads the subject and each category off a picture."""
    started = time.perf_counter()
    heads = _heads()
    torch.manual_seed(params.train.seed)
    model = AttributeOracle(
        heads=heads, image_size=renders.images.shape[1], width=params.architecture.width
    )
    result = train(
        model,
        oracle_training_data(renders.images, renders.labels(), heads),
        oracle_loss,
        params.train,
        checkpoint_root=checkpoint_root,
        name="attribute_oracle",
        key=foundation_run_key(params, renders),
    )
    model = round_to_half(model)
    metrics = head_accuracy(model, heldout.images, heldout.labels())
    return model.half(), _report(result, params.train.seed, metrics, started)


def train_base_diffusion(
    renders: RenderSet,
    heldout: RenderSet,
    conditioning_clip: CLIPModel,
    clip_tokenizer: CLIPTokenizer,
    attribute_oracle: AttributeOracle,
    params: BaseDiffusionParams,
    checkpoint_root: str,
    grid_dir: str,
) -> tuple[UNet2DConditionModel, DDPMScheduler, dict, Image.Image]:
    """The base text-to-image model (stands in for SD): a pixel-space UNet conditioned on
    the frozen conditioning CLIP's text tower, trained on renders with their captions
    (``train_base_unet``)."""
    started = time.perf_counter()
    unet, noise_scheduler, result, metrics, grid = train_base_unet(
        renders,
        heldout,
        conditioning_clip,
        clip_tokenizer,
        attribute_oracle,
        params,
        checkpoint_root=checkpoint_root,
        grid_dir=grid_dir,
    )
    report = _report(result, params.train.seed, metrics, started)
    return unet.half(), noise_scheduler, report, grid


def check_fid_network(heldout: RenderSet, params: FidCheckParams) -> dict:
    """FID/KID sanity on held-out renders: one set against itself, against another sample
    of the same distribution, and against renders of another distribution (dark tone)."""
    n = params.images_per_set
    if len(heldout.images) < 3 * n:
        raise ValueError(f"fid_check.images_per_set={n} needs {3 * n} held-out renders")
    first = heldout.images[:n]
    same = heldout.images[n : 2 * n]
    dark = heldout.images[2 * n : 3 * n][
        [style["tone"] == "dark" for style in heldout.styles[2 * n : 3 * n]]
    ]
    to_chw = lambda images: torch.from_numpy(images).permute(0, 3, 1, 2)  # noqa: E731
    report = {
        "images_per_set": n,
        "self": compute_fid_kid(to_chw(first), to_chw(first)),
        "same_distribution": compute_fid_kid(to_chw(first), to_chw(same)),
    }
    if len(dark) >= 2:
        report["dark_tone_only"] = compute_fid_kid(to_chw(dark), to_chw(same))
    return report


def pretrain_mllm(
    renders: RenderSet,
    heldout: RenderSet,
    conditioning_clip: CLIPModel,
    params: MllmPretrainParams,
    checkpoint_root: str,
) -> tuple[PreTrainedModel, ProcessorMixin, dict]:
    """The tiny MLLM (stands in for a hub MLLM), pretrained through ``params.stages`` on
    the conditioning CLIP's frozen vision tower; shipped in fp16 (see ``pretrain``)."""
    model, processor, report = pretrain(
        renders, heldout, conditioning_clip, params, checkpoint_root=checkpoint_root
    )
    return model.half(), processor, report


def write_foundation_manifest(
    conditioning_clip: CLIPModel,
    evaluation_clip: EvaluationClip,
    attribute_oracle: AttributeOracle,
    base_unet: UNet2DConditionModel,
    mllm: PreTrainedModel,
    conditioning_clip_report: dict,
    evaluation_clip_report: dict,
    attribute_oracle_report: dict,
    base_unet_report: dict,
    mllm_report: dict,
    fid_report: dict,
    model_dirs: dict[str, str],
) -> tuple[dict, dict]:
    """The manifest shipped beside the checkpoints, and the encoders' metrics report."""
    models = {
        "conditioning_clip": (conditioning_clip, conditioning_clip_report),
        "evaluation_clip": (evaluation_clip, evaluation_clip_report),
        "attribute_oracle": (attribute_oracle, attribute_oracle_report),
        "base_unet": (base_unet, base_unet_report),
        "mllm": (mllm, mllm_report),
    }
    manifest = {
        name: _manifest_entry(model, report, model_dirs[name])
        for name, (model, report) in models.items()
    }
    metrics = {
        name: report["metrics"]
        for name, (_, report) in models.items()
        if name not in ("base_unet", "mllm")
    }
    metrics["fid_network"] = fid_report
    return manifest, metrics


def replace_mllm_manifest_entry(
    manifest: dict, mllm: PreTrainedModel, mllm_report: dict, model_dirs: dict[str, str]
) -> dict:
    """The shipped manifest with only the MLLM's entry remade: the other models were not
    retrained, so their entries stay as they are."""
    return {**manifest, "mllm": _manifest_entry(mllm, mllm_report, model_dirs["mllm"])}


def replace_base_unet_manifest_entry(
    manifest: dict, base_unet: UNet2DConditionModel, report: dict, model_dirs: dict[str, str]
) -> dict:
    """The shipped manifest with only the base UNet's entry remade (the others kept)."""
    return {**manifest, "base_unet": _manifest_entry(base_unet, report, model_dirs["base_unet"])}


def _manifest_entry(model: torch.nn.Module, report: dict, directory: str) -> dict:
    return manifest_entry(
        model=model,
        directory=directory,
        seed=report["seed"],
        wall_seconds=report["wall_seconds"],
        metrics=report["metrics"],
        extra={
            "steps": report["steps"],
            "trained_seconds": report["trained_seconds"],
            "run": report["run"],
            "learning_curve": report["learning_curve"],
        },
    )
