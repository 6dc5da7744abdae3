"""Why the tiny MLLM does not learn to compare images from scratch, on a symbolic stand-in.

Each image is one token: the sum of its five attribute embeddings (fixed, random) plus a
learned tag for its group (liked, disliked, query). A small Llama reads the liked images, the
disliked ones and the query, all at one position (so only content tells them apart), and a
linear head answers "does the user like the query?" for a fresh simulated user per sample
(4 liked and 4 disliked attributes, as the agent world's users), K liked and K disliked
images with K uniform in 1-8. Held-out questions are scored at K = 1, 4, 8 next to the
counting rule on the true attributes.

Four conditions (experiments/README.md):

- ``independent``: query and key projections drawn independently (the hub initialisation);
- ``matching``: each layer's key projection starts equal to its query projection, the answer
  read at the query's token;
- ``matching_text_readout``: the same, with one more token after the query where the answer
  is read (as a chat template's role word);
- ``matching_multi_query``: ``matching`` with 8 queries a context, each answered at its own
  token (the pretraining stages' ``queries``), so a step has 8 answers a context.

``python -m experiments.matching_saddle [--steps 2000] [--seed 0]`` prints one row per
condition (2,000 steps of 128 contexts: 33-120 s each on a 2-core CPU; ``--steps 250``
shows how soon each leaves chance).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaModel

from prefgen_kedro.world.vocabulary import CATEGORIES

SIZES = [len(values) for values in CATEGORIES.values()]
OFFSETS = np.cumsum([0, *SIZES[:-1]])
N_ATTRIBUTES = sum(SIZES)
POOL = 300  # candidate images drawn per question
EVAL_KS = (1, 4, 8)


def draw_users(rng: np.random.Generator, n: int) -> np.ndarray:
    """(n, 48) attribute weights of ``n`` fresh users: 4 liked and 4 disliked attributes,
    weights 0.5–1.5 (as the agent world's users), zero elsewhere."""
    taste = np.argsort(rng.random((n, N_ATTRIBUTES)), axis=1)[:, :8]
    weights = rng.uniform(0.5, 1.5, (n, 8)) * np.r_[np.ones(4), -np.ones(4)]
    utility_of = np.zeros((n, N_ATTRIBUTES))
    np.put_along_axis(utility_of, taste, weights, axis=1)
    return utility_of


def pick_context(
    rng: np.random.Generator, utility: np.ndarray, k: int, queries: int = 1
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """For each row of candidate ``utility`` (n, candidates): K random liked and K random
    disliked candidates, a query of either side, as column indices (n, k), (n, k), (n,);
    whether the query is liked (n,); and which rows had enough candidates a side. With
    ``queries`` > 1, that many queries (n, queries), each of either side, none in the context."""
    keys = rng.random(utility.shape)
    liked_order = np.argsort(np.where(utility > 0, keys, 2.0), axis=1)
    disliked_order = np.argsort(np.where(utility < 0, keys, 2.0), axis=1)
    enough = ((utility > 0).sum(1) >= k + queries) & ((utility < 0).sum(1) >= k + queries)
    label = rng.random((len(utility), queries)) < 0.5
    query = np.where(label, liked_order[:, k : k + queries], disliked_order[:, k : k + queries])
    if queries == 1:
        query, label = query[:, 0], label[:, 0]
    return liked_order[:, :k], disliked_order[:, :k], query, label, enough


def sample_questions(
    rng: np.random.Generator, n: int, k: int, queries: int = 1
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``n`` questions at context size ``k``: liked (n, k, 5), disliked (n, k, 5) and query
    (n, 5) attribute ids, and whether the user likes the query (n,); with ``queries`` > 1,
    that many queries a context: (n, queries, 5) and (n, queries)."""
    utility_of = draw_users(rng, n)
    images = OFFSETS + np.stack([rng.integers(0, s, (n, POOL)) for s in SIZES], axis=2)
    utility = np.take_along_axis(utility_of[:, None, :], images, axis=2).sum(axis=2).round(6)
    liked, disliked, query, label, enough = pick_context(rng, utility, k, queries)
    rows = np.arange(n)[:, None]
    liked, disliked = images[rows, liked], images[rows, disliked]
    query = images[rows, query] if queries > 1 else images[rows[:, 0], query]
    return liked[enough], disliked[enough], query[enough], label[enough]


def counting_rule_accuracy(liked, disliked, query, label) -> float:
    score = sum(
        (liked == query[:, None, [c]]).sum((1, 2)) - (disliked == query[:, None, [c]]).sum((1, 2))
        for c in range(len(SIZES))
    )
    return float(np.mean(np.where(score == 0, 0.5, (score > 0) == label)))


def two_layer_llama(
    width: int, *, matching: bool, initializer_range: float = 0.02, max_positions: int = 8
) -> LlamaModel:
    """The stand-in's language model: 2 layers, 4 heads; with ``matching`` each layer's key
    projection starts equal to its query projection (std 0.15: two identical tokens' logit
    ≈ 6 at width 64)."""
    config = LlamaConfig(
        vocab_size=8,
        hidden_size=width,
        intermediate_size=4 * width,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=max_positions,
        initializer_range=initializer_range,
    )
    llama = LlamaModel(config)
    if matching:
        with torch.no_grad():
            for layer in llama.layers:
                torch.nn.init.normal_(layer.self_attn.q_proj.weight, std=0.15)
                layer.self_attn.k_proj.weight.copy_(layer.self_attn.q_proj.weight)
    return llama


class SymbolicJudge(torch.nn.Module):
    def __init__(self, *, matching: bool, text_readout: bool, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        width = 64
        self.attributes = torch.nn.Embedding(N_ATTRIBUTES, width)
        torch.nn.init.normal_(self.attributes.weight, std=1 / np.sqrt(len(SIZES)))
        self.attributes.weight.requires_grad_(False)  # a frozen "vision tower"
        self.tags = torch.nn.Parameter(torch.randn(4, width) * 0.02)  # liked/disliked/query/read
        self.text_readout = text_readout
        self.llama = two_layer_llama(width, matching=matching)
        self.head = torch.nn.Linear(width, 2)

    def forward(self, liked, disliked, query) -> torch.Tensor:
        """Logits (n, 2) for queries (n, 5); for several queries a context (n, Q, 5), all
        after the context, (n, Q, 2), each read at its query's token."""
        several = np.ndim(query) == 3
        liked, disliked, queries = (
            self.attributes(torch.as_tensor(ids)).sum(-2) for ids in (liked, disliked, query)
        )
        queries = queries if several else queries[:, None]
        tokens = [liked + self.tags[0], disliked + self.tags[1], queries + self.tags[2]]
        if self.text_readout:
            tokens.append(self.tags[3].expand(len(queries), 1, -1))
        embeds = torch.cat(tokens, dim=1)
        positions = torch.zeros(embeds.shape[:2], dtype=torch.long)  # one slot for all images
        positions[:, -1] = int(self.text_readout)
        hidden = self.llama(inputs_embeds=embeds, position_ids=positions).last_hidden_state
        logits = self.head(hidden[:, -1 if self.text_readout else -queries.shape[1] :])
        return logits if several else logits[:, -1]


def clipped_step(optimizer: torch.optim.Optimizer, parameters: list, loss: torch.Tensor) -> None:
    """One optimiser step on ``loss``, the gradient's norm clipped to 1."""
    optimizer.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(parameters, 1.0)
    optimizer.step()


def run(condition: str, *, steps: int, seed: int) -> dict[str, float]:
    """Held-out accuracy at each of ``EVAL_KS`` after ``steps`` steps of training."""
    model = SymbolicJudge(
        matching=condition != "independent",
        text_readout=condition == "matching_text_readout",
        seed=seed,
    )
    queries = 8 if condition == "matching_multi_query" else 1
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3, weight_decay=0.0)
    rng = np.random.default_rng(seed)
    started = time.perf_counter()
    for _ in range(steps):
        liked, disliked, query, label = sample_questions(rng, 128, int(rng.integers(1, 9)), queries)
        logits = model(liked, disliked, query).reshape(-1, 2)
        loss = F.cross_entropy(logits, torch.as_tensor(label.astype(int)).reshape(-1))
        clipped_step(optimizer, trainable, loss)
    result: dict[str, float] = {"seconds": time.perf_counter() - started}
    with torch.no_grad():
        for k in EVAL_KS:
            liked, disliked, query, label = sample_questions(
                np.random.default_rng(999 + k), 1000, k
            )
            answer = model(liked, disliked, query).argmax(1).numpy() == 1
            result[f"K={k}"] = float(np.mean(answer == label))
            result[f"rule K={k}"] = counting_rule_accuracy(liked, disliked, query, label)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for condition in ("independent", "matching", "matching_text_readout", "matching_multi_query"):
        result = run(condition, steps=args.steps, seed=args.seed)
        cells = " | ".join(f"{key} {value:.3f}" for key, value in result.items() if "K=" in key)
        print(f"{condition:<22} | {result['seconds']:>5.0f} s | {cells}", flush=True)


if __name__ == "__main__":
    main()
