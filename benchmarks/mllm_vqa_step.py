"""An MLLM VQA tuning step vs. a plain Hugging Face training step on the same batch.

Project: the shipped MLLM tuned as ``vqa_tuning.tune_mllm`` does at the default K (the last
stage's): ``VqaDataset`` (each sample encoded by the processor when the loader asks for it) and
``vqa_loss`` through ``prefgen_kedro.training.train``, vision tower frozen. Reference: the same
model loaded again, the same parameters trainable, ``model(**batch).loss.backward()`` and an
AdamW step on one batch collated once by ``VqaDataset.collate`` (no processor, loader, NaN
check, clipping or scheduler per step). Same batch size and bf16 autocast (fp32 on a CPU without
native bf16, as the trainer runs there: ``prefgen_kedro.precision``).
"""

from __future__ import annotations

import math

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, PreTrainedModel

from benchmarks import FOUNDATION
from benchmarks.timing import PRECISION_LABELS, Comparison, main, time_training
from prefgen_kedro.models.mllm import VqaDataset, vision_encoder, vqa_loss
from prefgen_kedro.models.vqa import sample_vqa_examples
from prefgen_kedro.precision import effective_precision
from prefgen_kedro.world.agent_world import generate_agent_world

# As conf/base/parameters_vqa_tuning.yml (the last stage) and parameters_data_ingestion.yml.
K = 8
TRAIN = {
    "batch_size": 32,
    "learning_rate": 5.0e-4,
    "weight_decay": 0.01,
    "warmup_steps": 20,
    "mixed_precision": "bf16",
    "seed": 31,
}
SLOT_POSITIONS = True
WORLD = {
    "images_per_user": 32,
    "n_liked_attributes": 4,
    "n_disliked_attributes": 4,
    "label_noise": 0.05,
    "image_size": 32,
}
USERS = 8


def run(quick: bool = False) -> Comparison:
    """Time both training steps, in turn; ``quick``: 1 warm-up and 2 timed steps each."""
    warmup, repeats = (1, 2) if quick else (2, 8)
    batch_size = TRAIN["batch_size"]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = effective_precision(TRAIN["mixed_precision"], device)
    processor = AutoProcessor.from_pretrained(FOUNDATION / "mllm_processor")
    dataset = _vqa_dataset(processor, samples=batch_size * (warmup + repeats))

    plain = _load_mllm().to(device).train()
    vision_encoder(plain).requires_grad_(False)
    trainable = [parameter for parameter in plain.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(
        trainable, lr=TRAIN["learning_rate"], weight_decay=TRAIN["weight_decay"]
    )
    batch = {
        key: value.to(device)
        for key, value in dataset.collate([dataset[i] for i in range(batch_size)]).items()
    }

    def plain_step() -> float:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = plain(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        # The trainer reads every loss (its NaN check); reading it here also waits for a GPU.
        return loss.item()

    model = _load_mllm()
    frozen = {id(parameter) for parameter in vision_encoder(model).parameters()}
    project, reference = time_training(
        model,
        dataset,
        vqa_loss,
        TRAIN,
        plain_step,
        warmup=warmup,
        repeats=repeats,
        collate_fn=dataset.collate,
        # As tune_mllm without LoRA: everything but the vision tower.
        trainable_parameters=[p for p in model.parameters() if id(p) not in frozen],
        description="benchmark: VQA tuning",
    )
    tokens = batch["input_ids"].shape[1]
    return Comparison(
        title="MLLM VQA tuning step vs. plain Hugging Face step",
        call="step",
        unit="samples",
        items=batch_size,
        labels=("VQA tuning (project trainer)", "model(**batch).loss.backward()"),
        project=project,
        reference=reference,
        details=(
            f"K={K} ({2 * K + 1} images a sample, {tokens} tokens in the reference batch), "
            f"batch {batch_size}, {PRECISION_LABELS[precision]} on {device.type}, {warmup} "
            f"warm-up + {repeats} timed steps each, in turn; "
            f"{sum(p.numel() for p in trainable):,} trainable parameters (vision tower frozen). "
            "The project's step also encodes its samples with the processor; the reference's "
            "batch was collated once."
        ),
    )


def _load_mllm() -> PreTrainedModel:
    return AutoModelForImageTextToText.from_pretrained(FOUNDATION / "mllm", dtype=torch.float32)


def _vqa_dataset(processor: AutoProcessor, samples: int) -> VqaDataset:
    """``samples`` VQA questions with reasons at K, from a small agent world."""
    world = generate_agent_world(
        n_users=USERS,
        **WORLD,
        split_fractions={"train": 1.0},
        images_subdir="images",
        seed=0,
    )
    examples = sample_vqa_examples(
        world.images,
        world.interactions,
        world.users,
        splits=["train"],
        k=K,
        samples_per_user=math.ceil(samples / USERS),
        seed=0,
        with_reasons=True,
    )
    return VqaDataset(examples, world.pictures, processor, slot_positions=SLOT_POSITIONS)


if __name__ == "__main__":
    main(run, __doc__.splitlines()[0])
