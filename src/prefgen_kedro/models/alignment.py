"""PrefGen step 3: map the MLLM's semantic user embedding into the diffusion text space.

An MLP takes ``e_sem`` (one per context of a user) to the conditioning text encoder's
pooled space (the EOS token's final state, the space the UNet's cross-attention reads). Its
target for a training user is the *set* of text embeddings of that user's attribute phrases
(agent world: the liked attributes; Pick-a-Pic: captions of liked images).

- ``mmd`` (PrefGen): per user, the multi-kernel Gaussian MMD² between the mapped embeddings
  of the user's contexts and the user's target set, averaged over the users of a batch:
  distributions are matched, so the mapped embeddings spread over the phrases a user likes.
- ``mse`` (the ``no_mmd`` ablation): each mapped context embedding regresses onto one of
  the user's targets; its optimum is their mean, which collapses diversity.

Public API: ``AlignmentMlp``, ``UserSetsDataset``, ``alignment_loss``,
``text_embeddings``, ``attribute_retrieval``, ``mean_pairwise_cosine_distance``,
``set_mmd2``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from torch import nn
from torch.utils.data import Dataset
from transformers import CLIPModel, PreTrainedTokenizerBase

from prefgen_kedro.models.mmd import DEFAULT_BANDWIDTH_FACTORS, gaussian_mmd2
from prefgen_kedro.world.vocabulary import ATTRIBUTE_IDS, attribute

Objective = Literal["mmd", "mse"]


class AlignmentMlp(nn.Module, PyTorchModelHubMixin):
    """``e_sem`` (in_dim) → text space (out_dim): LayerNorm, two GELU layers, a linear out."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(in_dim),
            nn.Linear(in_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, out_dim),
        )

    def forward(self, e_sem: torch.Tensor) -> torch.Tensor:
        return self.net(e_sem)


@torch.inference_mode()
def text_embeddings(
    clip: CLIPModel, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]
) -> torch.Tensor:
    """The text tower's pooled output (EOS token, final layer norm) for each text: (N, D),
    float32 on the CPU whatever device ``clip`` is on."""
    tokens = tokenizer(list(texts), padding="max_length", truncation=True, return_tensors="pt")
    output = clip.text_model(input_ids=tokens.input_ids.to(clip.device))
    return output.pooler_output.float().cpu()


def attribute_phrase_embeddings(
    clip: CLIPModel, tokenizer: PreTrainedTokenizerBase
) -> tuple[list[str], torch.Tensor]:
    """Every attribute's phrase (``ATTRIBUTE_IDS`` order) and its text-space state: the
    vocabulary ê_sem is aligned to in the agent world."""
    phrases = [attribute(a).phrase for a in ATTRIBUTE_IDS]
    return phrases, text_embeddings(clip, tokenizer, phrases)


class UserSetsDataset(Dataset):
    """One item per user: its context embeddings (S, in_dim) and target set (T, out_dim)
    with a mask, so users with different set sizes batch together."""

    def __init__(self, contexts: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> None:
        if len(contexts) != len(targets) or not contexts:
            raise ValueError(f"need one target set per user, got {len(contexts)}/{len(targets)}")
        empty = [i for i, target in enumerate(targets) if len(target) == 0]
        if empty:
            raise ValueError(f"users {empty[:5]} have an empty target set")
        self.contexts = [c.float() for c in contexts]
        self.targets = [t.float() for t in targets]

    def __len__(self) -> int:
        return len(self.contexts)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"contexts": self.contexts[index], "targets": self.targets[index]}

    @staticmethod
    def collate(items: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        batch = {}
        for key in ("contexts", "targets"):
            longest = max(len(item[key]) for item in items)
            width = items[0][key].shape[1]
            values = torch.zeros(len(items), longest, width)
            mask = torch.zeros(len(items), longest, dtype=torch.bool)
            for row, item in enumerate(items):
                values[row, : len(item[key])] = item[key]
                mask[row, : len(item[key])] = True
            batch[key], batch[f"{key}_mask"] = values, mask
        return batch


def alignment_loss(
    model: nn.Module,
    batch: Mapping[str, torch.Tensor],
    *,
    objective: Objective,
    bandwidth_factors: Sequence[float] = DEFAULT_BANDWIDTH_FACTORS,
) -> tuple[torch.Tensor, dict[str, float]]:
    """``compute_loss`` for the shared trainer: the mean over the batch's users of the
    per-user MMD² (``mmd``) or of the squared error to a randomly paired target (``mse``)."""
    mapped = model(batch["contexts"])
    losses = []
    for row in range(len(mapped)):
        x = mapped[row][batch["contexts_mask"][row]]
        y = batch["targets"][row][batch["targets_mask"][row]]
        if objective == "mmd":
            losses.append(gaussian_mmd2(x, y, bandwidth_factors))
        else:
            paired = torch.randint(len(y), (len(x),))  # the trainer seeds the global RNG
            losses.append(F.mse_loss(x, y[paired]))
    return torch.stack(losses).mean(), {}


def set_mmd2(
    mapped: Sequence[torch.Tensor],
    targets: Sequence[torch.Tensor],
    bandwidth_factors: Sequence[float] = DEFAULT_BANDWIDTH_FACTORS,
) -> float:
    """Mean over users of the MMD² between their mapped contexts and their target set
    (users with fewer than two of either are skipped: the unbiased estimate needs two)."""
    values = [
        float(gaussian_mmd2(x, y, bandwidth_factors))
        for x, y in zip(mapped, targets, strict=True)
        if len(x) >= 2 and len(y) >= 2
    ]
    if not values:
        raise ValueError("no user has two mapped contexts and two targets")
    return sum(values) / len(values)


def attribute_retrieval(
    mapped: torch.Tensor,
    phrase_embeddings: torch.Tensor,
    true_phrases: Sequence[Sequence[int]],
    *,
    k: int = 5,
) -> dict[str, float]:
    """Rank all phrases by cosine to each user's mapped embedding: recall@k of the user's
    true phrases and their mean rank (1 = best)."""
    scores = F.normalize(mapped.float(), dim=-1) @ F.normalize(phrase_embeddings.float(), dim=-1).T
    order = scores.argsort(dim=1, descending=True)
    ranks = order.argsort(dim=1) + 1  # rank of each phrase for each user
    recalls, mean_ranks = [], []
    for row, truth in enumerate(true_phrases):
        if not truth:
            continue
        user_ranks = ranks[row, list(truth)].float()
        recalls.append(float((user_ranks <= k).float().mean()))
        mean_ranks.append(float(user_ranks.mean()))
    if not recalls:
        raise ValueError("no user has a true phrase to retrieve")
    return {
        f"recall_at_{k}": sum(recalls) / len(recalls),
        "mean_rank": sum(mean_ranks) / len(mean_ranks),
        "phrases": int(phrase_embeddings.shape[0]),
    }


def mean_pairwise_cosine_distance(embeddings: torch.Tensor) -> float:
    """Mean of 1 − cos over all distinct pairs of rows: 0 when all point one way."""
    n = embeddings.shape[0]
    if n < 2:
        raise ValueError("diversity needs at least two embeddings")
    unit = F.normalize(embeddings.float(), dim=-1)
    cosines = unit @ unit.T
    off_diagonal = cosines.sum() - cosines.diagonal().sum()
    return float(1.0 - off_diagonal / (n * (n - 1)))
