"""The two CLIPs: the conditioning CLIP (transformers) and the evaluation CLIP (open_clip).

The conditioning CLIP's text tower conditions the diffusion UNet and is the MMD target
space; its vision tower gives ``e_img``. The evaluation CLIP only scores (CLIP score), so
the judge is never the conditioner. Both are plain hub-style models: ``from_pretrained``
loads a hub checkpoint or our tiny one alike.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from open_clip.loss import ClipLoss
from open_clip.tokenizer import SimpleTokenizer
from transformers import CLIPConfig, CLIPModel, PreTrainedTokenizerBase

from prefgen_kedro.models.batches import TensorDictDataset
from prefgen_kedro.world.vocabulary import HEADS, caption

# CLIP's own normalisation: the tiny models use it too, so a hub CLIP and ours take the
# same pixels.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def to_pixel_values(images: np.ndarray | torch.Tensor, image_size: int) -> torch.Tensor:
    """uint8 images (N, H, W, 3) -> normalised float (N, 3, S, S), resized if needed."""
    pixels = torch.as_tensor(images).permute(0, 3, 1, 2).float() / 255.0
    if pixels.shape[-1] != image_size or pixels.shape[-2] != image_size:
        pixels = F.interpolate(pixels, size=(image_size, image_size), mode="bicubic").clamp(0, 1)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (pixels - mean) / std


# ---- conditioning CLIP (transformers) --------------------------------------------------


def build_conditioning_clip(
    *,
    image_size: int,
    patch_size: int,
    vision_width: int,
    vision_layers: int,
    text_width: int,
    text_layers: int,
    heads: int,
    projection_dim: int,
    max_text_length: int,
    vocab_size: int,
    seed: int,
) -> CLIPModel:
    """A small ``transformers.CLIPModel`` from a config, randomly initialised with ``seed``."""
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config={
            "vocab_size": vocab_size,
            "hidden_size": text_width,
            "intermediate_size": 4 * text_width,
            "num_hidden_layers": text_layers,
            "num_attention_heads": heads,
            "max_position_embeddings": max_text_length,
            "bos_token_id": vocab_size - 2,
            "eos_token_id": vocab_size - 1,
            "pad_token_id": vocab_size - 1,
        },
        vision_config={
            "image_size": image_size,
            "patch_size": patch_size,
            "hidden_size": vision_width,
            "intermediate_size": 4 * vision_width,
            "num_hidden_layers": vision_layers,
            "num_attention_heads": heads,
        },
        projection_dim=projection_dim,
    )
    return CLIPModel(config)


def conditioning_clip_encoders(
    model: CLIPModel, tokenizer: PreTrainedTokenizerBase
) -> tuple[Callable[[np.ndarray], torch.Tensor], Callable[[Sequence[str]], torch.Tensor]]:
    """(encode uint8 images, encode texts) -> L2-normalised float32 embeddings on the CPU,
    for evaluation; inputs go to the model's device (the ``gpu`` catalog loads it on one)."""
    image_size = model.config.vision_config.image_size

    @torch.inference_mode()
    def encode_images(images: np.ndarray) -> torch.Tensor:
        pixels = to_pixel_values(images, image_size).to(model.device, model.dtype)
        features = model.get_image_features(pixel_values=pixels)
        return F.normalize(_pooled(features).float(), dim=-1).cpu()

    @torch.inference_mode()
    def encode_texts(texts: Sequence[str]) -> torch.Tensor:
        tokens = tokenizer(list(texts), padding="max_length", truncation=True, return_tensors="pt")
        features = model.get_text_features(input_ids=tokens["input_ids"].to(model.device))
        return F.normalize(_pooled(features).float(), dim=-1).cpu()

    return encode_images, encode_texts


def _pooled(features: torch.Tensor | object) -> torch.Tensor:
    # transformers 5 returns a model output whose pooler_output is the projected tensor.
    if isinstance(features, torch.Tensor):
        return features
    return features.pooler_output


# ---- evaluation CLIP (open_clip) -------------------------------------------------------


# open_clip's own hub layout, in which laion's checkpoints (e.g. the ``gpu`` environment's
# ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``) ship their open_clip weights.
OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"


class EvaluationClip(torch.nn.Module, PyTorchModelHubMixin):
    """An open_clip CLIP that saves and loads like a hub model (config + safetensors).

    ``model_cfg`` is an open_clip model config (``embed_dim``, ``vision_cfg``,
    ``text_cfg``). ``from_pretrained`` reads a directory this class saved, or a downloaded
    open_clip hub directory (``open_clip_config.json`` + ``open_clip_model.safetensors``).
    """

    def __init__(self, model_cfg: dict) -> None:
        super().__init__()
        self.model_cfg = model_cfg
        self.model = open_clip.CLIP(**model_cfg)
        self.context_length = model_cfg["text_cfg"]["context_length"]
        self.image_size = model_cfg["vision_cfg"]["image_size"]

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | Path, **kwargs: Any
    ) -> EvaluationClip:
        # An open_clip folder has no config.json: the mixin would warn that it is missing.
        directory = Path(pretrained_model_name_or_path)
        if (directory / OPEN_CLIP_CONFIG).is_file():
            return cls._from_open_clip(directory, kwargs.get("map_location", "cpu"))
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @classmethod
    def _from_open_clip(cls, directory: Path, map_location: str) -> EvaluationClip:
        config = json.loads((directory / OPEN_CLIP_CONFIG).read_text())
        model = cls(config["model_cfg"])
        # open_clip's loader (strict) also adapts state dicts of older open_clip versions.
        open_clip.load_checkpoint(model.model, str(directory / OPEN_CLIP_WEIGHTS))
        return model.to(map_location).eval()

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return open_clip.tokenize(list(texts), context_length=self.context_length)

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor):
        return self.model(pixel_values, input_ids)


def build_evaluation_clip(
    *,
    image_size: int,
    patch_size: int,
    vision_width: int,
    vision_layers: int,
    text_width: int,
    text_layers: int,
    heads: int,
    embed_dim: int,
    context_length: int,
    seed: int,
) -> EvaluationClip:
    """A small open_clip model from a custom config (``pretrained=None``)."""
    torch.manual_seed(seed)
    model_cfg = {
        "embed_dim": embed_dim,
        "vision_cfg": {
            "image_size": image_size,
            "patch_size": patch_size,
            "width": vision_width,
            "layers": vision_layers,
            "head_width": vision_width // heads,
        },
        "text_cfg": {
            "context_length": context_length,
            "vocab_size": SimpleTokenizer().vocab_size,
            "width": text_width,
            "heads": heads,
            "layers": text_layers,
        },
    }
    return EvaluationClip(model_cfg)


def evaluation_clip_encoders(
    model: EvaluationClip, batch_size: int = 1024
) -> tuple[Callable[[np.ndarray], torch.Tensor], Callable[[Sequence[str]], torch.Tensor]]:
    """(encode uint8 images, encode texts) -> L2-normalised float32 embeddings on the CPU;
    inputs go to the model's device, images ``batch_size`` at a time (a ViT-H-14 on a whole
    benchmark's images at once would not fit in GPU memory)."""
    parameter = next(model.parameters())

    @torch.inference_mode()
    def encode_images(images: np.ndarray) -> torch.Tensor:
        embeddings = []
        for start in range(0, len(images), batch_size):
            pixels = to_pixel_values(images[start : start + batch_size], model.image_size)
            features = model.model.encode_image(pixels.to(parameter.device, parameter.dtype))
            embeddings.append(F.normalize(features.float(), dim=-1).cpu())
        return torch.cat(embeddings)

    @torch.inference_mode()
    def encode_texts(texts: Sequence[str]) -> torch.Tensor:
        tokens = model.tokenize(texts).to(parameter.device)
        return F.normalize(model.model.encode_text(tokens).float(), dim=-1).cpu()

    return encode_images, encode_texts


# ---- training (both CLIPs) ------------------------------------------------------------


class ClipWithAttributeHeads(torch.nn.Module):
    """A CLIP (either family) plus linear heads on both towers' features, for training.

    The heads add a supervised signal (subject, each category) to the contrastive loss.
    From scratch, a small ViT learns colours from captions within minutes but shapes and
    layout far more slowly, and in a batch colours alone tell captions apart, so the
    contrastive loss alone leaves subject and layout out of both towers. Only ``clip`` is
    kept; the heads are dropped after training.
    """

    def __init__(self, clip: CLIPModel | EvaluationClip, heads: Mapping[str, int]) -> None:
        super().__init__()
        self.clip = clip
        # Both families' towers end in a projection to the shared embedding width.
        if isinstance(clip, EvaluationClip):
            width = clip.model_cfg["embed_dim"]
        else:
            width = clip.config.projection_dim
        self.image_heads = torch.nn.ModuleDict(
            {head: torch.nn.Linear(width, n) for head, n in heads.items()}
        )
        self.text_heads = torch.nn.ModuleDict(
            {head: torch.nn.Linear(width, n) for head, n in heads.items()}
        )

    def forward(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(contrastive loss, projected image features, projected text features), the
        loss in the CLIP's own recipe: transformers' ``return_loss`` or open_clip's
        ``ClipLoss``. (transformers 5 puts the projected features in ``pooler_output``.)"""
        if isinstance(self.clip, EvaluationClip):
            image = self.clip.model.encode_image(pixel_values)
            text = self.clip.model.encode_text(input_ids)
            scale = self.clip.model.logit_scale.exp()
            loss = ClipLoss()(F.normalize(image, dim=-1), F.normalize(text, dim=-1), scale)
            return loss, image, text
        output = self.clip(input_ids=input_ids, pixel_values=pixel_values, return_loss=True)
        return (
            output.loss,
            output.vision_model_output.pooler_output,
            output.text_model_output.pooler_output,
        )


def clip_with_heads_loss(
    model: ClipWithAttributeHeads, batch: Mapping[str, torch.Tensor], head_weight: float
) -> tuple[torch.Tensor, dict[str, float]]:
    """Contrastive loss + ``head_weight`` × mean cross-entropy of all attribute heads.

    Heads are read off the unwrapped module (``getattr`` on ``module`` under DDP), but
    the forward pass goes through ``model`` so distributed training syncs gradients.
    """
    heads = getattr(model, "module", model)
    contrastive, image, text = model(*_ungrouped(batch))
    head_losses = {}
    for tower, features, tower_heads in (
        ("image", image, heads.image_heads),
        ("text", text, heads.text_heads),
    ):
        head_losses[tower] = sum(
            F.cross_entropy(head(features), batch[name].flatten(0, 1))
            for name, head in tower_heads.items()
        ) / len(tower_heads)
    loss = contrastive + head_weight * (head_losses["image"] + head_losses["text"])
    return loss, {"contrastive": contrastive.item()} | {
        f"{tower}_heads": value.item() for tower, value in head_losses.items()
    }


def clip_training_data(
    images: np.ndarray,
    input_ids: torch.Tensor,
    image_size: int,
    group_size: int = 1,
    labels: Mapping[str, torch.Tensor] | None = None,
) -> TensorDictDataset:
    """Pixels and caption token ids for either CLIP's contrastive loss.

    One item is a group of ``group_size`` consecutive renders, so groups made to share
    easy attributes (see ``render_set``) land in one batch as each other's hard negatives.
    """
    pixels = to_pixel_values(images, image_size)
    grouped_labels = {name: t.view(-1, group_size) for name, t in (labels or {}).items()}
    return TensorDictDataset(
        pixel_values=pixels.view(-1, group_size, *pixels.shape[1:]),
        input_ids=input_ids.view(-1, group_size, input_ids.shape[-1]),
        **grouped_labels,
    )


def _ungrouped(batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(pixels, ids) with the group dimension of ``clip_training_data`` folded away."""
    return batch["pixel_values"].flatten(0, 1), batch["input_ids"].flatten(0, 1)


# ---- shared evaluation -----------------------------------------------------------------


def zero_shot_accuracy(
    encode_images: Callable[[np.ndarray], torch.Tensor],
    encode_texts: Callable[[Sequence[str]], torch.Tensor],
    images: np.ndarray,
    subjects: Sequence[str],
    styles: Sequence[dict[str, str]],
    batch_size: int = 256,
) -> dict[str, float]:
    """Image→caption top-1 accuracy per category, zero-shot among that category's values.

    For each image and category, the candidates are its true caption with that category's
    value replaced by every value of the category (the subject counts as a category).
    """
    image_embeddings = torch.cat(
        [encode_images(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
    )
    accuracy = {}
    for category, values in HEADS.items():
        texts = []
        for subject, style in zip(subjects, styles, strict=True):
            for value in values:
                if category == "subject":
                    texts.append(caption(value, style))
                else:
                    texts.append(caption(subject, {**style, category: value}))
        text_embeddings = torch.cat(
            [encode_texts(texts[i : i + batch_size]) for i in range(0, len(texts), batch_size)]
        ).view(len(images), len(values), -1)
        scores = torch.einsum("nd,nkd->nk", image_embeddings, text_embeddings)
        truth = torch.tensor(
            [
                values.index(subject if category == "subject" else style[category])
                for subject, style in zip(subjects, styles, strict=True)
            ]
        )
        accuracy[category] = float((scores.argmax(dim=1) == truth).float().mean())
    return accuracy
