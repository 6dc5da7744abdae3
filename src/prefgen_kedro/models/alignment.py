"""PrefGen step 3: map the MLLM's semantic user embedding into the diffusion text space.

The targets live in the conditioning text encoder's pooled space (the EOS token's final
state, the space the UNet's cross-attention reads): a vocabulary of phrase states (agent
world: every attribute's phrase; Pick-a-Pic: the liked images' captions), and for each
training user the *set* of its phrases (the liked attributes; its liked images' captions).
An MLP takes ``e_sem`` (one per context of a user) to a distribution over that vocabulary;
``ê_sem`` is the states of its ``tokens`` most probable phrases, text-space points the
user branch reads like words. Phrases may come in exclusive groups (agent world: the
attribute categories, since every image shows one value of each): then ê_sem takes at most
one phrase of a group, as "red" and "blue" cannot both be drawn. Its inputs are
standardised with the training contexts' mean and spread, kept in the checkpoint: an MLLM
state varies across users in a small part of its norm, and unstandardised that part is lost
beside the shared one.

- ``mmd`` (PrefGen): for every context of a user, the multi-kernel Gaussian MMD² between the
  aligner's distribution and the user's target set (uniform on its phrases), both on the
  vocabulary's points, averaged over the contexts and users of a batch: distributions are
  matched, so a context's mass spreads over the phrases its user likes.
- ``mse`` (the ``no_mmd`` ablation): the distribution's mean point regresses onto one of the
  user's targets, drawn at random; its optimum is their mean, which blurs the distribution.

Mapping to free points instead (a linear output layer, the earlier design) kept the MMD's
diversity but seldom put a token near a liked phrase, and the branch reads ê_sem as words
(experiments/README.md).

Public API: ``ALIGNER_VARIANTS`` (``AlignerVariant``), ``AlignmentMlp``, ``Aligners``,
``UserSetsDataset``, ``alignment_loss``, ``text_embeddings``, ``attribute_phrase_embeddings``,
``phrase_retrieval``, ``mean_pairwise_cosine_distance``, ``set_mmd2``.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from torch import nn
from torch.utils.data import Dataset
from transformers import CLIPModel, PreTrainedTokenizerBase

from prefgen_kedro.models.mmd import (
    DEFAULT_BANDWIDTH_FACTORS,
    gaussian_gram,
    gaussian_mmd2,
    weighted_mmd2,
)
from prefgen_kedro.provenance import run_key
from prefgen_kedro.training import train
from prefgen_kedro.world.vocabulary import ATTRIBUTE_IDS, attribute

if TYPE_CHECKING:
    from prefgen_kedro.params import AlignmentParams

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
    """``e_sem`` (in_dim) → a distribution over ``vocabulary_size`` text-space phrase states
    (kept in the checkpoint, each out_dim wide): standardisation with stored statistics, one
    GELU hidden layer with dropout, a score per phrase."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        vocabulary_size: int,
        hidden_dim: int,
        tokens: int,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if not 2 <= tokens <= vocabulary_size:
            raise ValueError(
                f"the aligner maps to a set of tokens (at least 2, at most the "
                f"{vocabulary_size} phrases), got {tokens}"
            )
        self.tokens = tokens
        self.out_dim = out_dim
        self.register_buffer("input_mean", torch.zeros(in_dim))
        self.register_buffer("input_std", torch.ones(in_dim))
        self.register_buffer("vocabulary", torch.zeros(vocabulary_size, out_dim))
        # exclusive groups of phrases; by default every phrase is a group of its own
        self.register_buffer("phrase_groups", torch.arange(vocabulary_size))
        self.net = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(in_dim, hidden_dim),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, vocabulary_size),
        )

    @torch.no_grad()
    def fit_standardisation(self, inputs: torch.Tensor) -> None:
        """Keep the mean and spread of ``inputs`` (N, in_dim), the training contexts."""
        self.input_mean.copy_(inputs.float().mean(dim=0))
        self.input_std.copy_(inputs.float().std(dim=0).clamp_min(1e-6))

    @torch.no_grad()
    def set_vocabulary(self, states: torch.Tensor, groups: Sequence[int] | None = None) -> None:
        """The phrase states (vocabulary_size, out_dim) the distribution is over and, if
        given, each phrase's exclusive group (ê_sem takes at most one phrase of a group)."""
        self.vocabulary.copy_(states.float())
        if groups is not None:
            groups = torch.as_tensor(groups, dtype=torch.long)
            if groups.shape != self.phrase_groups.shape:
                raise ValueError(
                    f"need one group per phrase ({len(self.phrase_groups)}), got {len(groups)}"
                )
            if len(groups.unique()) < self.tokens:
                raise ValueError(
                    f"{len(groups.unique())} phrase groups cannot give {self.tokens} tokens "
                    "(at most one phrase of a group)"
                )
            self.phrase_groups.copy_(groups)

    def forward(self, e_sem: torch.Tensor) -> torch.Tensor:
        """(..., in_dim) → a score per phrase (..., vocabulary_size)."""
        return self.net((e_sem - self.input_mean) / self.input_std)

    def distribution(self, e_sem: torch.Tensor) -> torch.Tensor:
        """(..., in_dim) → the phrase probabilities (..., vocabulary_size)."""
        return self(e_sem).softmax(dim=-1)

    def token_sets(self, e_sem: torch.Tensor) -> torch.Tensor:
        """(..., in_dim) → the states of the ``tokens`` most probable phrases, at most one
        per group, most probable first (..., tokens, out_dim)."""
        return self.vocabulary[self.picks(self(e_sem))]

    def picks(self, scores: torch.Tensor) -> torch.Tensor:
        """Phrase scores (..., vocabulary_size) → the indices (..., tokens) of the best
        phrase of each of the ``tokens`` groups whose best phrase scores highest."""
        groups = self.phrase_groups.unique()
        if len(groups) == len(self.phrase_groups):
            return scores.topk(self.tokens, dim=-1).indices
        maxima = [
            scores.masked_fill(self.phrase_groups != group, -torch.inf).max(dim=-1)
            for group in groups
        ]
        best_scores = torch.stack([maximum.values for maximum in maxima], dim=-1)
        best_phrases = torch.stack([maximum.indices for maximum in maxima], dim=-1)
        chosen = best_scores.topk(self.tokens, dim=-1).indices
        return best_phrases.gather(-1, chosen)


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
                    "vocabulary_size": mlp.vocabulary.shape[0],
                    "hidden_dim": mlp.net[1].out_features,
                    "tokens": mlp.tokens,
                    "dropout": mlp.net[0].p,
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
    """One item per user: its context embeddings (S, in_dim) and its target set as weights
    on the vocabulary (uniform on its phrases); contexts are padded and masked, so users with
    different numbers of contexts batch together."""

    def __init__(
        self,
        contexts: Sequence[torch.Tensor],
        target_phrases: Sequence[Sequence[int]],
        vocabulary_size: int,
    ) -> None:
        if len(contexts) != len(target_phrases) or not contexts:
            raise ValueError(
                f"need one target set per user, got {len(contexts)}/{len(target_phrases)}"
            )
        empty = [i for i, phrases in enumerate(target_phrases) if len(phrases) == 0]
        if empty:
            raise ValueError(f"users {empty[:5]} have an empty target set")
        self.contexts = [c.float() for c in contexts]
        self.targets = torch.zeros(len(target_phrases), vocabulary_size)
        for row, phrases in enumerate(target_phrases):
            self.targets[row, list(phrases)] = 1.0 / len(phrases)

    def __len__(self) -> int:
        return len(self.contexts)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"contexts": self.contexts[index], "targets": self.targets[index]}

    @staticmethod
    def collate(items: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        longest = max(len(item["contexts"]) for item in items)
        contexts = torch.zeros(len(items), longest, items[0]["contexts"].shape[1])
        mask = torch.zeros(len(items), longest, dtype=torch.bool)
        for row, item in enumerate(items):
            contexts[row, : len(item["contexts"])] = item["contexts"]
            mask[row, : len(item["contexts"])] = True
        targets = torch.stack([item["targets"] for item in items])
        return {"contexts": contexts, "contexts_mask": mask, "targets": targets}


def alignment_loss(
    model: AlignmentMlp,
    batch: Mapping[str, torch.Tensor],
    *,
    objective: Objective,
    gram: torch.Tensor,
) -> tuple[torch.Tensor, dict[str, float]]:
    """``compute_loss`` for the shared trainer: the mean over the batch's (unpadded)
    contexts of the MMD² between the aligner's distribution and the user's target set under
    the vocabulary's kernel ``gram`` (``mmd``, see ``mmd.gaussian_gram``), or of the squared
    error between the distribution's mean point and a target drawn from the set (``mse``)."""
    probabilities = model.distribution(batch["contexts"])  # (users, contexts, V)
    targets = batch["targets"][:, None].expand_as(probabilities)
    if objective == "mmd":
        per_context = weighted_mmd2(probabilities, targets, gram)
    else:
        drawn = torch.multinomial(targets.flatten(0, 1), 1).view(targets.shape[:2])
        mean_point = probabilities @ model.vocabulary
        per_context = ((mean_point - model.vocabulary[drawn]) ** 2).mean(dim=-1)
    return per_context[batch["contexts_mask"]].mean(), {}


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


def phrase_retrieval(
    scores: torch.Tensor, true_phrases: Sequence[Sequence[int]], *, k: int = 5
) -> dict[str, float]:
    """Rank all phrases for each user by its ``scores`` (users, phrases): recall@k of the
    user's true phrases and their mean rank (1 = best)."""
    ranks = scores.float().argsort(dim=1, descending=True).argsort(dim=1) + 1
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
        "phrases": int(scores.shape[1]),
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


def user_context_sets(rows: pd.DataFrame, column: str) -> tuple[list[str], list[torch.Tensor]]:
    """The users of ``rows`` (sorted) and, for each, its contexts' ``column`` (S, dim)."""
    groups = rows.groupby("user_id", sort=True)[column]
    return [user_id for user_id, _ in groups], [
        torch.from_numpy(np.stack(vectors.to_list())).float() for _, vectors in groups
    ]


def train_aligner(
    name: str,
    variant: AlignerVariant,
    user_ids: Sequence[str],
    contexts: Sequence[torch.Tensor],
    alignment_targets: Mapping,
    params: AlignmentParams,
) -> tuple[AlignmentMlp, dict]:
    """The aligner ``name`` trained on the training users' contexts (one (S, in_dim) tensor
    per user) with its variant's objective, and its training report."""
    vocabulary = alignment_targets["vocabulary"].clone()  # made under inference mode
    targets = [alignment_targets["phrase_ids"][user_id] for user_id in user_ids]
    dataset = UserSetsDataset(contexts, targets, len(vocabulary))
    torch.manual_seed(params.train.seed)
    model = AlignmentMlp(
        in_dim=contexts[0].shape[1],
        out_dim=vocabulary.shape[1],
        vocabulary_size=len(vocabulary),
        hidden_dim=params.hidden_dim,
        tokens=params.tokens,
        dropout=params.dropout,
    )
    model.fit_standardisation(torch.cat(list(contexts)))
    model.set_vocabulary(vocabulary, alignment_targets["phrase_groups"])
    gram = gaussian_gram(vocabulary, params.bandwidth_factors)
    result = train(
        model,
        dataset,
        functools.partial(alignment_loss, objective=variant.objective, gram=gram),
        params.train,
        checkpoint_root=params.checkpoint_root,
        name=f"aligner_{name}",
        # Every input of every training context and every target: a new MLLM, other
        # probing contexts or other phrases all train afresh.
        key=run_key(
            {
                "variant": asdict(variant),
                **params.model_dump(
                    include={"hidden_dim", "dropout", "tokens", "bandwidth_factors"}
                ),
            },
            users=list(user_ids),
            contexts=list(contexts),
            targets=dataset.targets,
            vocabulary=vocabulary,
            phrase_groups=alignment_targets["phrase_groups"],
        ),
        collate_fn=UserSetsDataset.collate,
    )
    report = {"objective": variant.objective, "reads": variant.reads, **result.summary()}
    return model.eval(), report


def align_users(
    aligners: Aligners,
    context_embeddings: pd.DataFrame,
    user_embeddings: pd.DataFrame,
    alignment_targets: Mapping,
    params: AlignmentParams,
) -> tuple[dict, pd.DataFrame]:
    """Every aligner's metrics on validation users (MMD² to the targets, retrieval,
    diversity next to the targets' own) and ``user_embeddings`` with every aligner's part of
    the user's canonical context."""
    validation = context_embeddings[context_embeddings["split"] == "val"]
    canonical = (
        context_embeddings[context_embeddings["context"] == 0]
        .set_index("user_id")
        .loc[user_embeddings["user_id"]]
    )
    is_val = canonical["split"].eq("val").to_numpy()
    val_users = list(canonical.index[is_val])
    targets = [alignment_targets["targets"][user_id] for user_id in val_users]
    metrics: dict = {
        "validation_users": len(val_users),
        "targets": {
            "diversity": mean_pairwise_cosine_distance(torch.cat(targets)),
            "diversity_within_user": mean_within(targets),
        },
    }
    aligned = user_embeddings.copy()
    for name, mlp in aligners.mlps.items():
        variant = ALIGNER_VARIANTS[name]
        user_ids, val_contexts = user_context_sets(validation, variant.reads)
        canonical_inputs = torch.from_numpy(np.stack(canonical[variant.reads].to_list())).float()
        with torch.inference_mode():
            mapped_contexts = [mlp.token_sets(contexts) for contexts in val_contexts]
            mapped_users = mlp.token_sets(canonical_inputs)
            val_scores = mlp(canonical_inputs[torch.tensor(is_val)])
        val_mapped = mapped_users[torch.tensor(is_val)]
        metrics[name] = {
            "mmd2_to_targets": set_mmd2(
                mapped_contexts,
                [alignment_targets["targets"][user_id] for user_id in user_ids],
                params.bandwidth_factors,
            ),
            "retrieval": phrase_retrieval(
                val_scores,
                [alignment_targets["phrase_ids"][user_id] for user_id in val_users],
                k=params.retrieval_k,
            ),
            # every validation user's canonical tokens together, and each user's apart
            "diversity_across_users": mean_pairwise_cosine_distance(val_mapped.flatten(0, 1)),
            "diversity_within_user": mean_within(list(val_mapped)),
        }
        aligned[variant.writes] = list(mapped_users.flatten(1).numpy())
    return metrics, aligned


def mean_within(sets: list[torch.Tensor]) -> float:
    """The mean over sets (of at least two rows) of their ``mean_pairwise_cosine_distance``."""
    values = [mean_pairwise_cosine_distance(rows) for rows in sets if len(rows) >= 2]
    if not values:
        raise ValueError("diversity within a set needs a set of at least two rows")
    return sum(values) / len(values)
