"""Nodes of ``probing``: PrefGen step 2, which layers of the tuned MLLM hold the user.

With the tuned MLLM frozen, the last prompt token's state after every layer is read for
several contexts of every user (context 0 is the canonical one the later stages use) and
for context + query questions. Per layer, an inter-user probe (which training user is
this, from a context it never saw?) and an intra-user probe (is the query liked?) are fit;
their curves pick the layers of ``e_sem`` and ``e_core`` (DESIGN.md §1), and the user
embeddings are built from those layers, plus ``e_img`` from the conditioning CLIP.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Literal

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from pydantic import Field
from transformers import CLIPModel, PreTrainedModel, ProcessorMixin

from prefgen_kedro.data.pictures import load_pictures
from prefgen_kedro.figures import probe_figure
from prefgen_kedro.models.clip import conditioning_clip_encoders
from prefgen_kedro.models.mllm import MllmPreferenceModel, PreferenceContext
from prefgen_kedro.models.probes import probe_layers
from prefgen_kedro.models.user_adapter import choose_image_embedding
from prefgen_kedro.models.vqa import (
    QUESTION,
    TASTE_QUESTION,
    context_summary,
    sample_contexts,
    sample_vqa_examples,
)
from prefgen_kedro.params import StrictParams
from prefgen_kedro.world.agent_world import tastes_are_known


class ProbeFitParams(StrictParams):
    steps: int = Field(ge=1)
    learning_rate: float = Field(gt=0)
    weight_decay: float = Field(ge=0)


class LayerSelectionParams(StrictParams):
    semantic_top: int = Field(ge=1)  # e_sem: mean of the last this-many layers
    core_window: int = Field(ge=1)  # e_core: mean of this many consecutive layers ...
    core_search_from: float = Field(ge=0, le=1)  # ... at the inter-user peak above this depth


class ProbingParams(StrictParams):
    k: int = Field(ge=1)  # context size (the default K of vqa_tuning)
    contexts_per_user: int = Field(ge=2)
    inter_user_train_contexts: int = Field(ge=1)  # the rest are the probe's test contexts
    intra_user_questions_per_user: int = Field(ge=1)
    slot_positions: bool
    # What the context-only prompt ends with: nothing, or the taste question (whose last
    # token is where the model starts to name the user's likes and dislikes).
    context_readout: Literal["context", "taste_question"]
    batch_size: int = Field(ge=1)
    probe: ProbeFitParams
    selection: LayerSelectionParams
    e_img: Literal["first_liked", "medoid_liked"]
    seed: int


def sample_probe_contexts(
    interactions: pd.DataFrame, users: pd.DataFrame, params: ProbingParams
) -> pd.DataFrame:
    """Every user's contexts (context 0 canonical) as a table."""
    if params.inter_user_train_contexts >= params.contexts_per_user:
        raise ValueError(
            f"probing.inter_user_train_contexts={params.inter_user_train_contexts} leaves no "
            f"test context of contexts_per_user={params.contexts_per_user}"
        )
    return sample_contexts(
        interactions, users, k=params.k, n_contexts=params.contexts_per_user, seed=params.seed
    )


def read_hidden_states(
    tuned_mllm: PreTrainedModel,
    processor: ProcessorMixin,
    probe_contexts: pd.DataFrame,
    images: pd.DataFrame,
    interactions: pd.DataFrame,
    users: pd.DataFrame,
    raw_images: Mapping[str, Callable],
    params: ProbingParams,
) -> dict[str, torch.Tensor | pd.DataFrame]:
    """Last-token states of every layer: for each context (no query), and for context +
    query questions of training and validation users (with their labels)."""
    pictures = load_pictures(raw_images)
    model = MllmPreferenceModel(
        tuned_mllm, processor, slot_positions=params.slot_positions, batch_size=params.batch_size
    )
    contexts = [
        PreferenceContext([pictures[i] for i in row.liked], [pictures[i] for i in row.disliked])
        for row in probe_contexts.itertuples(index=False)
    ]
    questions = sample_vqa_examples(
        images,
        interactions,
        users,
        splits=["train", "val"],
        k=params.k,
        samples_per_user=params.intra_user_questions_per_user,
        seed=params.seed + 1,
        with_reasons=False,
    )
    question_contexts = [
        PreferenceContext([pictures[i] for i in q.liked], [pictures[i] for i in q.disliked])
        for q in questions
    ]
    split = users.set_index("user_id")["split"]
    return {
        "contexts": model.hidden_states(
            contexts,
            question=TASTE_QUESTION if params.context_readout == "taste_question" else QUESTION,
        ),
        "questions": model.hidden_states(question_contexts, [pictures[q.query] for q in questions]),
        "question_table": pd.DataFrame(
            {
                "user_id": [q.user_id for q in questions],
                "split": [split[q.user_id] for q in questions],
                "label": [q.label for q in questions],
            }
        ),
    }


def fit_probes(
    hidden_states: dict, probe_contexts: pd.DataFrame, params: ProbingParams
) -> tuple[pd.DataFrame, dict, Figure]:
    """Per-layer probe accuracies (``probe_metrics``), the chosen layers and the plot."""
    metrics, selection = probe_layers(
        hidden_states,
        probe_contexts,
        params.inter_user_train_contexts,
        fit=params.probe.model_dump(),
        rule=params.selection.model_dump(),
        seed=params.seed,
    )
    return metrics, selection, probe_figure(metrics, selection)


def build_user_embeddings(
    hidden_states: dict,
    layer_selection: dict,
    probe_contexts: pd.DataFrame,
    images: pd.DataFrame,
    users: pd.DataFrame,
    conditioning_clip: CLIPModel,
    clip_tokenizer,
    raw_images: Mapping[str, Callable],
    params: ProbingParams,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``context_embeddings`` (``e_sem``/``e_core`` of every context of every user; in the
    agent world also ``context_summary``, the perfect summary the signal ladder's
    ``oracle_state`` aligns) and ``user_embeddings`` (DESIGN.md §4: from each user's
    canonical context, with ``e_img``)."""
    states = hidden_states["contexts"]
    e_sem = states[:, layer_selection["e_sem"]].mean(dim=1)
    e_core = states[:, layer_selection["e_core"]].mean(dim=1)
    per_context = probe_contexts[["user_id", "split", "context"]].assign(
        e_sem=list(e_sem.numpy()), e_core=list(e_core.numpy())
    )
    if tastes_are_known(users):
        shown = images.set_index("image_id")["attributes"]
        per_context["context_summary"] = [
            context_summary(shown[list(liked)], shown[list(disliked)])
            for liked, disliked in zip(
                probe_contexts["liked"], probe_contexts["disliked"], strict=True
            )
        ]
    canonical = probe_contexts["context"] == 0
    users = probe_contexts[canonical].reset_index(drop=True)
    pictures = load_pictures(raw_images)
    encode_images, _ = conditioning_clip_encoders(conditioning_clip.float().eval(), clip_tokenizer)
    e_img = [
        choose_image_embedding(encode_images(np.stack([pictures[i] for i in liked])), params.e_img)
        for liked in users["liked"]
    ]
    user_embeddings = users[["user_id", "split", "liked", "disliked"]].assign(
        e_sem=list(e_sem[torch.tensor(canonical.to_numpy())].numpy()),
        e_core=list(e_core[torch.tensor(canonical.to_numpy())].numpy()),
        e_img=[vector.numpy() for vector in e_img],
    )
    return per_context, user_embeddings
