"""The user branch: key/values copied from the text ones, an additive branch, only the
adapter learns, and two processes (gloo) train identical weights on split batches."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from safetensors.torch import load_file

from prefgen_kedro.models.batches import TensorDictDataset
from prefgen_kedro.models.diffusion import DiffusionLoss, build_noise_scheduler, build_unet
from prefgen_kedro.models.user_adapter import (
    UserAdapter,
    UserAttnProcessor,
    UserBranches,
    UserConditionedUnet,
    choose_image_embedding,
    install_user_adapter,
    null_parts,
)
from prefgen_kedro.training import TrainConfig, train

PARTS = {"e_sem_hat": 8, "e_core": 6, "e_img": 4}


def tiny_unet(**shape):
    return build_unet(
        **{
            "sample_size": 8,
            "in_channels": 3,
            "block_out_channels": (8, 16),
            "layers_per_block": 1,
            "cross_attention_dim": 8,
            "attention_head_dim": 2,
            "norm_num_groups": 4,
            "seed": 0,
            **shape,
        }
    )


def parts(batch: int = 2) -> dict[str, torch.Tensor]:
    torch.manual_seed(5)
    return {name: torch.randn(batch, dim) for name, dim in PARTS.items()}


def test_adapter_copies_text_key_values_and_lays_out_tokens_per_part():
    unet = tiny_unet()
    adapter = UserAdapter.for_unet(unet, PARTS, tokens_per_part=3)
    layers = [n for n in unet.attn_processors if n.endswith("attn2.processor")]
    assert len(adapter.to_k) == len(layers) > 0
    first = unet.get_submodule(layers[0].removesuffix(".processor"))
    key = layers[0].replace(".", "__")
    assert torch.equal(adapter.to_k[key].weight, first.to_k.weight)
    assert torch.equal(adapter.to_v[key].weight, first.to_v.weight)
    tokens = adapter.tokens(parts())
    assert tokens.shape == (2, 3 * len(PARTS), 8)
    with pytest.raises(KeyError, match="e_img"):
        adapter.tokens({"e_sem_hat": torch.zeros(2, 8), "e_core": torch.zeros(2, 6)})


def test_text_space_parts_are_tokens_as_they_are_and_survive_a_round_trip(tmp_path):
    unet = tiny_unet()
    dims = {"e_sem_hat": 16, "e_img": 4}  # e_sem_hat: two text-space tokens of width 8
    adapter = UserAdapter.for_unet(unet, dims, tokens_per_part=3, text_space_parts=["e_sem_hat"])
    assert set(adapter.projections) == {"e_img"}
    given = {"e_sem_hat": torch.randn(2, 16), "e_img": torch.randn(2, 4)}
    tokens = adapter.tokens(given)
    assert tokens.shape == (2, 2 + 3, 8)
    assert torch.equal(tokens[:, :2], given["e_sem_hat"].view(2, 2, 8))
    UserBranches.of({"prefgen": adapter}).save_pretrained(tmp_path)
    loaded = UserBranches.from_pretrained(tmp_path).adapters["prefgen"]
    assert loaded.text_space_parts == ["e_sem_hat"]
    # the same tokens (their order may differ: attention over them does not depend on it)
    assert torch.equal(loaded.tokens(given).sort(dim=1).values, tokens.sort(dim=1).values)
    with pytest.raises(ValueError, match="multiple of the cross-attention width"):
        UserAdapter.for_unet(unet, {"e_img": 4}, 1, text_space_parts=["e_img"])


def test_branch_is_added_to_the_text_attention():
    unet = tiny_unet().eval()
    noisy, text = torch.randn(2, 3, 8, 8), torch.randn(2, 5, 8)
    unet.set_attn_processor(AttnProcessor2_0())
    with torch.no_grad():
        plain = unet(noisy, 10, encoder_hidden_states=text).sample
    adapter = UserAdapter.for_unet(unet, PARTS, tokens_per_part=2)
    assert torch.equal(adapter.tokens(parts()), torch.zeros(2, 6, 8))  # projected: zero at first
    torch.nn.init.ones_(adapter.norm.weight)  # as after some training
    tokens = adapter.tokens(parts())
    outputs = {}
    for scale in (0.0, 1.0):
        install_user_adapter(unet, adapter, scale=scale)
        with torch.no_grad():
            outputs[scale] = unet(
                noisy,
                10,
                encoder_hidden_states=text,
                cross_attention_kwargs={"user_tokens": tokens},
            ).sample
    torch.testing.assert_close(outputs[0.0], plain, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(outputs[1.0], plain, atol=1e-3)
    # the null condition is zero parts of the same shapes
    assert all((v == 0).all() for v in null_parts(adapter, parts()).values())


def test_branch_blocks_limit_the_layers_the_branch_writes_into():
    unet = tiny_unet().eval()
    adapter = UserAdapter.for_unet(unet, PARTS, tokens_per_part=2, blocks=["up_blocks"])
    everywhere = [n for n in unet.attn_processors if n.endswith("attn2.processor")]
    assert set(adapter.to_k) == {
        n.replace(".", "__") for n in everywhere if n.startswith("up_blocks.")
    }
    assert len(adapter.to_k) < len(everywhere)
    install_user_adapter(unet, adapter)
    reading = {n for n, p in unet.attn_processors.items() if p.to_k is not None}
    assert reading == {n for n in everywhere if n.startswith("up_blocks.")}
    with pytest.raises(ValueError, match="'mid_blocks' holds no cross-attention"):
        UserAdapter.for_unet(unet, PARTS, tokens_per_part=2, blocks=["mid_blocks"])
    other = tiny_unet(
        block_out_channels=(8,), down_block_types=["DownBlock2D"], up_block_types=["UpBlock2D"]
    )
    with pytest.raises(KeyError, match="built for another UNet"):
        install_user_adapter(other, adapter)


def test_each_part_of_the_user_tokens_gets_its_own_attention():
    """A part's attention is not diluted by another part's tokens: the branch adds the sum of
    one attention per part (a lone part gives what it gives alone)."""
    torch.manual_seed(0)
    attn = Attention(query_dim=8, cross_attention_dim=8, heads=2, dim_head=4).eval()
    to_k, to_v = torch.nn.Linear(8, 8, bias=False), torch.nn.Linear(8, 8, bias=False)
    hidden, text, tokens = torch.randn(2, 6, 8), torch.randn(2, 3, 8), torch.randn(2, 5, 8)

    def added(groups, user_tokens):
        processor = UserAttnProcessor(to_k, to_v, 1.0, groups)
        with torch.no_grad():
            return processor(attn, hidden, text, user_tokens=user_tokens) - without_user

    with torch.no_grad():
        without_user = UserAttnProcessor()(attn, hidden, text)
    both = added([2, 3], tokens)
    torch.testing.assert_close(both, added(None, tokens[:, :2]) + added(None, tokens[:, 2:]))
    assert not torch.allclose(both, added(None, tokens), atol=1e-4)  # one softmax over all
    adapter = UserAdapter.for_unet(tiny_unet(), {"e_sem_hat": 16, "e_img": 4}, 3, ["e_sem_hat"])
    assert adapter.token_groups() == [2, 3]


def test_training_moves_only_the_adapter(tmp_path):
    unet = tiny_unet()
    adapter = UserAdapter.for_unet(unet, PARTS, tokens_per_part=2)
    before_unet = {k: v.clone() for k, v in unet.state_dict().items()}
    before_adapter = {k: v.clone() for k, v in adapter.state_dict().items()}
    torch.manual_seed(0)
    dataset = TensorDictDataset(
        pixel_values=torch.randn(8, 3, 8, 8), prompt_embeds=torch.randn(8, 5, 8), **parts(8)
    )
    train(
        UserConditionedUnet(unet, adapter),
        dataset,
        DiffusionLoss(
            build_noise_scheduler(), torch.zeros(1, 5, 8), user_keys=tuple(PARTS), user_dropout=0.5
        ),
        TrainConfig(max_steps=3, batch_size=4, learning_rate=1e-2, checkpoint_every=10),
        checkpoint_root=str(tmp_path),
        name="adapter",
        trainable_parameters=adapter.trainable_parameters(key_values=False),
    )
    assert all(torch.equal(v, before_unet[k]) for k, v in unet.state_dict().items())
    changed = [k for k, v in adapter.state_dict().items() if not torch.equal(v, before_adapter[k])]
    assert any(k.startswith("projections") for k in changed) and "norm.weight" in changed
    # the user key/values stay the text ones unless asked to train
    assert not any(k.startswith(("to_k", "to_v")) for k in changed)
    assert len(adapter.trainable_parameters(key_values=True)) == len(list(adapter.parameters()))
    adapter.save_pretrained(tmp_path / "saved")
    loaded = UserAdapter.from_pretrained(tmp_path / "saved")
    # (the config may come back with the parts reordered: attention is order-free over keys)
    assert sorted(loaded.part_names) == sorted(PARTS)
    saved = adapter.state_dict()
    assert all(torch.equal(v, saved[k]) for k, v in loaded.state_dict().items())


def test_image_embedding_rules():
    liked = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]]), dim=1)
    assert torch.equal(choose_image_embedding(liked, "first_liked"), liked[0])
    assert torch.equal(choose_image_embedding(liked, "medoid_liked"), liked[1])
    with pytest.raises(ValueError, match="unknown"):
        choose_image_embedding(liked, "mean")


def test_two_processes_train_identical_weights_on_split_batches(tmp_path):
    script = Path(__file__).parent / "scripts" / "train_adapter_distributed.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            "29517",
            str(script),
            str(tmp_path),
        ],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(rank["world"] == 2 for rank in ranks)
    weights = [load_file(tmp_path / f"rank{r}.safetensors") for r in (0, 1)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    # every step: each rank a different half of the global batch of 2 x 2
    for step0, step1 in zip(ranks[0]["seen"], ranks[1]["seen"], strict=True):
        assert len(step0) == len(step1) == 2 and not set(step0) & set(step1)
