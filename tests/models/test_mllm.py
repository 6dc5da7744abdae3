"""The preference MLLM: answer-only labels, slot positions, round trips, inference and LoRA."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)

from prefgen_kedro.models.mllm import (
    IGNORE_INDEX,
    MllmPreferenceModel,
    PooledLlavaForConditionalGeneration,
    PreferenceContext,
    VqaDataset,
    _FirstTokenAmong,
    add_lora,
    answer_token_ids,
    build_tiny_mllm,
    build_tiny_processor,
    chat_text,
    collate_vqa,
    encode_vqa,
    frozen_parameters,
    reads_vision_features,
    train_tokenizer,
    vision_encoder,
    vqa_loss,
)
from prefgen_kedro.models.vqa import (
    MARKERS,
    TASTE_QUESTION,
    build_prompt,
    query_prompt,
    sample_vqa_examples,
    vqa_corpus,
)
from prefgen_kedro.training import TrainConfig, train
from prefgen_kedro.world.agent_world import generate_agent_world

SIZE = 32
TEXT_LAYERS = 2
VISION = {
    "image_size": SIZE,
    "patch_size": 4,
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
}


@pytest.fixture(scope="module")
def world():
    return generate_agent_world(
        n_users=4,
        images_per_user=10,
        n_liked_attributes=3,
        n_disliked_attributes=3,
        label_noise=0.0,
        image_size=SIZE,
        split_fractions={"train": 0.5, "val": 0.25, "test": 0.25},
        images_subdir="images",
        seed=0,
    )


def sample_examples(world, **overrides):
    settings = {
        "splits": ["train", "val", "test"],
        "k": 2,
        "samples_per_user": 2,
        "seed": 0,
        "with_reasons": True,
    } | overrides
    return sample_vqa_examples(world.images, world.interactions, world.users, **settings)


@pytest.fixture(scope="module")
def examples(world):
    return sample_examples(world)


@pytest.fixture(scope="module")
def processor(world):
    tokenizer = train_tokenizer(vqa_corpus(world.images["caption"]), vocab_size=400)
    return build_tiny_processor(tokenizer, image_size=SIZE)


def tiny_mllm(processor, **overrides):
    settings = {
        "attribute_categories": [2, 3],
        "matching_attention_std": 0.09,
        "text_width": 32,
        "text_layers": TEXT_LAYERS,
        "text_heads": 2,
        "max_positions": 256,
        "seed": 0,
        "vision_config": VISION,
    } | overrides
    return build_tiny_mllm(processor.tokenizer, **settings)


@pytest.fixture(scope="module")
def saved(processor, tmp_path_factory) -> Path:
    """A tiny model and its processor saved the way a hub checkpoint is stored."""
    path = tmp_path_factory.mktemp("tiny_mllm")
    tiny_mllm(processor).save_pretrained(path)
    processor.save_pretrained(path)
    return path


def contexts_and_queries(world, examples):
    contexts = [
        PreferenceContext(
            liked=[world.pictures[i] for i in example.liked],
            disliked=[world.pictures[i] for i in example.disliked],
        )
        for example in examples
    ]
    return contexts, [world.pictures[example.query] for example in examples]


def test_tokenizer_keeps_answer_words_markers_and_image_token_whole(processor):
    tokenizer = processor.tokenizer
    for token in ("Yes", "No", "<image>", *MARKERS):
        assert len(tokenizer(token, add_special_tokens=False).input_ids) == 1, token
    assert tokenizer.decode(tokenizer("No, because it is dotted").input_ids) == (
        "No, because it is dotted"
    )


def test_only_answer_tokens_and_eos_carry_labels(world, examples, processor):
    dataset = VqaDataset(examples, world.pictures, processor)
    tokenizer = processor.tokenizer
    for index in range(len(examples)):
        item = dataset[index]
        answer = tokenizer(examples[index].answer, add_special_tokens=False).input_ids
        labelled = item["labels"] != IGNORE_INDEX
        n = len(answer) + 1
        assert labelled.sum() == n and labelled[-n:].all()
        assert item["labels"][-n:].tolist() == [*answer, tokenizer.eos_token_id]
        assert torch.equal(item["input_ids"][-n:], item["labels"][-n:])
        # 5 images of one (attribute) token each, all in the (unlabelled) prompt
        assert (item["input_ids"] == processor.image_token_id).sum() == 5
        assert item["pixel_values"].shape == (5, 3, SIZE, SIZE)

    batch = dataset.collate([dataset[i] for i in range(3)])
    assert batch["pixel_values"].shape == (15, 3, SIZE, SIZE)
    padded = batch["attention_mask"] == 0
    assert (batch["labels"][padded] == IGNORE_INDEX).all()
    model = tiny_mllm(processor)
    loss, metrics = vqa_loss(model, batch)
    # the same loss by hand: cross-entropy over the labelled (answer) tokens only
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    targets = batch["labels"][:, 1:]
    by_hand = F.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=-100)
    assert torch.allclose(loss, by_hand, atol=1e-5)
    assert 0.0 <= metrics["first_token_accuracy"] <= 1.0


def test_yes_no_loss_scores_each_answers_first_token_on_yes_and_no_alone(world, processor):
    pictures = list(world.pictures.values())
    context = PreferenceContext(pictures[:1], pictures[1:2])
    turns = [(query_prompt(), [pictures[3]], "No")]
    items = [
        encode_vqa(processor, context, pictures[2], "Yes", follow_ups=turns),
        encode_vqa(processor, context, pictures[4], "No, because it is dotted"),
    ]
    batch = collate_vqa(items, pad_token_id=processor.tokenizer.pad_token_id)
    model = tiny_mllm(processor).eval()
    yes_id, no_id = answer_token_ids(processor.tokenizer)
    loss, metrics = vqa_loss(model, batch, yes_no_ids=(yes_id, no_id))
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[:, :-1]
    targets, previous = batch["labels"][:, 1:], batch["labels"][:, :-1]
    decisions, wording, hits = [], [], []
    for row, column in (targets != IGNORE_INDEX).nonzero().tolist():
        target = int(targets[row, column])
        if previous[row, column] == IGNORE_INDEX:  # an answer's first token: Yes or No
            pair = logits[row, column, [no_id, yes_id]]
            decisions.append(F.cross_entropy(pair[None], torch.tensor([int(target == yes_id)])))
            hits.append(int(pair.argmax()) == int(target == yes_id))
        else:  # its reason and eos: the LM loss
            wording.append(F.cross_entropy(logits[row, column][None], torch.tensor([target])))
    assert len(hits) == 3  # "Yes" and "No" of the first sample, "No" of the second
    assert torch.allclose(loss, torch.stack(decisions + wording).mean(), atol=1e-5)
    assert metrics["first_token_accuracy"] == pytest.approx(sum(hits) / 3)
    # Balanced: the decisions' mean plus the other tokens' mean, whatever their numbers.
    balanced, _ = vqa_loss(model, batch, yes_no_ids=(yes_id, no_id), balanced=True)
    by_hand = torch.stack(decisions).mean() + torch.stack(wording).mean()
    assert torch.allclose(balanced, by_hand, atol=1e-5)
    # The first generated token of an answer is "Yes" or "No" whatever else scores higher.
    scores = torch.zeros(2, len(processor.tokenizer))
    scores[:, 7] = 100.0
    restricted = _FirstTokenAmong((yes_id, no_id), prompt_length=5)
    first = restricted(torch.zeros(2, 5, dtype=torch.long), scores.clone())
    assert set(first.argmax(1).tolist()) <= {yes_id, no_id}
    assert torch.isinf(first).sum() == 2 * (len(processor.tokenizer) - 2)
    assert torch.equal(restricted(torch.zeros(2, 6, dtype=torch.long), scores.clone()), scores)


def test_follow_up_turns_are_the_chat_templates_conversation_each_answer_labelled(world, processor):
    tokenizer = processor.tokenizer
    pictures = list(world.pictures.values())
    turns = [(query_prompt(), [pictures[3]], "No"), (query_prompt(), [pictures[4]], "Yes")]
    context = PreferenceContext(pictures[:1], pictures[1:2])
    item = encode_vqa(processor, context, pictures[2], "Yes", slot_positions=True, follow_ups=turns)
    # the token sequence of the whole conversation as the chat template renders it
    history = [(build_prompt(1, 1), "Yes"), (query_prompt(), "No")]
    conversation = chat_text(processor, query_prompt(), history) + "Yes" + tokenizer.eos_token
    whole = processor(text=conversation, images=list(pictures[:5]))
    assert item["input_ids"].tolist() == whole["input_ids"][0]
    assert item["pixel_values"].shape == (5, 3, SIZE, SIZE)
    labelled = item["labels"][item["labels"] != IGNORE_INDEX]
    assert tokenizer.decode(labelled) == "Yes</s>No</s>Yes</s>"
    # every image, the follow-ups' queries included, on the one slot range
    slots = item["position_ids"][item["input_ids"] == processor.image_token_id].view(5, -1)
    assert (slots == slots[0]).all()
    with pytest.raises(ValueError, match="follow-up turns need"):
        encode_vqa(processor, context, pictures[2], None, follow_ups=turns)


def test_slot_positions_put_every_image_slot_on_one_range(world, processor):
    pictures = list(world.pictures.values())
    image_id = processor.image_token_id

    def slot_positions(k_liked, k_disliked):
        context = PreferenceContext(pictures[:k_liked], pictures[5 : 5 + k_disliked])
        item = encode_vqa(processor, context, pictures[9], "Yes", slot_positions=True)
        ids, positions = item["input_ids"], item["position_ids"]
        images = positions[ids == image_id].view(-1, 1)
        return images, positions, ids

    images, positions, ids = slot_positions(3, 2)
    # liked, disliked and query images all sit on one range: any two are at distance 0
    assert (images == images[0]).all()
    # every marker sits right before its slot's first image position
    markers = torch.isin(
        ids, torch.tensor(processor.tokenizer.convert_tokens_to_ids(list(MARKERS)))
    )
    assert (positions[markers] == images[:, 0] - 1).all()
    # text after a slot continues from its end, so it runs on monotonically between slots
    after_query = positions[(ids == image_id).nonzero().max() + 1 :]
    assert torch.equal(after_query, torch.arange(len(after_query)) + images[0, -1] + 1)
    # the answer's positions do not move with K
    assert slot_positions(1, 1)[1][-1] == positions[-1]
    # without the option, positions are left to the model
    plain = encode_vqa(processor, PreferenceContext(pictures[:1], pictures[1:2]), pictures[2])
    assert "position_ids" not in plain


def test_group_tags_add_each_image_its_markers_tag(world, processor, tmp_path):
    pictures = list(world.pictures.values())
    context = PreferenceContext(pictures[:2], pictures[2:3])
    batch = collate_vqa(
        [encode_vqa(processor, context, pictures[3])],
        pad_token_id=processor.tokenizer.pad_token_id,
    )
    tagged = tiny_mllm(processor).eval()
    untagged = tiny_mllm(processor).eval()
    with torch.no_grad():
        untagged.model.group_tags.weight.zero_()  # the same weights but the tags
    tagged.save_pretrained(tmp_path)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    captured = {}
    for name, model in (("tagged", tagged), ("untagged", untagged), ("loaded", loaded)):
        model.model.language_model.register_forward_pre_hook(
            lambda _, args, kwargs, name=name: captured.update({name: kwargs["inputs_embeds"]}),
            with_kwargs=True,
        )
        with torch.inference_mode():
            model(**batch)
    ids = batch["input_ids"][0]
    is_image = ids == processor.image_token_id
    difference = (captured["tagged"] - captured["untagged"])[0]
    assert (difference[~is_image] == 0).all()  # text is untouched
    assert torch.equal(captured["loaded"], captured["tagged"])
    markers = [processor.tokenizer.convert_tokens_to_ids(m) for m in MARKERS]
    # a table of their own, apart from the markers' input embeddings
    table = tagged.model.group_tags.weight
    tag_of = {marker: table[row] for row, marker in enumerate(sorted(markers))}
    expected = [markers[0]] * 2 + [markers[1]] + [markers[2]]  # liked, liked, disliked, query
    for image, marker in enumerate(expected):
        rows = difference[is_image].view(4, 1, -1)[image]
        assert torch.allclose(rows, tag_of[marker].expand_as(rows), atol=1e-6)


def test_vision_tower_starts_from_the_conditioning_clip(processor, make_conditioning_clip):
    clip = make_conditioning_clip(SIZE, seed=3)
    model = tiny_mllm(processor, vision_config=None, vision_from=clip)
    copied = model.model.vision_tower.state_dict()
    for key, value in clip.vision_model.state_dict().items():
        assert torch.equal(copied[key], value), key
    with pytest.raises(ValueError, match="exactly one"):
        tiny_mllm(processor, vision_from=clip)


def test_initializer_range_sets_the_language_models_and_projectors_initial_scale(processor):
    model = tiny_mllm(processor, initializer_range=0.08)
    language = model.model.language_model
    for weights in (
        language.embed_tokens.weight,
        language.layers[0].self_attn.v_proj.weight,
        model.model.multi_modal_projector.linear_1.weight,
    ):
        assert weights.std().item() == pytest.approx(0.08, rel=0.1)
    default = tiny_mllm(processor).model.language_model.layers[0].self_attn.v_proj.weight
    assert default.std().item() == pytest.approx(0.02, rel=0.1)


def test_matching_attention_starts_with_each_layers_key_projection_equal_to_its_query(
    processor,
):
    model = tiny_mllm(processor, matching_attention_std=0.09)
    for layer in model.model.language_model.layers:
        query, key = layer.self_attn.q_proj.weight, layer.self_attn.k_proj.weight
        assert torch.equal(query, key)
        assert query.std().item() == pytest.approx(0.09, rel=0.1)
    # so attention logits start as a similarity: symmetric, every token alike to itself
    hidden = torch.randn(1, 6, model.config.text_config.hidden_size)
    attention = model.model.language_model.layers[0].self_attn
    scores = attention.q_proj(hidden) @ attention.k_proj(hidden).transpose(1, 2)
    assert torch.allclose(scores, scores.transpose(1, 2), atol=1e-5)
    assert (scores.diagonal(dim1=1, dim2=2) > 0).all()
    with pytest.raises(ValueError, match="matching_attention_std"):
        tiny_mllm(processor, matching_attention_std=0.0)


def test_a_chat_asks_its_follow_up_questions_in_turn(world, processor):
    examples = sample_examples(
        world, splits=["train"], k=1, samples_per_user=3, questions_per_context=2
    )
    dataset = VqaDataset(examples, world.pictures, processor)
    opening, follow_up = examples[:2]
    assert len(dataset) == 2 * len({e.user_id for e in examples})
    pictures = world.pictures
    expected = encode_vqa(
        processor,
        PreferenceContext([pictures[opening.liked[0]]], [pictures[opening.disliked[0]]]),
        pictures[opening.query],
        opening.answer,
        follow_ups=[(query_prompt(), [pictures[follow_up.query]], follow_up.answer)],
    )
    assert all(torch.equal(dataset[0][key], value) for key, value in expected.items())
    orphan = dataclasses.replace(follow_up, liked=opening.disliked)
    with pytest.raises(ValueError, match="VQA example 1 .* does not share the context"):
        VqaDataset([opening, orphan], world.pictures, processor)


def test_the_answer_follows_the_query_image(world, examples, processor):
    # No role word: the first answer token is predicted at the query's (last) image token,
    # where the comparison with the context is made.
    item = VqaDataset(examples, world.pictures, processor)[0]
    first_answer = (item["labels"] != IGNORE_INDEX).nonzero()[0].item()
    assert item["input_ids"][first_answer - 1] == processor.image_token_id


def test_orthogonal_matching_starts_attention_as_the_count_of_shared_attribute_values(
    processor,
):
    categories = [3, 4]
    model = tiny_mllm(
        processor,
        attribute_categories=categories,
        text_head_dim=48,  # wider than the model: its form is still the dot product
        matching_attention_std=0.1,
    )
    language = model.model.language_model
    embeddings = model.model.multi_modal_projector.attribute_embeddings.weight  # (32, 7)
    gram = embeddings.T @ embeddings
    assert torch.allclose(gram, gram.diagonal().mean() * torch.eye(7), atol=1e-4)
    attention = language.layers[0].self_attn
    assert attention.q_proj.weight.shape == (2 * 48, 32)
    assert attention.q_proj.weight.std().item() == pytest.approx(0.1, rel=0.1)
    # Images as one-hot attribute values: each head's logit counts the values two share.
    values = torch.tensor([[0, 3], [0, 4], [1, 3], [1, 5], [2, 6]])
    onehot = torch.zeros(len(values), 7).scatter_(1, values, 1.0)
    with torch.no_grad():
        tokens = language.layers[0].input_layernorm(onehot @ embeddings.T)
        query = attention.q_proj(tokens).view(len(values), 2, 48)
        key = attention.k_proj(tokens).view(len(values), 2, 48)
    logits = torch.einsum("ahd,bhd->hab", query, key)
    shared = (values[:, None, :] == values[None, :, :]).sum(-1).float()
    for head in logits:
        assert torch.allclose(head, head[0, 0] / 2 * shared, atol=1e-3)


def test_attribute_token_is_its_categories_probability_weighted_value_embeddings(
    processor, tmp_path
):
    categories = [2, 3]
    model = tiny_mllm(processor, attribute_categories=categories).eval()
    projector = model.model.multi_modal_projector
    features = torch.randn(3, 1 + 4, VISION["hidden_size"])  # CLS, then a 2×2 patch grid
    with torch.no_grad():
        # Confident logits: value 1 of the first category, value 2 of the second.
        projector.attribute_readout.weight.zero_()
        projector.attribute_readout.bias.copy_(torch.tensor([0.0, 50.0, 0.0, 0.0, 50.0]))
        tokens = projector(features)
    embeddings = projector.attribute_embeddings.weight  # (width, values)
    assert tokens.shape == (3, 1, model.config.text_config.hidden_size)
    assert torch.allclose(tokens[:, 0], (embeddings[:, 1] + embeddings[:, 4]).expand(3, -1))
    # Each image's value embeddings start near unit variance, above its group tag.
    assert 0.5 < embeddings.std().item() * len(categories) ** 0.5 < 2.0
    # The read-out is frozen with the vision tower; the value embeddings learn.
    frozen = {id(p) for p in frozen_parameters(model)}
    assert id(projector.attribute_readout.weight) in frozen
    assert id(projector.attribute_embeddings.weight) not in frozen
    model.save_pretrained(tmp_path)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert loaded.config.attribute_categories == categories
    with torch.no_grad():
        assert torch.equal(loaded.model.multi_modal_projector(features), tokens)
    with pytest.raises(ValueError, match="attribute_categories"):
        tiny_mllm(processor, attribute_categories=[])


def test_saved_model_and_processor_load_through_the_auto_classes(world, examples, processor, saved):
    model = AutoModelForImageTextToText.from_pretrained(saved).eval()
    loaded_processor = AutoProcessor.from_pretrained(saved)
    assert isinstance(model, PooledLlavaForConditionalGeneration)
    assert loaded_processor.chat_template == processor.chat_template
    reference = tiny_mllm(processor).eval()
    original = VqaDataset(examples, world.pictures, processor)
    loaded = VqaDataset(examples, world.pictures, loaded_processor)
    for key, value in original[0].items():
        assert torch.equal(loaded[0][key], value), key
    batch = loaded.collate([loaded[i] for i in range(2)])
    with torch.inference_mode():
        assert torch.allclose(model(**batch).logits, reference(**batch).logits, atol=1e-6)


def test_each_image_is_its_attribute_token_alone(world, processor):
    model = tiny_mllm(processor).eval()
    pictures = list(world.pictures.values())
    item = encode_vqa(processor, PreferenceContext(pictures[:1], pictures[1:2]), pictures[2])
    assert (item["input_ids"] == processor.image_token_id).sum() == 3
    features = torch.randn(3, 1 + 64, VISION["hidden_size"])  # CLS, then an 8×8 patch grid
    projector = model.model.multi_modal_projector
    with torch.no_grad():
        assert torch.equal(projector(features), projector.attribute_token(features)[:, None])
        batch = collate_vqa([item], pad_token_id=processor.tokenizer.pad_token_id)
        assert model(**batch).logits.shape[1] == batch["input_ids"].shape[1]


@pytest.mark.parametrize("slot_positions", [False, True])
def test_inference_is_batched_and_padding_free(world, examples, processor, slot_positions):
    # At the shipped scale (not 0.02) greedy answers have no near-ties that batching's
    # rounding could flip.
    model = tiny_mllm(processor, initializer_range=0.08)
    inference = MllmPreferenceModel(
        model, processor, slot_positions=slot_positions, batch_size=3, max_new_tokens=5
    )
    contexts, queries = contexts_and_queries(world, examples[:4])
    # contexts of different sizes, so batches are padded
    contexts[1] = PreferenceContext(contexts[1].liked[:1], contexts[1].disliked)

    states = inference.hidden_states(contexts, queries)
    assert states.shape == (4, TEXT_LAYERS + 1, 32)
    assert inference.hidden_states(contexts).shape == (4, TEXT_LAYERS + 1, 32)
    alone = torch.cat(
        [inference.hidden_states([c], [q]) for c, q in zip(contexts, queries, strict=True)]
    )
    assert torch.allclose(states, alone, atol=1e-5)

    yes = inference.judge(contexts, queries)
    assert yes.shape == (4,) and ((yes > 0) & (yes < 1)).all()
    assert torch.allclose(
        yes,
        torch.cat([inference.judge([c], [q]) for c, q in zip(contexts, queries, strict=True)]),
        atol=1e-5,
    )

    answers = inference.answer(contexts, queries)
    assert len(answers) == 4 and all(isinstance(answer, str) for answer in answers)
    # each (padded, batched) answer is the greedy continuation of its prompt alone, every
    # new token recomputed from the whole sequence, one position after the last
    tokenizer = processor.tokenizer
    for context, query, answer in zip(contexts, queries, answers, strict=True):
        item = encode_vqa(processor, context, query, slot_positions=slot_positions)
        sequence = collate_vqa([item], pad_token_id=tokenizer.pad_token_id)
        tokens = []
        for step in range(5):
            with torch.inference_mode():
                logits = model(**sequence).logits[0, -1]
            if step == 0:  # the first answer token is "Yes" or "No", as the judge reads it
                logits = logits[[inference.yes_id, inference.no_id]]
                token = (inference.yes_id, inference.no_id)[int(logits.argmax())]
            else:
                token = int(logits.argmax())
            tokens.append(token)
            if token == tokenizer.eos_token_id:
                break
            sequence["input_ids"] = torch.cat([sequence["input_ids"], torch.tensor([[token]])], 1)
            sequence["attention_mask"] = torch.ones_like(sequence["input_ids"])
            if slot_positions:
                last = sequence["position_ids"][:, -1:]
                sequence["position_ids"] = torch.cat([sequence["position_ids"], last + 1], 1)
        assert answer == tokenizer.decode(tokens, skip_special_tokens=True).strip()
    # greedy generation continues the prompt's positions: it equals teacher-forced argmax
    item = encode_vqa(processor, contexts[0], queries[0], slot_positions=slot_positions)
    prompt = collate_vqa([item], pad_token_id=processor.tokenizer.pad_token_id)
    with torch.inference_mode():
        generated = model.generate(**prompt, max_new_tokens=3, min_new_tokens=3, do_sample=False)
        extended = {"input_ids": generated[:, :-1], "pixel_values": prompt["pixel_values"]}
        if slot_positions:
            last = prompt["position_ids"][:, -1:]
            extended["position_ids"] = torch.cat([prompt["position_ids"], last + 1, last + 2], 1)
        forced = model(**extended).logits[:, -3:].argmax(-1)
    assert torch.equal(generated[:, -3:], forced)


@pytest.mark.parametrize("slot_positions", [False, True])
def test_cached_vision_features_give_what_the_pixels_give(
    world, examples, processor, slot_positions
):
    model = tiny_mllm(processor, initializer_range=0.08)
    assert reads_vision_features(model)
    contexts, queries = contexts_and_queries(world, examples[:5])
    contexts[1] = PreferenceContext(contexts[1].liked[:1], contexts[1].disliked)
    settings = {"slot_positions": slot_positions, "batch_size": 2, "max_new_tokens": 5}
    plain = MllmPreferenceModel(model, processor, cache_vision_features=False, **settings)
    expected = {
        "states": plain.hidden_states(contexts, queries),
        "taste states": plain.hidden_states(contexts, question=TASTE_QUESTION),
        "judge": plain.judge(contexts, queries),
    }
    answers = plain.answer(contexts, queries)

    pictures_through_tower = []
    hook = vision_encoder(model).register_forward_hook(
        lambda module, args, output: pictures_through_tower.append(len(args[0]))
    )
    cached = MllmPreferenceModel(model, processor, **settings)
    found = {
        "states": cached.hidden_states(contexts, queries),
        "taste states": cached.hidden_states(contexts, question=TASTE_QUESTION),
        "judge": cached.judge(contexts, queries),
    }
    assert cached.answer(contexts, queries) == answers
    hook.remove()
    for name, value in expected.items():
        torch.testing.assert_close(found[name], value, rtol=1e-5, atol=1e-5, msg=name)
    # each distinct picture went through the frozen tower once, however often it was shown
    distinct = {
        picture.tobytes()
        for context, query in zip(contexts, queries, strict=True)
        for picture in (*context.liked, *context.disliked, query)
    }
    assert sum(pictures_through_tower) == len(distinct)


def test_vqa_samples_with_cached_features_score_as_with_pixels(world, processor):
    model = tiny_mllm(processor)
    chats = sample_examples(world, samples_per_user=3, questions_per_context=2)
    assert any(example.turn > 0 for example in chats)  # follow-up questions in a chat
    plain = VqaDataset(chats, world.pictures, processor, slot_positions=True)
    cached = VqaDataset(chats, world.pictures, processor, slot_positions=True, features_from=model)
    with_pixels = plain.collate([plain[i] for i in range(len(plain))])
    with_features = cached.collate([cached[i] for i in range(len(cached))])
    assert with_features.keys() == with_pixels.keys() - {"pixel_values"} | {"vision_features"}
    for key in with_pixels.keys() - {"pixel_values"}:
        assert torch.equal(with_features[key], with_pixels[key]), key
    with torch.no_grad():
        loss_pixels, _ = vqa_loss(model, with_pixels)
        loss_features, _ = vqa_loss(model, with_features)
    torch.testing.assert_close(loss_features, loss_pixels, rtol=1e-5, atol=1e-6)
    # a picture's features do not depend on which sample asked for it first (a resumed run)
    again = VqaDataset(chats, world.pictures, processor, slot_positions=True, features_from=model)
    last_first = [again[i] for i in reversed(range(len(again)))][::-1]
    for item, other in zip([cached[i] for i in range(len(cached))], last_first, strict=True):
        assert torch.equal(item["vision_features"], other["vision_features"])


def test_lora_on_a_saved_model_trains_only_the_adapters(world, examples, saved, tmp_path):
    model = AutoModelForImageTextToText.from_pretrained(saved)
    processor = AutoProcessor.from_pretrained(saved)
    wrapped = add_lora(
        model,
        rank=4,
        alpha=8,
        target_modules=r".*language_model.*\.(q_proj|v_proj)",
        gradient_checkpointing=True,
    )
    before = {name: value.clone() for name, value in wrapped.state_dict().items()}
    dataset = VqaDataset(examples, world.pictures, processor, slot_positions=True)
    result = train(
        wrapped,
        dataset,
        vqa_loss,
        TrainConfig(max_steps=1, batch_size=4, learning_rate=1e-2),
        checkpoint_root=tmp_path,
        name="vqa_lora",
        collate_fn=dataset.collate,
    )
    assert result.steps == 1 and np.isfinite(result.history[-1]["loss"])
    after = wrapped.state_dict()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all("lora_" in name for name in changed)
    assert any("language_model.layers.1.self_attn.v_proj.lora_B" in name for name in changed)
    assert not any("vision_tower" in name for name in changed)


def test_qwen2_vl_takes_the_same_road(world, examples, make_qwen2_vl_processor, tmp_path):
    """The gpu world's family, built tiny: same batching, loss, LoRA and inference."""
    qwen_processor = make_qwen2_vl_processor(vqa_corpus(world.images["caption"]))
    qwen_processor.save_pretrained(tmp_path)
    vocabulary = qwen_processor.tokenizer.get_vocab()
    config = Qwen2VLConfig(
        text_config={
            "vocab_size": len(qwen_processor.tokenizer),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": TEXT_LAYERS,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "rope_parameters": {"rope_type": "default", "mrope_section": [2, 2, 4]},
        },
        vision_config={"depth": 1, "embed_dim": 16, "hidden_size": 32, "num_heads": 2},
        image_token_id=vocabulary["<|image_pad|>"],
        video_token_id=vocabulary["<|video_pad|>"],
        vision_start_token_id=vocabulary["<|vision_start|>"],
        vision_end_token_id=vocabulary["<|vision_end|>"],
    )
    torch.manual_seed(0)
    Qwen2VLForConditionalGeneration(config).save_pretrained(tmp_path)

    model = AutoModelForImageTextToText.from_pretrained(tmp_path)
    processor = AutoProcessor.from_pretrained(tmp_path)
    wrapped = add_lora(model, rank=2, alpha=4, target_modules=["q_proj", "v_proj"])
    dataset = VqaDataset(examples, world.pictures, processor)
    result = train(
        wrapped,
        dataset,
        vqa_loss,
        TrainConfig(max_steps=1, batch_size=2, learning_rate=1e-2),
        checkpoint_root=tmp_path / "checkpoints",
        name="qwen_lora",
        collate_fn=dataset.collate,
    )
    assert np.isfinite(result.history[-1]["loss"])

    inference = MllmPreferenceModel(wrapped, processor, batch_size=2, max_new_tokens=3)
    contexts, queries = contexts_and_queries(world, examples[:3])
    contexts[1] = PreferenceContext(contexts[1].liked[:1], contexts[1].disliked)
    states = inference.hidden_states(contexts, queries)
    assert states.shape == (3, TEXT_LAYERS + 1, 32)
    alone = torch.cat(
        [inference.hidden_states([c], [q]) for c, q in zip(contexts, queries, strict=True)]
    )
    assert torch.allclose(states, alone, atol=1e-5)
    assert inference.judge(contexts, queries).shape == (3,)
    assert len(inference.answer(contexts, queries)) == 3
