"""Linear probes over the MLLM's layers and the layer selection they drive (PrefGen §2).

Per layer, an inter-user probe (which user is this?) and an intra-user probe (liked or
disliked?) are trained on standardised last-token states. Their accuracy by depth picks
``e_sem`` (the top layers, semantic) and ``e_core`` (where users are most separable).
``probe_hidden_states`` reads the states the probes fit; ``user_embeddings`` averages the
chosen layers into every context's and user's embeddings.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from prefgen_kedro.data.pictures import picture_contexts, picture_list
from prefgen_kedro.models.mllm import MllmPreferenceModel
from prefgen_kedro.models.user_adapter import choose_image_embedding
from prefgen_kedro.models.vqa import VqaExample, context_summary
from prefgen_kedro.world.agent_world import tastes_are_known
from prefgen_kedro.world.vocabulary import ATTRIBUTE_IDS


@dataclass
class LinearProbe:
    """A linear classifier on standardised features."""

    mean: torch.Tensor
    std: torch.Tensor
    linear: nn.Linear

    @torch.no_grad()
    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear((features - self.mean) / self.std)


def fit_linear_probe(
    features: torch.Tensor,
    labels: torch.Tensor,
    n_classes: int,
    *,
    steps: int = 300,
    learning_rate: float = 0.05,
    weight_decay: float = 1e-3,
    seed: int = 0,
) -> LinearProbe:
    """Full-batch AdamW; reproducible for a seed (own generator). ``labels`` are class
    indices (N,) for a softmax probe, or a multi-hot float (N, n_classes) for a multi-label
    probe (one logistic regression per column)."""
    multilabel = labels.is_floating_point()
    loss = F.binary_cross_entropy_with_logits if multilabel else F.cross_entropy
    features = features.float()
    mean = features.mean(dim=0)
    std = features.std(dim=0).clamp_min(1e-6)
    standardised = (features - mean) / std
    generator = torch.Generator().manual_seed(seed)
    linear = nn.Linear(features.shape[1], n_classes)
    bound = 1.0 / math.sqrt(features.shape[1])
    with torch.no_grad():
        linear.weight.uniform_(-bound, bound, generator=generator)
        linear.bias.zero_()
    optimizer = torch.optim.AdamW(linear.parameters(), lr=learning_rate, weight_decay=weight_decay)
    for _ in range(steps):
        optimizer.zero_grad()
        loss(linear(standardised), labels).backward()
        optimizer.step()
    return LinearProbe(mean, std, linear)


def mean_auc(scores: torch.Tensor, targets: torch.Tensor) -> float:
    """ROC AUC of each column's ``scores`` for its 0/1 ``targets`` (the chance that a
    positive row outscores a negative one, ties half), averaged over the columns that have
    both classes; 0.5 is chance."""
    aucs = []
    for column in range(targets.shape[1]):
        positive = scores[targets[:, column] > 0.5, column]
        negative = scores[targets[:, column] <= 0.5, column]
        if len(positive) and len(negative):
            difference = positive[:, None] - negative[None, :]
            aucs.append(((difference > 0).float() + 0.5 * (difference == 0).float()).mean())
    if not aucs:
        raise ValueError("no column has both positive and negative rows")
    return float(torch.stack(aucs).mean())


def top_k_accuracy(probe: LinearProbe, features: torch.Tensor, labels: torch.Tensor, k: int = 1):
    """Share of rows whose label is among the probe's ``k`` highest logits."""
    top = probe.logits(features.float()).topk(min(k, probe.linear.out_features), dim=1).indices
    return float((top == labels[:, None]).any(dim=1).float().mean())


def layerwise_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    n_classes: int,
    *,
    top_k: Sequence[int] = (1,),
    seed: int = 0,
    **fit_options: float,
) -> list[dict[str, float]]:
    """One probe per layer of (N, layers, D) features; per layer ``{"top1": …, …}``."""
    results = []
    for layer in range(train_features.shape[1]):
        probe = fit_linear_probe(
            train_features[:, layer], train_labels, n_classes, seed=seed, **fit_options
        )
        results.append(
            {
                f"top{k}": top_k_accuracy(probe, test_features[:, layer], test_labels, k)
                for k in top_k
            }
        )
    return results


def select_layers(
    inter_user_accuracy: Sequence[float],
    *,
    semantic_top: int = 4,
    core_window: int = 3,
    core_search_from: float = 0.5,
) -> dict[str, list[int]]:
    """Indices into the hidden states (0 = embeddings, i = after layer i).

    ``e_sem``: the last ``semantic_top`` layers. ``e_core``: the ``core_window``
    consecutive layers with the highest mean inter-user accuracy, searched from
    ``core_search_from`` of the depth upwards (the middle-to-upper layers).
    """
    depth = len(inter_user_accuracy) - 1
    if not 1 <= semantic_top <= depth or not 1 <= core_window <= depth:
        raise ValueError(
            f"semantic_top={semantic_top} and core_window={core_window} must be within the "
            f"{depth} layers"
        )
    first = min(max(1, math.ceil(core_search_from * depth)), depth - core_window + 1)
    starts = range(first, depth - core_window + 2)
    best = max(starts, key=lambda s: sum(inter_user_accuracy[s : s + core_window]))
    return {
        "e_sem": list(range(depth - semantic_top + 1, depth + 1)),
        "e_core": list(range(best, best + core_window)),
    }


# What the taste audit probes, where a run has it: CLIP image embeddings, the MLLM's states,
# every aligner's part, the counting rule's own picks as phrases, and the perfect ê_sem.
AUDITED_PARTS = (
    "mean_clip",
    "e_img",
    "e_core",
    "e_sem",
    "e_sem_hat",
    "e_sem_hat_no_mmd",
    "oracle_state_hat",
    "counting_rule_picks",
    "true_sem",
)


def taste_audit(
    user_conditions: pd.DataFrame, users: pd.DataFrame, images: pd.DataFrame, split: str, seed: int
) -> dict:
    """How much of each user's taste every stage's output still carries: for each source,
    a multi-label linear probe predicts the user's liked attributes from one context's
    vector (trained on training users' contexts, tested on ``split`` users' contexts) and
    its mean ROC AUC is reported (0.5: nothing). The counting rule on the context images'
    true attributes is the ceiling the context allows. Agent world only (real users have
    no known attributes): elsewhere an empty audit."""
    if not tastes_are_known(users):
        return {}
    liked = users.set_index("user_id")["liked_attributes"]
    shown = images.set_index("image_id")["attributes"]

    def taste(rows: pd.DataFrame) -> torch.Tensor:
        return liked_targets(liked[rows["user_id"]])

    train = user_conditions[user_conditions["split"] == "train"]
    test = user_conditions[user_conditions["split"] == split]
    counting_rule = np.stack(
        [
            context_summary(shown[list(liked_ids)], shown[list(disliked_ids)])
            for liked_ids, disliked_ids in zip(test["liked"], test["disliked"], strict=True)
        ]
    )
    audit = {
        "split": split,
        "users": int(test["user_id"].nunique()),
        "contexts": len(test),
        "auc": {"counting_rule": mean_auc(torch.from_numpy(counting_rule), taste(test))},
    }
    for part in (part for part in AUDITED_PARTS if part in user_conditions):
        audit["auc"][part] = audit_auc(
            torch.from_numpy(np.stack(train[part].to_list())).float(),
            taste(train),
            torch.from_numpy(np.stack(test[part].to_list())).float(),
            taste(test),
            seed=seed,
        )
    return audit


def liked_targets(liked: Iterable[Iterable[str]]) -> torch.Tensor:
    """Each row's liked attributes as a 0/1 row over ``ATTRIBUTE_IDS``."""
    columns = {a: i for i, a in enumerate(ATTRIBUTE_IDS)}
    rows = [list(attributes) for attributes in liked]
    targets = torch.zeros(len(rows), len(columns))
    for r, attributes in enumerate(rows):
        targets[r, [columns[a] for a in attributes]] = 1.0
    return targets


def audit_auc(
    train_features: torch.Tensor,
    train_taste: torch.Tensor,
    test_features: torch.Tensor,
    test_taste: torch.Tensor,
    *,
    seed: int,
) -> float:
    """The taste audit of one source: a multi-label linear probe fitted on the training
    rows' liked attributes, its mean ROC AUC on the test rows'."""
    probe = fit_linear_probe(train_features, train_taste, train_taste.shape[1], seed=seed)
    return mean_auc(probe.logits(test_features), test_taste)


def probe_layers(
    hidden_states: Mapping[str, torch.Tensor | pd.DataFrame],
    probe_contexts: pd.DataFrame,
    inter_user_train_contexts: int,
    *,
    fit: Mapping[str, float],
    rule: Mapping[str, float],
    seed: int,
) -> tuple[pd.DataFrame, dict]:
    """Per layer, the inter-user probe (which training user, from a context it never saw:
    the first ``inter_user_train_contexts`` contexts train it) and the intra-user probe
    (liked or not, validation users' questions), as a table, and the layers ``rule``
    (``select_layers``) picks for ``e_sem`` and ``e_core``."""
    states = hidden_states["contexts"]
    train_users = probe_contexts["split"] == "train"
    user_index = {
        u: i for i, u in enumerate(sorted(set(probe_contexts.loc[train_users, "user_id"])))
    }
    seen = train_users & (probe_contexts["context"] < inter_user_train_contexts)
    unseen = train_users & (probe_contexts["context"] >= inter_user_train_contexts)
    labels = torch.tensor([user_index.get(u, -1) for u in probe_contexts["user_id"]])
    inter = layerwise_accuracy(
        states[torch.tensor(seen.to_numpy())],
        labels[torch.tensor(seen.to_numpy())],
        states[torch.tensor(unseen.to_numpy())],
        labels[torch.tensor(unseen.to_numpy())],
        len(user_index),
        top_k=(1, 5),
        seed=seed,
        **fit,
    )
    table = hidden_states["question_table"]
    fit_rows = torch.tensor((table["split"] == "train").to_numpy())
    test_rows = torch.tensor((table["split"] == "val").to_numpy())
    answers = torch.tensor(table["label"].to_numpy())
    intra = layerwise_accuracy(
        hidden_states["questions"][fit_rows],
        answers[fit_rows],
        hidden_states["questions"][test_rows],
        answers[test_rows],
        2,
        seed=seed,
        **fit,
    )
    rows = [
        {"layer": layer, "task": task, "metric": metric, "accuracy": value}
        for task, curve in (("inter_user", inter), ("intra_user", intra))
        for layer, accuracies in enumerate(curve)
        for metric, value in accuracies.items()
    ]
    metrics = pd.DataFrame(rows)
    chosen = select_layers([a["top1"] for a in inter], **rule)
    selection = {
        **chosen,
        "inter_user_peak_layer": int(np.argmax([a["top1"] for a in inter])),
        "intra_user_peak_layer": int(np.argmax([a["top1"] for a in intra])),
        "inter_user_chance": 1.0 / len(user_index),
        "intra_user_majority": float(
            max(answers[test_rows].float().mean(), 1 - answers[test_rows].float().mean())
        ),
        "rule": rule,
    }
    return metrics, selection


def probe_hidden_states(
    model: MllmPreferenceModel,
    probe_contexts: pd.DataFrame,
    questions: Sequence[VqaExample],
    pictures: Mapping[str, np.ndarray],
    users: pd.DataFrame,
    *,
    context_question: str,
) -> dict[str, torch.Tensor | pd.DataFrame]:
    """Last-token states of every layer (``MllmPreferenceModel.hidden_states``): for each
    context of ``probe_contexts`` ending with ``context_question`` (``contexts``), for each
    context + query question (``questions``), and the questions' user, split and label
    (``question_table``)."""
    contexts = picture_contexts(
        probe_contexts["liked"].tolist(), probe_contexts["disliked"].tolist(), pictures
    )
    question_contexts = picture_contexts(
        [q.liked for q in questions], [q.disliked for q in questions], pictures
    )
    split = users.set_index("user_id")["split"]
    return {
        "contexts": model.hidden_states(contexts, question=context_question),
        "questions": model.hidden_states(
            question_contexts, picture_list([q.query for q in questions], pictures)
        ),
        "question_table": pd.DataFrame(
            {
                "user_id": [q.user_id for q in questions],
                "split": [split[q.user_id] for q in questions],
                "label": [q.label for q in questions],
            }
        ),
    }


def user_embeddings(
    context_states: torch.Tensor,
    layer_selection: Mapping[str, Sequence[int]],
    probe_contexts: pd.DataFrame,
    images: pd.DataFrame,
    users: pd.DataFrame,
    encode_images: Callable[[np.ndarray], torch.Tensor],
    pictures: Mapping[str, np.ndarray],
    e_img_rule: str,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``context_embeddings`` (``e_sem``/``e_core``, the means of ``context_states`` over the
    selected layers, of every context of every user; in the agent world also
    ``context_summary``, the perfect summary the signal ladder's ``oracle_state`` aligns) and
    ``user_embeddings`` (DESIGN.md §4: from each user's canonical context, with ``e_img``
    chosen by ``e_img_rule`` among the CLIP embeddings of its liked ``pictures``)."""
    e_sem = context_states[:, layer_selection["e_sem"]].mean(dim=1)
    e_core = context_states[:, layer_selection["e_core"]].mean(dim=1)
    per_context = probe_contexts[["user_id", "split", "context"]].assign(
        e_sem=list(e_sem.numpy()), e_core=list(e_core.numpy())
    )
    if tastes_are_known(users):
        shown = images.set_index("image_id")["attributes"]
        per_context["context_summary"] = [
            context_summary(shown[list(liked)], shown[list(disliked)])
            for liked, disliked in zip(
                probe_contexts["liked"], probe_contexts["disliked"], strict=True
            )
        ]
    canonical = probe_contexts["context"] == 0
    canonical_users = probe_contexts[canonical].reset_index(drop=True)
    e_img = [
        choose_image_embedding(encode_images(np.stack([pictures[i] for i in liked])), e_img_rule)
        for liked in canonical_users["liked"]
    ]
    per_user = canonical_users[["user_id", "split", "liked", "disliked"]].assign(
        e_sem=list(e_sem[torch.tensor(canonical.to_numpy())].numpy()),
        e_core=list(e_core[torch.tensor(canonical.to_numpy())].numpy()),
        e_img=[vector.numpy() for vector in e_img],
    )
    return per_context, per_user
