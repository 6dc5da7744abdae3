"""Nodes of ``alignment``: PrefGen step 3, ``e_sem`` → the diffusion text space.

MLPs of one recipe are trained on the training users' contexts (``ALIGNER_VARIANTS``):
``prefgen`` with the per-context MMD² loss, ``prefgen_no_mmd`` (the ablation) with a
point-wise MSE, both from ``e_sem``, and in the agent world ``oracle_state``, PrefGen's recipe
on a perfect context summary (the signal ladder's reference). Each maps every user's
canonical context to a few text-space tokens (``e_sem_hat``, ...), and their retrieval and
diversity are compared on the validation users.
"""

from __future__ import annotations

import functools
from dataclasses import asdict

import numpy as np
import pandas as pd
import torch
from pydantic import Field
from transformers import CLIPModel, PreTrainedTokenizerBase

from prefgen_kedro.data.tables import LIKED
from prefgen_kedro.models.alignment import (
    ALIGNER_VARIANTS,
    Aligners,
    AlignmentMlp,
    UserSetsDataset,
    alignment_loss,
    attribute_phrase_embeddings,
    mean_pairwise_cosine_distance,
    phrase_retrieval,
    set_mmd2,
    text_embeddings,
)
from prefgen_kedro.models.mmd import gaussian_gram
from prefgen_kedro.pipelines.params import StrictParams
from prefgen_kedro.provenance import run_key
from prefgen_kedro.training import TrainConfig, train
from prefgen_kedro.world.agent_world import tastes_are_known
from prefgen_kedro.world.vocabulary import ATTRIBUTE_IDS, attribute


class AlignmentParams(StrictParams):
    checkpoint_root: str
    hidden_dim: int = Field(ge=1)
    dropout: float = Field(ge=0.0, lt=1.0)
    tokens: int = Field(ge=2)  # phrases (text-space tokens) each context is mapped to
    bandwidth_factors: list[float] = Field(min_length=1)
    retrieval_k: int = Field(ge=1)
    train: TrainConfig


def make_alignment_targets(
    users: pd.DataFrame,
    images: pd.DataFrame,
    interactions: pd.DataFrame,
    conditioning_clip: CLIPModel,
    clip_tokenizer: PreTrainedTokenizerBase,
) -> dict:
    """Every user's target set in the conditioning text space, and the phrase vocabulary the
    retrieval ranks with its exclusive groups. Agent world: the phrases of the user's liked
    attributes (vocabulary: all attribute phrases, grouped by category); Pick-a-Pic: the
    captions of the user's liked images (vocabulary: every caption, each its own group)."""
    clip = conditioning_clip.float().eval()
    if tastes_are_known(users):
        phrases, vocabulary = attribute_phrase_embeddings(clip, clip_tokenizer)
        categories = sorted({attribute(a).category for a in ATTRIBUTE_IDS})
        groups = [categories.index(attribute(a).category) for a in ATTRIBUTE_IDS]
        column = {a: i for i, a in enumerate(ATTRIBUTE_IDS)}
        wanted = {
            row.user_id: [column[a] for a in row.liked_attributes]
            for row in users.itertuples(index=False)
        }
    else:
        liked = interactions[interactions["label"] == LIKED].merge(
            images[["image_id", "caption"]], on="image_id"
        )
        phrases = sorted(set(liked["caption"]))
        column = {caption: i for i, caption in enumerate(phrases)}
        by_user = liked.groupby("user_id")["caption"].apply(list)
        wanted = {
            user_id: [column[c] for c in by_user.get(user_id, [])] for user_id in users["user_id"]
        }
        vocabulary = text_embeddings(clip, clip_tokenizer, phrases)
        groups = list(range(len(phrases)))
    return {
        "phrases": phrases,
        "vocabulary": vocabulary,
        "phrase_groups": groups,
        "phrase_ids": wanted,
        "targets": {user_id: vocabulary[ids] for user_id, ids in wanted.items()},
    }


def train_aligners(
    context_embeddings: pd.DataFrame, alignment_targets: dict, params: AlignmentParams
) -> tuple[Aligners, dict]:
    """One MLP per aligner variant (``ALIGNER_VARIANTS``) whose input column the contexts
    have, trained on the training users' contexts with its objective."""
    train_rows = context_embeddings[context_embeddings["split"] == "train"]
    vocabulary = alignment_targets["vocabulary"].clone()  # made under inference mode
    gram = gaussian_gram(vocabulary, params.bandwidth_factors)
    mlps, report = {}, {}
    for name, variant in ALIGNER_VARIANTS.items():
        if variant.reads not in train_rows:
            continue
        user_ids, contexts = _user_sets(train_rows, variant.reads)
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
        model.fit_standardisation(torch.cat(contexts))
        model.set_vocabulary(vocabulary, alignment_targets["phrase_groups"])
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
                users=user_ids,
                contexts=contexts,
                targets=dataset.targets,
                vocabulary=vocabulary,
                phrase_groups=alignment_targets["phrase_groups"],
            ),
            collate_fn=UserSetsDataset.collate,
        )
        mlps[name] = model.eval()
        report[name] = {
            "objective": variant.objective,
            "reads": variant.reads,
            "steps": result.steps,
            "run": result.record(),
            "wall_seconds": round(result.wall_seconds, 1),
            "learning_curve": [
                {"step": entry["step"], "loss": round(entry["loss"], 5)} for entry in result.history
            ],
        }
    return Aligners.of(mlps), report


def _user_sets(rows: pd.DataFrame, column: str) -> tuple[list[str], list[torch.Tensor]]:
    """The users of ``rows`` (sorted) and, for each, its contexts' ``column`` (S, dim)."""
    groups = rows.groupby("user_id", sort=True)[column]
    return [user_id for user_id, _ in groups], [
        torch.from_numpy(np.stack(vectors.to_list())).float() for _, vectors in groups
    ]


def evaluate_alignment(
    aligners: Aligners,
    context_embeddings: pd.DataFrame,
    user_embeddings: pd.DataFrame,
    alignment_targets: dict,
    training_report: dict,
    params: AlignmentParams,
) -> tuple[dict, pd.DataFrame]:
    """``alignment_metrics`` on validation users (MMD² to the targets, retrieval, diversity
    next to the targets' own) and the user embeddings with every aligner's part of their
    canonical context (``e_sem_hat``, ``e_sem_hat_no_mmd``, ...)."""
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
            "diversity_within_user": _mean_within(targets),
        },
        "training": training_report,
    }
    aligned = user_embeddings.copy()
    for name, mlp in aligners.mlps.items():
        variant = ALIGNER_VARIANTS[name]
        user_ids, val_contexts = _user_sets(validation, variant.reads)
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
            "diversity_within_user": _mean_within(list(val_mapped)),
        }
        aligned[variant.writes] = list(mapped_users.flatten(1).numpy())
    return metrics, aligned


def _mean_within(sets: list[torch.Tensor]) -> float:
    """The mean over sets (of at least two rows) of their ``mean_pairwise_cosine_distance``."""
    values = [mean_pairwise_cosine_distance(rows) for rows in sets if len(rows) >= 2]
    if not values:
        raise ValueError("diversity within a set needs a set of at least two rows")
    return sum(values) / len(values)
