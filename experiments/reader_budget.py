"""How much of a new user's taste does ``e_sem`` hold, and how much of it can PrefGen's
aligner read from the training users it has?

``e_sem`` is the tuned MLLM's last-layer state after the taste question. The aligner learns
to read it from the agent world's training users alone (700 by default), each seen through
6 contexts. Here the same state is read by readers fitted on N *fresh* simulated users,
drawn as the world draws its users (4 liked and 4 disliked attributes) and shown as one
context of 8 liked and 8 disliked renders from a pool of the script's own. They are never
the project's users. Every reader is scored on the run's validation users' contexts, as the
aligner is:

- ``linear reader``: a linear multi-label read-out of the liked attributes, binary
  cross-entropy (Adam, 1,500 steps);
- ``MMD aligner``: the shipped aligner recipe (``models/alignment.py``: MLP, MMD to the liked
  phrases, the phrase vocabulary and groups of the run's aligner), with 192 contexts a step
  and 3,000 steps, since each fresh user brings one context where a training user brings 6.

Each row gives, for the validation users' contexts:
- the liked precision of the 4 picks (one phrase per category, the aligner's rule), which
  sets the like-rate once the picks are said in the prompt;
- the mean ROC AUC of the read-out's liked scores;
- the taste audit of the picks as ``e_sem_hat`` carries them (the 4 picked phrases' states):
  the benchmark's linear probe (``probes.taste_audit``), fitted on the picks of the training
  users' contexts, scored on the validation users' liked attributes.

The run's own aligner and the counting rule on the same contexts are printed beside them.

``python -m experiments.reader_budget`` after a default ``kedro run`` (about 4 minutes on a
2-core CPU); ``--data`` points at another run's ``data`` folder.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    PreTrainedModel,
    ProcessorMixin,
)

import prefgen_kedro.models.mllm  # noqa: F401  (registers the tiny MLLM with the Auto classes)
from prefgen_kedro.models.alignment import (
    ALIGNER_VARIANTS,
    Aligners,
    AlignmentMlp,
    train_aligner,
)
from prefgen_kedro.models.mllm import MllmPreferenceModel
from prefgen_kedro.models.mllm_pretraining import SimulatedUserVqa
from prefgen_kedro.models.mmd import DEFAULT_BANDWIDTH_FACTORS
from prefgen_kedro.models.probes import audit_auc, liked_targets, mean_auc
from prefgen_kedro.models.vqa import TASTE_QUESTION
from prefgen_kedro.params import AlignmentParams
from prefgen_kedro.world.agent_world import render_set
from prefgen_kedro.world.vocabulary import ATTRIBUTE_IDS

AUDIT_SEED = 2026  # the benchmark's (``evaluation.seed``), as its taste audit fits its probe
POOL_SEED = 777  # a render pool of its own: not the MLLM's (606) nor the held-out one (404)
USER_SEED = 5
# The shipped optimiser (conf/base/parameters_alignment.yml) with 192 contexts a step and
# 3,000 steps, as a fresh user brings one context where a training user brings 6.
ALIGNER_TRAIN = {
    "max_steps": 3000,
    "batch_size": 192,
    "learning_rate": 1.0e-3,
    "weight_decay": 1.0e-2,
    "warmup_steps": 30,
    "checkpoint_every": 3000,
    "log_every": 500,
    "seed": 51,
}


def aligner_recipe(shipped: AlignmentMlp, checkpoint_root: str) -> AlignmentParams:
    """The run's aligner's shape (width, dropout, tokens, as ``Aligners.of`` reads it) and
    the default kernel, trained with ``ALIGNER_TRAIN``."""
    return AlignmentParams.model_validate(
        {
            "checkpoint_root": checkpoint_root,
            "hidden_dim": shipped.net[1].out_features,
            "dropout": shipped.net[0].p,
            "tokens": shipped.tokens,
            "bandwidth_factors": list(DEFAULT_BANDWIDTH_FACTORS),
            "retrieval_k": 5,
            "train": ALIGNER_TRAIN,
        }
    )


def fresh_user_states(
    mllm: PreTrainedModel, processor: ProcessorMixin, layers: list[int], n_users: int
) -> tuple[torch.Tensor, list]:
    """``e_sem`` as probing reads it (the taste-question state, averaged over ``layers``) of
    ``n_users`` fresh simulated users, and each one's liked attributes."""
    pool = render_set(16000, POOL_SEED, 32)
    task = SimulatedUserVqa(pool, processor, None, n_samples=n_users, seed=USER_SEED, k=(8, 8))
    reader = MllmPreferenceModel(mllm, processor, slot_positions=True, batch_size=256)
    questions = [task.question(i) for i in range(n_users)]
    states = [
        reader.hidden_states(
            [task.context(q) for q in questions[start : start + 2048]], question=TASTE_QUESTION
        )[:, layers].mean(dim=1)
        for start in range(0, n_users, 2048)
    ]
    return torch.cat(states), [sorted(q.user.liked) for q in questions]


def linear_reader(
    states: torch.Tensor, liked: list, steps: int = 1500
) -> Callable[[torch.Tensor], torch.Tensor]:
    """A standardised linear read-out of the liked attributes (binary cross-entropy)."""
    column = {a: i for i, a in enumerate(ATTRIBUTE_IDS)}
    targets = torch.zeros(len(liked), len(ATTRIBUTE_IDS))
    for row, attributes in enumerate(liked):
        targets[row, [column[a] for a in attributes]] = 1.0
    mean, std = states.mean(0), states.std(0) + 1e-6
    linear = torch.nn.Linear(states.shape[1], len(ATTRIBUTE_IDS))
    torch.nn.init.zeros_(linear.weight)
    optimizer = torch.optim.Adam(linear.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        rows = torch.randint(0, len(liked), (min(4096, len(liked)),), generator=generator)
        loss = F.binary_cross_entropy_with_logits(
            linear((states[rows] - mean) / std), targets[rows]
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return lambda x: linear((x - mean) / std).detach()


class Scorer:
    """Scores readers on the validation contexts; the taste audit of their picks is fitted
    on the training contexts' picks, as the benchmark fits it on the training users'."""

    def __init__(
        self,
        validation: torch.Tensor,
        validation_liked: list,
        training: torch.Tensor,
        training_liked: list,
        vocabulary: torch.Tensor,
    ) -> None:
        self.validation, self.training = validation, training
        self.liked, self.truth = validation_liked, liked_targets(validation_liked)
        self.training_truth = liked_targets(training_liked)
        self.vocabulary = vocabulary

    def picks_audit(self, training_picks: torch.Tensor, validation_picks: torch.Tensor) -> float:
        """Mean liked AUC of the benchmark's linear probe on the picks' phrase states."""
        return audit_auc(
            self.vocabulary[training_picks].flatten(1),
            self.training_truth,
            self.vocabulary[validation_picks].flatten(1),
            self.truth,
            seed=AUDIT_SEED,
        )

    def report(
        self,
        name: str,
        read: Callable[[torch.Tensor], torch.Tensor],
        pick: Callable[[torch.Tensor], torch.Tensor],
    ) -> None:
        """One printed row for a reader (features → liked scores) and its picking rule."""
        with torch.no_grad():
            scores = read(self.validation)
            picks, training_picks = pick(scores), pick(read(self.training))
        audit = self.picks_audit(training_picks, picks)  # fits a probe: outside no_grad
        hits = [
            len({ATTRIBUTE_IDS[i] for i in row} & set(truth)) / len(row)
            for row, truth in zip(picks.tolist(), self.liked, strict=True)
        ]
        print(
            f"{name:40s} liked precision {np.mean(hits):.3f}  "
            f"AUC {mean_auc(scores, self.truth):.3f}  "
            f"picks' audit AUC {audit:.3f}",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("data"))
    parser.add_argument("--readers", default="700,2000,5000,20000")
    parser.add_argument("--aligners", default="700,4200,20000")
    args = parser.parse_args()
    models = args.data / "06_models"
    mllm = AutoModelForImageTextToText.from_pretrained(models / "tuned_mllm", dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(models / "foundation/mllm_processor")
    shipped = Aligners.from_pretrained(models / "aligners")["prefgen"].eval()
    contexts_file = args.data / "05_model_input/context_embeddings.parquet"
    contexts = pd.read_parquet(contexts_file)
    if "context_summary" not in contexts:
        raise SystemExit(
            f"{contexts_file} has no context_summary column: this script needs an agent-world "
            "run, whose users' tastes are known"
        )
    users = pd.read_parquet(args.data / "02_intermediate/users.parquet").set_index("user_id")

    def split(name: str) -> tuple[torch.Tensor, torch.Tensor, list]:
        rows = contexts[contexts["split"] == name]
        return (
            torch.from_numpy(np.stack(rows["e_sem"].to_list())).float(),
            torch.from_numpy(np.stack(rows["context_summary"].to_list())).float(),
            [users.loc[user_id, "liked_attributes"] for user_id in rows["user_id"]],
        )

    e_sem, summary, liked = split("val")
    training_e_sem, training_summary, training_liked = split("train")
    print(f"{len(e_sem)} validation contexts, {len(training_e_sem)} training contexts")
    on_e_sem = Scorer(e_sem, liked, training_e_sem, training_liked, shipped.vocabulary)
    on_summary = Scorer(summary, liked, training_summary, training_liked, shipped.vocabulary)
    on_e_sem.report("the run's aligner (its training users)", shipped, shipped.picks)
    # tiny noise breaks the counting rule's ties between equal counts
    on_summary.report(
        "counting rule on the context",
        lambda x: x,
        lambda x: shipped.picks(
            x + torch.rand(x.shape, generator=torch.Generator().manual_seed(0)) * 1e-3
        ),
    )

    readers = [int(n) for n in args.readers.split(",")]
    aligners = [int(n) for n in args.aligners.split(",")]
    layers = json.loads((args.data / "08_reporting/layer_selection.json").read_text())["e_sem"]
    states, fresh_liked = fresh_user_states(mllm, processor, layers, max(readers + aligners))
    for n in readers:
        reader = linear_reader(states[:n], fresh_liked[:n])
        on_e_sem.report(f"linear reader, {n} fresh users", reader, shipped.picks)
    column = {a: i for i, a in enumerate(ATTRIBUTE_IDS)}
    for n in aligners:
        targets = {
            "vocabulary": shipped.vocabulary,
            "phrase_groups": shipped.phrase_groups.tolist(),
            "phrase_ids": {f"fresh{i}": [column[a] for a in fresh_liked[i]] for i in range(n)},
        }
        with tempfile.TemporaryDirectory() as checkpoints:
            params = aligner_recipe(shipped, checkpoints)
            aligner, _ = train_aligner(
                "prefgen",
                ALIGNER_VARIANTS["prefgen"],
                [f"fresh{i}" for i in range(n)],
                [states[i : i + 1] for i in range(n)],
                targets,
                params,
            )
        on_e_sem.report(f"MMD aligner, {n} fresh users", aligner.eval(), aligner.picks)


if __name__ == "__main__":
    main()
