"""PrefGen step 4 around the user adapter: every user's condition parts, the samples a
branch trains on, the branches' training runs and their validation.

Each variant reads some parts of a user's condition (``DiffusionParams.variants``): PrefGen
``[ê_sem; e_core; e_img]``, its ablations, ``ip_adapter`` (``e_img``) and ``mean_clip``
(the mean CLIP embedding of the liked context). A training sample is one of a training
user's liked images, its prompt (subject-only for a render, the caption for a real image),
and the condition computed from a context of that user that does *not* contain the image
(DESIGN.md: no copying).
"""

from __future__ import annotations

import shutil
import weakref
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from PIL import Image
from transformers import CLIPModel, PreTrainedTokenizerBase

from prefgen_kedro.data.pictures import (
    PictureFiles,
    context_pictures,
    preference_contexts,
)
from prefgen_kedro.models.alignment import (
    ALIGNER_VARIANTS,
    Aligners,
    attribute_phrase_embeddings,
)
from prefgen_kedro.models.batches import Column, RowFile, RowsDataset, scratch_folder
from prefgen_kedro.models.clip import EvaluationClip, conditioning_clip_encoders
from prefgen_kedro.models.diffusion import (
    DiffusionLoss,
    encode_latents,
    encode_prompts,
    sample_grid,
    to_diffusion_pixels,
)
from prefgen_kedro.models.oracle import AttributeOracle
from prefgen_kedro.models.stack import DiffusionStack, MllmWithProcessor
from prefgen_kedro.models.user_adapter import (
    USER_BRANCH_RECIPE,
    UserAdapter,
    UserBranches,
    UserConditionedUnet,
    choose_image_embedding,
)
from prefgen_kedro.models.user_generation import (
    draw_prompts,
    held_out_likes,
    image_prompts,
    oracle_preference,
    preference_scores,
    said_column,
    sample_methods,
)
from prefgen_kedro.params import DiffusionParams
from prefgen_kedro.provenance import digest_of, run_key
from prefgen_kedro.training import train
from prefgen_kedro.world.agent_world import simulated_users, tastes_are_known
from prefgen_kedro.world.vocabulary import ATTRIBUTE_IDS, said_caption

# A perfect ê_sem: the text-space states of the simulated user's liked-attribute phrases
# (the alignment targets themselves). A diagnostic upper bound for PrefGen's delivery,
# agent world only, never a method.
TRUE_SEM = "true_sem"
# The counting rule's own picks from each context, as the aligners' phrase states: the most
# that said phrases can carry of a context's taste. A diagnostic for the taste audit, agent
# world only, never a method.
COUNTING_RULE_PICKS = "counting_rule_picks"
# Pictures the conditioning CLIP encodes at once for the users' conditions.
CONDITION_BATCH = 256
PARTS = (
    "e_sem_hat",
    "e_sem_hat_no_mmd",
    "oracle_state_hat",
    "e_core",
    "e_img",
    "mean_clip",
    TRUE_SEM,
)


def user_conditions(
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
    also ``true_sem`` and, with the ``oracle_state`` aligner, ``counting_rule_picks``."""
    wanted = {part for parts in params.active_variants.values() for part in parts}
    unknown = wanted - set(PARTS)
    if unknown:
        raise ValueError(f"diffusion.variants name unknown parts {sorted(unknown)}; known: {PARTS}")
    agent_world = tastes_are_known(users)
    if TRUE_SEM in wanted and not agent_world:
        raise ValueError(f"diffusion.variants name {TRUE_SEM!r}, which only simulated users have")
    encode_images, _ = conditioning_clip_encoders(conditioning_clip.float().eval(), clip_tokenizer)
    merged = probe_contexts.merge(context_embeddings, on=["user_id", "split", "context"])
    pictures = PictureFiles(raw_images)  # a batch's pictures at a time
    # Each liked picture once: a user's contexts share most of theirs.
    shown = list(dict.fromkeys(i for ids in merged["liked"] for i in ids))
    batches = [shown[i : i + CONDITION_BATCH] for i in range(0, len(shown), CONDITION_BATCH)]
    embeddings = [encode_images(np.stack([pictures[i] for i in batch])) for batch in batches]
    embedding_of = dict(zip(shown, torch.cat(embeddings), strict=True))
    liked_embeddings = [torch.stack([embedding_of[i] for i in ids]) for ids in merged["liked"]]
    conditions = merged.assign(
        e_img=[choose_image_embedding(e, params.e_img).numpy() for e in liked_embeddings],
        mean_clip=[
            torch.nn.functional.normalize(e.mean(0), dim=0).numpy() for e in liked_embeddings
        ],
    )
    said = {part for name in params.active_variants for part in params.said(name)}
    if said and not agent_world:
        raise ValueError(
            f"diffusion.said_parts {sorted(said)} are said as attribute words, which only "
            "simulated users have (a real user's phrases are whole captions): set "
            "diffusion.said_parts to []"
        )
    sayable = {ALIGNER_VARIANTS[name].writes for name in aligners.mlps} | {TRUE_SEM}
    if said - sayable:
        raise ValueError(
            f"diffusion.said_parts {sorted(said - sayable)} name no attributes: only the "
            f"aligners' phrases and {TRUE_SEM!r} can be said"
        )
    for name, mlp in aligners.mlps.items():
        variant = ALIGNER_VARIANTS[name]
        with torch.inference_mode():
            picks = mlp.picks(
                mlp(torch.from_numpy(np.stack(merged[variant.reads].to_list())).float())
            )
        conditions[variant.writes] = list(mlp.vocabulary[picks].flatten(1).numpy())
        if variant.writes in said:
            # An agent-world vocabulary is every attribute's phrase, in ATTRIBUTE_IDS order.
            if len(mlp.vocabulary) != len(ATTRIBUTE_IDS):
                raise ValueError(
                    f"aligner {name!r} picks from {len(mlp.vocabulary)} phrases, not the "
                    f"{len(ATTRIBUTE_IDS)} attributes': {variant.writes} cannot be said"
                )
            conditions[said_column(variant.writes)] = [
                [ATTRIBUTE_IDS[i] for i in row] for row in picks.tolist()
            ]
    missing = wanted - set(conditions) - {TRUE_SEM}
    if missing:
        raise ValueError(
            f"diffusion.variants read parts {sorted(missing)} that no trained aligner wrote"
        )
    if not agent_world:
        return conditions
    with torch.inference_mode():
        _, vocabulary = attribute_phrase_embeddings(conditioning_clip, clip_tokenizer)
    conditions[TRUE_SEM] = liked_phrase_states(users, vocabulary)[conditions["user_id"]].to_list()
    if TRUE_SEM in said:
        liked_of = users.set_index("user_id")["liked_attributes"].map(list)
        conditions[said_column(TRUE_SEM)] = liked_of[conditions["user_id"]].to_list()
    if "oracle_state" in aligners.mlps:
        # the oracle_state aligner reads the same summaries: its picking rule and phrases
        reference = aligners.mlps["oracle_state"]
        summaries = torch.from_numpy(np.stack(merged["context_summary"].to_list())).float()
        picks = reference.picks(summaries)  # ties: the first attribute of equal count
        conditions[COUNTING_RULE_PICKS] = list(reference.vocabulary[picks].flatten(1).numpy())
        conditions[said_column(COUNTING_RULE_PICKS)] = [
            [ATTRIBUTE_IDS[i] for i in row] for row in picks.tolist()
        ]
    return conditions


def liked_phrase_states(users: pd.DataFrame, vocabulary: torch.Tensor) -> pd.Series:
    """Per user, the text-space states of its liked-attribute phrases (the alignment
    targets; ``vocabulary``: every attribute's, ``ATTRIBUTE_IDS`` order), concatenated."""
    counts = set(users["liked_attributes"].map(len))
    if len(counts) != 1:
        raise ValueError(f"true_sem needs every user to like as many attributes; got {counts}")
    column = {a: i for i, a in enumerate(ATTRIBUTE_IDS)}
    states = [
        vocabulary[[column[a] for a in liked]].flatten().numpy()
        for liked in users["liked_attributes"]
    ]
    return pd.Series(states, index=users["user_id"])


# Pictures a branch sample file is written from at once: encode_latents' batch, so the
# latents are those it gives for the whole list; prompts: encode_prompts' batch.
CLEAN_BATCH = 32
PROMPT_BATCH = 256


def prompt_column(said: Sequence[str]) -> str:
    """The training set's column of the prompt states that say the parts ``said``."""
    return "+".join(["prompt_embeds", *said])


def branch_training_set(
    user_conditions: pd.DataFrame,
    images: pd.DataFrame,
    interactions: pd.DataFrame,
    raw_images: Mapping[str, Callable],
    conditioning_clip: CLIPModel,
    clip_tokenizer: PreTrainedTokenizerBase,
    vae: AutoencoderKL | None,
    folder: str | Path,
    said_sets: Collection[Sequence[str]],
) -> RowsDataset:
    """One sample per (training user's context, liked image of that user outside it), with
    the image's prompt (``image_prompts``: a render's subject-only prompt, a real image's
    caption) and, for each of ``said_sets``, the prompt that also says those parts of the
    context's condition (``said_caption`` of the image's subject; ``prompt_column``); the
    clean sample is the image's pixels, or its latents when the UNet has a ``vae``.

    Nothing grows with the samples in memory but their indices: the clean samples are
    written to a ``RowFile`` in a ``scratch_folder`` under ``folder`` (removed with the
    dataset, or by the next run if this one is killed) a batch of pictures at a time, the
    distinct prompts' text states to others, and each sample reads its prompts' rows and its
    context's condition parts (held once per context row)."""
    likes = held_out_likes(user_conditions[user_conditions["split"] == "train"], interactions)
    if likes.empty:
        raise ValueError("no training user has a liked image outside its contexts")
    targets = likes["image_id"].tolist()
    pictures = PictureFiles(raw_images)
    missing = sorted(set(targets) - set(raw_images))
    if missing:
        raise KeyError(f"raw_images has no picture of the training targets {missing[:5]}")
    subjects = images.set_index("image_id")["subject"][targets].tolist()
    plain = image_prompts(images)[targets].tolist()
    where = scratch_folder(folder, ".tmp-branch-samples-")
    text_model = conditioning_clip.text_model.float().eval()
    vae = None if vae is None else vae.eval()

    def clean() -> Iterator[torch.Tensor]:
        for start in range(0, len(targets), CLEAN_BATCH):
            batch = [pictures[i] for i in targets[start : start + CLEAN_BATCH]]
            if vae is None:
                yield to_diffusion_pixels(np.stack(batch))
            else:
                yield encode_latents(vae, batch, batch_size=CLEAN_BATCH)

    def prompt_states(name: str, sample_prompts: Sequence[str]) -> Column:
        prompts = sorted(set(sample_prompts))
        position = {prompt: k for k, prompt in enumerate(prompts)}

        def states() -> Iterator[torch.Tensor]:
            for start in range(0, len(prompts), PROMPT_BATCH):
                chunk = prompts[start : start + PROMPT_BATCH]
                yield encode_prompts(text_model, clip_tokenizer, chunk, batch_size=PROMPT_BATCH)

        return Column(
            _written(where / f"{name}.bin", states()),
            torch.tensor([position[prompt] for prompt in sample_prompts]),
        )

    rows = pd.Index(pd.unique(likes["row"]))
    context_of = torch.from_numpy(rows.get_indexer(likes["row"])).long()
    held = user_conditions.loc[rows]
    prompts = {}
    for said in dict.fromkeys(map(tuple, said_sets)):
        sample_prompts = plain
        if said:
            named = user_conditions.loc[likes["row"], [said_column(part) for part in said]]
            sample_prompts = [
                said_caption(subject, [a for attributes in row for a in attributes])
                for subject, row in zip(subjects, named.itertuples(index=False), strict=True)
            ]
        prompts[prompt_column(said)] = prompt_states(prompt_column(said), sample_prompts)
    dataset = RowsDataset(
        pixel_values=Column(_written(where / "clean.bin", clean())),
        **prompts,
        **{
            part: Column(torch.from_numpy(np.stack(held[part].to_list())).float(), context_of)
            for part in PARTS
            if part in held
        },
    )
    weakref.finalize(dataset, shutil.rmtree, where, True)
    return dataset


def _written(path: Path, blocks: Iterator[torch.Tensor]) -> RowFile:
    """A ``RowFile`` at ``path`` of ``blocks``' rows, in order."""
    file = None
    for block in blocks:
        if file is None:
            file = RowFile(path, block.shape[1:], block.dtype)
        file.append(block)
    if file is None:
        raise ValueError(f"no rows for {path}")
    return file


def train_variant_branches(
    user_conditions: pd.DataFrame,
    images: pd.DataFrame,
    interactions: pd.DataFrame,
    raw_images: Mapping[str, Callable],
    stack: DiffusionStack,
    params: DiffusionParams,
) -> tuple[UserBranches, dict]:
    """Every active variant's branch (``train_user_branch``) on the frozen base UNet (on
    the latents of the stack's VAE when the UNet is a latent one, e.g. SD 1.5), under
    prompts that say the variant's said parts; a variant whose parts are all said has none.
    Each variant's run is keyed by the samples it trains on (pixels or latents, prompt
    states, its condition parts), the base UNet's weights and the noise schedule, so a
    variant whose inputs are unchanged is reused and any other trains afresh. The samples
    are read from disk a batch at a time (``branch_training_set``). Returns the branches
    and a report of every variant's run."""
    dataset = branch_training_set(
        user_conditions,
        images,
        interactions,
        raw_images,
        stack.clip,
        stack.tokenizer,
        stack.vae,
        params.checkpoint_root,  # its sample files, removed with the dataset
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


def train_user_branch(
    name: str,
    parts: list[str],
    said: list[str],
    dataset: RowsDataset,
    unet: UNet2DConditionModel,
    noise_scheduler: DDPMScheduler,
    empty: torch.Tensor,
    base: Mapping[str, str],
    params: DiffusionParams,
) -> tuple[UserAdapter | None, dict]:
    """The variant ``name``'s adapter, reading ``parts``, trained on the frozen ``unet``
    under prompts that say the parts ``said`` (``dataset``'s ``prompt_column(said)``), and
    its report. No parts: no branch (None). A branch of text-space parts read by the frozen
    text key/values has nothing to learn: used as built. Its run is keyed by the samples it
    trains on (pixels or latents, prompt states, its condition parts) and ``base``, the
    digests of the base UNet's weights and the noise schedule (taken before any adapter is
    installed)."""
    described = {"said": said, "parts": parts}
    if not parts:
        return None, {**described, "steps": 0}
    torch.manual_seed(params.train.seed)
    samples = RowsDataset(
        pixel_values=dataset.columns["pixel_values"],
        prompt_embeds=dataset.columns[prompt_column(said)],
        **{part: dataset.columns[part] for part in parts},
    )
    text_space = [part for part in parts if part in params.text_space_parts]
    adapter = UserAdapter.for_unet(
        unet,
        {part: samples.columns[part].shape[1] for part in parts},
        params.tokens_per_part,
        text_space,
        params.branch_blocks,
    )
    trainable = adapter.trainable_parameters(params.train_key_values)
    if not trainable:  # text-space parts read by the text key/values: used as built
        return adapter.eval(), {**described, "steps": 0}
    result = train(
        UserConditionedUnet(unet, adapter),
        samples,
        DiffusionLoss(
            noise_scheduler,
            empty,
            params.caption_dropout,
            params.snr_gamma,
            user_keys=tuple(parts),
            user_dropout=params.user_dropout,
        ),
        params.train,
        checkpoint_root=params.checkpoint_root,
        name=f"user_branch_{name}",
        key=run_key(
            {
                "parts": parts,
                "text_space": text_space,
                "recipe": USER_BRANCH_RECIPE,
                "layers": sorted(adapter.to_k),
                **params.model_dump(
                    include={
                        "tokens_per_part",
                        "caption_dropout",
                        "user_dropout",
                        "train_key_values",
                        "snr_gamma",
                    }
                ),
            },
            # A sample's clean image (pixels or latents), prompt states (saying ``said``)
            # and the variant's parts: a change to another part leaves the variant reused.
            # Streamed: the digest of the tensors they would be, read a block at a time.
            samples={
                key: samples.streamed(key) for key in ("pixel_values", "prompt_embeds", *parts)
            },
            empty_prompt=empty,
            **base,
        ),
        trainable_parameters=trainable,
    )
    return adapter.eval(), {**described, **result.summary()}


def validate_user_branches(
    user_branches: UserBranches,
    user_conditions: pd.DataFrame,
    users: pd.DataFrame,
    images: pd.DataFrame,
    interactions: pd.DataFrame,
    stack: DiffusionStack,
    evaluation_clip: EvaluationClip,
    attribute_oracle: AttributeOracle,
    foundation_mllm: MllmWithProcessor,
    tuned_mllm: MllmWithProcessor,
    raw_images: Mapping[str, Callable],
    training_report: dict,
    params: DiffusionParams,
) -> tuple[dict, Image.Image]:
    """Each branch, the bare base model and ``viper_style`` on the validation users'
    canonical contexts (the prompts of ``draw_prompts``): per method the oracle like-rate,
    mean utility and subject accuracy for simulated users, the MLLM judge's P(yes), CLIP
    score and CLIP-I for real ones (whose taste no oracle knows); sampling images/s; and a
    grid of a few users. ``viper_style`` reads tastes with ``foundation_mllm``, the judge is
    ``tuned_mllm``. (The benchmark on test users is the ``evaluation`` pipeline.)"""
    agent_world = tastes_are_known(users)
    validation = (
        user_conditions[(user_conditions["split"] == "val") & (user_conditions["context"] == 0)]
        .set_index("user_id")
        .sort_index()
        .head(params.validation.users)
    )
    cases = draw_prompts(
        validation,
        interactions,
        images,
        params.validation.prompts_per_user,
        params.validation.seed,
        subject_only=agent_world,
    ).join(validation, on="user_id")
    canonical = validation.loc[cases["user_id"].unique()]
    contexts = preference_contexts(canonical, context_pictures(canonical, raw_images))
    samples = sample_methods(
        ["base", *params.active_variants, "viper_style"],
        cases,
        stack=stack,
        branches=user_branches.adapters,
        said={name: params.said(name) for name in params.active_variants},
        taste_reader=params.viper_style.reader(foundation_mllm),
        contexts=contexts,
        viper=params.viper_style,
        sampling=params.sampling.model_dump(),
    )
    if agent_world:
        oracle = attribute_oracle.float().eval()
        simulated = simulated_users(users, cases["user_id"])
    else:
        judge = params.viper_style.reader(tuned_mllm)
    metrics: dict = {"users": len(canonical), "images_per_method": len(cases)}
    for method, generated in samples.images.items():
        if agent_world:
            scores = oracle_preference(oracle, generated, cases["subject"].tolist(), simulated)
            found = {
                "like_rate": float(scores["liked"].mean()),
                "mean_utility": float(scores["utility"].mean()),
                "subject_accuracy": float(scores["subject_correct"].mean()),
            }
        else:
            scores = preference_scores(
                generated,
                cases["prompt"].tolist(),
                cases["user_id"].tolist(),
                contexts,
                evaluation_clip=evaluation_clip,
                judge=judge,
            )
            found = {column: float(value) for column, value in scores.mean().items()}
        metrics[method] = {**found, "images_per_second": samples.images_per_second[method]}
    metrics["viper_style"]["taste_answers_read"] = float(
        np.mean([bool(liked or disliked) for liked, disliked in samples.tastes.values()])
    )
    metrics["viper_style"]["example_taste_answers"] = [
        " | ".join(map(", ".join, taste)) for taste in list(samples.tastes.values())[:4]
    ]
    metrics["training"] = training_report
    grid_cases = cases["subject"][: params.validation.grid_users]
    grid = sample_grid(
        np.concatenate([generated[: len(grid_cases)] for generated in samples.images.values()]),
        None,
        [f"{name}: {subject}" for name in samples.images for subject in grid_cases],
    )
    return metrics, grid
