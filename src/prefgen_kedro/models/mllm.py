"""The preference MLLM: building the tiny one, batching VQA samples, the loss, LoRA, inference.

Every MLLM is loaded with ``AutoModelForImageTextToText`` + ``AutoProcessor`` from a directory,
so a hub checkpoint (``Qwen/Qwen2-VL-2B-Instruct`` in ``gpu``) and the agent world's tiny model
take the same road; prompts go through the processor's chat template, images through its
image processor, so nothing here knows which model it drives.

The tiny model is LLaVA: the conditioning CLIP's vision tower, a small Llama, and one token
per image, its *attribute token* (``PooledLlavaForConditionalGeneration``): one softmax per
attribute category read out of the frozen vision tower's CLS token and mean patch, each value
with a learned embedding. It is registered with ``AutoConfig`` and
``AutoModelForImageTextToText`` when this module is imported (``model_type`` =
``prefgen_pooled_llava``), so ``from_pretrained`` works on a saved one without
``trust_remote_code``. Its processor is a stock ``LlavaProcessor`` that writes one image token
per image (the CLS token's place).

Three things help a model that learns comparison from nothing (the tiny one); how they were
found is in experiments/README.md:

- Slot-aligned positions (``slot_positions``): every image slot (its group marker and its
  image tokens) gets the same position ids, and text continues after a slot's end. Any two
  images are then at distance 0, so attention compares them by content alone, and the
  positions do not depend on K. Plain ``position_ids``, for models with 1-D positions (not
  Qwen2-VL's 3-D M-RoPE; leave it off there).
- Group tags: each image token also carries a tag of the marker before it (a row of a table
  of its own), so which group an image is in is part of every image token.
- Matching attention (``build_tiny_mllm(matching_attention_std=...)``): every layer's key
  projection starts equal to its query projection, an orthogonal matrix per head, so
  attention starts as the count of attribute values two images share.

Public API:

- ``PooledLlavaConfig``, ``PooledLlavaForConditionalGeneration`` — the tiny model's classes.
- ``train_tokenizer``, ``build_tiny_processor``, ``build_tiny_mllm`` — build the tiny one.
- ``PreferenceContext``, ``chat_text``, ``encode_chat``, ``encode_vqa``, ``collate_vqa``,
  ``VqaDataset``, ``append_answer``, ``answer_token_sequence`` — model inputs, with labels
  only on the answer tokens and the eos; ``select_vision_features`` — what the projector
  reads for a set of pictures, to stand in for their pixels; ``reads_vision_features``,
  ``VisionFeatureCache``, ``BlankLayouts``, ``FeatureChats`` — the same inputs for a model
  that reads them, each picture through the frozen tower once and each layout encoded once.
- ``vqa_loss``, ``answer_loss`` — ``compute_loss`` for ``prefgen_kedro.training.train`` (the
  LM loss, or "Yes"/"No" on those two logits alone, optionally weighed apart from the
  reason: ``AnswerLoss``); ``answer_loss_terms`` (the same from logits),
  ``answer_loss_settings``, ``answer_token_ids``.
- ``add_lora`` — peft LoRA (+ gradient checkpointing) for the hub model; ``vision_encoder``
  and ``frozen_parameters`` (what LLaVA's recipe keeps frozen).
- ``MllmPreferenceModel`` — ``hidden_states``, ``judge`` (P("Yes")), ``answer``.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from peft import LoraConfig, PeftModel, get_peft_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch import nn
from torch.utils.data import Dataset
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    CLIPImageProcessor,
    CLIPModel,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaModel,
    LlavaProcessor,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    ProcessorMixin,
)
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

from prefgen_kedro.console import progress
from prefgen_kedro.models.clip import CLIP_MEAN, CLIP_STD, to_pixel_values
from prefgen_kedro.models.vqa import (
    IMAGE_PLACEHOLDER,
    MARKERS,
    NO,
    QUESTION,
    YES,
    VqaExample,
    build_prompt,
    query_prompt,
)

IGNORE_INDEX = -100  # the label transformers' causal LM loss skips
PAD_TOKEN, BOS_TOKEN, EOS_TOKEN = "<pad>", "<s>", "</s>"
# Keys with one entry per token (from the processor or added here): padded, not concatenated.
_TOKEN_KEYS = frozenset(
    {"input_ids", "attention_mask", "labels", "position_ids", "token_type_ids", "mm_token_type_ids"}
)
_PAD_VALUES = {"labels": IGNORE_INDEX}
# Role words added to the tokenizer's corpus so each is few tokens ("ASSISTANT:" is no longer
# in the chat template, but the shipped tokenizer was trained with it).
_CHAT_ROLES = ("USER:", "ASSISTANT:")


def tiny_chat_template() -> str:
    """The tiny processor's chat template: "USER: <prompt>" and the answer right after the
    prompt's last token, assistant turns ending with the eos token. A preference prompt's
    answer is thus read at the query's last image token, where attention compares the query
    with the context (a role word after it would have to fetch that comparison with a second
    attention hop, which a symbolic prototype of the tiny model did not find)."""
    return (
        "{% for message in messages %}"
        "{{ 'USER: ' if message['role'] == 'user' else '' }}"
        "{% if message['content'] is string %}{{ message['content'] }}"
        "{% else %}{% for part in message['content'] %}"
        "{{ '" + IMAGE_PLACEHOLDER + "' if part['type'] == 'image' else part['text'] }}"
        "{% endfor %}{% endif %}"
        "{{ eos_token if message['role'] == 'assistant' else '' }}"
        "{% endfor %}"
    )


# ---- the tiny model: LLaVA with one attribute token an image ---------------------------


@strict
class PooledLlavaConfig(LlavaConfig):
    """``LlavaConfig`` plus the attribute token's categories and the group markers' ids.
    (A saved config may still hold ``image_token_grid``, ``tag_image_groups`` and
    ``cls_token_last``, options of earlier versions: they are ignored.)"""

    model_type = "prefgen_pooled_llava"
    # Sizes of the attribute categories an image's attribute token reads (``_PooledProjector``).
    attribute_categories: list[int] | None = None
    # Marker token ids whose images get a tag of their own (``PooledLlavaModel``).
    group_tag_markers: list[int] | None = None


class _PooledProjector(LlavaMultiModalProjector):
    """Maps an image's vision features (CLS token first) to its one token, the *attribute
    token*: a linear read-out of the CLS token and the mean patch to one softmax per category
    (a render has one colour, one pattern, one tone...), each value with a learned embedding,
    the token being their probability-weighted sum. Its read-out is fitted to the renders'
    attributes (``fit_attribute_readout``), a structured form of LLaVA's caption alignment,
    and kept frozen with the vision tower (``frozen_parameters``): compared by similarity,
    such features answer preference questions nearly as well as the true attributes, raw
    CLIP features far worse (experiments/README.md, "What the vision tower allows").
    LLaVA's two projection layers are kept (the checkpoint holds them) but unused.
    """

    def __init__(self, config: PooledLlavaConfig) -> None:
        super().__init__(config)
        self.categories = list(config.attribute_categories or ())
        if not self.categories:
            raise ValueError("the attribute token needs attribute_categories")
        if config.vision_feature_select_strategy != "full":
            raise ValueError("the attribute token reads the CLS token: keep it ('full')")
        width = config.vision_config.hidden_size
        self.attribute_readout = nn.Linear(2 * width, sum(self.categories))
        self.attribute_embeddings = nn.Linear(
            sum(self.categories), config.text_config.hidden_size, bias=False
        )

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.attribute_token(image_features)[:, None]

    @staticmethod
    def readout_inputs(image_features: torch.Tensor) -> torch.Tensor:
        """(n, 2 × width): the CLS token and the mean patch, what the read-out reads."""
        return torch.cat([image_features[:, 0], image_features[:, 1:].mean(1)], dim=1)

    def attribute_probabilities(self, image_features: torch.Tensor) -> list[torch.Tensor]:
        """One (n, category size) distribution per category."""
        logits = self.attribute_readout(self.readout_inputs(image_features))
        return [part.softmax(-1) for part in logits.split(self.categories, dim=-1)]

    def attribute_token(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.attribute_embeddings(
            torch.cat(self.attribute_probabilities(image_features), -1)
        )


class PooledLlavaModel(LlavaModel):
    """``LlavaModel`` with the attribute-token projector and image tokens that carry a tag
    of the token right before their run (the group marker): a row of ``group_tags``, a table
    of its own. (A tag shared with the marker's input embedding, where the RMS norm scales it
    up to a whole token, had its gradient swamped by that use, and a symbolic stand-in that
    shared them stayed at chance: experiments/README.md.)
    """

    config_class = PooledLlavaConfig

    def __init__(self, config: PooledLlavaConfig) -> None:
        super().__init__(config)
        self.multi_modal_projector = _PooledProjector(config)
        if not config.group_tag_markers:
            raise ValueError("group tags need group_tag_markers")
        self.group_tags = nn.Embedding(
            len(config.group_tag_markers), config.text_config.hidden_size
        )
        self.post_init()

    def _group_tags(self, markers: torch.Tensor) -> torch.Tensor:
        is_marker = markers[:, None] == torch.tensor(
            self.config.group_tag_markers, device=markers.device
        )
        if not is_marker.any(1).all():
            unknown = sorted(set(markers[~is_marker.any(1)].tolist()))
            raise ValueError(f"images after tokens {unknown}, not group markers, have no tag")
        return self.group_tags(is_marker.int().argmax(1))

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        vision_features: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        """``LlavaModel.forward``; ``vision_features`` (``select_vision_features`` of the
        images, e.g. cached once for a pool of renders) may stand in for ``pixel_values``:
        the frozen vision tower is then skipped, the projector and the rest run as usual."""
        if pixel_values is not None and vision_features is not None:
            raise ValueError("give pixel_values or vision_features, not both")
        if pixel_values is None and vision_features is None:
            return super().forward(input_ids=input_ids, **kwargs)
        if input_ids is None:
            raise ValueError("images need input_ids to find their image tokens")
        if kwargs.pop("mm_encoder_outputs", None) is not None:
            raise ValueError("give images or mm_encoder_outputs, not both")
        if vision_features is None:
            image_outputs = self.get_image_features(
                pixel_values=pixel_values,
                vision_feature_layer=kwargs.get("vision_feature_layer"),
                vision_feature_select_strategy=kwargs.get("vision_feature_select_strategy"),
                return_dict=True,
            )
        else:
            projected = self.multi_modal_projector(vision_features)
            image_outputs = BaseModelOutputWithPooling(pooler_output=list(projected))
        # A segment embedding, as BERT's: without it a group is only known to an image
        # token through an attention hop to its marker, and the tiny model never found
        # that hop.
        is_image = input_ids == self.config.image_token_id
        before = F.pad(input_ids[:, :-1], (1, 0), value=self.config.image_token_id)
        run_starts = is_image & (before != self.config.image_token_id)
        tags = self._group_tags(before[run_starts])  # one per image, in order
        image_outputs.pooler_output = [
            features + tag for features, tag in zip(image_outputs.pooler_output, tags, strict=True)
        ]
        return super().forward(
            input_ids=input_ids, mm_encoder_outputs={"image": image_outputs}, **kwargs
        )


class PooledLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    """``LlavaForConditionalGeneration`` whose images cost one (attribute) token each."""

    config_class = PooledLlavaConfig

    def __init__(self, config: PooledLlavaConfig) -> None:
        super().__init__(config)
        self.model = PooledLlavaModel(config)
        self.post_init()


AutoConfig.register(PooledLlavaConfig.model_type, PooledLlavaConfig, exist_ok=True)
AutoModelForImageTextToText.register(
    PooledLlavaConfig, PooledLlavaForConditionalGeneration, exist_ok=True
)


def train_tokenizer(
    corpus: Iterable[str], *, vocab_size: int, model_max_length: int = 2048
) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on ``corpus``, with pad/bos/eos, the image token and the
    group markers as special (single) tokens; "Yes" and "No" must come out as one token each,
    since ``judge`` reads their next-token probabilities."""
    specials = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, IMAGE_PLACEHOLDER, *MARKERS]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    corpus = list(corpus)
    backend.train_from_iterator(
        # The chat roles are in every sample: as frequent as the corpus's lines, so merged.
        [*corpus, *_CHAT_ROLES * max(1, len(corpus) // len(_CHAT_ROLES))],
        trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        extra_special_tokens={"image_token": IMAGE_PLACEHOLDER},
        additional_special_tokens=list(MARKERS),
        model_max_length=model_max_length,
    )
    for word in (YES, NO):
        if len(tokenizer(word, add_special_tokens=False).input_ids) != 1:
            raise ValueError(f"{word!r} is not one token; raise vocab_size or add it to the corpus")
    return tokenizer


def build_tiny_processor(tokenizer: PreTrainedTokenizerBase, *, image_size: int) -> LlavaProcessor:
    """A ``LlavaProcessor`` for ``image_size`` pictures (normalised as CLIP, never resized or
    cropped) writing one image token each (the CLS token's place, where the model puts the
    attribute token), with the tiny chat template (``tiny_chat_template``)."""
    image_processor = CLIPImageProcessor(
        do_resize=False,
        do_center_crop=False,
        size={"height": image_size, "width": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        # A patch larger than the image counts no patches (LlavaProcessor floors): the one
        # additional token (LLaVA's CLS, kept by "full") is the image's only one.
        patch_size=2 * image_size,
        vision_feature_select_strategy="full",
        num_additional_image_tokens=1,
        image_token=IMAGE_PLACEHOLDER,
        chat_template=tiny_chat_template(),
    )


def build_tiny_mllm(
    tokenizer: PreTrainedTokenizerBase,
    *,
    text_width: int,
    text_layers: int,
    text_heads: int,
    max_positions: int,
    seed: int,
    attribute_categories: Sequence[int],
    matching_attention_std: float,
    vision_config: Mapping[str, Any] | None = None,
    vision_from: CLIPModel | None = None,
    vision_feature_layer: int = -1,
    initializer_range: float = 0.02,
    text_head_dim: int | None = None,
) -> PooledLlavaForConditionalGeneration:
    """The tiny LLaVA, randomly initialised with ``seed``.

    The vision tower is either a fresh CLIP vision transformer of ``vision_config``
    (``image_size``, ``patch_size``, ``hidden_size``, ...) or a copy of ``vision_from``'s
    (the conditioning CLIP: its config and weights), read at ``vision_feature_layer``. Each
    image is one attribute token over ``attribute_categories`` (each category's number of
    values; fit its read-out with ``fit_attribute_readout`` before training) carrying its
    group's tag. The Llama has ``text_layers`` layers of width ``text_width`` (MLP 4× wider),
    heads of ``text_head_dim`` (default ``text_width / text_heads``) and the tokenizer's
    vocabulary; ``initializer_range`` is the std of its and the projector's initial weights.

    Every layer's key projection starts equal to its query projection, each head's block a
    scaled orthogonal matrix with entries of ``matching_attention_std``, and the attribute
    values' embeddings start orthogonal: with heads as wide as the model, two confident
    image tokens then start with a logit proportional to the number of attribute values they
    share, the counting rule's kernel. Why each choice: experiments/README.md.
    """
    if (vision_config is None) == (vision_from is None):
        raise ValueError("give exactly one of vision_config and vision_from")
    if matching_attention_std <= 0:
        raise ValueError("matching_attention_std must be > 0")
    head_dim = text_head_dim or text_width // text_heads
    vision = (
        vision_from.config.vision_config.to_dict()
        if vision_from is not None
        else {"model_type": "clip_vision_model", **vision_config}
    )
    vision.pop("dtype", None)  # a half-precision source must not make this model half too
    config = PooledLlavaConfig(
        vision_config=vision,
        text_config={
            "model_type": "llama",
            "vocab_size": len(tokenizer),
            "hidden_size": text_width,
            "intermediate_size": 4 * text_width,
            "num_hidden_layers": text_layers,
            "num_attention_heads": text_heads,
            "num_key_value_heads": text_heads,
            "head_dim": head_dim,
            "max_position_embeddings": max_positions,
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "initializer_range": initializer_range,
        },
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER),
        image_seq_length=1,
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy="full",
        attribute_categories=list(attribute_categories),
        group_tag_markers=sorted(_marker_ids(tokenizer)),
    )
    torch.manual_seed(seed)
    model = PooledLlavaForConditionalGeneration(config)
    if vision_from is not None:
        model.model.vision_tower.load_state_dict(vision_from.vision_model.state_dict())
    # Small beside the image features, as the symbolic stand-in's tags that learned.
    nn.init.normal_(model.model.group_tags.weight, std=0.02)
    embeddings = model.model.multi_modal_projector.attribute_embeddings.weight
    _orthogonal_with_std(embeddings, len(attribute_categories) ** -0.5)  # a column a value
    _tie_query_key_projections(model.model.language_model, matching_attention_std)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


@torch.no_grad()
def _tie_query_key_projections(language_model: nn.Module, std: float) -> None:
    """Each layer's q and k projections set to one draw: each head's block
    ``_orthogonal_with_std``, so q·k is a multiple of the dot product of the two tokens (for
    a head narrower than the model, of a projection's), largest for a token like the
    attending one."""
    for layer in language_model.layers:
        attention = layer.self_attn  # as many key/value heads as heads (build_tiny_mllm)
        for block in attention.q_proj.weight.split(attention.head_dim):
            _orthogonal_with_std(block, std)
        attention.k_proj.weight.copy_(attention.q_proj.weight)


@torch.no_grad()
def _orthogonal_with_std(weight: torch.Tensor, std: float) -> None:
    """``weight`` (rows, columns) set to a (semi-)orthogonal matrix scaled to entries of
    ``std``: orthogonal columns where it has at least as many rows, orthogonal rows where not."""
    nn.init.orthogonal_(weight, gain=std * max(weight.shape) ** 0.5)


# ---- model inputs ------------------------------------------------------------------------


@dataclass(frozen=True)
class PreferenceContext:
    """A user's context as pictures: uint8 (H, W, 3) arrays, liked and disliked."""

    liked: Sequence[np.ndarray]
    disliked: Sequence[np.ndarray]


def chat_text(
    processor: ProcessorMixin, prompt: str, history: Sequence[tuple[str, str]] = ()
) -> str:
    """``prompt`` (with ``IMAGE_PLACEHOLDER``s) as a user turn in the processor's chat
    template, after ``history``'s answered (prompt, answer) turns, ending with the generation
    prompt: the answer's first token comes next."""
    messages = []
    for turn_prompt, turn_answer in history:
        messages.append({"role": "user", "content": _content(turn_prompt)})
        messages.append({"role": "assistant", "content": turn_answer})
    messages.append({"role": "user", "content": _content(prompt)})
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _content(prompt: str) -> list[dict[str, str]]:
    content: list[dict[str, str]] = []
    for i, piece in enumerate(prompt.split(IMAGE_PLACEHOLDER)):
        if i:
            content.append({"type": "image"})
        if piece:
            content.append({"type": "text", "text": piece})
    return content


def encode_chat(
    processor: ProcessorMixin,
    prompt: str,
    images: Sequence[np.ndarray],
    answer: str | None = None,
    *,
    slot_positions: bool = False,
    follow_ups: Sequence[tuple[str, Sequence[np.ndarray], str]] = (),
) -> dict[str, torch.Tensor]:
    """One sample's model inputs (no batch dimension on per-token tensors).

    With ``answer``, its tokens and the eos follow the prompt and ``labels`` carry them,
    every prompt token being ``IGNORE_INDEX``. ``follow_ups`` are further user turns
    (prompt, its images, answer), each answered and labelled the same way, in one sequence:
    the model answers several questions about one context in one pass. With
    ``slot_positions``, ``position_ids`` are slot-aligned (see the module docstring).
    """
    if follow_ups and answer is None:
        raise ValueError("follow-up turns need the first turn's answer")
    tokenizer = processor.tokenizer
    turns = [(prompt, images, answer), *follow_ups]
    pieces = []
    history: list[tuple[str, str]] = []
    rendered = ""  # the conversation's text so far, answers and eos included
    for turn_prompt, turn_images, turn_answer in turns:
        text = chat_text(processor, turn_prompt, history)
        if not text.startswith(rendered):
            raise ValueError("the chat template renders earlier turns differently in context")
        pieces.append(
            _encode_turn(
                processor, text[len(rendered) :], turn_images, turn_answer, first=not pieces
            )
        )
        if turn_answer is not None:
            history.append((turn_prompt, turn_answer))
            rendered = text + turn_answer + tokenizer.eos_token
    item = {key: torch.cat([piece[key] for piece in pieces]) for key in pieces[0]}
    if slot_positions:
        item["position_ids"] = slot_position_ids(
            item["input_ids"],
            image_token_id=processor.image_token_id,
            marker_ids=_marker_ids(tokenizer),
            n_images=sum(len(turn_images) for _, turn_images, _ in turns),
        )
    return item


def _encode_turn(
    processor: ProcessorMixin,
    text: str,
    images: Sequence[np.ndarray],
    answer: str | None,
    *,
    first: bool,
) -> dict[str, torch.Tensor]:
    """``text``'s model inputs (per-image tensors stacked on dim 0), then ``answer``'s tokens
    and the eos, the only labelled ones. Only the ``first`` turn gets the tokenizer's special
    tokens (a bos, where it adds one)."""
    tokenizer = processor.tokenizer
    encoded = processor(
        text=text, images=list(images), return_tensors="pt", add_special_tokens=first
    )
    item = {
        key: value[0] if key in _TOKEN_KEYS else value
        for key, value in encoded.items()
        if isinstance(value, torch.Tensor)
    }
    if answer is not None:
        item = append_answer(item, answer_token_sequence(tokenizer, answer))
    return item


def answer_token_sequence(tokenizer: PreTrainedTokenizerBase, answer: str) -> torch.Tensor:
    """``answer``'s token ids and the eos: what an assistant turn holds."""
    return torch.tensor(
        [*tokenizer(answer, add_special_tokens=False).input_ids, tokenizer.eos_token_id]
    )


def append_answer(item: Mapping[str, torch.Tensor], answer_ids: torch.Tensor) -> dict:
    """A prompt's inputs followed by ``answer_ids``, the only labelled tokens (the prompt's
    are ``IGNORE_INDEX``); position ids, where the prompt has them, run on after its last."""
    prompt_length = len(item["input_ids"])
    # Answer tokens are attended text tokens (token type 0 where the processor has types).
    appended = {"input_ids": answer_ids, "attention_mask": torch.ones_like(answer_ids)}
    if "position_ids" in item:
        last = int(item["position_ids"][-1])
        appended["position_ids"] = torch.arange(last + 1, last + 1 + len(answer_ids))
    extended = dict(item)
    for key in _TOKEN_KEYS & item.keys() - {"labels"}:
        extended[key] = torch.cat([item[key], appended.get(key, torch.zeros_like(answer_ids))])
    extended["labels"] = torch.cat([torch.full((prompt_length,), IGNORE_INDEX), answer_ids])
    return extended


def encode_vqa(
    processor: ProcessorMixin,
    context: PreferenceContext,
    query: np.ndarray | None,
    answer: str | None = None,
    *,
    slot_positions: bool = False,
    question: str = QUESTION,
    follow_ups: Sequence[tuple[str, Sequence[np.ndarray], str]] = (),
) -> dict[str, torch.Tensor]:
    """``encode_chat`` of the VQA prompt: liked, disliked, then (if given) the query image
    and ``question`` (without a query, a ``question`` other than the default ends the prompt);
    ``follow_ups`` as ``encode_chat``'s."""
    images = [*context.liked, *context.disliked, *([] if query is None else [query])]
    prompt = build_prompt(
        len(context.liked), len(context.disliked), with_query=query is not None, question=question
    )
    return encode_chat(
        processor, prompt, images, answer, slot_positions=slot_positions, follow_ups=follow_ups
    )


def slot_position_ids(
    input_ids: torch.Tensor, *, image_token_id: int, marker_ids: Collection[int], n_images: int
) -> torch.Tensor:
    """Position ids where every image slot shares one range (see the module docstring).

    A slot is a run of image tokens plus the marker tokens right before it; the first slot
    starts where the text has got to, every later slot restarts there, and whatever follows
    a slot continues from its end.
    """
    ids = input_ids.tolist()
    positions: list[int] = []
    slot_start: int | None = None
    slots = 0
    position = 0
    i = 0
    while i < len(ids):
        start = i
        while i < len(ids) and ids[i] in marker_ids:
            i += 1
        if i < len(ids) and ids[i] == image_token_id:
            while i < len(ids) and ids[i] == image_token_id:
                i += 1
            slot_start = position if slot_start is None else slot_start
            positions.extend(range(slot_start, slot_start + i - start))
            position = slot_start + i - start
            slots += 1
        else:
            # Markers not followed by an image, or plain text: positions run on.
            i = max(i, start + 1)
            positions.extend(range(position, position + i - start))
            position += i - start
    if slots != n_images:
        raise ValueError(
            f"found {slots} image-token runs for {n_images} images: slot positions need "
            "a non-image token between two images (the group markers)"
        )
    return torch.tensor(positions)


def collate_vqa(
    items: Sequence[Mapping[str, torch.Tensor]],
    *,
    pad_token_id: int,
    padding_side: Literal["left", "right"] = "right",
) -> dict[str, torch.Tensor]:
    """Pad per-token tensors to the longest sample (labels with ``IGNORE_INDEX``, input ids
    with ``pad_token_id``, the rest with 0) and concatenate per-image ones (pixel values)."""
    longest = max(len(item["input_ids"]) for item in items)
    batch = {}
    for key in items[0]:
        if key not in _TOKEN_KEYS:
            batch[key] = torch.cat([item[key] for item in items])
            continue
        value = pad_token_id if key == "input_ids" else _PAD_VALUES.get(key, 0)
        rows = []
        for item in items:
            padding = torch.full((longest - len(item[key]),), value, dtype=item[key].dtype)
            parts = (padding, item[key]) if padding_side == "left" else (item[key], padding)
            rows.append(torch.cat(parts))
        batch[key] = torch.stack(rows)
    return batch


def _marker_ids(tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """The group markers that are single tokens of ``tokenizer`` (all of them in the tiny one)."""
    vocabulary = tokenizer.get_vocab()
    return {vocabulary[marker] for marker in MARKERS if marker in vocabulary}


class VqaDataset(Dataset):
    """``VqaExample``s as training samples, one chat per context: an example with ``turn`` 0
    and the follow-ups after it, each answered before the next is asked. ``collate`` is the
    trainer's ``collate_fn``. With ``features_from`` (the trained model, when it
    ``reads_vision_features``), samples carry the pictures' features from its frozen tower
    for their pixels (``FeatureChats``): before the first sample, every picture the chats
    show goes through the tower in one fixed order, so a picture's features never depend on
    which sample asked for it first (a resumed run would otherwise compute some in other
    batches, a rounding apart, and train other weights)."""

    _FEATURE_BATCH = 500

    def __init__(
        self,
        examples: Sequence[VqaExample],
        pictures: Mapping[str, np.ndarray],
        processor: ProcessorMixin,
        *,
        slot_positions: bool = False,
        features_from: PreTrainedModel | None = None,
    ) -> None:
        self.chats: list[list[VqaExample]] = []
        for index, example in enumerate(examples):
            if example.turn == 0:
                self.chats.append([example])
                continue
            opening = self.chats[-1][0] if self.chats else None
            if opening is None or (opening.user_id, opening.liked, opening.disliked) != (
                example.user_id,
                example.liked,
                example.disliked,
            ):
                raise ValueError(
                    f"VQA example {index} (user {example.user_id}, turn {example.turn}) is a "
                    "follow-up but does not share the context of the example opening its chat"
                )
            self.chats[-1].append(example)
        self.pictures = pictures
        self.processor = processor
        self.slot_positions = slot_positions
        self._feature_chats = (
            None
            if features_from is None
            else FeatureChats(
                processor, VisionFeatureCache(features_from), slot_positions=slot_positions
            )
        )

    def __len__(self) -> int:
        return len(self.chats)

    def _compute_vision_features(self, features: VisionFeatureCache) -> None:
        shown = sorted(
            {
                image_id
                for chat in self.chats
                for example in chat
                for image_id in (*example.liked, *example.disliked, example.query)
            }
        )
        for start in range(0, len(shown), self._FEATURE_BATCH):
            features([self.pictures[i] for i in shown[start : start + self._FEATURE_BATCH]])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        example, *follow_ups = self.chats[index]
        context = PreferenceContext(
            liked=[self.pictures[i] for i in example.liked],
            disliked=[self.pictures[i] for i in example.disliked],
        )
        query = self.pictures[example.query]
        asked = [(query_prompt(), [self.pictures[e.query]], e.answer) for e in follow_ups]
        if self._feature_chats is not None:
            if not len(self._feature_chats.features):
                self._compute_vision_features(self._feature_chats.features)
            return self._feature_chats.encode(context, query, example.answer, follow_ups=asked)
        return encode_vqa(
            self.processor,
            context,
            query,
            example.answer,
            slot_positions=self.slot_positions,
            follow_ups=asked,
        )

    def collate(self, items: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return collate_vqa(items, pad_token_id=self.processor.tokenizer.pad_token_id)


# How an answer is scored: the LM loss on every answer token, or "yes_no" / "yes_no_balanced"
# (``vqa_loss``).
AnswerLoss = Literal["language_model", "yes_no", "yes_no_balanced"]


def answer_token_ids(tokenizer: PreTrainedTokenizerBase) -> tuple[int, int]:
    """The first tokens of "Yes" and "No", which must differ."""
    yes_id, no_id = (tokenizer(word, add_special_tokens=False).input_ids[0] for word in (YES, NO))
    if yes_id == no_id:
        raise ValueError(f"{YES!r} and {NO!r} start with the same token")
    return yes_id, no_id


def vqa_loss(
    model: nn.Module,
    batch: Mapping[str, torch.Tensor],
    *,
    yes_no_ids: tuple[int, int] | None = None,
    balanced: bool = False,
) -> tuple[torch.Tensor, dict[str, float]]:
    """``answer_loss_terms`` of ``model``'s logits for ``batch`` (its ``labels`` mark the
    answer tokens, the only scored ones)."""
    output = model(**{key: value for key, value in batch.items() if key != "labels"})
    return answer_loss_terms(
        output.logits, batch["labels"], yes_no_ids=yes_no_ids, balanced=balanced
    )


def answer_loss_terms(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    yes_no_ids: tuple[int, int] | None = None,
    balanced: bool = False,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The LM loss on the answer tokens (labels other than ``IGNORE_INDEX``), and how often
    each answer's first token is the model's top prediction.

    With ``yes_no_ids`` (``answer_token_ids``) every answer's first token that is "Yes" or
    "No" is scored on those two logits alone (a two-way cross-entropy, as the judge reads
    them), the other answer tokens by the LM loss, averaged over all; the accuracy is then
    "Yes" against "No". A 1,024-way answer kept a symbolic stand-in at chance where the
    two-way one learned (experiments/README.md). With ``balanced`` the two parts are averaged
    apart and added, so the decision weighs as much as its reason however many tokens the
    reason has (averaged together, a 7-token reason is 7/8 of an answer's gradient).
    """
    logits, targets = logits[:, :-1].float(), labels[:, 1:]
    answered = targets != IGNORE_INDEX
    starts = answered & (labels[:, :-1] == IGNORE_INDEX)
    if not answered.any():  # e.g. a batch of questions only an auxiliary head scores
        return logits.sum() * 0.0, {}
    if yes_no_ids is None:
        loss = F.cross_entropy(logits[answered], targets[answered])
        accuracy = (logits[starts].argmax(dim=-1) == targets[starts]).float().mean()
        return loss, {"first_token_accuracy": float(accuracy)}
    yes_id, no_id = yes_no_ids
    first = starts & ((targets == yes_id) | (targets == no_id))
    rest = answered & ~first
    pair = logits[first][:, [no_id, yes_id]]
    said_yes = (targets[first] == yes_id).long()
    decision = F.cross_entropy(pair, said_yes, reduction="sum")
    wording = F.cross_entropy(logits[rest], targets[rest], reduction="sum")
    if balanced:
        loss = decision / first.sum().clamp_min(1) + wording / rest.sum().clamp_min(1)
    else:
        loss = (decision + wording) / (first.sum() + rest.sum()).clamp_min(1)
    accuracy = (pair.argmax(dim=-1) == said_yes).float().mean() if len(pair) else torch.tensor(0.0)
    return loss, {"first_token_accuracy": float(accuracy)}


def answer_loss(
    kind: AnswerLoss, tokenizer: PreTrainedTokenizerBase
) -> Callable[..., tuple[torch.Tensor, dict[str, float]]]:
    """``vqa_loss`` as a trainer's ``compute_loss``: the LM loss on every answer token, or
    with "yes_no" each answer's "Yes"/"No" on those two logits alone ("yes_no_balanced": that
    term and the other tokens' LM loss averaged apart)."""
    return functools.partial(vqa_loss, **answer_loss_settings(kind, tokenizer))


def answer_loss_settings(kind: AnswerLoss, tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """``answer_loss_terms``' keyword arguments for an ``AnswerLoss``."""
    if kind == "language_model":
        return {}
    return {"yes_no_ids": answer_token_ids(tokenizer), "balanced": kind == "yes_no_balanced"}


def frozen_parameters(model: PreTrainedModel) -> list[nn.Parameter]:
    """What LLaVA's recipe keeps frozen: the vision encoder and, in the tiny model, the
    attribute token's read-out fitted to it."""
    frozen = list(vision_encoder(model).parameters())
    projector = getattr(model.model, "multi_modal_projector", None)
    if isinstance(projector, _PooledProjector):
        frozen.extend(projector.attribute_readout.parameters())
    return frozen


@torch.no_grad()
def select_vision_features(
    model: PreTrainedModel, images: np.ndarray, *, batch_size: int = 500
) -> torch.Tensor:
    """What the tiny LLaVA's projector reads for each uint8 (H, W, 3) image: the frozen
    vision tower's hidden states at the config's feature layer (the CLS token dropped by the
    "default" strategy), float32 on the CPU. Computed once for a pool of renders, they stand
    in for its pixels (``PooledLlavaModel.forward``'s ``vision_features``)."""
    return torch.cat(
        [
            _tower_features(model, images[start : start + batch_size])
            for start in progress(range(0, len(images), batch_size), desc="vision features")
        ]
    )


@torch.no_grad()
def _tower_features(model: PreTrainedModel, images: np.ndarray) -> torch.Tensor:
    """``select_vision_features`` of one batch of images."""
    tower = vision_encoder(model)
    config = model.config
    parameter = next(tower.parameters())
    # The tiny processor's normalisation: CLIP's mean and std, no resizing.
    pixels = to_pixel_values(images, images.shape[1]).to(parameter.device, parameter.dtype)
    hidden = tower(pixels, output_hidden_states=True).hidden_states[config.vision_feature_layer]
    if config.vision_feature_select_strategy == "default":
        hidden = hidden[:, 1:]
    return hidden.float().cpu()


def reads_vision_features(model: nn.Module) -> bool:
    """Whether ``model`` takes ``vision_features`` in place of pixels (the tiny LLaVA, not
    wrapped by peft)."""
    return isinstance(getattr(model, "model", None), PooledLlavaModel)


class VisionFeatureCache:
    """``select_vision_features`` of each distinct picture, computed once and kept, keyed by
    a digest of its pixels. LLaVA's recipe keeps the vision tower frozen, so a picture's
    features stay valid as long as the tower is not trained."""

    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model
        self._features: dict[tuple, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self._features)

    def __call__(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """(len(images), patches, width): the features of ``images``, in order; the tower
        runs once, as one batch, on the pictures not seen before."""
        keys = [_picture_key(image) for image in images]
        new = {key: image for key, image in zip(keys, images, strict=True)}
        new = {key: image for key, image in new.items() if key not in self._features}
        if new:
            computed = _tower_features(self.model, np.stack(list(new.values())))
            self._features.update(zip(new, computed, strict=True))
        return torch.stack([self._features[key] for key in keys])


def _picture_key(image: np.ndarray) -> tuple:
    return image.shape, image.dtype.str, hashlib.blake2b(image.tobytes(), digest_size=16).digest()


class BlankLayouts:
    """Each chat layout's tokens, encoded once on blank pictures. A sample's tokens depend on
    its layout (how many images, the question, the answers), never on what its pictures
    show, so one encoding serves every sample of a layout; its ``pixel_values`` are dropped
    (``vision_features`` take their place)."""

    def __init__(self, max_layouts: int = 4096) -> None:
        self.max_layouts = max_layouts  # answers with reasons make many layouts; kept bounded
        self._layouts: dict[tuple, dict[str, torch.Tensor]] = {}

    def __call__(
        self, key: tuple, blank: np.ndarray, encode: Callable[[np.ndarray], dict]
    ) -> dict[str, torch.Tensor]:
        """``encode(blank)``'s tokens, once per (``key``, the blank picture's shape)."""
        key = (*key, blank.shape)
        if key not in self._layouts:
            if len(self._layouts) >= self.max_layouts:
                self._layouts.clear()
            encoded = encode(blank)
            encoded.pop("pixel_values")
            self._layouts[key] = encoded
        return self._layouts[key]


class FeatureChats:
    """``encode_vqa`` for a model that reads ``vision_features`` (``reads_vision_features``):
    each layout's tokens from ``BlankLayouts`` and each picture's features from a
    ``VisionFeatureCache``, in place of the processor's pixels and the frozen tower. The
    model then sees the same inputs as through ``encode_vqa``, for far less work when
    pictures recur (a user's context in every question about it)."""

    def __init__(
        self,
        processor: ProcessorMixin,
        features: VisionFeatureCache,
        *,
        slot_positions: bool,
    ) -> None:
        self.processor = processor
        self.features = features
        self.slot_positions = slot_positions
        self.layouts = BlankLayouts()

    def encode(
        self,
        context: PreferenceContext,
        query: np.ndarray | None,
        answer: str | None = None,
        *,
        question: str = QUESTION,
        follow_ups: Sequence[tuple[str, Sequence[np.ndarray], str]] = (),
    ) -> dict[str, torch.Tensor]:
        """What ``encode_vqa`` gives, with ``vision_features`` for ``pixel_values``."""
        images = [*context.liked, *context.disliked, *([] if query is None else [query])]
        images += [image for _, follow_up_images, _ in follow_ups for image in follow_up_images]
        n_liked, n_disliked = len(context.liked), len(context.disliked)
        asked = tuple((prompt, len(shown), said) for prompt, shown, said in follow_ups)
        layout = self.layouts(
            (n_liked, n_disliked, query is None, answer, question, asked),
            np.zeros_like(images[0]),
            lambda blank: encode_vqa(
                self.processor,
                PreferenceContext([blank] * n_liked, [blank] * n_disliked),
                None if query is None else blank,
                answer,
                slot_positions=self.slot_positions,
                question=question,
                follow_ups=[(prompt, [blank] * n, said) for prompt, n, said in asked],
            ),
        )
        return {**layout, "vision_features": self.features(images)}


def vision_encoder(model: PreTrainedModel) -> nn.Module:
    """The vision encoder of a LLaVA-style (``vision_tower``) or Qwen2-VL (``visual``) model,
    which LLaVA's recipe keeps frozen."""
    for name in ("vision_tower", "visual"):
        if hasattr(model.model, name):
            return getattr(model.model, name)
    raise AttributeError(f"{type(model).__name__} has no vision_tower or visual module")


# ---- LoRA ----------------------------------------------------------------------------


def add_lora(
    model: PreTrainedModel,
    *,
    rank: int,
    alpha: float,
    target_modules: Sequence[str] | str,
    dropout: float = 0.0,
    gradient_checkpointing: bool = False,
) -> PeftModel:
    """Wrap ``model`` with LoRA adapters (peft); only they stay trainable.

    ``target_modules`` is peft's: a list of module-name suffixes (``["q_proj", "v_proj"]``,
    which also matches a CLIP vision tower's) or one regex on the full name (e.g.
    ``r".*language_model.*\\.(q_proj|v_proj)"`` for the LM only).
    """
    if gradient_checkpointing:
        # Non-reentrant checkpointing passes gradients to LoRA weights even though the
        # frozen embeddings' outputs do not require grad.
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False}
        )
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=target_modules if isinstance(target_modules, str) else list(target_modules),
        lora_dropout=dropout,
        bias="none",
    )
    return get_peft_model(model, config)


# ---- inference ---------------------------------------------------------------------------


class _FirstTokenAmong(LogitsProcessor):
    """Greedy decoding whose first generated token is one of ``allowed``: a model whose
    answer was trained on the "Yes" and "No" logits alone (``vqa_loss(yes_no_ids=...)``)
    need not rank them above every other token."""

    def __init__(self, allowed: Sequence[int], prompt_length: int) -> None:
        self.allowed = list(allowed)
        self.prompt_length = prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if input_ids.shape[1] != self.prompt_length:
            return scores
        masked = torch.full_like(scores, float("-inf"))
        masked[:, self.allowed] = scores[:, self.allowed]
        return masked


class MllmPreferenceModel:
    """Batched inference on a (possibly LoRA-wrapped) MLLM and its processor.

    The model is put in eval mode. ``slot_positions`` must match how it was trained. With
    ``cache_vision_features``, a model that reads vision features (the tiny LLaVA) gets each
    distinct picture's features once per instance: its vision tower must not be trained
    while the instance is in use.
    """

    def __init__(
        self,
        model: nn.Module,
        processor: ProcessorMixin,
        *,
        slot_positions: bool = False,
        batch_size: int = 16,
        max_new_tokens: int = 32,
        cache_vision_features: bool = True,
    ) -> None:
        self.model = model.eval()
        self.processor = processor
        self.slot_positions = slot_positions
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.yes_id, self.no_id = answer_token_ids(processor.tokenizer)
        # A model that reads vision features gets each picture's once (``FeatureChats``):
        # most of the work of reading a context is otherwise the frozen tower and the
        # processor on pictures it has seen.
        self._feature_chats = (
            FeatureChats(processor, VisionFeatureCache(model), slot_positions=slot_positions)
            if cache_vision_features and reads_vision_features(model)
            else None
        )

    @torch.inference_mode()
    def hidden_states(
        self,
        contexts: Sequence[PreferenceContext],
        queries: Sequence[np.ndarray] | None = None,
        question: str = QUESTION,
    ) -> torch.Tensor:
        """The last prompt token's hidden state at the embeddings and after every layer:
        (N, n_layers + 1, width), float32 on the CPU. Without queries, a ``question`` other
        than the default ends the prompt (e.g. ``TASTE_QUESTION``: the states the model
        answers the user's taste from)."""
        # logits_to_keep=1: the vocabulary logits of every position are never read here (on
        # Qwen2-VL-2B they would be most of the memory).
        states = [
            torch.stack(
                self.model(**batch, output_hidden_states=True, logits_to_keep=1).hidden_states,
                dim=1,
            )[:, :, -1]
            for batch in self._batches(contexts, queries, question)
        ]
        return torch.cat(states).float().cpu()

    @torch.inference_mode()
    def judge(
        self, contexts: Sequence[PreferenceContext], queries: Sequence[np.ndarray]
    ) -> torch.Tensor:
        """P("Yes") for each (context, query): the next-token distribution after the prompt,
        restricted to the "Yes" and "No" tokens and renormalised. (N,), float32."""
        scores = []
        for batch in self._batches(contexts, queries):
            logits = self.model(**batch, logits_to_keep=1).logits[:, -1].float()
            pair = logits[:, [self.yes_id, self.no_id]]
            scores.append(pair.softmax(dim=-1)[:, 0].cpu())
        return torch.cat(scores)

    @torch.inference_mode()
    def answer(
        self,
        contexts: Sequence[PreferenceContext],
        queries: Sequence[np.ndarray] | None,
        question: str = QUESTION,
    ) -> list[str]:
        """The greedy answer for each (context, query): with the default question, "Yes"/"No"
        (the first token is one of the two, as ``judge`` reads it) and its reason; with
        ``TASTE_QUESTION`` and no queries, the user's taste."""
        tokenizer = self.processor.tokenizer
        answers = []
        for batch in self._batches(contexts, queries, question):
            prompt_length = batch["input_ids"].shape[1]
            first_tokens = (self.yes_id, self.no_id) if question == QUESTION else None
            if "position_ids" in batch or "vision_features" in batch:
                generated = self._greedy_with_positions(batch, first_tokens)
            else:
                generated = self.model.generate(
                    **batch,
                    max_new_tokens=self.max_new_tokens,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                    logits_processor=LogitsProcessorList(
                        [_FirstTokenAmong(first_tokens, prompt_length)] if first_tokens else []
                    ),
                )[:, prompt_length:]
            answers += tokenizer.batch_decode(generated, skip_special_tokens=True)
        return [text.strip() for text in answers]

    def _greedy_with_positions(
        self, batch: Mapping[str, torch.Tensor], first_tokens: Sequence[int] | None
    ) -> torch.Tensor:
        """Greedy decoding of a batch with its own position ids (slot positions), each new
        token one position after the last: ``generate`` builds its masks from position ids,
        and ids that restart (every image slot does) read there as packed sequences, which
        changed even the first answer token. (N, new tokens); pad after an eos. Without
        position ids (a batch with vision features, which ``generate`` would pass again at
        every step), the prompt is numbered as ``generate`` numbers a left-padded one."""
        tokenizer = self.processor.tokenizer
        if "position_ids" not in batch:
            numbered = batch["attention_mask"].long().cumsum(-1) - 1
            batch = {**batch, "position_ids": numbered.clamp_min(0)}
        output = self.model(**batch, use_cache=True)
        mask, positions = batch["attention_mask"], batch["position_ids"][:, -1:]
        done = torch.zeros(len(mask), dtype=torch.bool, device=mask.device)
        tokens = []
        for step in range(self.max_new_tokens):
            logits = output.logits[:, -1].float()
            if step == 0 and first_tokens:
                allowed = torch.full_like(logits, float("-inf"))
                allowed[:, list(first_tokens)] = 0.0
                logits = logits + allowed
            token = logits.argmax(dim=-1).masked_fill(done, tokenizer.pad_token_id)
            tokens.append(token)
            done |= token == tokenizer.eos_token_id
            if done.all():
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            positions = positions + 1
            output = self.model(
                input_ids=token[:, None],
                attention_mask=mask,
                position_ids=positions,
                cache=output.cache,
                use_cache=True,
            )
        return torch.stack(tokens, dim=1)

    def _batches(
        self,
        contexts: Sequence[PreferenceContext],
        queries: Sequence[np.ndarray] | None,
        question: str = QUESTION,
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Left-padded batches (the last column is every sample's last prompt token)."""
        if queries is not None and len(queries) != len(contexts):
            raise ValueError(f"{len(contexts)} contexts but {len(queries)} queries")
        parameter = next(self.model.parameters())
        for start in range(0, len(contexts), self.batch_size):
            batch_contexts = contexts[start : start + self.batch_size]
            batch_queries = (
                [None] * len(batch_contexts)
                if queries is None
                else queries[start : start + self.batch_size]
            )
            if self._feature_chats is None:
                items = [
                    encode_vqa(
                        self.processor,
                        context,
                        query,
                        slot_positions=self.slot_positions,
                        question=question,
                    )
                    for context, query in zip(batch_contexts, batch_queries, strict=True)
                ]
            else:
                # The batch's new pictures through the tower together, then each sample.
                self._feature_chats.features(
                    [
                        image
                        for context, query in zip(batch_contexts, batch_queries, strict=True)
                        for image in (*context.liked, *context.disliked, query)
                        if image is not None
                    ]
                )
                items = [
                    self._feature_chats.encode(context, query, question=question)
                    for context, query in zip(batch_contexts, batch_queries, strict=True)
                ]
            batch = collate_vqa(
                items, pad_token_id=self.processor.tokenizer.pad_token_id, padding_side="left"
            )
            yield {
                key: value.to(parameter.device, parameter.dtype)
                if value.is_floating_point()
                else value.to(parameter.device)
                for key, value in batch.items()
            }
