"""A ``transformers.CLIPTokenizer`` built offline from the BPE file inside ``open_clip``.

open_clip ships OpenAI CLIP's byte-level BPE (``bpe_simple_vocab_16e6.txt.gz``) and builds
its vocabulary in code; this rebuilds the same 49,408 ids (256 bytes, the same with
``</w>``, 48,894 merges, ``<start_of_text>``, ``<end_of_text>``) so the agent world's tiny
CLIP gets a real tokenizer without a hub download.

Equal to ``open_clip.tokenize`` for the same text: ``[<start_of_text>] + bpe + [<end_of_text>]``,
truncated to ``model_max_length`` with the last id forced to ``<end_of_text>``. Two choices
and one known gap:

* Padding uses ``<end_of_text>`` (as Stable Diffusion's CLIP tokenizer does), where
  open_clip pads with id 0 (the byte ``!``, since it has no pad token). A CLIP text encoder
  is causal and pools at the first ``<end_of_text>``, so what follows never reaches the
  pooled output; making ``!`` the pad token instead would make it a special token and
  change how a ``!`` in the text is tokenized.
* Build with ``vocab=``/``merges=``: in transformers 5, ``CLIPTokenizer(vocab_file=...,
  merges_file=...)`` silently ignores both files and yields a 2-token vocabulary.
* open_clip also cleans text with ``ftfy`` and ``html.unescape`` (``"&amp;"`` becomes
  ``"&"``); the HF tokenizer only NFC-normalises, collapses whitespace and lowercases, so
  text with HTML entities or mojibake tokenizes differently.
"""

from __future__ import annotations

import gzip
import importlib.util
from functools import cache
from pathlib import Path

from transformers import CLIPTokenizer

BOS_TOKEN = "<start_of_text>"
EOS_TOKEN = "<end_of_text>"
CONTEXT_LENGTH = 77
_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
_NUM_MERGES = 49152 - 256 - 2  # open_clip keeps the first 48,894 merges of the file


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map the BPE vocabulary is written in."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    characters = printable[:]
    shifted = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            characters.append(256 + shifted)
            shifted += 1
    return dict(zip(printable, map(chr, characters), strict=True))


def open_clip_bpe_path() -> Path:
    """The BPE merges file bundled with the installed ``open_clip_torch``."""
    # find_spec locates the package without importing it (importing open_clip takes ~3 s).
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("open_clip_torch is not installed; it ships the CLIP BPE file")
    path = Path(next(iter(spec.submodule_search_locations))) / _BPE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed open_clip_torch")
    return path


@cache
def open_clip_vocab_and_merges() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """open_clip's token -> id map and its BPE merges, in rank order."""
    with gzip.open(open_clip_bpe_path(), "rt", encoding="utf-8") as handle:
        lines = handle.read().split("\n")
    # Line 0 is a "#version" header.
    merges = tuple(tuple(line.split()) for line in lines[1 : _NUM_MERGES + 1])
    byte_tokens = list(_bytes_to_unicode().values())
    tokens = [
        *byte_tokens,
        *(token + "</w>" for token in byte_tokens),
        *("".join(merge) for merge in merges),
        BOS_TOKEN,
        EOS_TOKEN,
    ]
    return {token: index for index, token in enumerate(tokens)}, merges


def build_clip_tokenizer(model_max_length: int = CONTEXT_LENGTH) -> CLIPTokenizer:
    """A CLIP tokenizer with open_clip's vocabulary and special tokens, padding with EOS."""
    vocab, merges = open_clip_vocab_and_merges()
    return CLIPTokenizer(
        vocab=dict(vocab),
        merges=list(merges),
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        # Byte-level BPE covers every byte, so the unknown token never occurs.
        unk_token=EOS_TOKEN,
        model_max_length=model_max_length,
    )


def save_clip_tokenizer(directory: str | Path, model_max_length: int = CONTEXT_LENGTH) -> Path:
    """Write the tokenizer with ``save_pretrained`` so ``from_pretrained(directory)`` loads it."""
    directory = Path(directory)
    build_clip_tokenizer(model_max_length).save_pretrained(directory)
    return directory
