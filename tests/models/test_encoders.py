import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from prefgen_kedro.datasets import PretrainedModelDataset
from prefgen_kedro.models.batches import class_indices
from prefgen_kedro.models.clip import (
    CLIP_MEAN,
    OPEN_CLIP_CONFIG,
    OPEN_CLIP_WEIGHTS,
    ClipWithAttributeHeads,
    build_evaluation_clip,
    clip_training_data,
    clip_with_heads_loss,
    conditioning_clip_encoders,
    evaluation_clip_encoders,
    zero_shot_accuracy,
)
from prefgen_kedro.models.clip_tokenizer import build_clip_tokenizer
from prefgen_kedro.models.oracle import AttributeOracle, head_accuracy, oracle_training_data
from prefgen_kedro.world.agent_world import render_set
from prefgen_kedro.world.vocabulary import CATEGORIES, HEADS, SUBJECTS

SIZE = 16


def grouped_batch(renders, input_ids):
    """Both groups of ``renders`` as one batch, with every head's labels."""
    labels = class_indices(renders.labels(), HEADS)
    data = clip_training_data(renders.images, input_ids, SIZE, group_size=4, labels=labels)
    assert len(data) == 2 and data[0]["pixel_values"].shape == (4, 3, SIZE, SIZE)
    return {key: torch.stack([data[0][key], data[1][key]]) for key in data[0]}


def heads_loss(clip, batch):
    model = ClipWithAttributeHeads(clip, {head: len(c) for head, c in HEADS.items()})
    loss, logged = clip_with_heads_loss(model, batch, head_weight=1.0)
    assert set(logged) == {"contrastive", "image_heads", "text_heads"}
    # The heads add their cross-entropy to the contrastive loss.
    assert loss.item() > logged["contrastive"]
    return loss


@pytest.fixture(scope="module")
def renders():
    return render_set(8, seed=0, size=SIZE, group_size=4, shared=("background",))


def test_groups_share_their_categories(renders):
    assert [s["background"] for s in renders.styles[:4]] == [renders.styles[0]["background"]] * 4
    with pytest.raises(ValueError, match="multiple of group_size"):
        render_set(5, seed=0, size=SIZE, group_size=2)
    with pytest.raises(ValueError, match="not in"):
        render_set(4, seed=0, size=SIZE, group_size=2, shared=("colour",))


def test_conditioning_clip_trains_on_groups_and_encodes(renders, make_conditioning_clip):
    tokenizer = build_clip_tokenizer(model_max_length=24)
    model = make_conditioning_clip(SIZE, vocab_size=len(tokenizer))
    ids = tokenizer(renders.captions, padding="max_length", return_tensors="pt").input_ids
    loss = heads_loss(model, grouped_batch(renders, ids))
    loss.backward()
    assert (
        torch.isfinite(loss) and model.text_model.embeddings.token_embedding.weight.grad is not None
    )
    encode_images, encode_texts = conditioning_clip_encoders(model.eval(), tokenizer)
    assert encode_images(renders.images).shape == (8, 8)
    assert torch.allclose(encode_texts(["a red star"]).norm(dim=-1), torch.ones(1))


def tiny_evaluation_clip():
    return build_evaluation_clip(
        image_size=SIZE,
        patch_size=4,
        vision_width=16,
        vision_layers=1,
        text_width=16,
        text_layers=1,
        heads=2,
        embed_dim=8,
        context_length=24,
        seed=0,
    )


def test_evaluation_clip_loss_and_zero_shot_accuracy_are_well_formed(renders):
    model = tiny_evaluation_clip()
    loss = heads_loss(model, grouped_batch(renders, model.tokenize(renders.captions)))
    loss.backward()
    assert torch.isfinite(loss) and model.model.visual.conv1.weight.grad is not None
    accuracy = zero_shot_accuracy(
        *evaluation_clip_encoders(model.eval()), renders.images, renders.subjects, renders.styles
    )
    assert set(accuracy) == {"subject", *CATEGORIES}
    assert all(0.0 <= value <= 1.0 for value in accuracy.values())


def test_evaluation_clip_loads_an_open_clip_hub_directory(renders, tmp_path):
    """The layout laion's checkpoints ship (the gpu world's ViT-H-14), beside the
    transformers files such a repository also holds."""
    model = tiny_evaluation_clip().eval()
    (tmp_path / OPEN_CLIP_CONFIG).write_text(
        json.dumps({"model_cfg": model.model_cfg, "preprocess_cfg": {"mean": list(CLIP_MEAN)}})
    )
    save_file(model.model.state_dict(), tmp_path / OPEN_CLIP_WEIGHTS)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "clip"}))
    loaded = PretrainedModelDataset(
        path=tmp_path, model_class="prefgen_kedro.models.clip.EvaluationClip"
    ).load()
    assert loaded.model_cfg == model.model_cfg and not loaded.training
    images, texts = evaluation_clip_encoders(model)
    loaded_images, loaded_texts = evaluation_clip_encoders(loaded)
    assert torch.equal(loaded_images(renders.images), images(renders.images))
    assert torch.equal(loaded_texts(["a red star"]), texts(["a red star"]))


def test_evaluation_clip_encodes_images_in_batches_as_in_one(renders):
    model = tiny_evaluation_clip().eval()
    whole, _ = evaluation_clip_encoders(model, batch_size=len(renders.images))
    batched, _ = evaluation_clip_encoders(model, batch_size=3)
    torch.testing.assert_close(batched(renders.images), whole(renders.images))


def test_zero_shot_accuracy_is_exact_for_a_perfect_encoder(renders):
    """Embedding images and captions by the words of their true attributes scores 100%."""
    vocab = [*SUBJECTS, *(value for values in CATEGORIES.values() for value in values)]

    def embed(words):
        vector = torch.tensor([float(word in words) for word in vocab])
        return vector / vector.norm()

    truth = {
        image.tobytes(): embed({subject, *style.values()})
        for image, subject, style in zip(
            renders.images, renders.subjects, renders.styles, strict=True
        )
    }

    def encode_images(images):
        return torch.stack([truth[image.tobytes()] for image in images])

    def encode_texts(texts):
        padded = [f" {text.replace(',', ' ')} " for text in texts]
        return torch.stack([embed({w for w in vocab if f" {w} " in t}) for t in padded])

    accuracy = zero_shot_accuracy(
        encode_images, encode_texts, renders.images, renders.subjects, renders.styles
    )
    assert accuracy == dict.fromkeys(["subject", *CATEGORIES], 1.0)


def test_oracle_reads_every_head(renders):
    heads = HEADS
    oracle = AttributeOracle(heads=heads, image_size=SIZE, width=4)
    data = oracle_training_data(renders.images, renders.labels(), heads)
    assert int(data[0]["subject"]) == SUBJECTS.index(renders.subjects[0])
    predicted = oracle.predict(renders.images)
    assert set(predicted) == set(heads) and all(len(v) == 8 for v in predicted.values())
    accuracy = head_accuracy(oracle, renders.images, renders.labels())
    assert all(0.0 <= value <= 1.0 for value in accuracy.values())
    perfect = head_accuracy(oracle, renders.images, oracle.predict(renders.images))
    assert all(value == 1.0 for value in perfect.values())
    assert np.asarray(renders.images).dtype == np.uint8
