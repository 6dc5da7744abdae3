"""A miniature hub: the ``gpu`` environment's checkpoints with their real architectures and
folder layouts, shrunk in width and depth and filled with seeded random weights, so the whole
``gpu`` chain runs on a CPU in minutes (``conf/minihub``, ``tests/test_minihub.py``).

``write_minihub(root)`` writes, below ``root``, the folders ``conf/gpu/catalog.yml`` reads
below ``data/06_models/hub/``, with the same file names (safetensors only):

- ``Qwen2-VL-2B-Instruct/``: a ``Qwen2VLForConditionalGeneration`` (bf16, as shipped) with
  its processor: Qwen2-VL's image processor settings, a byte-level BPE ``Qwen2Tokenizer``
  with Qwen's special tokens (its vocabulary trained here on the project's prompts: the hub
  tokenizer is not on this machine), Qwen2-VL-Instruct's chat template and generation config;
- ``stable-diffusion-v1-5/{unet,vae,scheduler,tokenizer}``: SD 1.5's ``UNet2DConditionModel``
  and ``AutoencoderKL`` block structure (three cross-attention down blocks and a plain one, a
  4-channel latent at 1/8 of the pixels), its scheduler config unchanged and its tokenizer
  (OpenAI CLIP's BPE, from the copy ``open_clip`` bundles) as the hub's four files;
- ``clip-vit-large-patch14/``: a ``CLIPModel`` shaped like ViT-L/14 (patch 14 at 224 px, quick
  GELU); its text width is the UNet's cross-attention width, as in SD 1.5;
- ``CLIP-ViT-H-14-laion2B-s32B-b79K/``: open_clip's ViT-H-14 config, shrunk, in laion's layout
  (``open_clip_config.json`` + ``open_clip_model.safetensors``).

``write_pickapic_shards(folder)`` writes Pick-a-Pic v2 parquet shards (its columns and types)
of simulated users choosing between renders, for ``data_ingestion`` to read.

A folder is written only where nothing is, or where this module wrote it before (its
``minihub.json`` says so): anything else is refused, naming the path. Writing is seeded and
deterministic. ``python -m prefgen_kedro.minihub DEST [--pickapic SHARD_DIR]``; ``make
minihub`` writes both where ``conf/minihub`` reads them.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from prefgen_kedro.models.clip_tokenizer import open_clip_vocab_and_merges
from prefgen_kedro.provenance import files_digest

# The folders below a hub root (conf/gpu/catalog.yml).
QWEN2_VL = "Qwen2-VL-2B-Instruct"
STABLE_DIFFUSION = "stable-diffusion-v1-5"
CLIP_VIT_L14 = "clip-vit-large-patch14"
OPEN_CLIP_VIT_H14 = "CLIP-ViT-H-14-laion2B-s32B-b79K"
MARKER = "minihub.json"

# ---- Qwen2-VL-2B-Instruct ------------------------------------------------------------------
# Qwen2's special tokens, in the hub tokenizer's order (ids 151643-151656 there).
QWEN2_VL_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
# Qwen2-VL-2B-Instruct's chat template (a default system turn, images as vision pads).
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Qwen2-VL-2B's config with 6 of its 28 language layers (enough for gpu's layer choice: the
# last 4 for e_sem, a window of 2 from 30% of the depth for e_core) and 2 of its 32 vision
# blocks; widths / 24 (head sizes 16, mrope sections scaled alike).
QWEN2_VL_TEXT = {
    "hidden_size": 64,  # 1536
    "intermediate_size": 128,  # 8960
    "num_hidden_layers": 6,  # 28
    "num_attention_heads": 4,  # 12
    "num_key_value_heads": 2,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
    "tie_word_embeddings": True,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
}
QWEN2_VL_VISION = {
    "depth": 2,  # 32
    "embed_dim": 32,  # 1280
    "hidden_size": 64,  # the language width
    "num_heads": 2,  # 16
    "mlp_ratio": 4,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "in_channels": 3,
    "hidden_act": "quick_gelu",
}
# Qwen2-VL's image processor as shipped: a 64 px picture becomes 56 × 56, 4 image tokens.
QWEN2_VL_PIXELS = {"min_pixels": 56 * 56, "max_pixels": 28 * 28 * 16384}
TOKENIZER_VOCABULARY = 1024  # the trained BPE's size before the special tokens (hub: 151,643)

# ---- Stable Diffusion 1.5 ------------------------------------------------------------------
TEXT_WIDTH = 32  # CLIP ViT-L/14's text width (768) = the UNet's cross-attention width
# stable-diffusion-v1-5/stable-diffusion-v1-5's unet/ and vae/ config.json (the real sizes,
# which benchmarks/gpu_check.py and tests/test_gpu_components.py build), and the miniature.
HUB_SD15_UNET = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-5,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
}
HUB_SD15_VAE = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "scaling_factor": 0.18215,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
SD15_UNET = HUB_SD15_UNET | {
    "block_out_channels": [32, 64, 64, 64],
    "cross_attention_dim": TEXT_WIDTH,
    "layers_per_block": 1,
    "sample_size": 8,  # latents of 64 px pictures
}
SD15_VAE = HUB_SD15_VAE | {
    "block_out_channels": [32, 32, 64, 64],  # still 8× down, as SD's
    "layers_per_block": 1,
    "sample_size": 64,
}
SD15_SCHEDULER = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}
# The hub's CLIP tokenizer names its two special tokens differently from open_clip.
SD_BOS, SD_EOS = "<|startoftext|>", "<|endoftext|>"

# ---- CLIP ViT-L/14 -------------------------------------------------------------------------
CLIP_CONFIG = {
    "projection_dim": 32,  # 768
    "logit_scale_init_value": 2.6592,
    "text_config": {
        "hidden_size": TEXT_WIDTH,
        "intermediate_size": 4 * TEXT_WIDTH,
        "num_attention_heads": 2,  # 12
        "num_hidden_layers": 2,  # 12
        "max_position_embeddings": 77,
        "hidden_act": "quick_gelu",
        "vocab_size": 49408,
        # As in openai/clip-vit-large-patch14: with eos id 2, transformers pools at the
        # highest id of the input, which is <|endoftext|>.
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 1,
        "projection_dim": 32,
    },
    "vision_config": {
        "hidden_size": 32,  # 1024
        "intermediate_size": 128,  # 4096
        "num_attention_heads": 2,  # 16
        "num_hidden_layers": 2,  # 24
        "image_size": 224,
        "patch_size": 14,
        "hidden_act": "quick_gelu",
        "projection_dim": 32,
    },
}

# ---- open_clip ViT-H-14 (laion) --------------------------------------------------------------
VIT_H14_SHRUNK = {
    "embed_dim": 32,  # 1024
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 32, "head_width": 16, "patch_size": 14},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
OPEN_CLIP_PREPROCESS = {
    "mean": [0.48145466, 0.4578275, 0.40821073],
    "std": [0.26862954, 0.26130258, 0.27577711],
}


class NotMinihubError(FileExistsError):
    """A folder holds files this module did not write; it is never written over."""


def write_minihub(root: str | Path, *, seed: int = 0) -> dict[str, Path]:
    """Write the miniature hub below ``root`` (see the module docstring); returns each
    folder by its catalog name. ``root`` must be missing, empty or a miniature hub (then it
    is rewritten whole)."""
    root = Path(root)

    def write(staging: Path) -> None:
        write_qwen2_vl(staging / QWEN2_VL, seed=seed)
        write_stable_diffusion(staging / STABLE_DIFFUSION, seed=seed + 1)
        write_clip_vit_l14(staging / CLIP_VIT_L14, seed=seed + 2)
        write_open_clip_vit_h14(staging / OPEN_CLIP_VIT_H14, seed=seed + 3)

    _write_owned(root, write, {"kind": "hub", "seed": seed})
    return hub_folders(root)


def hub_folders(root: str | Path) -> dict[str, Path]:
    """The catalog's hub entries and their folders below a hub ``root``."""
    root = Path(root)
    sd = root / STABLE_DIFFUSION
    return {
        "foundation_mllm": root / QWEN2_VL,
        "foundation_mllm_processor": root / QWEN2_VL,
        "base_unet": sd / "unet",
        "base_vae": sd / "vae",
        "noise_scheduler": sd / "scheduler",
        "clip_tokenizer": sd / "tokenizer",
        "conditioning_clip": root / CLIP_VIT_L14,
        "evaluation_clip": root / OPEN_CLIP_VIT_H14,
    }


def _write_owned(folder: Path, write: Any, marker: dict[str, Any]) -> None:
    """Write ``folder`` by ``write(staging)`` beside it and move it into place, unless it
    holds something this module did not write."""
    occupied = folder.exists() and (not folder.is_dir() or any(folder.iterdir()))
    if occupied and not (folder / MARKER).is_file():
        raise NotMinihubError(
            f"{folder} is not empty and was not written by prefgen_kedro.minihub (no "
            f"{MARKER}); refusing to write over it"
        )
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        write(staging)
        files = files_digest(staging)
        (staging / MARKER).write_text(
            json.dumps({"written_by": __name__, **marker, "files_digest": files}, indent=2)
        )
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# ---- the models -----------------------------------------------------------------------------


def write_qwen2_vl(folder: Path, *, seed: int) -> None:
    """Qwen2-VL in bf16 and its processor (image processor, tokenizer, chat template)."""
    from transformers import GenerationConfig, Qwen2VLForConditionalGeneration

    tokenizer = qwen2_tokenizer()
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN2_VL_SPECIAL_TOKENS}
    config = qwen2_vl_config(tokenizer)
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config).to(torch.bfloat16)
    # The Instruct checkpoint's generation config (sampling at near-zero temperature).
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<|endoftext|>"],
        pad_token_id=ids["<|endoftext|>"],
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        do_sample=True,
        temperature=0.01,
        top_k=1,
        top_p=0.001,
        repetition_penalty=1.0,
    )
    model.save_pretrained(folder)
    qwen2_vl_processor(tokenizer).save_pretrained(folder)


def qwen2_vl_config(
    tokenizer: Any,
    *,
    text: dict[str, Any] | None = None,
    vision: dict[str, Any] | None = None,
    vocab_size: int | None = None,
    **kwargs: Any,
) -> Any:
    """A ``Qwen2VLConfig`` of ``text`` and ``vision`` (default: the miniature ones) whose
    special token ids are ``tokenizer``'s; ``vocab_size`` defaults to the tokenizer's,
    padded to a multiple of 64 as the hub's 151,936 rows are. ``kwargs`` go to the config
    (e.g. ``attn_implementation``)."""
    from transformers import Qwen2VLConfig

    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN2_VL_SPECIAL_TOKENS}
    return Qwen2VLConfig(
        text_config={
            **(QWEN2_VL_TEXT if text is None else text),
            "vocab_size": vocab_size or -(-len(tokenizer) // 64) * 64,
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
        },
        vision_config=QWEN2_VL_VISION if vision is None else vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        tie_word_embeddings=True,
        **kwargs,
    )


def qwen2_vl_processor(tokenizer: Any) -> Any:
    """Qwen2-VL-2B-Instruct's processor around ``tokenizer``: its image processor settings
    (a 512 px picture becomes 504 × 504, 324 image tokens) and chat template."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    return Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(**QWEN2_VL_PIXELS),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=QWEN2_VL_CHAT_TEMPLATE,
    )


def qwen2_tokenizer(vocabulary: int = TOKENIZER_VOCABULARY) -> Any:
    """A ``Qwen2Tokenizer`` (Qwen's pre-tokenizer and byte-level BPE) whose merges are
    trained on the project's prompts, answers and captions, with Qwen2-VL's special tokens
    after them; every byte is in its alphabet, so any caption encodes."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    from prefgen_kedro.models.vqa import vqa_corpus
    from prefgen_kedro.world.vocabulary import ATTRIBUTES, SUBJECTS

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(pattern=_regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    captions = [
        f"a {attribute.value} {subject}" for subject in SUBJECTS for attribute in ATTRIBUTES
    ]
    backend.train_from_iterator(
        [*vqa_corpus(captions), "You are a helpful assistant.", "system user assistant"],
        trainers.BpeTrainer(
            vocab_size=vocabulary,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    trained = json.loads(backend.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    tokenizer = Qwen2Tokenizer(
        vocab=trained["vocab"],
        merges=merges,
        unk_token=None,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        errors="replace",
        model_max_length=32768,
        split_special_tokens=False,
    )
    # The hub's order (<|endoftext|> first), and the Instruct model's eos: <|im_end|>.
    tokenizer.add_special_tokens({"additional_special_tokens": list(QWEN2_VL_SPECIAL_TOKENS[1:])})
    tokenizer.eos_token = "<|im_end|>"
    return tokenizer


def _regex(pattern: str) -> Any:
    from tokenizers import Regex

    return Regex(pattern)


def write_stable_diffusion(folder: Path, *, seed: int) -> None:
    """SD 1.5's unet/, vae/, scheduler/ and tokenizer/ folders."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(seed)
    UNet2DConditionModel.from_config(SD15_UNET).save_pretrained(
        folder / "unet", safe_serialization=True
    )
    torch.manual_seed(seed + 1)
    AutoencoderKL.from_config(SD15_VAE).save_pretrained(folder / "vae", safe_serialization=True)
    (folder / "scheduler").mkdir()
    _write_json(folder / "scheduler" / "scheduler_config.json", SD15_SCHEDULER)
    write_sd_tokenizer(folder / "tokenizer")


def write_sd_tokenizer(folder: Path) -> None:
    """SD 1.5's tokenizer/ as the hub has it: vocab.json, merges.txt, special_tokens_map.json
    and tokenizer_config.json of OpenAI CLIP's BPE (open_clip's bundled copy; the same ids)."""
    vocab, merges = open_clip_vocab_and_merges()
    renamed = {"<start_of_text>": SD_BOS, "<end_of_text>": SD_EOS}
    folder.mkdir(parents=True)
    _write_json(folder / "vocab.json", {renamed.get(t, t): i for t, i in vocab.items()})
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
    )
    special = {
        "bos_token": {"content": SD_BOS, "lstrip": False, "normalized": True, "rstrip": False,
                      "single_word": False},
        "eos_token": {"content": SD_EOS, "lstrip": False, "normalized": True, "rstrip": False,
                      "single_word": False},
        "pad_token": SD_EOS,
        "unk_token": {"content": SD_EOS, "lstrip": False, "normalized": True, "rstrip": False,
                      "single_word": False},
    }  # fmt: skip
    _write_json(folder / "special_tokens_map.json", special)
    _write_json(
        folder / "tokenizer_config.json",
        {
            "add_prefix_space": False,
            "bos_token": special["bos_token"],
            "do_lower_case": True,
            "eos_token": special["eos_token"],
            "errors": "replace",
            "model_max_length": 77,
            "name_or_path": "openai/clip-vit-large-patch14",
            "pad_token": SD_EOS,
            "special_tokens_map_file": "./special_tokens_map.json",
            "tokenizer_class": "CLIPTokenizer",
            "unk_token": special["unk_token"],
        },
    )


def write_clip_vit_l14(folder: Path, *, seed: int) -> None:
    """A ``CLIPModel`` shaped like openai/clip-vit-large-patch14 (config.json +
    model.safetensors)."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    CLIPModel(CLIPConfig(**CLIP_CONFIG)).save_pretrained(folder)


def write_open_clip_vit_h14(folder: Path, *, seed: int) -> None:
    """open_clip's ViT-H-14, shrunk, as laion publishes it: open_clip_config.json (the model
    and preprocessing configs) and open_clip_model.safetensors (open_clip's state dict)."""
    import open_clip
    from safetensors.torch import save_file

    from prefgen_kedro.models.clip import OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS

    torch.manual_seed(seed)
    model = open_clip.CLIP(**VIT_H14_SHRUNK)
    folder.mkdir(parents=True)
    _write_json(
        folder / OPEN_CLIP_CONFIG,
        {"model_cfg": VIT_H14_SHRUNK, "preprocess_cfg": OPEN_CLIP_PREPROCESS},
    )
    state = {name: value.contiguous() for name, value in model.state_dict().items()}
    save_file(state, folder / OPEN_CLIP_WEIGHTS)


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# ---- Pick-a-Pic v2 shards -------------------------------------------------------------------

# Pick-a-Pic v2's columns and types (the parquet shards of yuvalkirstain/pickapic_v2).
PICKAPIC_SCHEMA = pa.schema(
    [
        ("are_different", pa.bool_()),
        ("best_image_uid", pa.string()),
        ("caption", pa.string()),
        ("created_at", pa.timestamp("ns")),
        ("has_label", pa.bool_()),
        ("image_0_uid", pa.string()),
        ("image_0_url", pa.string()),
        ("image_1_uid", pa.string()),
        ("image_1_url", pa.string()),
        ("jpg_0", pa.binary()),
        ("jpg_1", pa.binary()),
        ("label_0", pa.float64()),
        ("label_1", pa.float64()),
        ("model_0", pa.string()),
        ("model_1", pa.string()),
        ("ranking_id", pa.int64()),
        ("user_id", pa.int64()),
        ("num_example_per_prompt", pa.int64()),
    ]
)


def write_pickapic_shards(
    folder: str | Path,
    *,
    n_users: int = 32,
    pairs_per_user: int = 12,
    image_size: int = 72,
    shards: int = 2,
    seed: int = 0,
) -> list[Path]:
    """Pick-a-Pic v2 shards of ``n_users`` simulated users, each choosing ``pairs_per_user``
    times between two JPEG renders of one caption (``image_size`` px, so the ingestion
    resizes), plus one tie and one unlabelled row (which the cleaning drops). Users' rows
    are spread over ``shards`` files. Returns the shard paths."""
    folder = Path(folder)

    def write(staging: Path) -> None:
        rows = pickapic_rows(
            n_users=n_users, pairs_per_user=pairs_per_user, image_size=image_size, seed=seed
        )
        for index in range(shards):
            table = pa.Table.from_pylist(rows[index::shards], schema=PICKAPIC_SCHEMA)
            pq.write_table(table, staging / f"train-{index:05d}-of-{shards:05d}.parquet")

    marker = {"kind": "pickapic", "n_users": n_users, "pairs_per_user": pairs_per_user}
    _write_owned(folder, write, {**marker, "image_size": image_size, "seed": seed})
    return sorted(folder.glob("*.parquet"))


def pickapic_rows(
    *, n_users: int, pairs_per_user: int, image_size: int, seed: int
) -> list[dict[str, Any]]:
    """The rows of ``write_pickapic_shards``: each pair is a simulated user's liked and
    disliked render of the agent world, under the liked one's caption, in random order."""
    from prefgen_kedro.world.agent_world import generate_agent_world

    world = generate_agent_world(
        n_users=n_users,
        images_per_user=2 * pairs_per_user,
        n_liked_attributes=4,
        n_disliked_attributes=4,
        label_noise=0.0,
        image_size=image_size,
        split_fractions={"train": 1.0},
        images_subdir="images",
        seed=seed,
    )
    rng = np.random.default_rng(seed)
    caption = world.images.set_index("image_id")["caption"]
    start = datetime(2023, 5, 1)
    rows = []
    for user_index, (_, history) in enumerate(world.interactions.groupby("user_id", sort=True)):
        liked = history.loc[history["label"] == 1, "image_id"].tolist()
        disliked = history.loc[history["label"] == 0, "image_id"].tolist()
        for chosen, rejected in zip(liked, disliked, strict=False):
            swap = bool(rng.random() < 0.5)
            uids = (rejected, chosen) if swap else (chosen, rejected)
            labels = (0.0, 1.0) if swap else (1.0, 0.0)
            rows.append(
                _pickapic_row(
                    caption[chosen], 1000 + user_index, uids, labels, world.pictures, len(rows),
                    start,
                )
            )  # fmt: skip
        if user_index == 0:  # rows the cleaning drops: a tie and an unlabelled choice
            pair = (liked[0], disliked[0])
            rows.append(
                _pickapic_row("a tie", 1000, pair, (0.5, 0.5), world.pictures, len(rows), start)
            )
            rows.append(
                {
                    **_pickapic_row(
                        "unlabelled", 1000, pair, (1.0, 0.0), world.pictures, len(rows), start
                    ),
                    "has_label": False,
                }
            )
    return rows


def _pickapic_row(
    text: str,
    user_id: int,
    uids: tuple[str, str],
    labels: tuple[float, float],
    pictures: dict[str, np.ndarray],
    ranking_id: int,
    start: datetime,
) -> dict[str, Any]:
    best = uids[0] if labels[0] > labels[1] else uids[1] if labels[1] > labels[0] else ""
    return {
        "are_different": uids[0] != uids[1],
        "best_image_uid": best,
        "caption": text,
        "created_at": start + timedelta(minutes=ranking_id),
        "has_label": True,
        "image_0_uid": uids[0],
        "image_0_url": f"https://example.invalid/{uids[0]}.png",
        "image_1_uid": uids[1],
        "image_1_url": f"https://example.invalid/{uids[1]}.png",
        "jpg_0": _jpeg(pictures[uids[0]]),
        "jpg_1": _jpeg(pictures[uids[1]]),
        "label_0": labels[0],
        "label_1": labels[1],
        "model_0": "sd-1.5",
        "model_1": "sdxl",
        "ranking_id": ranking_id,
        "user_id": user_id,
        "num_example_per_prompt": 1,
    }


def _jpeg(picture: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


# ---- command line ---------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m prefgen_kedro.minihub",
        description="Write the miniature hub (and Pick-a-Pic shards) that conf/minihub reads.",
    )
    parser.add_argument("dest", type=Path, help="the hub root (conf/minihub: data/minihub/hub)")
    parser.add_argument("--pickapic", type=Path, help="also write Pick-a-Pic shards here")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name, path in write_minihub(args.dest, seed=args.seed).items():
        print(f"{name}: {path}")
    if args.pickapic:
        for shard in write_pickapic_shards(args.pickapic, seed=args.seed):
            print(f"Pick-a-Pic shard: {shard}")


if __name__ == "__main__":
    main()
