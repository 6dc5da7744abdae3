"""Nodes of ``diffusion``: PrefGen step 4, the user branch on the frozen base UNet, and the
comparison conditioners trained by the same recipe.

Each variant reads some parts of a user's condition (``variants`` in the parameters):
PrefGen ``[ê_sem; e_core; e_img]``, its ablations, ``ip_adapter`` (``e_img``) and
``mean_clip`` (the mean CLIP embedding of the liked context). A training sample is one of a
training user's liked images, its prompt (subject-only for a render, the caption for a
real image), and the condition computed from a context of that user that does *not* contain
the image (DESIGN.md: no copying).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import pandas as pd
from PIL import Image
from transformers import CLIPModel, PreTrainedTokenizerBase

from prefgen_kedro.models.alignment import Aligners
from prefgen_kedro.models.clip import EvaluationClip
from prefgen_kedro.models.oracle import AttributeOracle
from prefgen_kedro.models.probes import taste_audit
from prefgen_kedro.models.stack import DiffusionStack, MllmWithProcessor
from prefgen_kedro.models.user_adapter import UserBranches
from prefgen_kedro.models.user_branches import (
    train_variant_branches,
    user_conditions,
    validate_user_branches,
)
from prefgen_kedro.params import DiffusionParams, EvaluationParams


def make_user_conditions(
    probe_contexts: pd.DataFrame,
    context_embeddings: pd.DataFrame,
    aligners: Aligners,
    conditioning_clip: CLIPModel,
    clip_tokenizer: PreTrainedTokenizerBase,
    raw_images: Mapping[str, Callable],
    users: pd.DataFrame,
    params: DiffusionParams,
) -> pd.DataFrame:
    """Every part of every user's condition, for each of its contexts (context 0 is the
    canonical one the evaluation uses): each aligner's part (``e_sem_hat``, ...), ``e_img``
    and ``mean_clip``, next to the contexts' ``e_sem`` and ``e_core``; in the agent world
    also ``true_sem``. It reads the conditioning CLIP alone, not the whole diffusion stack:
    on ``gpu`` that would bring SD 1.5's UNet and VAE onto the GPU for nothing."""
    return user_conditions(
        probe_contexts,
        context_embeddings,
        aligners,
        conditioning_clip,
        clip_tokenizer,
        raw_images,
        users,
        params,
    )


def train_user_branches(
    user_conditions: pd.DataFrame,
    images: pd.DataFrame,
    interactions: pd.DataFrame,
    raw_images: Mapping[str, Callable],
    stack: DiffusionStack,
    params: DiffusionParams,
) -> tuple[UserBranches, dict]:
    """One branch per variant that has branch parts, trained on the frozen base UNet under
    prompts that say its said parts (``train_variant_branches``; step times:
    ``benchmarks/adapter_step.py``)."""
    return train_variant_branches(user_conditions, images, interactions, raw_images, stack, params)


def evaluate_user_branches(
    user_branches: UserBranches,
    user_conditions: pd.DataFrame,
    users: pd.DataFrame,
    images: pd.DataFrame,
    interactions: pd.DataFrame,
    diffusion_stack: DiffusionStack,
    evaluation_clip: EvaluationClip,
    attribute_oracle: AttributeOracle,
    foundation_mllm: MllmWithProcessor,
    tuned_mllm: MllmWithProcessor,
    raw_images: Mapping[str, Callable],
    training_report: dict,
    params: DiffusionParams,
) -> tuple[dict, Image.Image]:
    """Each branch, the bare base model and ``viper_style`` on the validation users
    (``validate_user_branches``; the benchmark on test users is ``evaluation``)."""
    return validate_user_branches(
        user_branches,
        user_conditions,
        users,
        images,
        interactions,
        diffusion_stack,
        evaluation_clip,
        attribute_oracle,
        foundation_mllm,
        tuned_mllm,
        raw_images,
        training_report,
        params,
    )


def audit_taste_signal(
    user_conditions: pd.DataFrame,
    users: pd.DataFrame,
    images: pd.DataFrame,
    params: EvaluationParams,
) -> dict:
    """The benchmark's taste audit of the ``params.split`` users' conditions
    (``probes.taste_audit``)."""
    return taste_audit(user_conditions, users, images, split=params.split, seed=params.seed)
