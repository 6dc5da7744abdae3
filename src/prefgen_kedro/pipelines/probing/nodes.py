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

import pandas as pd
import torch
from matplotlib.figure import Figure
from pydantic import Field
from transformers import CLIPModel, PreTrainedTokenizerBase

from prefgen_kedro.data.pictures import PictureFiles
from prefgen_kedro.figures import probe_figure
from prefgen_kedro.models.clip import conditioning_clip_encoders
from prefgen_kedro.models.mllm import MllmPreferenceModel
from prefgen_kedro.models.probes import probe_hidden_states, probe_layers, user_embeddings
from prefgen_kedro.models.stack import MllmWithProcessor
from prefgen_kedro.models.vqa import (
    QUESTION,
    TASTE_QUESTION,
    sample_contexts,
    sample_vqa_examples,
)
from prefgen_kedro.params import StrictParams


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
    tuned_mllm: MllmWithProcessor,
    probe_contexts: pd.DataFrame,
    images: pd.DataFrame,
    interactions: pd.DataFrame,
    users: pd.DataFrame,
    raw_images: Mapping[str, Callable],
    params: ProbingParams,
) -> dict[str, torch.Tensor | pd.DataFrame]:
    """Last-token states of every layer: for each context (no query), and for context +
    query questions of training and validation users (with their labels)."""
    pictures = PictureFiles(raw_images)  # read a batch at a time
    model = MllmPreferenceModel(
        tuned_mllm.model,
        tuned_mllm.processor,
        slot_positions=params.slot_positions,
        batch_size=params.batch_size,
    )
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
    question = TASTE_QUESTION if params.context_readout == "taste_question" else QUESTION
    return probe_hidden_states(
        model, probe_contexts, questions, pictures, users, context_question=question
    )


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
    clip_tokenizer: PreTrainedTokenizerBase,
    raw_images: Mapping[str, Callable],
    params: ProbingParams,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``context_embeddings`` and ``user_embeddings`` (``probes.user_embeddings``): the
    chosen layers' ``e_sem``/``e_core`` of every context, and of each user's canonical
    context with ``e_img`` from the conditioning CLIP."""
    encode_images, _ = conditioning_clip_encoders(conditioning_clip.float().eval(), clip_tokenizer)
    return user_embeddings(
        hidden_states["contexts"],
        layer_selection,
        probe_contexts,
        images,
        users,
        encode_images,
        PictureFiles(raw_images),
        params.e_img,
    )
