"""Images for every compared method, and how users score them (DESIGN.md §5).

The diffusion pipeline's validation and the evaluation pipeline's benchmark draw prompts,
sample and score through these functions, so both measure the same thing. Simulated users
(the agent world) get subject-only prompts and the attribute oracle's verdicts; real users
(Pick-a-Pic), whose taste is known only through their images, get the captions of their
own held-out liked images as prompts and are scored by the MLLM judge and CLIP. Public API:
``image_prompts``, ``held_out_likes``, ``draw_prompts``, ``draw_subject_prompts``,
``sample_methods``, ``said_column``, ``said_prompts``, ``generate``, ``read_tastes``,
``viper_style_embeds``, ``viper_style_prompts``, ``preference_scores``,
``oracle_preference``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0

from prefgen_kedro.data.tables import LIKED
from prefgen_kedro.models.clip import EvaluationClip, evaluation_clip_encoders
from prefgen_kedro.models.diffusion import encode_prompts, sample
from prefgen_kedro.models.metrics import clip_preference, clip_score
from prefgen_kedro.models.mllm import MllmPreferenceModel, PreferenceContext
from prefgen_kedro.models.oracle import AttributeOracle
from prefgen_kedro.models.stack import DiffusionStack
from prefgen_kedro.models.user_adapter import UserAdapter, install_user_adapter
from prefgen_kedro.models.vqa import TASTE_QUESTION, parse_taste
from prefgen_kedro.params import ViperStyleParams
from prefgen_kedro.world.agent_world import SOURCE as RENDER_SOURCE
from prefgen_kedro.world.users import SimulatedUser
from prefgen_kedro.world.vocabulary import HEADS, said_caption, subject_prompt

logger = logging.getLogger(__name__)


def image_prompts(images: pd.DataFrame) -> pd.Series:
    """Per image id, the prompt a user asks for to get that image: a render's subject-only
    prompt ("a star": in the agent world the style is the user's taste, not the prompt's),
    any other image's caption (Pick-a-Pic: what its user typed; its ``subject`` is that
    same caption)."""
    renders = (images["source"] == RENDER_SOURCE).to_numpy()
    prompts = np.where(renders, images["subject"].map(subject_prompt), images["caption"])
    return pd.Series(prompts, index=images["image_id"].to_numpy(), dtype=object)


def held_out_likes(contexts: pd.DataFrame, interactions: pd.DataFrame) -> pd.DataFrame:
    """For each row of ``contexts`` (``user_id``, ``liked``, ``disliked``), its user's liked
    images outside that context, in history order, each once (a real user may like one image
    in two pairs): columns ``row`` (the context's index label), ``user_id``, ``image_id``.
    A condition made from the context never saw them, so they can be its training targets
    or its held-out references."""
    liked = interactions[interactions["label"] == LIKED].drop_duplicates(["user_id", "image_id"])
    history = liked.groupby("user_id", sort=False)["image_id"].apply(list)
    rows = []
    for label, user_id, shown_liked, shown_disliked in zip(
        contexts.index, contexts["user_id"], contexts["liked"], contexts["disliked"], strict=True
    ):
        # A real user can like an image in one pair and dislike it in another: a context
        # shows it on either side.
        shown = {*shown_liked, *shown_disliked}
        rows += [(label, user_id, i) for i in history.get(user_id, []) if i not in shown]
    return pd.DataFrame(rows, columns=["row", "user_id", "image_id"])


def draw_prompts(
    contexts: pd.DataFrame,
    interactions: pd.DataFrame,
    images: pd.DataFrame,
    prompts_per_user: int,
    seed: int,
    *,
    subject_only: bool,
) -> pd.DataFrame:
    """The cases every method samples, the same prompts and image seeds for all:
    ``prompts_per_user`` per user of ``contexts`` (indexed by user id, with the ``liked`` and
    ``disliked`` image ids of the context its condition comes from). Columns: ``user_id``,
    ``case``, ``subject``, ``prompt``, ``seed`` and ``real_image_id``, a liked image of the
    user outside that context (the ``real`` reference row).

    ``subject_only`` (simulated users): subjects drawn with ``seed`` as in
    ``draw_subject_prompts``, and the user's first held-out liked renders. Otherwise (real
    users): held-out liked images with distinct, non-empty prompts drawn with ``seed``; each
    case's prompt is its image's caption (``image_prompts``) and that image, the user's own
    answer to the prompt, is its ``real_image_id``. Never an image of the context. Users
    with too few such images are left out (logged); none left is an error."""
    if prompts_per_user < 1:
        raise ValueError(f"prompts_per_user must be >= 1, got {prompts_per_user}")
    held_out = held_out_likes(contexts.rename_axis("user_id").reset_index(), interactions)
    prompt_of = image_prompts(images)
    if not subject_only:
        held_out["prompt"] = prompt_of[held_out["image_id"]].to_numpy()
        # Two cases of one caption would ask the same twice; an empty caption asks nothing.
        held_out = held_out[held_out["prompt"].fillna("").str.strip().ne("")]
        held_out = held_out.drop_duplicates(["user_id", "prompt"])
    candidates = held_out.groupby("user_id", sort=False)["image_id"].apply(list)
    users = [u for u in contexts.index if len(candidates.get(u, [])) >= prompts_per_user]
    if not users:
        raise ValueError(
            f"no user has {prompts_per_user} liked images outside its context "
            f"(prompts_per_user={prompts_per_user})"
        )
    if len(users) < len(contexts):
        kept = set(users)
        left_out = [u for u in contexts.index if u not in kept]
        logger.warning(
            "%d of %d users have fewer than %d liked images outside their context, left out: %s",
            len(left_out),
            len(contexts),
            prompts_per_user,
            ", ".join(map(str, left_out[:10])) + (" …" if len(left_out) > 10 else ""),
        )
    if subject_only:
        cases = draw_subject_prompts(users, prompts_per_user, seed)
        return cases.assign(
            real_image_id=[i for u in users for i in candidates[u][:prompts_per_user]]
        )
    rng = np.random.default_rng(seed)
    real = [
        candidates[u][j]
        for u in users
        for j in rng.choice(len(candidates[u]), prompts_per_user, replace=False)
    ]
    subject_of = images.set_index("image_id")["subject"]
    return _cases(
        users,
        prompts_per_user,
        seed,
        subject=subject_of[real].tolist(),
        prompt=prompt_of[real].tolist(),
    ).assign(real_image_id=real)


def draw_subject_prompts(user_ids: Sequence[str], prompts_per_user: int, seed: int) -> pd.DataFrame:
    """``prompts_per_user`` subjects per user, drawn with ``seed``, each with its own image
    seed; every method samples the same (subject, seed) pairs. Columns: ``user_id``,
    ``case`` (0, 1, … within the user), ``subject``, ``prompt`` (the subject-only prompt),
    ``seed``."""
    if prompts_per_user < 1:
        raise ValueError(f"prompts_per_user must be >= 1, got {prompts_per_user}")
    rng = np.random.default_rng(seed)
    subjects = list(HEADS["subject"])
    n = len(user_ids) * prompts_per_user
    drawn = [subjects[i] for i in rng.integers(len(subjects), size=n)]
    return _cases(
        user_ids,
        prompts_per_user,
        seed,
        subject=drawn,
        prompt=[subject_prompt(s) for s in drawn],
    )


def _cases(
    user_ids: Sequence[str], prompts_per_user: int, seed: int, **columns: list[str]
) -> pd.DataFrame:
    """``prompts_per_user`` rows per user (``case`` 0, 1, …) with ``columns``, each row with
    its own image seed."""
    n = len(user_ids) * prompts_per_user
    return pd.DataFrame(
        {
            "user_id": np.repeat(np.asarray(user_ids, dtype=object), prompts_per_user),
            "case": np.tile(np.arange(prompts_per_user), len(user_ids)),
            **columns,
            "seed": [seed * 100_000 + i for i in range(n)],
        }
    )


UNTRAINED_METHODS = ("base", "viper_style")  # methods that need no user branch


@dataclass
class MethodSamples:
    """Each method's uint8 images (case order), the prompts of a method whose prompts said
    more than the case's (case order), its sampling speed, and the taste the MLLM read for
    ``viper_style`` (user → (liked, disliked) attribute words)."""

    images: dict[str, np.ndarray] = field(default_factory=dict)
    said_prompts: dict[str, list[str]] = field(default_factory=dict)
    images_per_second: dict[str, float] = field(default_factory=dict)
    tastes: dict[str, tuple[list[str], list[str]]] = field(default_factory=dict)

    def report(self, cases: int) -> dict:
        """The number of ``cases``, each method's images/s and what ``viper_style`` read."""
        return {
            "cases": cases,
            "images_per_second": self.images_per_second,
            "viper_style_tastes": {
                user: {"liked": liked, "disliked": disliked}
                for user, (liked, disliked) in self.tastes.items()
            },
        }


def sample_methods(
    methods: Sequence[str],
    cases: pd.DataFrame,
    *,
    stack: DiffusionStack,
    branches: Mapping[str, UserAdapter],
    said: Mapping[str, Sequence[str]],
    taste_reader: MllmPreferenceModel,
    contexts: Mapping[str, PreferenceContext],
    viper: ViperStyleParams,
    sampling: Mapping[str, object],
) -> MethodSamples:
    """One image per case for each method: ``base`` (the prompt alone), ``viper_style``
    (the MLLM's reading of ``contexts``, delivered as ``viper`` says) or a user variant: the
    prompt saying its ``said`` parts (``said_prompts``) and, if it has one, its trained
    branch fed its other parts. ``cases`` has ``user_id``, ``subject``, ``prompt``, ``seed``
    and the variants' part columns; every method samples the same prompts and seeds with the
    ``stack`` (its UNet and text tower in float32; a latent UNet decodes with its VAE)."""
    branches = dict(branches)  # an nn.ModuleDict has no ``get``
    known = [*UNTRAINED_METHODS, *dict.fromkeys([*said, *branches])]
    unknown = sorted(set(methods) - set(known))
    if unknown:
        raise ValueError(
            f"cannot sample methods {unknown}: known are {known} "
            "(user variants come from diffusion.variants)"
        )
    unbranched = [m for m in methods if m in said and not said[m] and m not in branches]
    if unbranched:
        raise ValueError(f"user_branches has no branch of {unbranched}, which say nothing")
    unet, text_encoder = stack.unet.float().eval(), stack.clip.text_model.float().eval()
    scheduler, vae, tokenizer = stack.scheduler, stack.vae, stack.tokenizer

    def encode(prompts: Sequence[str]) -> torch.Tensor:
        return encode_prompts(text_encoder, tokenizer, list(prompts))

    prompt_embeds = encode(cases["prompt"])
    empty = encode([""])
    seeds = cases["seed"].tolist()
    samples = MethodSamples()
    for method in methods:
        started = time.perf_counter()
        if method == "base":
            images = generate(unet, scheduler, prompt_embeds, empty, seeds, vae=vae, **sampling)
        elif method == "viper_style":
            samples.tastes = read_tastes(taste_reader, contexts, cases["user_id"])
            positive, negative = viper_style_embeds(
                samples.tastes, cases, prompt_embeds, empty, encode, viper
            )
            if viper.delivery == "prompt":
                samples.said_prompts[method] = viper_style_prompts(samples.tastes, cases)
            images = generate(unet, scheduler, positive, negative, seeds, vae=vae, **sampling)
        else:
            embeds = prompt_embeds
            if said.get(method):
                samples.said_prompts[method] = said_prompts(cases, said[method])
                embeds = encode(samples.said_prompts[method])
            adapter = branches.get(method)
            conditions = None
            if adapter is not None:
                conditions = {
                    part: torch.from_numpy(np.stack(cases[part].to_list()))
                    for part in adapter.part_names
                }
            images = generate(
                unet,
                scheduler,
                embeds,
                empty,
                seeds,
                adapter=adapter,
                conditions=conditions,
                vae=vae,
                **sampling,
            )
        samples.images[method] = images
        samples.images_per_second[method] = round(len(cases) / (time.perf_counter() - started), 2)
    return samples


def said_column(part: str) -> str:
    """The ``user_conditions`` column of the attribute ids ``part``'s phrases name."""
    return f"{part}_attributes"


def said_prompts(cases: pd.DataFrame, parts: Sequence[str]) -> list[str]:
    """Each case's subject captioned with the attributes its ``parts`` name (the columns
    ``said_column(part)``, in order; ``said_caption``)."""
    columns = [said_column(part) for part in parts]
    missing = [column for column in columns if column not in cases]
    if missing:
        raise KeyError(f"the cases have no columns {missing} to say (user_conditions makes them)")
    return [
        said_caption(subject, [a for attributes in row for a in attributes])
        for subject, row in zip(
            cases["subject"], cases[columns].itertuples(index=False), strict=True
        )
    ]


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
    vae: AutoencoderKL | None = None,
) -> np.ndarray:
    """uint8 images from the base UNet, bare (``adapter=None``) or with a user branch fed
    ``conditions`` (one row per image for each of the adapter's parts). With a branch,
    guidance is compositional: ``guidance_scale`` on the prompt, ``user_guidance_scale`` on
    the user condition against the branch's all-zero ("no user") condition, which the
    branch learned under user dropout. The adapter is moved to the UNet's device."""
    common = {
        "guidance_scale": guidance_scale,
        "num_inference_steps": num_inference_steps,
        "seeds": seeds,
        "batch_size": batch_size,
        "mixed_precision": mixed_precision,
        "vae": vae,
    }
    if adapter is None:
        unet.set_attn_processor(AttnProcessor2_0())
        return sample(unet, scheduler, prompt_embeds, empty, **common)
    if conditions is None:
        raise ValueError("a user branch needs its conditions")
    # Its key/values run inside the UNet's attention layers, on the UNet's device.
    adapter.to(unet.device)
    install_user_adapter(unet, adapter)
    parts = {part: conditions[part].float().to(unet.device) for part in adapter.part_names}
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


def read_tastes(
    reader: MllmPreferenceModel, contexts: Mapping[str, PreferenceContext], user_ids: Sequence[str]
) -> dict[str, tuple[list[str], list[str]]]:
    """Each user's (liked, disliked) attribute words as the MLLM reads them off its context
    (``TASTE_QUESTION``, as ViPer's VLM does, never the ground truth)."""
    users = list(dict.fromkeys(user_ids))
    answers = reader.answer([contexts[u] for u in users], None, TASTE_QUESTION)
    return dict(zip(users, map(parse_taste, answers), strict=True))


def viper_style_embeds(
    tastes: Mapping[str, tuple[list[str], list[str]]],
    cases: pd.DataFrame,
    prompt_embeds: torch.Tensor,
    empty: torch.Tensor,
    encode: Callable[[Sequence[str]], torch.Tensor],
    viper: ViperStyleParams,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompt and negative-prompt states of ``viper_style`` for each case, from its
    user's ``tastes``. ``arithmetic`` (ViPer's): the prompt's states move by ``beta`` ×
    (liked words' states − disliked words'), against the empty prompt; ``prompt``: the liked
    words said after the prompt, the disliked words as the negative prompt."""
    disliked = [", ".join(tastes[u][1]) for u in cases["user_id"]]
    if viper.delivery == "arithmetic":
        liked = [", ".join(tastes[u][0]) for u in cases["user_id"]]
        return prompt_embeds + viper.beta * (encode(liked) - encode(disliked)), empty
    return encode(viper_style_prompts(tastes, cases)), encode(disliked)


def viper_style_prompts(
    tastes: Mapping[str, tuple[list[str], list[str]]], cases: pd.DataFrame
) -> list[str]:
    """Each case's prompt with its user's liked words said after it (``viper_style``'s
    ``prompt`` delivery)."""
    return [
        ", ".join([prompt, *tastes[user][0]])
        for prompt, user in zip(cases["prompt"], cases["user_id"], strict=True)
    ]


def preference_scores(
    images: np.ndarray,
    prompts: Sequence[str],
    user_ids: Sequence[str],
    contexts: Mapping[str, PreferenceContext],
    *,
    evaluation_clip: EvaluationClip,
    judge: MllmPreferenceModel,
) -> pd.DataFrame:
    """Per image, what any user allows measuring, simulated or real: ``clip_score`` (the
    image against its prompt, evaluation CLIP), ``clip_i`` (its CLIP similarity to the
    user's liked minus disliked context images) and ``judge_p_yes`` (the MLLM judge's P(yes)
    that the user likes it, given the user's context). Image ``i`` belongs to
    ``user_ids[i]``, whose context is ``contexts[user_ids[i]]``."""
    if not len(images) == len(prompts) == len(user_ids):
        raise ValueError(f"{len(images)} images, {len(prompts)} prompts, {len(user_ids)} users")
    encode_images, encode_texts = evaluation_clip_encoders(evaluation_clip.float().eval())
    image_embeddings = encode_images(images)
    text_embeddings = encode_texts(list(prompts))
    sides = {
        user_id: (
            encode_images(np.stack(contexts[user_id].liked)),
            encode_images(np.stack(contexts[user_id].disliked)),
        )
        for user_id in dict.fromkeys(user_ids)
    }
    return pd.DataFrame(
        {
            "clip_score": clip_score(image_embeddings, text_embeddings).numpy(),
            "clip_i": clip_preference(
                image_embeddings,
                torch.stack([sides[u][0] for u in user_ids]),
                torch.stack([sides[u][1] for u in user_ids]),
            ).numpy(),
            "judge_p_yes": judge.judge([contexts[u] for u in user_ids], list(images)).numpy(),
        }
    )


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
