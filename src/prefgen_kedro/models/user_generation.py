"""Images for every compared method, and how the simulated users score them (DESIGN.md §5).

The diffusion pipeline's validation and the evaluation pipeline's benchmark draw prompts,
sample and score through these functions, so both measure the same thing. Public API:
``draw_subject_prompts``, ``sample_methods``, ``generate``, ``viper_style_embeds``,
``oracle_preference``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0
from transformers import PreTrainedTokenizerBase

from prefgen_kedro.models.diffusion import encode_prompts, sample
from prefgen_kedro.models.mllm import MllmPreferenceModel, PreferenceContext
from prefgen_kedro.models.oracle import AttributeOracle
from prefgen_kedro.models.user_adapter import UserAdapter, install_user_adapter
from prefgen_kedro.models.vqa import TASTE_QUESTION, parse_taste
from prefgen_kedro.world.users import SimulatedUser
from prefgen_kedro.world.vocabulary import HEADS, subject_prompt


def draw_subject_prompts(user_ids: Sequence[str], prompts_per_user: int, seed: int) -> pd.DataFrame:
    """``prompts_per_user`` subjects per user, drawn with ``seed``, each with its own image
    seed; every method samples the same (subject, seed) pairs. Columns: ``user_id``,
    ``case`` (0, 1, … within the user), ``subject``, ``seed``."""
    if prompts_per_user < 1:
        raise ValueError(f"prompts_per_user must be >= 1, got {prompts_per_user}")
    rng = np.random.default_rng(seed)
    subjects = list(HEADS["subject"])
    n = len(user_ids) * prompts_per_user
    return pd.DataFrame(
        {
            "user_id": np.repeat(np.asarray(user_ids, dtype=object), prompts_per_user),
            "case": np.tile(np.arange(prompts_per_user), len(user_ids)),
            "subject": [subjects[i] for i in rng.integers(len(subjects), size=n)],
            "seed": [seed * 100_000 + i for i in range(n)],
        }
    )


UNTRAINED_METHODS = ("base", "viper_style")  # methods that need no user branch


@dataclass
class MethodSamples:
    """Each method's uint8 images (case order), its sampling speed, and the taste the
    MLLM read for ``viper_style`` (user → (liked, disliked) attribute words)."""

    images: dict[str, np.ndarray] = field(default_factory=dict)
    images_per_second: dict[str, float] = field(default_factory=dict)
    tastes: dict[str, tuple[list[str], list[str]]] = field(default_factory=dict)


def sample_methods(
    methods: Sequence[str],
    cases: pd.DataFrame,
    *,
    unet: UNet2DConditionModel,
    scheduler: object,
    text_encoder: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    branches: Mapping[str, UserAdapter],
    taste_reader: MllmPreferenceModel,
    contexts: Mapping[str, PreferenceContext],
    viper_beta: float,
    sampling: Mapping[str, object],
) -> MethodSamples:
    """One image per case for each method: ``base`` (the prompt alone), ``viper_style``
    (prompt arithmetic on the MLLM's reading of ``contexts``) or a trained user branch fed
    the case's condition parts. ``cases`` has ``user_id``, ``subject``, ``seed`` and the
    branches' part columns; every method samples the same subjects and seeds."""
    unknown = sorted(set(methods) - {*UNTRAINED_METHODS, *branches})
    if unknown:
        raise ValueError(
            f"cannot sample methods {unknown}: known are {[*UNTRAINED_METHODS, *branches]} "
            "(user branches come from diffusion.variants)"
        )
    prompt_embeds = encode_prompts(
        text_encoder, tokenizer, [subject_prompt(s) for s in cases["subject"]]
    )
    empty = encode_prompts(text_encoder, tokenizer, [""])
    seeds = cases["seed"].tolist()
    samples = MethodSamples()
    for method in methods:
        started = time.perf_counter()
        if method == "base":
            images = generate(unet, scheduler, prompt_embeds, empty, seeds, **sampling)
        elif method == "viper_style":
            embeds, samples.tastes = viper_style_embeds(
                taste_reader,
                contexts,
                cases["user_id"].tolist(),
                prompt_embeds,
                text_encoder,
                tokenizer,
                viper_beta,
            )
            images = generate(unet, scheduler, embeds, empty, seeds, **sampling)
        else:
            adapter = branches[method]
            conditions = {
                part: torch.from_numpy(np.stack(cases[part].to_list()))
                for part in adapter.part_names
            }
            images = generate(
                unet,
                scheduler,
                prompt_embeds,
                empty,
                seeds,
                adapter=adapter,
                conditions=conditions,
                **sampling,
            )
        samples.images[method] = images
        samples.images_per_second[method] = round(len(cases) / (time.perf_counter() - started), 2)
    return samples


def generate(
    unet: UNet2DConditionModel,
    scheduler: object,
    prompt_embeds: torch.Tensor,
    empty: torch.Tensor,
    seeds: Sequence[int],
    *,
    adapter: UserAdapter | None = None,
    conditions: Mapping[str, torch.Tensor] | None = None,
    guidance_scale: float,
    user_guidance_scale: float,
    num_inference_steps: int,
    batch_size: int,
    mixed_precision: str = "no",
) -> np.ndarray:
    """uint8 images from the base UNet, bare (``adapter=None``) or with a user branch fed
    ``conditions`` (one row per image for each of the adapter's parts). With a branch,
    guidance is compositional: ``guidance_scale`` on the prompt, ``user_guidance_scale`` on
    the user condition against the branch's all-zero ("no user") condition, which the
    branch learned under user dropout."""
    common = {
        "guidance_scale": guidance_scale,
        "num_inference_steps": num_inference_steps,
        "seeds": seeds,
        "batch_size": batch_size,
        "mixed_precision": mixed_precision,
    }
    if adapter is None:
        unet.set_attn_processor(AttnProcessor2_0())
        return sample(unet, scheduler, prompt_embeds, empty, **common)
    if conditions is None:
        raise ValueError("a user branch needs its conditions")
    install_user_adapter(unet, adapter)
    parts = {part: conditions[part].float() for part in adapter.part_names}
    with torch.inference_mode():
        tokens = adapter.tokens(parts)
        null = adapter.tokens({part: torch.zeros_like(v) for part, v in parts.items()})
    try:
        return sample(
            unet,
            scheduler,
            prompt_embeds,
            empty,
            extra_condition={"cross_attention_kwargs": {"user_tokens": tokens}},
            negative_extra_condition={"cross_attention_kwargs": {"user_tokens": null}},
            extra_guidance_scale=user_guidance_scale,
            **common,
        )
    finally:
        unet.set_attn_processor(AttnProcessor2_0())


def viper_style_embeds(
    reader: MllmPreferenceModel,
    contexts: Mapping[str, PreferenceContext],
    user_ids: Sequence[str],
    prompt_embeds: torch.Tensor,
    text_encoder: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    beta: float,
) -> tuple[torch.Tensor, dict[str, tuple[list[str], list[str]]]]:
    """ViPer-style prompt arithmetic: the MLLM reads each user's taste off its context
    (``TASTE_QUESTION``, as ViPer's VLM does, never the ground truth), and image ``i``'s
    prompt embedding moves by ``beta`` × (liked-attribute text − disliked-attribute text)
    of ``user_ids[i]``. Returns the embeddings and each user's (liked, disliked) reading."""
    users = list(dict.fromkeys(user_ids))
    answers = reader.answer([contexts[u] for u in users], None, TASTE_QUESTION)
    tastes = dict(zip(users, map(parse_taste, answers), strict=True))
    liked = encode_prompts(text_encoder, tokenizer, [", ".join(tastes[u][0]) for u in user_ids])
    disliked = encode_prompts(text_encoder, tokenizer, [", ".join(tastes[u][1]) for u in user_ids])
    return prompt_embeds + beta * (liked - disliked), tastes


def oracle_preference(
    oracle: AttributeOracle,
    images: np.ndarray,
    subjects: Sequence[str],
    users: Sequence[SimulatedUser],
) -> pd.DataFrame:
    """Per image: the attributes the oracle reads, the utility the image's simulated user
    gives them, ``liked`` (utility > 0, the user's noiseless verdict) and whether the subject
    is the one the prompt asked for."""
    if not len(images) == len(subjects) == len(users):
        raise ValueError(f"{len(images)} images, {len(subjects)} subjects, {len(users)} users")
    read = oracle.predict(images)
    utilities = [
        user.utility([f"{c}:{read[c][i]}" for c in HEADS if c != "subject"])
        for i, user in enumerate(users)
    ]
    return pd.DataFrame(
        {
            "utility": utilities,
            "liked": [u > 0 for u in utilities],
            "subject_correct": [r == s for r, s in zip(read["subject"], subjects, strict=True)],
        }
    )
