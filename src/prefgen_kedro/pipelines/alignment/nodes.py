"""Nodes of ``alignment``: PrefGen step 3, ``e_sem`` → the diffusion text space.

MLPs of one recipe are trained on the training users' contexts (``ALIGNER_VARIANTS``):
``prefgen`` with the per-context MMD² loss, ``prefgen_no_mmd`` (the ablation) with a
point-wise MSE, both from ``e_sem``, and in the agent world ``oracle_state``, PrefGen's recipe
on a perfect context summary (the signal ladder's reference). Each maps every user's
canonical context to a few text-space tokens (``e_sem_hat``, ...), and their retrieval and
diversity are compared on the validation users.
"""

from __future__ import annotations

import pandas as pd
from transformers import CLIPModel, PreTrainedTokenizerBase

from prefgen_kedro.data.tables import LIKED
from prefgen_kedro.models.alignment import (
    ALIGNER_VARIANTS,
    Aligners,
    align_users,
    attribute_phrase_embeddings,
    text_embeddings,
    train_aligner,
    user_context_sets,
)
from prefgen_kedro.params import AlignmentParams
from prefgen_kedro.world.agent_world import tastes_are_known
from prefgen_kedro.world.vocabulary import ATTRIBUTE_IDS, attribute


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
    mlps, report = {}, {}
    for name, variant in ALIGNER_VARIANTS.items():
        if variant.reads in train_rows:
            user_ids, contexts = user_context_sets(train_rows, variant.reads)
            mlps[name], report[name] = train_aligner(
                name, variant, user_ids, contexts, alignment_targets, params
            )
    return Aligners.of(mlps), report


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
    metrics, aligned = align_users(
        aligners, context_embeddings, user_embeddings, alignment_targets, params
    )
    return {**metrics, "training": training_report}, aligned
