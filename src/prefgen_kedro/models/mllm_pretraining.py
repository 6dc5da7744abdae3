"""Pretraining tasks for the tiny MLLM, the agent world's stand-in for a hub checkpoint.

A hub MLLM arrives able to describe pictures and to compare several of them; a tiny one
built from a config can do neither, and trained directly on the project's preference VQA it
stays at chance (``experiments/matching_saddle.py``). These datasets give it both, on renders and on
*simulated foundation users* that are drawn afresh for every sample and are never the
project's users:

- ``CaptionTask`` — LLaVA's stage 1: "Describe this image." → the render's caption.
- ``SimulatedUserVqa`` — the project's VQA format (markers, reasons, slot positions) on a
  fresh user per sample, with curricula as parameters: ``k`` (context size),
  ``copy_probability`` (the query is one of the context images, so the answer is found by
  exact matching before it has to be found by shared attributes) and ``taste_probability``
  (summarise the user's taste instead).

Both are deterministic in ``(seed, index)``, so the shared trainer's resume and shuffling
work unchanged; a curriculum is a sequence of runs with different settings
(``pipelines/foundation`` chains them).

``pretrain`` runs a curriculum (``MllmPretrainParams``: the architecture and the stages in
order) from a fresh tokenizer and model; the ``foundation`` node ``pretrain_mllm`` wires it,
and a GPU machine without Kedro can call it directly with the same parameters.

Public API: ``CaptionTask``, ``SimulatedUserVqa``, ``Question``, ``DESCRIBE``,
``evaluate_on_simulated_users``, ``pretrain`` and its parameter models.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field
from torch import nn
from torch.utils.data import Dataset
from transformers import CLIPModel, PreTrainedModel, ProcessorMixin

from prefgen_kedro.console import progress
from prefgen_kedro.data.tables import DISLIKED, LIKED
from prefgen_kedro.models.mllm import (
    IGNORE_INDEX,
    AnswerLoss,
    BlankLayouts,
    MllmPreferenceModel,
    PreferenceContext,
    answer_loss_settings,
    answer_loss_terms,
    answer_token_sequence,
    append_answer,
    build_tiny_mllm,
    build_tiny_processor,
    collate_vqa,
    encode_chat,
    encode_vqa,
    frozen_parameters,
    select_vision_features,
    train_tokenizer,
    vqa_loss,
)
from prefgen_kedro.models.probes import mean_auc
from prefgen_kedro.models.vqa import (
    IMAGE_PLACEHOLDER,
    QUERY_MARKER,
    TASTE_QUESTION,
    answer_text,
    context_summary,
    counting_rule_accuracy,
    counting_rule_scores,
    parse_taste,
    query_prompt,
    taste_text,
    vqa_corpus,
)
from prefgen_kedro.provenance import run_key
from prefgen_kedro.training import TrainConfig, shaping_settings, train
from prefgen_kedro.world.agent_world import RenderSet
from prefgen_kedro.world.users import SimulatedUser, make_user
from prefgen_kedro.world.vocabulary import (
    ATTRIBUTE_IDS,
    CATEGORIES,
    attribute,
    attribute_ids,
    attribute_matrix,
)

DESCRIBE = "Describe this image."


class MllmArchitecture(BaseModel, extra="forbid"):
    """``build_tiny_mllm``'s sizes and initialisation (the BPE's ``vocab_size`` too)."""

    vocab_size: int = Field(ge=300)
    text_width: int
    text_layers: int
    text_heads: int
    text_head_dim: int | None = Field(default=None, ge=1)  # None: text_width / text_heads
    max_positions: int
    initializer_range: float = Field(default=0.02, gt=0.0)
    matching_attention_std: float = Field(gt=0.0)


class AttributeReadoutParams(BaseModel, extra="forbid"):
    """How the attribute token's read-out is fitted (``fit_attribute_readout``)."""

    steps: int = Field(default=1500, ge=1)
    learning_rate: float = Field(default=1.0e-2, gt=0.0)
    batch_size: int = Field(default=512, ge=1)


class SimulatedUsersParams(BaseModel, extra="forbid"):
    n_liked: int = Field(ge=1)
    n_disliked: int = Field(ge=1)


class MllmStage(BaseModel, extra="forbid"):
    """One run of the curriculum: a task mix and its training settings."""

    name: str
    task: Literal["caption", "preference"]
    k: tuple[int, int] = (1, 1)  # context size range (preference)
    copy_probability: float = Field(default=0.0, ge=0.0, le=1.0)
    taste_probability: float = Field(default=0.0, ge=0.0, le=1.0)
    reasons: bool = True
    queries: tuple[int, int] = (1, 1)  # questions per context, answered in turn (preference)
    # "yes_no": each answer's "Yes"/"No" scored on those two logits alone (``vqa_loss``).
    answer_loss: AnswerLoss = "language_model"
    # > 0: taste samples also train a multi-label head on the taste question's state to
    # name the user's liked and disliked attributes (``TasteHead``), with this weight.
    taste_head_weight: float = Field(default=0.0, ge=0.0)
    # False: taste samples carry no answer, only the head scores them. The answer's first
    # token ("likes:") is the same for every user, and learning it while the head is still
    # blind pulled the taste question's state to one value for all users (the head's AUC
    # stayed at 0.50 through 32 k users); learned first, the head keeps that state apart.
    taste_answer: bool = True
    train: TrainConfig


class MllmEvalParams(BaseModel, extra="forbid"):
    ks: list[int]
    questions: int = Field(ge=2)
    seed: int


class MllmPretrainParams(BaseModel, extra="forbid"):
    architecture: MllmArchitecture
    slot_positions: bool
    simulated_users: SimulatedUsersParams
    stages: list[MllmStage] = Field(min_length=1)
    eval: MllmEvalParams
    attribute_readout: AttributeReadoutParams = AttributeReadoutParams()


class _Task(Dataset):
    """A procedural dataset of ``n_samples`` chat samples over a pool of renders whose
    ``features`` (``select_vision_features``, pool order) stand in for their pixels;
    ``collate`` pads them. Without features it only draws (e.g. questions to evaluate on).

    A sample's tokens depend on its layout (how many images, the question, the answers)
    and never on the pictures, so each layout is encoded once, on blank pictures
    (``BlankLayouts``), and a sample is its layout with its images' features (``_sample``).
    """

    def __init__(
        self,
        pool: RenderSet,
        processor: ProcessorMixin,
        features: torch.Tensor | None,
        n_samples: int,
        seed: int,
        slot_positions: bool,
    ) -> None:
        if features is not None and len(features) != len(pool.images):
            raise ValueError(f"{len(features)} feature rows for a pool of {len(pool.images)}")
        self.pool = pool
        self.processor = processor
        self.features = features
        self.n_samples = n_samples
        self.seed = seed
        self.slot_positions = slot_positions
        self._blank = np.zeros_like(pool.images[0])
        self._layouts = BlankLayouts()

    def __len__(self) -> int:
        return self.n_samples

    def _rng(self, index: int) -> np.random.Generator:
        if not 0 <= index < self.n_samples:
            raise IndexError(f"index {index} out of range for {self.n_samples} samples")
        return np.random.default_rng([self.seed, index])

    def _layout(self, key: tuple, encode: Callable[[np.ndarray], dict]) -> dict:
        """``encode(blank picture)``'s tokens, once per ``key``."""
        return self._layouts(key, self._blank, encode)

    def _sample(self, layout: dict, rows: Sequence[int], **extra: torch.Tensor) -> dict:
        """``layout`` with the features of pool ``rows`` (in the layout's image order)."""
        if self.features is None:
            raise ValueError("a task built without features draws questions but makes no samples")
        return {**layout, "vision_features": self.features[list(rows)], **extra}

    def collate(self, items: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return collate_vqa(items, pad_token_id=self.processor.tokenizer.pad_token_id)


class CaptionTask(_Task):
    """ "Describe this image. <query><image>" → the render's caption."""

    def __init__(
        self,
        pool: RenderSet,
        processor: ProcessorMixin,
        features: torch.Tensor,
        *,
        n_samples: int,
        seed: int,
        slot_positions: bool = True,
    ) -> None:
        super().__init__(pool, processor, features, n_samples, seed, slot_positions)
        self.captions = pool.captions

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        picked = int(self._rng(index).integers(len(self.captions)))
        prompt = self._layout(
            ("caption",),
            lambda blank: encode_chat(
                self.processor,
                f"{DESCRIBE} {QUERY_MARKER}{IMAGE_PLACEHOLDER}",
                [blank],
                slot_positions=self.slot_positions,
            ),
        )
        answer = answer_token_sequence(self.processor.tokenizer, self.captions[picked])
        return self._sample(append_answer(prompt, answer), [picked])


@dataclass(frozen=True)
class Question:
    """One preference question about a simulated user, as pool indices."""

    user: SimulatedUser
    liked: tuple[int, ...]
    disliked: tuple[int, ...]
    query: int
    label: int  # LIKED or DISLIKED: the query's noiseless label
    answer: str


class SimulatedUserVqa(_Task):
    """Preference VQA about a fresh simulated user per sample, drawn from a pool of renders.

    The user has ``n_liked`` + ``n_disliked`` weighted attributes (as the project's users);
    its context is K pool images of positive and K of negative utility (K uniform in the
    range ``k``), the query one more of either sign (balanced), labelled without noise. With
    probability ``copy_probability`` a query (each of them) is a copy of one of the context
    images of its side; with ``taste_probability`` the sample asks ``TASTE_QUESTION`` about
    the context instead (no query): the user's liked and disliked attributes the context
    shows, which makes the model summarise a context, the skill the preference answer and
    the probes stand on. A preference sample asks about Q queries in turn (Q uniform in the range
    ``queries``), each answered before the next is asked: Q answers' gradients for one
    context's images (in a symbolic stand-in, 8 queries a context reached in 250 steps the
    K = 8 accuracy that one query a context reached in 500-750; experiments/README.md).
    """

    def __init__(
        self,
        pool: RenderSet,
        processor: ProcessorMixin,
        features: torch.Tensor | None,
        *,
        n_samples: int,
        seed: int,
        k: tuple[int, int],
        copy_probability: float = 0.0,
        n_liked: int = 4,
        n_disliked: int = 4,
        slot_positions: bool = True,
        with_reasons: bool = True,
        taste_probability: float = 0.0,
        queries: tuple[int, int] = (1, 1),
        taste_targets: bool = False,
        taste_answer: bool = True,
    ) -> None:
        super().__init__(pool, processor, features, n_samples, seed, slot_positions)
        for name, (low, high) in (("k", k), ("queries", queries)):
            if not 1 <= low <= high:
                raise ValueError(
                    f"{name} must be a range (low, high) with 1 ≤ low ≤ high, got {(low, high)}"
                )
        if not 0.0 <= copy_probability <= 1.0:
            raise ValueError(f"copy_probability must be in [0, 1], got {copy_probability}")
        self.k = k
        self.copy_probability = copy_probability
        self.n_liked = n_liked
        self.n_disliked = n_disliked
        self.with_reasons = with_reasons
        self.taste_probability = taste_probability
        self.queries = queries
        self.taste_targets = taste_targets
        self.taste_answer = taste_answer
        # Attribute-major, so one attribute's row over the pool is contiguous.
        self.present = np.ascontiguousarray(attribute_matrix(pool.styles).T)
        self.pool_attributes = [attribute_ids(style) for style in pool.styles]
        self._column = {attribute_id: i for i, attribute_id in enumerate(ATTRIBUTE_IDS)}

    def question(self, index: int) -> Question:
        """The ``index``-th question (deterministic in ``seed`` and ``index``)."""
        return self.questions(index)[0]

    def questions(self, index: int) -> list[Question]:
        """The ``index``-th sample's questions: ``question(index)``, then the follow-ups about
        the same user and context, each query a fresh pool image of either side (balanced)."""
        rng = self._rng(index)
        while True:
            user = make_user(f"foundation-{index}", self.n_liked, self.n_disliked, rng)
            columns = [self._column[a] for a in (*user.liked, *user.disliked)]
            weights = np.array([*user.liked.values(), *(-w for w in user.disliked.values())])
            # Elementwise over the user's columns, not a BLAS product: in DataLoader workers a
            # BLAS call starts a thread per core in every worker (5x slower with two workers
            # here). Weights have 3 decimals, so rounding makes an exact tie (0.5 + 0.7 - 1.2)
            # a zero, on neither side, where float rounding used to pick one.
            utility = np.round((self.present[columns] * weights[:, None]).sum(axis=0), 6)
            sides = {LIKED: np.flatnonzero(utility > 0), DISLIKED: np.flatnonzero(utility < 0)}
            if min(len(ids) for ids in sides.values()) >= self.k[1] + self.queries[1]:
                break  # a user whose taste the pool shows on both sides (nearly always)
        k = int(rng.integers(self.k[0], self.k[1] + 1))
        label = LIKED if rng.random() < 0.5 else DISLIKED
        drawn = {
            side: rng.choice(ids, k + (side == label), replace=False) for side, ids in sides.items()
        }
        context = {side: tuple(int(i) for i in ids[:k]) for side, ids in drawn.items()}
        copied = rng.random() < self.copy_probability
        query = context[label][rng.integers(k)] if copied else int(drawn[label][k])
        shown = context[LIKED], context[DISLIKED]
        asked = [Question(user, *shown, query, label, self._answer(user, query, label))]
        n_follow_ups = int(rng.integers(self.queries[0], self.queries[1] + 1)) - 1
        # Follow-up queries: pool images of either side not yet drawn for this sample (the
        # set difference only when there are follow-ups: it is on every sample's path).
        unused = (
            {side: np.setdiff1d(ids, drawn[side]) for side, ids in sides.items()}
            if n_follow_ups
            else {}
        )
        for _ in range(n_follow_ups):
            side = LIKED if rng.random() < 0.5 else DISLIKED
            # Drawn only with copies on, so that runs without them keep their questions.
            if self.copy_probability and rng.random() < self.copy_probability:
                query = context[side][rng.integers(k)]
            else:
                query, unused[side] = _pop_random(rng, unused[side])
            asked.append(Question(user, *shown, query, side, self._answer(user, query, side)))
        return asked

    def _answer(self, user: SimulatedUser, query: int, label: int) -> str:
        opinion = user.liked if label == LIKED else user.disliked
        reasons = [attribute(a).value for a in self.pool_attributes[query] if a in opinion]
        return answer_text(label, reasons if self.with_reasons else ())

    def taste(self, question: Question) -> str:
        """The user's liked and disliked attributes that the context shows on their side."""
        shown = {
            side: {a for i in ids for a in self.pool_attributes[i]}
            for side, ids in ((LIKED, question.liked), (DISLIKED, question.disliked))
        }
        liked = [a for a in ATTRIBUTE_IDS if a in question.user.liked and a in shown[LIKED]]
        disliked = [
            a for a in ATTRIBUTE_IDS if a in question.user.disliked and a in shown[DISLIKED]
        ]
        return taste_text(
            [attribute(a).value for a in liked], [attribute(a).value for a in disliked]
        )

    def context(self, question: Question) -> PreferenceContext:
        images = self.pool.images
        return PreferenceContext(
            [images[i] for i in question.liked], [images[i] for i in question.disliked]
        )

    def taste_target(self, user: SimulatedUser) -> torch.Tensor:
        """(2 × attributes,) multi-hot: the user's liked attributes, then its disliked ones
        (``ATTRIBUTE_IDS`` order), all of them, whether the context shows them or not."""
        target = torch.zeros(2 * len(self._column))
        target[[self._column[a] for a in user.liked]] = 1.0
        target[[len(self._column) + self._column[a] for a in user.disliked]] = 1.0
        return target

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        question, *follow_ups = self.questions(index)
        k = len(question.liked)
        context = [*question.liked, *question.disliked]
        if self._rng(index).random() < self.taste_probability:
            prompt = self._layout(
                ("taste", k),
                lambda blank: encode_vqa(
                    self.processor,
                    PreferenceContext([blank] * k, [blank] * k),
                    None,
                    slot_positions=self.slot_positions,
                    question=TASTE_QUESTION,
                ),
            )
            # The state the head reads: the prompt's last token, where the answer starts.
            extra = (
                {
                    "taste_position": torch.tensor([len(prompt["input_ids"]) - 1]),
                    "taste_targets": self.taste_target(question.user)[None],
                }
                if self.taste_targets
                else {}
            )
            if self.taste_answer:
                answer = answer_token_sequence(self.processor.tokenizer, self.taste(question))
                sample = append_answer(prompt, answer)
            else:
                sample = {**prompt, "labels": torch.full_like(prompt["input_ids"], IGNORE_INDEX)}
            return self._sample(sample, context, **extra)
        answers = tuple(q.answer for q in (question, *follow_ups))
        layout = self._layout(
            ("preference", k, answers),
            lambda blank: encode_vqa(
                self.processor,
                PreferenceContext([blank] * k, [blank] * k),
                blank,
                answers[0],
                slot_positions=self.slot_positions,
                follow_ups=[(query_prompt(), [blank], answer) for answer in answers[1:]],
            ),
        )
        extra = (
            {
                "taste_position": torch.tensor([-1]),
                "taste_targets": torch.zeros(1, 2 * len(self._column)),
            }
            if self.taste_targets
            else {}
        )
        queries = [q.query for q in (question, *follow_ups)]
        return self._sample(layout, [*context, *queries], **extra)


def _pop_random(rng: np.random.Generator, ids: np.ndarray) -> tuple[int, np.ndarray]:
    """One of ``ids`` at random, and the others."""
    i = int(rng.integers(len(ids)))
    return int(ids[i]), np.delete(ids, i)


def evaluate_on_simulated_users(
    model: torch.nn.Module,
    processor: ProcessorMixin,
    pool: RenderSet,
    *,
    k: int,
    n_questions: int,
    seed: int,
    slot_positions: bool,
    batch_size: int = 64,
) -> dict[str, float]:
    """Yes/no accuracy of ``judge`` on fresh simulated users (no copies), next to the
    counting rule on the same questions, at context size ``k``."""
    questions = SimulatedUserVqa(
        pool,
        processor,
        None,
        n_samples=n_questions,
        seed=seed,
        k=(k, k),
        slot_positions=slot_positions,
    )
    asked = [questions.question(i) for i in range(n_questions)]
    was_training = model.training
    judge = MllmPreferenceModel(
        model, processor, slot_positions=slot_positions, batch_size=batch_size
    )
    p_yes = judge.judge(
        [questions.context(q) for q in asked], [pool.images[q.query] for q in asked]
    )
    model.train(was_training)
    labels = [q.label for q in asked]
    scores = counting_rule_scores(asked, questions.pool_attributes)
    predicted = (p_yes > 0.5).long().tolist()
    return {
        "k": k,
        "questions": n_questions,
        "accuracy": sum(int(p == (y == LIKED)) for p, y in zip(predicted, labels, strict=True))
        / n_questions,
        "counting_rule": counting_rule_accuracy(scores, labels),
    }


class TasteHead(nn.Module):
    """The MLLM with an auxiliary multi-label head on the last layer's state where it is
    asked for a user's taste (``TASTE_QUESTION``'s last token, the state ``probing`` reads
    ``e_sem`` from): one logit per attribute for "liked", then one per attribute for
    "disliked". A stand-in's pretraining device, never shipped: it makes summarising a
    fresh user's context a task of its own, scored on every taste sample."""

    def __init__(self, mllm: PreTrainedModel, n_attributes: int) -> None:
        super().__init__()
        self.mllm = mllm
        self.head = nn.Linear(mllm.config.text_config.hidden_size, 2 * n_attributes)

    def forward(
        self, taste_position: torch.Tensor, **inputs: torch.Tensor
    ) -> tuple[Any, torch.Tensor]:
        """The MLLM's output (with hidden states) and the head's logits for the samples
        whose ``taste_position`` is not −1, in batch order."""
        output = self.mllm(**inputs, output_hidden_states=True)
        asked = (taste_position >= 0).nonzero().squeeze(1)
        states = output.hidden_states[-1][asked, taste_position[asked]]
        return output, self.head(states)


def taste_head_loss(
    model: nn.Module,
    batch: Mapping[str, torch.Tensor],
    *,
    weight: float,
    **answer_settings: Any,
) -> tuple[torch.Tensor, dict[str, float]]:
    """``compute_loss`` for a ``TasteHead``: ``answer_loss_terms`` on every answer plus
    ``weight`` × the head's binary cross-entropy on the taste samples' users."""
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "taste_targets")}
    output, taste_logits = model(**inputs)
    loss, metrics = answer_loss_terms(output.logits, batch["labels"], **answer_settings)
    asked = batch["taste_position"] >= 0
    if asked.any():
        taste = F.binary_cross_entropy_with_logits(
            taste_logits.float(), batch["taste_targets"][asked]
        )
        loss = loss + weight * taste
        metrics["taste_loss"] = float(taste.detach())
    return loss, metrics


class HeldoutTaste:
    """Taste summaries of fresh held-out users (``n_users`` contexts of K liked + K disliked
    renders of ``heldout``): how well a ``TasteHead`` names their liked attributes (mean ROC
    AUC over attributes), next to the counting rule on the same contexts."""

    def __init__(
        self,
        heldout: RenderSet,
        processor: ProcessorMixin,
        features: torch.Tensor,
        *,
        k: int,
        n_users: int,
        seed: int,
        slot_positions: bool,
        simulated_users: SimulatedUsersParams,
        batch_size: int = 64,
    ) -> None:
        task = SimulatedUserVqa(
            heldout,
            processor,
            features,
            n_samples=n_users,
            seed=seed,
            k=(k, k),
            taste_probability=1.0,
            taste_targets=True,
            slot_positions=slot_positions,
            **simulated_users.model_dump(),
        )
        self.batches = [
            task.collate([task[i] for i in range(start, min(start + batch_size, n_users))])
            for start in range(0, n_users, batch_size)
        ]
        self.liked = torch.cat([batch["taste_targets"] for batch in self.batches])[
            :, : len(ATTRIBUTE_IDS)
        ]
        asked = [task.question(i) for i in range(n_users)]
        summaries = [
            context_summary(
                [task.pool_attributes[i] for i in q.liked],
                [task.pool_attributes[i] for i in q.disliked],
            )
            for q in asked
        ]
        self.counting_rule_auc = mean_auc(torch.from_numpy(np.stack(summaries)), self.liked)

    @torch.no_grad()
    def __call__(self, model: TasteHead) -> float:
        """Mean ROC AUC of the head's "liked" logits for the users' liked attributes."""
        was_training = model.training
        model.eval()
        parameter = next(model.parameters())
        logits = []
        for batch in self.batches:
            inputs = {
                k: v.to(parameter.device)
                for k, v in batch.items()
                if k not in ("labels", "taste_targets")
            }
            logits.append(model(**inputs)[1][:, : len(ATTRIBUTE_IDS)].float().cpu())
        model.train(was_training)
        return mean_auc(torch.cat(logits), self.liked)


def pretrain(
    renders: RenderSet,
    heldout: RenderSet,
    vision_from: CLIPModel,
    params: MllmPretrainParams,
    *,
    checkpoint_root: str,
) -> tuple[PreTrainedModel, ProcessorMixin, dict]:
    """A BPE tokenizer trained on the captions and prompts, a LLaVA on ``vision_from``'s
    (frozen) vision tower, trained through ``params.stages`` in order on ``renders`` and
    fresh simulated users. The frozen tower's features of every render are computed once
    and stand in for the pixels. After each stage its preference accuracy on ``heldout``
    renders is measured; stages with a taste head also log the head's taste AUC on held-out
    users against samples seen (the learning curve). The returned model is rounded to fp16
    and back, so the final figures are those of the checkpoint that ships in fp16. Each
    stage's resumable checkpoints are keyed by the parameters, every render and caption,
    all of ``vision_from``'s weights and the stages before it (``provenance.run_key``)."""
    started = time.perf_counter()
    arch = params.architecture
    tokenizer = train_tokenizer(
        vqa_corpus(renders.captions, [DESCRIBE]), vocab_size=arch.vocab_size
    )
    processor = build_tiny_processor(tokenizer, image_size=renders.images.shape[1])
    model = build_tiny_mllm(
        tokenizer,
        vision_from=vision_from,
        seed=params.stages[0].train.seed,
        attribute_categories=[len(values) for values in CATEGORIES.values()],
        **arch.model_dump(exclude={"vocab_size"}),
    )
    # Each stage continues the ones before it: its key chains theirs.
    key = run_key(
        params.model_dump(exclude={"stages", "eval"}),
        renders=renders,
        captions=renders.captions,
        vision_from=vision_from,
    )
    fit_attribute_readout(
        model, renders, **params.attribute_readout.model_dump(), seed=params.stages[0].train.seed
    )
    readout = attribute_readout_accuracy(model, heldout)
    features = select_vision_features(model, renders.images)
    # LLaVA keeps the vision tower frozen; the projector and the language model learn.
    frozen = {id(p) for p in frozen_parameters(model)}
    trainable = [p for p in model.parameters() if id(p) not in frozen]
    torch.manual_seed(params.stages[0].train.seed)
    taste_head = TasteHead(model, len(ATTRIBUTE_IDS))
    heldout_taste = (
        HeldoutTaste(
            heldout,
            processor,
            select_vision_features(model, heldout.images),
            k=max(params.eval.ks),
            n_users=params.eval.questions,
            seed=params.eval.seed,
            slot_positions=params.slot_positions,
            simulated_users=params.simulated_users,
        )
        if any(stage.taste_head_weight for stage in params.stages)
        else None
    )
    evaluate = functools.partial(_evaluate, processor=processor, heldout=heldout, params=params)
    stages = []
    for stage in params.stages:
        dataset = _stage_dataset(stage, renders, features, processor, params)
        key = run_key(
            {"stage": stage.model_dump(exclude={"train"}), "train": shaping_settings(stage.train)},
            previous=key,
        )
        settings = answer_loss_settings(stage.answer_loss, tokenizer)
        with_head = stage.taste_head_weight > 0
        result = train(
            taste_head if with_head else model,
            dataset,
            functools.partial(taste_head_loss, weight=stage.taste_head_weight, **settings)
            if with_head
            else functools.partial(vqa_loss, **settings),
            stage.train,
            checkpoint_root=checkpoint_root,
            name=f"mllm_{stage.name}",
            key=key,
            collate_fn=dataset.collate,
            trainable_parameters=[*trainable, *taste_head.head.parameters()]
            if with_head
            else trainable,
            on_log=(lambda step, entry: {"heldout_taste_auc": heldout_taste(taste_head)})
            if with_head
            else None,
        )
        stages.append(
            {
                "stage": stage.name,
                "samples": result.steps * stage.train.batch_size,
                **result.summary(),
                # with the held-out taste AUC logged beside the loss
                "learning_curve": [
                    {key: round(value, 4) for key, value in entry.items()}
                    for entry in result.history
                ],
                "heldout": evaluate(model),
            }
        )
    model = model.half().float()
    taste_head.eval()  # and the model it holds
    trained = [stage["trained_seconds"] for stage in stages]
    report = {
        "seed": params.stages[0].train.seed,
        "steps": sum(stage.train.max_steps for stage in params.stages),
        "wall_seconds": time.perf_counter() - started,
        # The stages' training over every call, reused stages included: the recipe's cost.
        "trained_seconds": None if None in trained else round(sum(trained), 1),
        "run": stages[-1]["run"],  # the stage whose weights ship
        "metrics": {
            "heldout_simulated_users": evaluate(model),
            "heldout_taste_answers": taste_answer_accuracy(
                model,
                processor,
                heldout,
                k=max(params.eval.ks),
                n_users=params.eval.questions,
                seed=params.eval.seed,
                slot_positions=params.slot_positions,
                simulated_users=params.simulated_users,
            ),
        },
        "learning_curve": stages,
    }
    if heldout_taste is not None:
        report["metrics"]["heldout_taste_summary"] = {
            "users": params.eval.questions,
            "k": max(params.eval.ks),
            "head_auc": heldout_taste(taste_head),  # the head on the fp16-rounded model
            "counting_rule_auc": heldout_taste.counting_rule_auc,
        }
    report["metrics"]["attribute_readout_heldout_accuracy"] = readout
    return model, processor, report


def taste_answer_accuracy(
    model: PreTrainedModel,
    processor: ProcessorMixin,
    heldout: RenderSet,
    *,
    k: int,
    n_users: int,
    seed: int,
    slot_positions: bool,
    simulated_users: SimulatedUsersParams,
) -> dict[str, float]:
    """The greedy answers to ``TASTE_QUESTION`` about fresh held-out users (K liked + K
    disliked renders each), what ``viper_style`` puts into a prompt: the share of named
    liked (disliked) values the user truly likes (dislikes), the share of the user's liked
    values the context shows that are named, and how many distinct answers were given."""
    task = SimulatedUserVqa(
        heldout,
        processor,
        None,
        n_samples=n_users,
        seed=seed,
        k=(k, k),
        slot_positions=slot_positions,
        **simulated_users.model_dump(),
    )
    asked = [task.question(i) for i in range(n_users)]
    was_training = model.training
    answers = MllmPreferenceModel(model, processor, slot_positions=slot_positions).answer(
        [task.context(q) for q in asked], None, question=TASTE_QUESTION
    )
    model.train(was_training)
    named = {"liked": [0, 0], "disliked": [0, 0]}  # [true, all] named values
    recalled = [0, 0]  # [named, shown] liked values
    for question, answer in zip(asked, answers, strict=True):
        liked, disliked = parse_taste(answer)
        truth = {
            "liked": {attribute(a).value for a in question.user.liked},
            "disliked": {attribute(a).value for a in question.user.disliked},
        }
        for side, words in (("liked", liked), ("disliked", disliked)):
            named[side][0] += sum(word in truth[side] for word in words)
            named[side][1] += len(words)
        shown, _ = parse_taste(task.taste(question))
        recalled[0] += len(set(shown) & set(liked))
        recalled[1] += len(shown)
    return {
        "users": n_users,
        "k": k,
        "liked_precision": named["liked"][0] / max(named["liked"][1], 1),
        "disliked_precision": named["disliked"][0] / max(named["disliked"][1], 1),
        "liked_recall": recalled[0] / max(recalled[1], 1),
        "distinct_answers": len(set(answers)),
    }


def _category_labels(renders: RenderSet) -> torch.Tensor:
    """(renders, categories): each render's value index within each category."""
    return torch.tensor(
        [[values.index(style[c]) for c, values in CATEGORIES.items()] for style in renders.styles]
    )


def _readout_inputs(model: PreTrainedModel, renders: RenderSet) -> torch.Tensor:
    """What the attribute read-out reads for every render (the frozen vision tower's CLS
    token and mean patch at the model's feature layer)."""
    projector = model.model.multi_modal_projector
    return projector.readout_inputs(select_vision_features(model, renders.images))


def fit_attribute_readout(
    model: PreTrainedModel,
    renders: RenderSet,
    *,
    steps: int,
    learning_rate: float,
    batch_size: int,
    seed: int,
) -> None:
    """Fit the attribute token's read-out (one softmax per category) to ``renders``'
    attributes with cross-entropy, on standardised inputs folded back into the layer."""
    inputs = _readout_inputs(model, renders)
    labels = _category_labels(renders)
    mean, std = inputs.mean(0), inputs.std(0).clamp_min(1e-6)
    standardised = (inputs - mean) / std
    projector = model.model.multi_modal_projector
    readout = torch.nn.Linear(inputs.shape[1], sum(projector.categories))
    torch.nn.init.zeros_(readout.weight)  # a convex fit: start at uniform, seed-independent
    torch.nn.init.zeros_(readout.bias)
    optimizer = torch.optim.Adam(readout.parameters(), lr=learning_rate)
    generator = torch.Generator().manual_seed(seed)
    for _ in progress(range(steps), desc="attribute read-out"):
        batch = torch.randint(0, len(inputs), (batch_size,), generator=generator)
        logits = readout(standardised[batch]).split(projector.categories, dim=-1)
        loss = sum(F.cross_entropy(part, labels[batch, c]) for c, part in enumerate(logits))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        weight = readout.weight / std
        target = projector.attribute_readout
        target.weight.copy_(weight.to(target.weight.dtype))
        target.bias.copy_((readout.bias - weight @ mean).to(target.bias.dtype))


@torch.no_grad()
def attribute_readout_accuracy(model: PreTrainedModel, renders: RenderSet) -> dict[str, float]:
    """How often the attribute token's most probable value is the render's, per category."""
    projector = model.model.multi_modal_projector
    logits = projector.attribute_readout(
        _readout_inputs(model, renders).to(projector.attribute_readout.weight.dtype)
    )
    labels = _category_labels(renders)
    return {
        category: round(float((part.argmax(-1) == labels[:, c]).float().mean()), 4)
        for c, (category, part) in enumerate(
            zip(CATEGORIES, logits.split(projector.categories, dim=-1), strict=True)
        )
    }


def _stage_dataset(
    stage: MllmStage,
    renders: RenderSet,
    features: torch.Tensor,
    processor: ProcessorMixin,
    params: MllmPretrainParams,
) -> CaptionTask | SimulatedUserVqa:
    n_samples = stage.train.max_steps * stage.train.batch_size
    seed = stage.train.seed
    if stage.task == "caption":
        return CaptionTask(
            renders,
            processor,
            features,
            n_samples=n_samples,
            seed=seed,
            slot_positions=params.slot_positions,
        )
    return SimulatedUserVqa(
        renders,
        processor,
        features,
        n_samples=n_samples,
        seed=seed,
        k=stage.k,
        copy_probability=stage.copy_probability,
        taste_probability=stage.taste_probability,
        taste_targets=stage.taste_head_weight > 0,
        taste_answer=stage.taste_answer,
        with_reasons=stage.reasons,
        queries=stage.queries,
        slot_positions=params.slot_positions,
        **params.simulated_users.model_dump(),
    )


def _evaluate(
    model: torch.nn.Module,
    *,
    processor: ProcessorMixin,
    heldout: RenderSet,
    params: MllmPretrainParams,
) -> dict[str, dict[str, float]]:
    """Preference accuracy on held-out renders and users at each evaluated K."""
    return {
        f"k{k}": evaluate_on_simulated_users(
            model,
            processor,
            heldout,
            k=k,
            n_questions=params.eval.questions,
            seed=params.eval.seed,
            slot_positions=params.slot_positions,
        )
        for k in params.eval.ks
    }
