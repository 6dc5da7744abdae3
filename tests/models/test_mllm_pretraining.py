"""Pretraining tasks on simulated foundation users: questions, curricula, taste answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from prefgen_kedro.data.tables import LIKED
from prefgen_kedro.models.mllm import (
    IGNORE_INDEX,
    build_tiny_mllm,
    build_tiny_processor,
    collate_vqa,
    encode_chat,
    encode_vqa,
    select_vision_features,
    train_tokenizer,
)
from prefgen_kedro.models.mllm_pretraining import (
    DESCRIBE,
    CaptionTask,
    HeldoutTaste,
    MllmPretrainParams,
    SimulatedUsersParams,
    SimulatedUserVqa,
    TasteHead,
    attribute_readout_accuracy,
    evaluate_on_simulated_users,
    fit_attribute_readout,
    pretrain,
    taste_head_loss,
)
from prefgen_kedro.models.vqa import (
    IMAGE_PLACEHOLDER,
    QUERY_MARKER,
    TASTE_QUESTION,
    parse_taste,
    query_prompt,
    vqa_corpus,
)
from prefgen_kedro.world.agent_world import render_set
from prefgen_kedro.world.vocabulary import ATTRIBUTE_IDS, CATEGORIES, attribute, attribute_ids

SIZE = 16


@pytest.fixture(scope="module")
def pool():
    return render_set(300, seed=0, size=SIZE)


@pytest.fixture(scope="module")
def processor(pool):
    tokenizer = train_tokenizer(vqa_corpus(pool.captions, [DESCRIBE]), vocab_size=400)
    return build_tiny_processor(tokenizer, image_size=SIZE)


# The smallest foundation MLLM architecture pretraining runs here.
ARCHITECTURE = {
    "text_width": 16,
    "text_layers": 1,
    "text_heads": 2,
    "max_positions": 256,
    "initializer_range": 0.08,
    "matching_attention_std": 0.1,
}
CATEGORY_SIZES = [len(values) for values in CATEGORIES.values()]


def attribute_mllm(processor, clip):
    """A model of ``ARCHITECTURE`` on ``clip``'s vision tower."""
    return build_tiny_mllm(
        processor.tokenizer,
        vision_from=clip,
        seed=0,
        attribute_categories=CATEGORY_SIZES,
        **ARCHITECTURE,
    )


def row_features(pool):
    """Stand-in vision features: each render's row index, so a sample shows which renders
    it gathered."""
    return torch.arange(len(pool.images), dtype=torch.float32)[:, None, None].expand(-1, 2, 3)


def questions(pool, processor, n=200, **settings):
    task = SimulatedUserVqa(
        pool, processor, row_features(pool), n_samples=n, seed=1, **({"k": (1, 4)} | settings)
    )
    return task, [task.question(i) for i in range(n)]


def test_questions_are_balanced_true_to_the_user_and_never_show_the_query(pool, processor):
    task, asked = questions(pool, processor)
    assert 0.4 < np.mean([q.label == LIKED for q in asked]) < 0.6
    assert {len(q.liked) for q in asked} == {1, 2, 3, 4}
    for q in asked:
        assert len(q.liked) == len(q.disliked) and q.query not in q.liked + q.disliked
        utility = lambda i, q=q: q.user.utility(attribute_ids(pool.styles[i]))  # noqa: E731
        assert all(utility(i) > 0 for i in q.liked) and all(utility(i) < 0 for i in q.disliked)
        assert (utility(q.query) > 0) == (q.label == LIKED)
        opinion = q.user.liked if q.label == LIKED else q.user.disliked
        for word in q.answer.removeprefix("Yes, because it is ").split(" and "):
            if "because" not in q.answer:
                break
            assert any(attribute(a).value in word for a in opinion)
    # a fresh user per question, and the same question for the same index
    assert len({tuple(sorted(q.user.liked)) for q in asked}) > 150
    assert task.question(7) == questions(pool, processor)[0].question(7)


def test_copied_queries_come_from_the_context_side_of_their_label(pool, processor):
    task, _ = questions(pool, processor, n=60, copy_probability=1.0, queries=(1, 4))
    asked = [q for index in range(60) for q in task.questions(index)]
    assert len(asked) > 100  # follow-ups are copies too
    for q in asked:
        assert q.query in (q.liked if q.label == LIKED else q.disliked)
    _, none = questions(pool, processor, copy_probability=0.0)
    assert not any(q.query in q.liked + q.disliked for q in none)
    half, _ = questions(pool, processor, n=60, copy_probability=0.5, queries=(4, 4))
    copied = [q.query in q.liked + q.disliked for i in range(60) for q in half.questions(i)]
    assert 0.35 < np.mean(copied) < 0.65


def test_follow_up_queries_are_fresh_balanced_and_each_answered(pool, processor):
    _, asked = questions(pool, processor, n=60)
    task, _ = questions(pool, processor, n=60, queries=(1, 4))
    counts, labels = [], []
    for index, first in enumerate(asked):
        sample = task.questions(index)
        # the first question is the one-query dataset's; the follow-ups share its context
        assert task.question(index) == sample[0]
        assert (sample[0].liked, sample[0].query) == (first.liked, first.query)
        queries = [q.query for q in sample]
        assert len(set(queries)) == len(queries)
        assert not set(queries) & set(first.liked + first.disliked)
        for q in sample[1:]:
            assert (q.liked, q.disliked, q.user) == (first.liked, first.disliked, first.user)
            utility = q.user.utility(attribute_ids(pool.styles[q.query]))
            assert (utility > 0) == (q.label == LIKED)
            labels.append(q.label == LIKED)
        counts.append(len(sample))
        item = task[index]
        answers = item["labels"][item["labels"] != IGNORE_INDEX]
        assert (answers == processor.tokenizer.eos_token_id).sum() == len(sample)
        shown = item["vision_features"][:, 0, 0].long().tolist()
        assert shown == [*first.liked, *first.disliked, *queries]
    assert set(counts) == {1, 2, 3, 4} and 0.35 < np.mean(labels) < 0.65
    with pytest.raises(ValueError, match="queries must be a range"):
        SimulatedUserVqa(pool, processor, None, n_samples=1, seed=0, k=(1, 2), queries=(0, 2))


def test_taste_samples_ask_about_the_context_and_name_shown_attributes(pool, processor):
    task, asked = questions(pool, processor, n=40, taste_probability=1.0)
    tokenizer = processor.tokenizer
    for index, q in enumerate(asked):
        liked, disliked = parse_taste(task.taste(q))
        shown = {a for i in q.liked for a in attribute_ids(pool.styles[i])}
        assert {a for a in q.user.liked if a in shown} == {
            a for a in q.user.liked if attribute(a).value in liked
        }
        assert all(any(attribute(a).value == w for a in q.user.disliked) for w in disliked)
        item = task[index]
        answer = item["labels"][item["labels"] != IGNORE_INDEX]
        assert tokenizer.decode(answer, skip_special_tokens=True).strip() == task.taste(q)
        # no query image: the 2K context images
        assert item["vision_features"][:, 0, 0].long().tolist() == [*q.liked, *q.disliked]


def test_samples_are_the_encoding_of_their_pictures(pool, processor, make_conditioning_clip):
    """A sample (its layout encoded once on blank pictures, the renders' cached features)
    is what encoding the pictures themselves gives, and the model answers it alike."""
    model = attribute_mllm(processor, make_conditioning_clip(SIZE, patch_size=8)).eval()
    features = select_vision_features(model, pool.images)
    task = SimulatedUserVqa(
        pool,
        processor,
        features,
        n_samples=20,
        seed=3,
        k=(1, 3),
        queries=(1, 3),
        copy_probability=0.3,
        taste_probability=0.4,
    )
    images = pool.images
    tastes = 0
    for index in range(20):
        first, *follow_ups = task.questions(index)
        item = task[index]
        if "vision_features" in item and len(item["vision_features"]) == 2 * len(first.liked):
            tastes += 1
            expected = encode_vqa(
                processor,
                task.context(first),
                None,
                task.taste(first),
                slot_positions=True,
                question=TASTE_QUESTION,
            )
        else:
            expected = encode_vqa(
                processor,
                task.context(first),
                images[first.query],
                first.answer,
                slot_positions=True,
                follow_ups=[(query_prompt(), [images[q.query]], q.answer) for q in follow_ups],
            )
        for key in ("input_ids", "attention_mask", "labels", "position_ids"):
            assert torch.equal(item[key], expected[key]), (index, key)
        with torch.no_grad():
            cached = model(**collate_vqa([item], pad_token_id=0)).logits
            pixels = model(**collate_vqa([expected], pad_token_id=0)).logits
        assert torch.allclose(cached, pixels, atol=1e-5), index
    assert 0 < tastes < 20
    caption = CaptionTask(pool, processor, features, n_samples=3, seed=0)[1]
    shown = [i for i, row in enumerate(features) if torch.equal(row, caption["vision_features"][0])]
    expected = encode_chat(
        processor,
        f"{DESCRIBE} {QUERY_MARKER}{IMAGE_PLACEHOLDER}",
        [images[shown[0]]],
        pool.captions[shown[0]],
        slot_positions=True,
    )
    for key in ("input_ids", "labels", "position_ids"):
        assert torch.equal(caption[key], expected[key]), key


def test_the_taste_head_reads_the_taste_question_and_scores_its_users(
    pool, processor, make_conditioning_clip
):
    model = attribute_mllm(processor, make_conditioning_clip(SIZE, patch_size=8))
    features = select_vision_features(model, pool.images)
    task = SimulatedUserVqa(
        pool,
        processor,
        features,
        n_samples=16,
        seed=2,
        k=(2, 3),
        taste_probability=0.5,
        taste_targets=True,
        n_liked=2,
        n_disliked=2,
    )
    batch = task.collate([task[i] for i in range(16)])
    asked = batch["taste_position"] >= 0
    assert 0 < asked.sum() < 16
    for row in asked.nonzero().squeeze(1).tolist():
        user = task.question(row).user
        assert batch["taste_targets"][row].sum() == 4  # 2 liked + 2 disliked, shown or not
        position = int(batch["taste_position"][row])
        # the state read is the prompt's last token: the answer starts right after it
        assert batch["labels"][row, position] == IGNORE_INDEX
        assert batch["labels"][row, position + 1] != IGNORE_INDEX
        liked = batch["taste_targets"][row, : len(ATTRIBUTE_IDS)].nonzero().squeeze(1)
        assert {ATTRIBUTE_IDS[i] for i in liked.tolist()} == set(user.liked)
    # without the answer, the head alone scores a taste sample: its state is the last token
    silent = SimulatedUserVqa(
        pool,
        processor,
        features,
        n_samples=4,
        seed=2,
        k=(2, 3),
        taste_probability=1.0,
        taste_targets=True,
        taste_answer=False,
    )
    for item in (silent[i] for i in range(4)):
        assert (item["labels"] == IGNORE_INDEX).all()
        assert int(item["taste_position"]) == len(item["input_ids"]) - 1
    head = TasteHead(model, len(ATTRIBUTE_IDS))
    loss, metrics = taste_head_loss(head, batch, weight=2.0)
    answer_only, _ = taste_head_loss(head, batch, weight=0.0)
    assert loss.item() == pytest.approx(answer_only.item() + 2.0 * metrics["taste_loss"], rel=1e-5)
    loss.backward()
    assert head.head.weight.grad.abs().sum() > 0
    heldout = HeldoutTaste(
        pool,
        processor,
        features,
        k=3,
        n_users=24,
        seed=0,
        slot_positions=True,
        simulated_users=SimulatedUsersParams(n_liked=2, n_disliked=2),
    )
    assert 0.0 <= heldout(head) <= 1.0 and heldout.counting_rule_auc > 0.6
    assert head.training  # left as it was


def test_caption_task_labels_the_caption(pool, processor):
    task = CaptionTask(pool, processor, row_features(pool), n_samples=5, seed=0)
    item = task[0]
    answer = processor.tokenizer.decode(item["labels"][item["labels"] != IGNORE_INDEX])
    shown = int(item["vision_features"][0, 0, 0])
    assert answer.strip().removesuffix("</s>") == pool.captions[shown]
    with pytest.raises(IndexError):
        task[5]


def test_evaluation_compares_the_judge_with_the_counting_rule(pool, processor):
    model = build_tiny_mllm(
        processor.tokenizer,
        **ARCHITECTURE,
        seed=0,
        attribute_categories=CATEGORY_SIZES,
        vision_config={
            "image_size": SIZE,
            "patch_size": 4,
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
        },
    )
    model.train()
    result = evaluate_on_simulated_users(
        model, processor, pool, k=2, n_questions=24, seed=0, slot_positions=True
    )
    assert model.training  # left as it was
    assert result["k"] == 2 and result["questions"] == 24
    assert 0 <= result["accuracy"] <= 1
    # the counting rule reads true attributes: far above chance even at K=2
    assert result["counting_rule"] > 0.6


# with either answer loss
@pytest.mark.parametrize("answer_loss", ["language_model", "yes_no"])
def test_pretrain_runs_the_stages_in_order_and_resumes_them(
    pool, tmp_path, make_conditioning_clip, answer_loss
):
    clip = make_conditioning_clip(SIZE, patch_size=8)
    train = {"batch_size": 4, "learning_rate": 1e-3, "checkpoint_every": 2, "seed": 0}
    params = MllmPretrainParams.model_validate(
        {
            "architecture": ARCHITECTURE | {"vocab_size": 400},
            "attribute_readout": {"steps": 20, "batch_size": 32},
            "slot_positions": True,
            "simulated_users": {"n_liked": 2, "n_disliked": 2},
            "stages": [
                {"name": "caption", "task": "caption", "train": train | {"max_steps": 2}},
                {
                    "name": "match",
                    "task": "preference",
                    "k": (1, 2),
                    "copy_probability": 0.5,
                    "answer_loss": answer_loss,
                    # the taste head's stage, with either answer loss
                    "taste_probability": 0.5,
                    "taste_head_weight": 1.0,
                    "train": train | {"max_steps": 3, "log_every": 1},
                },
            ],
            "eval": {"ks": [1, 2], "questions": 8, "seed": 4},
        }
    )
    run = lambda: pretrain(pool, pool, clip, params, checkpoint_root=str(tmp_path))  # noqa: E731
    model, processor, report = run()
    assert [stage["stage"] for stage in report["learning_curve"]] == ["caption", "match"]
    assert [stage["samples"] for stage in report["learning_curve"]] == [8, 12]
    assert report["steps"] == 5
    assert set(report["metrics"]["heldout_simulated_users"]) == {"k1", "k2"}
    # the head's held-out taste AUC, logged against samples seen, and the final summary
    curve = report["learning_curve"][1]["learning_curve"]
    assert [entry["samples_seen"] for entry in curve] == [4, 8, 12]
    assert all(0.0 <= entry["heldout_taste_auc"] <= 1.0 for entry in curve)
    summary = report["metrics"]["heldout_taste_summary"]
    assert summary["k"] == 2 and 0.0 <= summary["head_auc"] <= 1.0
    assert set(report["metrics"]["heldout_taste_answers"]) >= {"liked_precision", "liked_recall"}
    assert processor.tokenizer is not None and not model.training
    # A second call resumes every stage from its last checkpoint: the same model and curves.
    again, _, rerun = run()
    assert [stage["run"]["resumed_from"] for stage in report["learning_curve"]] == [None, None]
    assert [stage["run"]["resumed_from"] for stage in rerun["learning_curve"]] == [2, 3]
    assert all(stage["run"]["reused"] for stage in rerun["learning_curve"])
    # Reused, the stages still tell how long their training took: the recipe's cost.
    assert rerun["trained_seconds"] == report["trained_seconds"] is not None
    assert [stage["learning_curve"] for stage in rerun["learning_curve"]] == [
        stage["learning_curve"] for stage in report["learning_curve"]
    ]
    for (name, value), other in zip(
        model.state_dict().items(), again.state_dict().values(), strict=True
    ):
        assert torch.equal(value, other), name
    assert set(report["metrics"]["attribute_readout_heldout_accuracy"]) == set(CATEGORIES)
    assert model.model.group_tags.weight.shape == (3, ARCHITECTURE["text_width"])
    # The read-out is fitted first, then frozen through every stage.
    fitted = attribute_mllm(processor, clip)
    fit_attribute_readout(fitted, pool, steps=20, learning_rate=1e-2, batch_size=32, seed=0)
    for name, value in fitted.model.multi_modal_projector.attribute_readout.state_dict().items():
        shipped = model.model.multi_modal_projector.attribute_readout.state_dict()[name]
        assert torch.equal(shipped, value.half().float()), name


def test_a_changed_vision_tower_weight_pretrains_every_stage_afresh(
    pool, tmp_path, make_conditioning_clip
):
    clip = make_conditioning_clip(SIZE, patch_size=8)
    train = {"batch_size": 2, "learning_rate": 1e-3, "max_steps": 1}
    params = MllmPretrainParams.model_validate(
        {
            "architecture": ARCHITECTURE | {"vocab_size": 400},
            "slot_positions": True,
            "simulated_users": {"n_liked": 2, "n_disliked": 2},
            "stages": [
                {"name": "caption", "task": "caption", "train": train},
                {"name": "match", "task": "preference", "train": train},
            ],
            "eval": {"ks": [1], "questions": 2, "seed": 4},
        }
    )
    renders = pool.first(40)
    _, _, first = pretrain(renders, renders, clip, params, checkpoint_root=str(tmp_path))
    tower = clip.vision_model.encoder.layers[0].mlp.fc1.weight
    with torch.no_grad():
        tower[-1, -1] += 1e-3  # one value, far from the tensor's first ones
    _, _, changed = pretrain(renders, renders, clip, params, checkpoint_root=str(tmp_path))
    for before, after in zip(first["learning_curve"], changed["learning_curve"], strict=True):
        assert after["run"]["resumed_from"] is None
        assert after["run"]["inputs"]["previous"] != before["run"]["inputs"]["previous"]


def test_attribute_readout_learns_each_category_of_held_out_renders(
    pool, processor, make_conditioning_clip
):
    clip = make_conditioning_clip(SIZE, patch_size=8)
    model = attribute_mllm(processor, clip)
    heldout = render_set(300, seed=1, size=SIZE)
    before = attribute_readout_accuracy(model, heldout)
    fit_attribute_readout(model, pool, steps=300, learning_rate=1e-2, batch_size=128, seed=0)
    after = attribute_readout_accuracy(model, heldout)
    assert list(after) == list(CATEGORIES)
    for category, values in CATEGORIES.items():
        assert after[category] > max(before[category], 1.25 / len(values)), category
    # Colours are what even a random one-layer tower keeps (measured: 0.38 and 0.52).
    assert after["background"] > 3 / 12 and after["tone"] > 3 / 8
