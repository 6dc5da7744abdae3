"""PrefGen step 3: map the MLLM's semantic user embedding into the diffusion text space.

An MLP takes ``e_sem`` (one per context of a user) to a few tokens of the conditioning text
encoder's pooled space (the EOS token's final state, the space the UNet's cross-attention
reads). Its target for a training user is the *set* of text embeddings of that user's
attribute phrases (agent world: the liked attributes; Pick-a-Pic: captions of liked images).
Its inputs are standardised with the training contexts' mean and spread, kept in the
checkpoint: an MLLM state varies across users in a small part of its norm, and unstandardised
that part is lost beside the shared one.

- ``mmd`` (PrefGen): for every context of a user, the multi-kernel Gaussian MMD² between
  its mapped tokens and the user's target set, averaged over the contexts and users of a
  batch: distributions are matched, so one context's tokens spread over the phrases its user
  likes.
- ``mse`` (the ``no_mmd`` ablation): each mapped token regresses onto one of the user's
  targets, drawn at random; its optimum is their mean, which collapses diversity.

Public API: ``ALIGNER_VARIANTS`` (``AlignerVariant``), ``AlignmentMlp``, ``Aligners``,
``UserSetsDataset``, ``alignment_loss``, ``text_embeddings``, ``attribute_retrieval``,
``mean_pairwise_cosine_distance``, ``set_mmd2``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
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


@dataclass(frozen=True)
class AlignerVariant:
    """One aligner: its objective, the ``context_embeddings`` column it reads and the
    condition part it writes."""

    objective: Objective
    reads: str
    writes: str


# PrefGen's aligner, its MSE ablation, and the signal ladder's ``oracle_state`` reference:
# a perfect context summary (agent world only) through PrefGen's recipe.
ALIGNER_VARIANTS: dict[str, AlignerVariant] = {
    "prefgen": AlignerVariant("mmd", "e_sem", "e_sem_hat"),
    "prefgen_no_mmd": AlignerVariant("mse", "e_sem", "e_sem_hat_no_mmd"),
    "oracle_state": AlignerVariant("mmd", "context_summary", "oracle_state_hat"),
}


class AlignmentMlp(nn.Module, PyTorchModelHubMixin):
    """``e_sem`` (in_dim) → ``tokens`` text-space tokens (out_dim each), flattened:
    standardisation with stored statistics, two GELU layers, a linear out."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int, tokens: int) -> None:
        super().__init__()
        if tokens < 2:
            raise ValueError(f"the aligner maps to a set of tokens (at least 2), got {tokens}")
        self.tokens = tokens
        self.out_dim = out_dim
        self.register_buffer("input_mean", torch.zeros(in_dim))
        self.register_buffer("input_std", torch.ones(in_dim))
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, tokens * out_dim),
        )

    @torch.no_grad()
    def fit_standardisation(self, inputs: torch.Tensor) -> None:
        """Keep the mean and spread of ``inputs`` (N, in_dim), the training contexts."""
        self.input_mean.copy_(inputs.float().mean(dim=0))
        self.input_std.copy_(inputs.float().std(dim=0).clamp_min(1e-6))

    def forward(self, e_sem: torch.Tensor) -> torch.Tensor:
        """(..., in_dim) → (..., tokens × out_dim)."""
        return self.net((e_sem - self.input_mean) / self.input_std)

    def token_sets(self, e_sem: torch.Tensor) -> torch.Tensor:
        """(..., in_dim) → (..., tokens, out_dim)."""
        return self(e_sem).unflatten(-1, (self.tokens, self.out_dim))


class Aligners(nn.Module, PyTorchModelHubMixin):
    """Several named ``AlignmentMlp``s stored together (PrefGen's, its MSE ablation, the
    reference that aligns a perfect context summary): ``variants`` maps a name to its
    ``AlignmentMlp`` config."""

    def __init__(self, variants: dict[str, dict]) -> None:
        super().__init__()
        self.mlps = nn.ModuleDict(
            {name: AlignmentMlp(**config) for name, config in variants.items()}
        )

    @classmethod
    def of(cls, mlps: Mapping[str, AlignmentMlp]) -> Aligners:
        """Bundle trained MLPs (weights and standardisation copied)."""
        bundle = cls(
            variants={
                name: {
                    "in_dim": mlp.input_mean.shape[0],
                    "out_dim": mlp.out_dim,
                    "hidden_dim": mlp.net[0].out_features,
                    "tokens": mlp.tokens,
                }
                for name, mlp in mlps.items()
            }
        )
        for name, mlp in mlps.items():
            bundle.mlps[name].load_state_dict(mlp.state_dict())
        return bundle.eval()

    def __getitem__(self, name: str) -> AlignmentMlp:
        if name not in self.mlps:
            raise KeyError(f"no aligner {name!r}; trained: {sorted(self.mlps)}")
        return self.mlps[name]


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
    model: AlignmentMlp,
    batch: Mapping[str, torch.Tensor],
    *,
    objective: Objective,
    bandwidth_factors: Sequence[float] = DEFAULT_BANDWIDTH_FACTORS,
) -> tuple[torch.Tensor, dict[str, float]]:
    """``compute_loss`` for the shared trainer: the mean over the batch's (unpadded)
    contexts of the MMD² between a context's mapped tokens and its user's targets (``mmd``),
    or of the squared error of each token to a randomly paired target (``mse``)."""
    mapped = model.token_sets(batch["contexts"])  # (users, contexts, tokens, out_dim)
    losses = []
    for row in range(len(mapped)):
        y = batch["targets"][row][batch["targets_mask"][row]]
        x = mapped[row][batch["contexts_mask"][row]]  # the user's contexts, one set each
        if objective == "mmd":
            losses.append(gaussian_mmd2(x, y, bandwidth_factors))
        else:
            paired = torch.randint(len(y), x.shape[:2])  # the trainer seeds the global RNG
            losses.append(((x - y[paired]) ** 2).mean(dim=(1, 2)))
    return torch.cat(losses).mean(), {}


def set_mmd2(
    mapped: Sequence[torch.Tensor],
    targets: Sequence[torch.Tensor],
    bandwidth_factors: Sequence[float] = DEFAULT_BANDWIDTH_FACTORS,
) -> float:
    """Mean over users of the MMD² between a user's mapped token sets (contexts, tokens,
    out_dim), one context at a time, and its target set (users with fewer than two targets
    are skipped: the unbiased estimate needs two)."""
    values = [
        gaussian_mmd2(contexts, y, bandwidth_factors)
        for contexts, y in zip(mapped, targets, strict=True)
        if len(y) >= 2
    ]
    if not values:
        raise ValueError("no user has two targets")
    return float(torch.cat(values).mean())


def attribute_retrieval(
    mapped: torch.Tensor,
    phrase_embeddings: torch.Tensor,
    true_phrases: Sequence[Sequence[int]],
    *,
    k: int = 5,
) -> dict[str, float]:
    """Rank all phrases for each user by their best cosine to its mapped tokens (users,
    tokens, out_dim): recall@k of the user's true phrases and their mean rank (1 = best)."""
    scores = (
        (F.normalize(mapped.float(), dim=-1) @ F.normalize(phrase_embeddings.float(), dim=-1).T)
        .max(dim=1)
        .values
    )
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
