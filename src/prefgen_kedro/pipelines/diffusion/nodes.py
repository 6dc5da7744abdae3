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
from prefgen_kedro.models.diffusion import encode_prompts
from prefgen_kedro.models.oracle import AttributeOracle
from prefgen_kedro.models.probes import taste_audit
from prefgen_kedro.models.stack import DiffusionStack, MllmWithProcessor
from prefgen_kedro.models.user_adapter import UserBranches
from prefgen_kedro.models.user_branches import (
    branch_training_set,
    train_user_branch,
    user_conditions,
    validate_user_branches,
)
from prefgen_kedro.params import DiffusionParams, EvaluationParams
from prefgen_kedro.provenance import digest_of


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
    """Train one adapter per variant with branch parts on the frozen base UNet (on the
    latents of the stack's VAE when the UNet is a latent one, e.g. SD 1.5), under prompts
    that say the variant's said parts; a variant whose parts are all said has no branch.
    Each variant's run is keyed by the
    samples it trains on (pixels or latents, prompt states, its condition parts), the base
    UNet's weights and the noise schedule, so a variant whose inputs are unchanged is reused
    and any other trains afresh. The samples are read from disk a batch at a time
    (``branch_training_set``). (Step times: ``benchmarks/adapter_step.py``.)"""
    dataset = branch_training_set(
        user_conditions,
        images,
        interactions,
        raw_images,
        stack.clip,
        stack.tokenizer,
        stack.vae,
        params.checkpoint_root,  # its sample files, removed after the node
        said_sets=[
            params.said(name) for name in params.active_variants if params.branch_parts(name)
        ],
    )
    empty = encode_prompts(stack.clip.text_model.float().eval(), stack.tokenizer, [""])
    # Changed in place: the catalog loads the stack afresh for every node.
    unet = stack.unet.float()
    if params.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    base = {"unet": digest_of(unet), "noise_scheduler": digest_of(stack.scheduler)}
    adapters, report = {}, {"training_samples": len(dataset), "variants": {}}
    for name in params.active_variants:
        adapters[name], report["variants"][name] = train_user_branch(
            name,
            params.branch_parts(name),
            params.said(name),
            dataset,
            unet,
            stack.scheduler,
            empty,
            base,
            params,
        )
    return UserBranches.of({n: a for n, a in adapters.items() if a is not None}), report


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
