"""Nodes of ``vqa_tuning``: PrefGen step 1, preference VQA tuning of the pretrained MLLM.

The MLLM (the shipped tiny one in ``base``, a hub checkpoint with LoRA in ``gpu``) is tuned on
the training users' histories: their context of K liked and K disliked images, a query of
their own history outside it, and the answer with its reason. K ramps up through
``stages``; each stage is a run of the shared trainer (resumable), and a fixed slice of the
validation questions is asked every ``curve_every`` steps for the learning curve.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import replace

import pandas as pd
from matplotlib.figure import Figure

from prefgen_kedro.data.pictures import PictureFiles
from prefgen_kedro.figures import vqa_learning_curve_figure
from prefgen_kedro.models.stack import MllmWithProcessor
from prefgen_kedro.models.vqa import examples_table, sample_vqa_examples
from prefgen_kedro.models.vqa_tuning import tune_through_stages, validation_metrics
from prefgen_kedro.params import VqaTuningParams


def make_vqa_examples(
    images: pd.DataFrame, interactions: pd.DataFrame, users: pd.DataFrame, params: VqaTuningParams
) -> pd.DataFrame:
    """The VQA questions: each stage's training questions (as many as it trains on, so every
    one is seen once with a fresh context; ``questions_per_context`` of them a context) and
    the validation users' questions at the last K, one a context.
    Columns: those of ``examples_table`` plus ``split`` and ``stage`` (-1 for validation)."""
    n_train_users = int((users["split"] == "train").sum())
    frames = []
    for index, stage in enumerate(params.stages):
        wanted = stage.train.max_steps * stage.train.batch_size * stage.questions_per_context
        examples = sample_vqa_examples(
            images,
            interactions,
            users,
            splits=["train"],
            k=stage.k,
            samples_per_user=max(1, math.ceil(wanted / max(n_train_users, 1))),
            seed=params.seed + index,
            with_reasons=params.with_reasons,
            questions_per_context=stage.questions_per_context,
        )
        frames.append(examples_table(examples).assign(split="train", stage=index))
    validation = sample_vqa_examples(
        images,
        interactions,
        users,
        splits=["val"],
        k=params.stages[-1].k,
        samples_per_user=params.val_samples_per_user,
        seed=params.seed + len(params.stages),
        with_reasons=params.with_reasons,
    )
    frames.append(examples_table(validation).assign(split="val", stage=-1))
    return pd.concat(frames, ignore_index=True)


def tune_mllm(
    mllm: MllmWithProcessor,
    vqa_examples: pd.DataFrame,
    raw_images: Mapping[str, Callable],
    params: VqaTuningParams,
) -> tuple[MllmWithProcessor, dict]:
    """Tune ``mllm``'s model through the K stages; returns the tuned model (LoRA merged) with
    the same processor, and the training report: per-stage histories, the learning curve and
    questions/s. Pictures are read from ``raw_images`` as a batch shows them."""
    tuned, report = tune_through_stages(
        mllm.model, mllm.processor, vqa_examples, PictureFiles(raw_images), params
    )
    return replace(mllm, model=tuned), report


def evaluate_vqa(
    pretrained_mllm: MllmWithProcessor,
    tuned_mllm: MllmWithProcessor,
    vqa_examples: pd.DataFrame,
    raw_images: Mapping[str, Callable],
    images: pd.DataFrame,
    interactions: pd.DataFrame,
    tuning_report: dict,
    params: VqaTuningParams,
) -> tuple[dict, Figure]:
    """``vqa_metrics`` on the validation users (``vqa_tuning.validation_metrics``) and the
    learning-curve figure."""
    metrics = validation_metrics(
        pretrained_mllm.model,
        tuned_mllm.model,
        tuned_mllm.processor,
        vqa_examples,
        PictureFiles(raw_images),
        images,
        interactions,
        tuning_report,
        params,
    )
    return metrics, vqa_learning_curve_figure(tuning_report["learning_curve"], metrics)
