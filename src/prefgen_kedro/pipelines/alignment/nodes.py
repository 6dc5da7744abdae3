"""Nodes of ``alignment``: PrefGen step 3, ``e_sem`` → the diffusion text space.

Two MLPs of one recipe are trained on the training users' contexts: ``prefgen`` with the
per-user MMD² loss, ``prefgen_no_mmd`` (the ablation) with a point-wise MSE; both map every
user's canonical ``e_sem`` to ``e_sem_hat``, and their retrieval and diversity are compared
on the validation users.
"""

from __future__ import annotations

import functools

import numpy as np
import pandas as pd
import torch
from pydantic import Field
from transformers import CLIPModel, PreTrainedTokenizerBase

from prefgen_kedro.data.tables import LIKED
from prefgen_kedro.models.alignment import (
    AlignmentMlp,
    Objective,
    UserSetsDataset,
    alignment_loss,
    attribute_phrase_embeddings,
    attribute_retrieval,
    mean_pairwise_cosine_distance,
    set_mmd2,
    text_embeddings,
)
from prefgen_kedro.pipelines.params import StrictParams
from prefgen_kedro.provenance import run_key
from prefgen_kedro.training import TrainConfig, train
from prefgen_kedro.world.agent_world import tastes_are_known
from prefgen_kedro.world.vocabulary import ATTRIBUTE_IDS

VARIANTS: dict[str, Objective] = {"prefgen": "mmd", "prefgen_no_mmd": "mse"}


class AlignmentParams(StrictParams):
    checkpoint_root: str
    hidden_dim: int = Field(ge=1)
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
    retrieval ranks. Agent world: the phrases of the user's liked attributes (vocabulary:
    all attribute phrases); Pick-a-Pic: the captions of the user's liked images (vocabulary:
    every caption)."""
    clip = conditioning_clip.float().eval()
    if tastes_are_known(users):
        phrases, vocabulary = attribute_phrase_embeddings(clip, clip_tokenizer)
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
    return {
        "phrases": phrases,
        "vocabulary": vocabulary,
        "phrase_ids": wanted,
        "targets": {user_id: vocabulary[ids] for user_id, ids in wanted.items()},
    }


def train_aligners(
    context_embeddings: pd.DataFrame, alignment_targets: dict, params: AlignmentParams
) -> tuple[AlignmentMlp, AlignmentMlp, dict]:
    """The ``prefgen`` (MMD) and ``prefgen_no_mmd`` (MSE) MLPs, trained on training users."""
    train_rows = context_embeddings[context_embeddings["split"] == "train"]
    groups = train_rows.groupby("user_id", sort=True)["e_sem"]
    users = [user_id for user_id, _ in groups]
    contexts = [torch.from_numpy(np.stack(vectors.to_list())) for _, vectors in groups]
    targets = [alignment_targets["targets"][user_id] for user_id in users]
    dataset = UserSetsDataset(contexts, targets)
    models, report = [], {}
    for name, objective in VARIANTS.items():
        torch.manual_seed(params.train.seed)
        model = AlignmentMlp(
            in_dim=contexts[0].shape[1],
            out_dim=targets[0].shape[1],
            hidden_dim=params.hidden_dim,
        )
        result = train(
            model,
            dataset,
            functools.partial(
                alignment_loss, objective=objective, bandwidth_factors=params.bandwidth_factors
            ),
            params.train,
            checkpoint_root=params.checkpoint_root,
            name=f"aligner_{name}",
            # Every e_sem of every training context and every target: a new MLLM, other
            # probing contexts or other phrases all train afresh.
            key=run_key(
                {
                    "objective": objective,
                    **params.model_dump(include={"hidden_dim", "bandwidth_factors"}),
                },
                users=users,
                contexts=contexts,
                targets=targets,
            ),
            collate_fn=UserSetsDataset.collate,
        )
        models.append(model.eval())
        report[name] = {
            "objective": objective,
            "steps": result.steps,
            "run": result.record(),
            "wall_seconds": round(result.wall_seconds, 1),
            "learning_curve": [
                {"step": entry["step"], "loss": round(entry["loss"], 5)} for entry in result.history
            ],
        }
    return models[0], models[1], report


def evaluate_alignment(
    aligner: AlignmentMlp,
    aligner_no_mmd: AlignmentMlp,
    context_embeddings: pd.DataFrame,
    user_embeddings: pd.DataFrame,
    alignment_targets: dict,
    training_report: dict,
    params: AlignmentParams,
) -> tuple[dict, pd.DataFrame]:
    """``alignment_metrics`` on validation users (MMD² to the targets, retrieval, diversity
    next to the targets' own) and the user embeddings with ``e_sem_hat`` of both MLPs."""
    validation = context_embeddings[context_embeddings["split"] == "val"]
    groups = validation.groupby("user_id", sort=True)["e_sem"]
    val_users = [user_id for user_id, _ in groups]
    val_contexts = [torch.from_numpy(np.stack(vectors.to_list())) for _, vectors in groups]
    targets = [alignment_targets["targets"][user_id] for user_id in val_users]
    canonical = user_embeddings.set_index("user_id")
    e_sem = torch.from_numpy(np.stack(canonical["e_sem"].to_list())).float()
    is_val = torch.from_numpy(canonical["split"].eq("val").to_numpy())
    pooled_targets = torch.cat(targets)
    metrics: dict = {
        "validation_users": len(val_users),
        "targets": {"diversity": mean_pairwise_cosine_distance(pooled_targets)},
        "training": training_report,
    }
    mapped_users = {}
    for name, model in (("prefgen", aligner), ("prefgen_no_mmd", aligner_no_mmd)):
        with torch.inference_mode():
            mapped_contexts = [model(c.float()) for c in val_contexts]
            mapped_users[name] = model(e_sem)
        val_mapped = mapped_users[name][is_val]
        metrics[name] = {
            "mmd2_to_targets": set_mmd2(mapped_contexts, targets, params.bandwidth_factors),
            "retrieval": attribute_retrieval(
                val_mapped,
                alignment_targets["vocabulary"],
                [alignment_targets["phrase_ids"][u] for u in canonical.index[is_val.numpy()]],
                k=params.retrieval_k,
            ),
            # across users (one canonical e_sem_hat each) and across all mapped contexts
            "diversity_across_users": mean_pairwise_cosine_distance(val_mapped),
            "diversity_across_contexts": mean_pairwise_cosine_distance(torch.cat(mapped_contexts)),
        }
    metrics["targets"]["diversity_across_user_means"] = mean_pairwise_cosine_distance(
        torch.stack([t.mean(dim=0) for t in targets])
    )
    aligned = user_embeddings.assign(
        e_sem_hat=list(mapped_users["prefgen"].numpy()),
        e_sem_hat_no_mmd=list(mapped_users["prefgen_no_mmd"].numpy()),
    )
    return metrics, aligned
