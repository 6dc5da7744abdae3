"""How far can comparing image features go on a preference question? The ceiling the tiny
MLLM's vision side sets.

The MLLM sees a render through the conditioning CLIP's vision tower (frozen): a CLS token and
the mean patch at its last layer. A fresh simulated user (4 liked and 4 disliked attributes,
as the agent world's users) shows K liked and K disliked renders; the query is one more of
either side. A similarity rule answers "liked" when Σ_liked sim(query, ·) − Σ_disliked
sim(query, ·) > 0, sim being a dot product of per-render features:

- ``cls_cosine``: the CLS features, unit length (where matching attention starts);
- ``linear_probe``: a least-squares read-out of both tokens to the 48 attributes;
- ``category_softmax``: per-category softmax probabilities of a linear read-out trained with
  cross-entropy, one distribution per category (as a render has one attribute per category);
- ``grouped_softmax``: the same kind of bottleneck without the categories (16 softmax
  groups of 8, trained through a linear map to the same per-category losses);
- ``attributes``: the true attributes (the counting rule).

Probes train on the first renders and the questions use the others. ``python -m
experiments.feature_geometry`` prints one row per feature (about a minute on a 2-core CPU).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import CLIPModel

from experiments.matching_saddle import OFFSETS, SIZES, draw_users, pick_context
from prefgen_kedro.models.clip import to_pixel_values
from prefgen_kedro.world.agent_world import render_set
from prefgen_kedro.world.vocabulary import attribute_matrix

SHIPPED_CLIP = Path(__file__).resolve().parents[1] / "data/06_models/foundation/conditioning_clip"
MLLM_RENDER_SEED = 606  # conf/base: foundation.renders.mllm
EVAL_KS = (1, 4, 8)


@torch.no_grad()
def vision_features(clip: CLIPModel, images: np.ndarray, batch_size: int = 500) -> torch.Tensor:
    """(renders, 2 × width): the last layer's CLS token and mean patch, as the MLLM reads them."""
    features = []
    for start in range(0, len(images), batch_size):
        pixels = to_pixel_values(images[start : start + batch_size], images.shape[1])
        hidden = clip.vision_model(pixel_values=pixels, output_hidden_states=True).hidden_states[-1]
        features.append(torch.cat([hidden[:, 0], hidden[:, 1:].mean(1)], dim=1))
    return torch.cat(features)


def sample_questions(
    rng: np.random.Generator, present: np.ndarray, ids: np.ndarray, n: int, k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``n`` questions over the renders ``ids`` (users as ``matching_saddle``'s): liked (n, k),
    disliked (n, k) and query (n,) render indices, and whether the user likes the query (n,)."""
    utility = (draw_users(rng, n) @ present[ids].T).round(6)
    liked, disliked, query, label, enough = pick_context(rng, utility, k)
    return ids[liked][enough], ids[disliked][enough], ids[query][enough], label[enough]


def similarity_rule_accuracy(features: np.ndarray, liked, disliked, query, label) -> float:
    """Accuracy of Σ liked ⟨f_q, f⟩ − Σ disliked ⟨f_q, f⟩ > 0; a tie counts half."""
    q = features[query][:, :, None]
    score = (features[liked] @ q)[..., 0].sum(1) - (features[disliked] @ q)[..., 0].sum(1)
    return float(np.mean(np.where(np.abs(score) < 1e-9, 0.5, (score > 0) == label)))


def _category_loss(logits: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    return sum(
        F.cross_entropy(logits[:, o : o + s], present[:, o : o + s].argmax(1))
        for o, s in zip(OFFSETS, SIZES, strict=True)
    )


def _category_softmax(logits: torch.Tensor) -> torch.Tensor:
    return torch.cat(
        [logits[:, o : o + s].softmax(1) for o, s in zip(OFFSETS, SIZES, strict=True)], dim=1
    )


def _fit(modules: list[torch.nn.Module], loss_of, n_train: int, steps: int, lr: float) -> None:
    parameters = [p for module in modules for p in module.parameters()]
    optimizer = torch.optim.Adam(parameters, lr=lr)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        batch = torch.randint(0, n_train, (512,), generator=generator)
        loss = loss_of(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def probe_features(
    features: torch.Tensor, present: np.ndarray, n_train: int, steps: int
) -> dict[str, np.ndarray]:
    """Every row's per-render features, probes fitted on the first ``n_train`` renders."""
    torch.manual_seed(0)
    x = (features - features[:n_train].mean(0)) / features[:n_train].std(0).clamp_min(1e-6)
    target = torch.as_tensor(present)
    ones = torch.ones(len(x), 1)
    design = torch.cat([x, ones], 1)
    centred = target[:n_train] - target[:n_train].mean(0)
    ridge = torch.linalg.solve(
        design[:n_train].T @ design[:n_train] + torch.eye(design.shape[1]),
        design[:n_train].T @ centred,
    )
    linear = torch.nn.Linear(x.shape[1], target.shape[1])
    _fit([linear], lambda b: _category_loss(linear(x[b]), target[b]), n_train, steps, 1e-2)
    groups, group_size = 16, 8
    to_codes = torch.nn.Linear(x.shape[1], groups * group_size)
    heads = torch.nn.Linear(groups * group_size, target.shape[1])

    def codes(inputs: torch.Tensor) -> torch.Tensor:
        return to_codes(inputs).view(len(inputs), groups, group_size).softmax(-1).flatten(1)

    _fit(
        [to_codes, heads],
        lambda b: _category_loss(heads(codes(x[b])), target[b]),
        n_train,
        2 * steps,
        3e-3,
    )
    with torch.no_grad():
        return {
            "cls_cosine": F.normalize(features[:, : features.shape[1] // 2], dim=1).numpy(),
            "linear_probe": (design @ ridge).numpy(),
            "category_softmax": _category_softmax(linear(x)).numpy(),
            "grouped_softmax": codes(x).numpy(),
            "attributes": present,
        }


def run(
    *,
    n_renders: int = 9000,
    n_train: int = 8000,
    questions: int = 3000,
    probe_steps: int = 1500,
    clip_dir: Path = SHIPPED_CLIP,
    seed: int = 0,
) -> dict[str, dict[int, float]]:
    """Each row's rule accuracy at each of ``EVAL_KS`` on questions over the held-out renders."""
    renders = render_set(n_renders, MLLM_RENDER_SEED, 32)
    present = attribute_matrix(renders.styles)
    clip = CLIPModel.from_pretrained(clip_dir, dtype=torch.float32).eval()
    rows = probe_features(vision_features(clip, renders.images), present, n_train, probe_steps)
    held_out = np.arange(n_train, n_renders)
    asked = {
        k: sample_questions(np.random.default_rng([seed, k]), present, held_out, questions, k)
        for k in EVAL_KS
    }
    return {
        name: {k: similarity_rule_accuracy(features, *asked[k]) for k in EVAL_KS}
        for name, features in rows.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for name, by_k in run(questions=args.questions, seed=args.seed).items():
        cells = " | ".join(f"K={k} {accuracy:.3f}" for k, accuracy in by_k.items())
        print(f"{name:<17} | {cells}", flush=True)


if __name__ == "__main__":
    main()
