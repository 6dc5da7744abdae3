"""Which part of the real MLLM's input keeps it at chance, on the symbolic stand-in.

``matching_saddle``'s ``matching_multi_query`` learns to compare (8 queries a context); the
real tiny MLLM, with the same initialisation, does not. This adds the real model's structure
to the symbolic one piece by piece (every row keeps 8 queries a context and the matching
initialisation, a 2-layer width-64 Llama, images as the sums of their attribute embeddings):

- ``text``: six learned text tokens before each group and each query ("I like these
  images:", ...), at positions that continue after the image slots, as the real prompt's;
- ``markers``: a marker token before each image, whose embedding is also the image's group
  tag (``shared``, as the real model's ``tag_image_groups``) or not (``own`` tags);
- ``patch``: a second token per image before its attribute token (the real model's mean
  patch: a learned projection of its attributes plus noise);
- ``answers``: each query's answer and an eos token in the sequence before the next query,
  as a multi-turn chat has them;
- ``vocab``: the answer read by a 1,024-way head (the language model's next token) instead of
  a two-way one; ``prior`` starts that head's bias at +12 for "Yes" and "No"; ``two_way``
  trains it on the two answers' logits only (a loss restricted to the answers);
- ``init``: the language model's and the tokens' ``initializer_range`` (the real model's 0.08);
- ``copies``: half the training queries copies of a context image of their side (the
  pretraining stages' ``copy_probability``; held-out queries never are).

``python -m experiments.real_structure [--steps 250]`` prints held-out accuracy at K = 1/4/8
for each row (250 steps of 128 contexts: 20-100 s each on a 2-core CPU).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from experiments.matching_saddle import (
    EVAL_KS,
    N_ATTRIBUTES,
    SIZES,
    clipped_step,
    sample_questions,
    two_layer_llama,
)

TEXT_TOKENS = 6  # a group's or a query's prompt text
QUERIES = 8
VOCABULARY = 1024
WIDTH = 64

# Each row: the structure added to the symbolic stand-in (see the module docstring).
CONDITIONS: dict[str, dict] = {
    "symbolic": {},
    "text": {"text": True},
    "markers_shared_tags": {"markers": "shared"},
    "markers_own_tags": {"markers": "own"},
    "text_markers_shared_tags": {"text": True, "markers": "shared"},
    "text_markers_own_tags": {"text": True, "markers": "own"},
    "text_markers_own_tags_patch": {"text": True, "markers": "own", "patch": True},
    "text_markers_own_tags_answers": {"text": True, "markers": "own", "answers": True},
    "text_markers_own_tags_init_0.08": {"text": True, "markers": "own", "init": 0.08},
    "text_markers_own_tags_vocab": {"text": True, "markers": "own", "vocab": True},
    "vocab": {"vocab": True},
    "vocab_prior": {"vocab": True, "prior": 12.0},
    "vocab_two_way": {"vocab": True, "two_way": True},
    "everything_shared_tags": {
        "text": True,
        "markers": "shared",
        "patch": True,
        "answers": True,
        "vocab": True,
        "init": 0.08,
    },
    "everything_own_tags_two_way": {
        "text": True,
        "markers": "own",
        "patch": True,
        "answers": True,
        "vocab": True,
        "two_way": True,
        "init": 0.08,
    },
}
# The same with half the training queries copies of a context image of their side (the
# pretraining stages' ``copy_probability``); held-out questions are never copies.
CONDITIONS["everything_own_tags_two_way_copies"] = {
    **CONDITIONS["everything_own_tags_two_way"],
    "copies": 0.5,
}


class StructuredJudge(torch.nn.Module):
    """``matching_saddle``'s judge with the real model's structure switched on by keyword."""

    def __init__(
        self,
        *,
        text: bool = False,
        markers: str | None = None,
        patch: bool = False,
        answers: bool = False,
        vocab: bool = False,
        prior: float = 0.0,
        init: float = 0.02,
        seed: int = 0,
    ) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.text, self.markers, self.patch, self.answers = text, markers, patch, answers
        self.attributes = torch.nn.Embedding(N_ATTRIBUTES, WIDTH)
        torch.nn.init.normal_(self.attributes.weight, std=1 / np.sqrt(len(SIZES)))
        self.attributes.weight.requires_grad_(False)  # a frozen "vision tower"
        # Words: the three group markers, each group's and the query's text, Yes, No, eos.
        self.words = torch.nn.Parameter(torch.randn(3 + 3 * TEXT_TOKENS + 3, WIDTH) * 0.02)
        if markers or text:
            torch.nn.init.normal_(self.words, std=init)  # token embeddings, as the real model's
        self.yes, self.no, self.eos = len(self.words) - 3, len(self.words) - 2, len(self.words) - 1
        self.tags = torch.nn.Parameter(torch.randn(3, WIDTH) * 0.02) if markers == "own" else None
        self.patch_projection = torch.nn.Linear(N_ATTRIBUTES, WIDTH) if patch else None
        self.llama = two_layer_llama(WIDTH, matching=True, initializer_range=init, max_positions=64)
        self.head = torch.nn.Linear(WIDTH, VOCABULARY if vocab else 2)
        if vocab:
            torch.nn.init.normal_(self.head.weight, std=init)
            if prior:
                with torch.no_grad():
                    self.head.bias.zero_()
                    self.head.bias[[self.yes, self.no]] = prior

    def _image_tokens(self, ids: np.ndarray, group: int) -> torch.Tensor:
        """(n, images, tokens an image, width) for images given as attribute ids (n, images, 5)."""
        features = self.attributes(torch.as_tensor(ids)).sum(-2)
        tag = self.words[group] if self.tags is None else self.tags[group]
        tokens = []
        if self.markers:
            tokens.append(self.words[group].expand_as(features))
        if self.patch_projection is not None:
            present = F.one_hot(torch.as_tensor(ids), N_ATTRIBUTES).float().sum(-2)
            tokens.append(self.patch_projection(present + 0.5 * torch.randn_like(present)) + tag)
        tokens.append(features + tag)
        return torch.stack(tokens, -2)

    def forward(self, liked, disliked, queries, labels) -> torch.Tensor:
        """Logits (n, queries, head size), each read at its query's last token; ``labels``
        (n, queries) are the earlier answers a chat shows (with ``answers``)."""
        n = len(liked)
        pieces: list[torch.Tensor] = []
        positions: list[int] = []
        read: list[int] = []
        slot = TEXT_TOKENS if self.text else 0  # where every image slot starts
        next_position = 0

        def add_text(group: int) -> None:
            nonlocal next_position
            if self.text:
                start = 3 + group * TEXT_TOKENS
                pieces.append(self.words[start : start + TEXT_TOKENS].expand(n, -1, -1))
                positions.extend(range(next_position, next_position + TEXT_TOKENS))
                next_position += TEXT_TOKENS

        def add_images(ids: np.ndarray, group: int) -> None:
            nonlocal next_position
            tokens = self._image_tokens(ids, group)
            images, per_image = tokens.shape[1:3]
            pieces.append(tokens.reshape(n, images * per_image, WIDTH))
            positions.extend(list(range(slot, slot + per_image)) * images)
            next_position = slot + per_image  # text continues after a slot's end

        add_text(0)
        add_images(liked, 0)
        add_text(1)
        add_images(disliked, 1)
        for q in range(queries.shape[1]):
            add_text(2)
            add_images(queries[:, q : q + 1], 2)
            read.append(sum(piece.shape[1] for piece in pieces) - 1)
            if self.answers and q < queries.shape[1] - 1:
                answer = torch.where(torch.as_tensor(labels[:, q]), self.yes, self.no)
                eos = self.words[self.eos].expand(n, -1)
                pieces.append(torch.stack([self.words[answer], eos], 1))
                positions.extend([next_position, next_position + 1])
                next_position += 2
        embeds = torch.cat(pieces, 1)
        position_ids = torch.tensor(positions)[None].expand(n, -1)
        hidden = self.llama(inputs_embeds=embeds, position_ids=position_ids).last_hidden_state
        return self.head(hidden[:, read])


def copy_queries(
    rng: np.random.Generator,
    liked: np.ndarray,
    disliked: np.ndarray,
    query: np.ndarray,
    label: np.ndarray,
    probability: float,
) -> np.ndarray:
    """``query`` (n, queries, 5) with each query, with ``probability``, replaced by a random
    context image of its label's side (so its label stays true)."""
    rows = np.arange(len(query))[:, None]
    pick = rng.integers(0, liked.shape[1], label.shape)
    same_side = np.where(label[..., None], liked[rows, pick], disliked[rows, pick])
    return np.where((rng.random(label.shape) < probability)[..., None], same_side, query)


def run(condition: str, *, steps: int, seed: int = 0) -> dict[str, float]:
    """Held-out accuracy (single queries) at each of ``EVAL_KS`` after ``steps`` steps."""
    settings = dict(CONDITIONS[condition])
    # How it trains, not what it is:
    two_way = settings.pop("two_way", False)
    copies = settings.pop("copies", 0.0)
    model = StructuredJudge(seed=seed, **settings)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3, weight_decay=0.0)
    rng = np.random.default_rng(seed)
    vocab = settings.get("vocab", False)
    started = time.perf_counter()
    for _ in range(steps):
        k = int(rng.integers(1, 9))
        liked, disliked, query, label = sample_questions(rng, 128, k, QUERIES)
        if copies:
            query = copy_queries(rng, liked, disliked, query, label, copies)
        logits = model(liked, disliked, query, label)
        target = torch.as_tensor(label.astype(int))
        if vocab and two_way:
            logits = logits[..., [model.no, model.yes]]
        elif vocab:
            target = torch.where(target == 1, model.yes, model.no)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))
        clipped_step(optimizer, trainable, loss)
    result: dict[str, float] = {"seconds": time.perf_counter() - started}
    with torch.no_grad():
        for k in EVAL_KS:
            liked, disliked, query, label = sample_questions(np.random.default_rng(999 + k), 500, k)
            logits = model(liked, disliked, query[:, None], label[:, None])[:, 0]
            if vocab:  # as the MLLM's judge: "Yes" against "No"
                logits = logits[:, [model.no, model.yes]]
            result[f"K={k}"] = float(np.mean((logits.argmax(1).numpy() == 1) == label))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", nargs="*", choices=list(CONDITIONS), help="rows to run")
    args = parser.parse_args()
    for condition in args.only or CONDITIONS:
        result = run(condition, steps=args.steps, seed=args.seed)
        cells = " | ".join(f"{key} {value:.3f}" for key, value in result.items() if "K=" in key)
        print(f"{condition:<34} | {result['seconds']:>5.0f} s | {cells}", flush=True)


if __name__ == "__main__":
    main()
