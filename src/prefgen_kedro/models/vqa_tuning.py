"""PrefGen step 1: preference VQA tuning of the pretrained MLLM through its K stages, and
its validation.

Each stage is a run of the shared trainer (resumable), keyed by the one before it; a fixed
slice of the validation questions is asked every ``curve_every`` steps for the learning
curve.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from transformers import PreTrainedModel, ProcessorMixin

from prefgen_kedro.data.pictures import only, picture_contexts, picture_list
from prefgen_kedro.data.tables import LIKED
from prefgen_kedro.models.mllm import (
    MllmPreferenceModel,
    PreferenceContext,
    VqaDataset,
    add_lora,
    answer_loss,
    frozen_parameters,
    reads_vision_features,
)
from prefgen_kedro.models.vqa import (
    VqaExample,
    counting_rule_accuracy,
    counting_rule_scores,
    examples_from_table,
)
from prefgen_kedro.params import VqaTuningParams
from prefgen_kedro.provenance import run_key
from prefgen_kedro.training import shaping_settings, train


def tune_through_stages(
    mllm: PreTrainedModel,
    processor: ProcessorMixin,
    vqa_examples: pd.DataFrame,
    pictures: Mapping[str, np.ndarray],
    params: VqaTuningParams,
) -> tuple[PreTrainedModel, dict]:
    """Tune ``mllm`` through the K stages; returns the tuned model (LoRA merged) and the
    training report: per-stage histories, the learning curve and questions/s."""
    validation_rows = vqa_examples[vqa_examples["split"] == "val"]
    watched = examples_from_table(validation_rows)[: params.curve_questions]
    model = mllm
    if params.lora is not None:
        # Seeded: the adapters' random initialisation is part of the start the key digests,
        # so an unseeded one would give every run a new key (never reused, never resumed).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(params.seed)
            model = add_lora(mllm, **params.lora.model_dump())
    # The vision side stays as pretrained (LLaVA's recipe; LoRA targets come from params).
    frozen = {id(p) for p in frozen_parameters(mllm)}
    trainable = [p for p in model.parameters() if p.requires_grad and id(p) not in frozen]
    # The tower stays frozen through every stage: a stage computes each picture's features once.
    features_from = model if reads_vision_features(model) else None

    # The first stage starts from ``mllm``, each later one from the stage before it: the keys
    # chain, so a new pretrained MLLM (one changed weight) trains every stage afresh.
    key = run_key(
        params.model_dump(exclude={"checkpoint_root", "stages"}),
        start=mllm,
        processor=processor,
        watched=validation_rows.iloc[: params.curve_questions],
        watched_pictures=_pictures_of(watched, pictures),
    )
    curve: list[dict] = []
    stages: list[dict] = []
    questions_before = 0
    started = time.perf_counter()
    for index, stage in enumerate(params.stages):
        rows = vqa_examples[(vqa_examples["split"] == "train") & (vqa_examples["stage"] == index)]
        examples = examples_from_table(rows)
        dataset = VqaDataset(
            examples,
            pictures,
            processor,
            slot_positions=params.slot_positions,
            features_from=features_from,
        )
        key = run_key(
            {"stage": stage.model_dump(exclude={"train"}), "train": shaping_settings(stage.train)},
            previous=key,
            examples=rows,
            pictures=_pictures_of(examples, pictures),
        )

        result = train(
            model,
            dataset,
            answer_loss(params.answer_loss, processor.tokenizer),
            stage.train,
            checkpoint_root=params.checkpoint_root,
            name=f"vqa_tuning_stage{index}",
            key=key,
            collate_fn=dataset.collate,
            trainable_parameters=trainable,
            on_log=_validation_scorer(
                lambda: accuracy(model, processor, watched, pictures, params),
                every=params.curve_every,
            ),
        )
        questions_per_chat = len(examples) / len(dataset)
        # From the history, so a stage restored from its checkpoint keeps its points.
        curve.extend(
            {
                "stage": index,
                "k": stage.k,
                "step": entry["step"],
                "questions_seen": questions_before
                + round(entry["samples_seen"] * questions_per_chat),
                "train_loss": round(entry["loss"], 4),
                "val_accuracy": entry["val_accuracy"],
            }
            for entry in result.history
            if "val_accuracy" in entry
        )
        stages.append(
            {
                "stage": index,
                "k": stage.k,
                **result.summary(),
                "questions_per_context": stage.questions_per_context,
                # Of the steps this run trained; none when the checkpoint was already final.
                "questions_per_second": round(
                    result.steps_trained
                    * stage.train.batch_size
                    * questions_per_chat
                    / max(result.wall_seconds, 1e-9),
                    1,
                )
                if result.steps_trained
                else None,
                "history": result.history,
            }
        )
        questions_before += round(result.steps * stage.train.batch_size * questions_per_chat)
    if params.lora is not None:
        model = model.merge_and_unload()
    report = {
        "stages": stages,
        "learning_curve": curve,
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    return model.eval(), report


def validation_metrics(
    pretrained_mllm: PreTrainedModel,
    tuned_mllm: PreTrainedModel,
    processor: ProcessorMixin,
    vqa_examples: pd.DataFrame,
    pictures: Mapping[str, np.ndarray],
    images: pd.DataFrame,
    interactions: pd.DataFrame,
    tuning_report: dict,
    params: VqaTuningParams,
) -> dict:
    """``vqa_metrics`` on the validation users: tuned vs. untuned model, majority class, the
    counting rule, the ceiling the label noise allows, judge–utility agreement, example
    answers and the tuning's speed."""
    validation = examples_from_table(vqa_examples[vqa_examples["split"] == "val"])
    labels = np.array([example.label for example in validation])
    tuned_p = _judge(tuned_mllm, processor, validation, pictures, params)
    untuned_p = _judge(pretrained_mllm, processor, validation, pictures, params)
    metrics: dict = {
        "k": params.stages[-1].k,
        "questions": len(validation),
        "users": len({example.user_id for example in validation}),
        "accuracy": {
            "tuned": _hits(tuned_p, labels),
            "untuned": _hits(untuned_p, labels),
            "majority_class": float(max(labels.mean(), 1 - labels.mean())),
        },
    }
    attributes = images.set_index("image_id")["attributes"]
    if all(len(attributes[e.query]) for e in validation):  # the agent world
        scores = counting_rule_scores(validation, attributes)
        metrics["accuracy"]["counting_rule"] = counting_rule_accuracy(scores, labels.tolist())
    if "utility" in interactions:
        utility = interactions.set_index(["user_id", "image_id"])["utility"]
        positive = np.array([utility[(e.user_id, e.query)] > 0 for e in validation])
        # A label that disagrees with the true utility is noise no model can predict.
        metrics["accuracy"]["label_noise_ceiling"] = float((positive == (labels == LIKED)).mean())
        metrics["judge_agreement_with_utility_sign"] = float(((tuned_p > 0.5) == positive).mean())
    judge = MllmPreferenceModel(
        tuned_mllm, processor, slot_positions=params.slot_positions, batch_size=8
    )
    shown = validation[:8]
    answers = judge.answer(*_contexts_and_queries(shown, pictures))
    metrics["example_answers"] = [
        {"user_id": e.user_id, "query": e.query, "expected": e.answer, "answered": a}
        for e, a in zip(shown, answers, strict=True)
    ]
    metrics["training"] = {
        "wall_seconds": tuning_report["wall_seconds"],
        "questions_per_second": [
            stage["questions_per_second"] for stage in tuning_report["stages"]
        ],
    }
    return metrics


def accuracy(
    model: torch.nn.Module,
    processor: ProcessorMixin,
    examples: Sequence[VqaExample],
    pictures: Mapping[str, np.ndarray],
    params: VqaTuningParams,
) -> float:
    """Yes/no accuracy of ``model``'s judge on ``examples`` (leaves it in training mode)."""
    was_training = model.training
    p_yes = _judge(model, processor, examples, pictures, params)
    model.train(was_training)
    return _hits(p_yes, np.array([example.label for example in examples]))


def _validation_scorer(
    measure: Callable[[], float], *, every: int
) -> Callable[[int, dict[str, float]], dict[str, float] | None]:
    """An ``on_log`` callback adding ``val_accuracy`` to every ``every``-th step's entry."""

    def score(step: int, entry: dict[str, float]) -> dict[str, float] | None:
        return {"val_accuracy": measure()} if step % every == 0 else None

    return score


def _judge(model, processor, examples, pictures, params) -> np.ndarray:
    judge = MllmPreferenceModel(
        model, processor, slot_positions=params.slot_positions, batch_size=params.judge_batch_size
    )
    return judge.judge(*_contexts_and_queries(examples, pictures)).numpy()


def _contexts_and_queries(
    examples: Sequence[VqaExample], pictures: Mapping[str, np.ndarray]
) -> tuple[Sequence[PreferenceContext], Sequence[np.ndarray]]:
    """``examples``' contexts and queries, their pictures read a batch at a time."""
    contexts = picture_contexts(
        [e.liked for e in examples], [e.disliked for e in examples], pictures
    )
    return contexts, picture_list([e.query for e in examples], pictures)


def _hits(p_yes: np.ndarray, labels: np.ndarray) -> float:
    return float(((p_yes > 0.5) == (labels == LIKED)).mean())


def _pictures_of(
    examples: Sequence[VqaExample], pictures: Mapping[str, np.ndarray]
) -> Mapping[str, np.ndarray]:
    """The pictures ``examples`` show (context and query), by image id, read when indexed
    (the run key digests them one at a time)."""
    return only(
        pictures,
        (
            image_id
            for example in examples
            for image_id in (*example.liked, *example.disliked, example.query)
        ),
    )
