"""The attribute oracle: a CNN that reads the subject and every attribute off a picture.

With a simulated user's weights it gives the exact preference alignment of a generated
image (like-rate, utility) and its prompt adherence (subject accuracy). The head layout is
part of the saved config, so a checkpoint says what it reads.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from prefgen_kedro.models.batches import TensorDictDataset, class_indices


def _block(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.GELU(),
    )


class AttributeOracle(nn.Module, PyTorchModelHubMixin):
    """One classification head per category (``heads`` maps a head to its class names).

    The features are flattened, not pooled, so composition (where the subject is) and
    vignetting (where the picture darkens) stay readable.
    """

    def __init__(self, heads: dict[str, list[str]], image_size: int, width: int = 32) -> None:
        super().__init__()
        self.heads = heads
        self.image_size = image_size
        self.features = nn.Sequential(
            _block(3, width, 1),
            _block(width, width, 1),
            _block(width, 2 * width, 2),
            _block(2 * width, 2 * width, 1),
            _block(2 * width, 4 * width, 2),
            _block(4 * width, 4 * width, 2),
            nn.Flatten(),
        )
        flat = 4 * width * (image_size // 8) ** 2
        self.trunk = nn.Sequential(nn.Dropout(0.1), nn.Linear(flat, 256), nn.GELU())
        self.classifiers = nn.ModuleDict(
            {head: nn.Linear(256, len(classes)) for head, classes in heads.items()}
        )

    def forward(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        hidden = self.trunk(self.features(pixel_values))
        return {head: classifier(hidden) for head, classifier in self.classifiers.items()}

    @torch.inference_mode()
    def predict(self, images: np.ndarray, batch_size: int = 512) -> dict[str, list[str]]:
        """uint8 images (N, H, W, 3) -> the class name each head reads, per image."""
        was_training = self.training
        self.eval()
        predictions: dict[str, list[str]] = {head: [] for head in self.heads}
        for start in range(0, len(images), batch_size):
            logits = self(to_oracle_pixels(images[start : start + batch_size], self.image_size))
            for head, classes in self.heads.items():
                predictions[head] += [classes[i] for i in logits[head].argmax(dim=1).tolist()]
        self.train(was_training)
        return predictions


def to_oracle_pixels(images: np.ndarray | torch.Tensor, image_size: int) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, S, S) in [-1, 1]."""
    pixels = torch.as_tensor(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    if pixels.shape[-1] != image_size:
        pixels = F.interpolate(pixels, size=(image_size, image_size), mode="bilinear")
    return pixels


def oracle_loss(model: AttributeOracle, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Sum over heads of the cross-entropy; ``batch`` holds ``pixel_values`` and one
    integer label tensor per head."""
    logits = model(batch["pixel_values"])
    return sum(F.cross_entropy(logits[head], batch[head]) for head in model.heads)


def oracle_training_data(
    images: np.ndarray, labels: Mapping[str, Sequence[str]], heads: Mapping[str, Sequence[str]]
) -> TensorDictDataset:
    """Pixels plus one integer label tensor per head (class index in ``heads``)."""
    return TensorDictDataset(
        pixel_values=to_oracle_pixels(images, images.shape[1]), **class_indices(labels, heads)
    )


def head_accuracy(
    model: AttributeOracle, images: np.ndarray, truth: Mapping[str, Sequence[str]]
) -> dict[str, float]:
    """Per-head accuracy against true class names."""
    predicted = model.predict(images)
    return {
        head: float(np.mean(np.asarray(predicted[head]) == np.asarray(truth[head])))
        for head in model.heads
    }
