import pytest
import torch
from open_clip.tokenizer import SimpleTokenizer, tokenize
from transformers import CLIPTokenizer

from prefgen_kedro.models.clip_tokenizer import (
    BOS_TOKEN,
    EOS_TOKEN,
    build_clip_tokenizer,
    open_clip_vocab_and_merges,
    save_clip_tokenizer,
)

TEXTS = [
    "a red circle on a white background",
    "Hello, World!!! It's 2024: 3.14 apples; (pears?) -- 'quoted' \"double\"",
    "CAPITALS and MiXeD case, e.g. NASA's iPhone",
    "  extra   spaces\tand\nnewlines  ",
    "émigré naïve café, Zürich 東京 🙂",
    "hello!",
    "",
    " ".join(f"word{i}" for i in range(60)),  # 120+ tokens: truncated
]


def encode(tokenizer: CLIPTokenizer, texts: list[str]) -> torch.Tensor:
    return tokenizer(
        texts, padding="max_length", truncation=True, max_length=77, return_tensors="pt"
    )["input_ids"]


@pytest.fixture(scope="module")
def tokenizer() -> CLIPTokenizer:
    return build_clip_tokenizer()


def test_vocabulary_is_open_clips():
    vocab, merges = open_clip_vocab_and_merges()
    reference = SimpleTokenizer()
    assert vocab == reference.encoder
    assert dict(zip(merges, range(len(merges)), strict=True)) == reference.bpe_ranks


def test_ids_equal_open_clip(tokenizer):
    assert tokenizer.bos_token == BOS_TOKEN
    assert tokenizer.eos_token == tokenizer.pad_token == EOS_TOKEN
    assert tokenizer.model_max_length == 77
    eos = tokenizer.eos_token_id
    ours, theirs = encode(tokenizer, TEXTS), tokenize(TEXTS)
    assert ours.shape == theirs.shape == (len(TEXTS), 77)
    for text, our_ids, their_ids in zip(TEXTS, ours, theirs, strict=True):
        # open_clip pads with 0; its sequence ends at the first end-of-text.
        length = int((their_ids == eos).nonzero()[0]) + 1
        assert our_ids[:length].tolist() == their_ids[:length].tolist(), text
        # Our layout: the same ids, then end-of-text padding instead of open_clip's zeros.
        assert torch.equal(our_ids, torch.where(torch.arange(77) < length, their_ids, eos))
    # The long text is truncated as open_clip does: 75 tokens, then a forced end-of-text.
    assert int((theirs[-1] == eos).nonzero()[0]) == 76


def test_save_and_load_round_trip(tokenizer, tmp_path):
    directory = save_clip_tokenizer(tmp_path / "tokenizer")
    loaded = CLIPTokenizer.from_pretrained(directory)
    assert len(loaded) == len(tokenizer) == 49408
    assert loaded.pad_token == EOS_TOKEN
    assert torch.equal(encode(loaded, TEXTS), encode(tokenizer, TEXTS))
