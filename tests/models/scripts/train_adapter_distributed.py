"""Run under ``torchrun --nproc_per_node 2``: trains a tiny user adapter with the shared
trainer on the CPU (gloo) and writes, per rank, the adapter weights and which samples each
step showed it. ``tests/models/test_user_adapter.py`` launches it and compares the ranks."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from accelerate import PartialState
from safetensors.torch import save_file

from prefgen_kedro.models.batches import TensorDictDataset
from prefgen_kedro.models.diffusion import DiffusionLoss, build_noise_scheduler, build_unet
from prefgen_kedro.models.user_adapter import UserAdapter, UserConditionedUnet
from prefgen_kedro.training import TrainConfig, train

out = Path(sys.argv[1])
state = PartialState(cpu=True)  # torch.distributed (gloo) from torchrun's environment
unet = build_unet(
    sample_size=8,
    in_channels=3,
    block_out_channels=(8, 16),
    layers_per_block=1,
    cross_attention_dim=8,
    attention_head_dim=2,
    norm_num_groups=4,
    seed=0,
)
torch.manual_seed(1)
adapter = UserAdapter.for_unet(unet, {"e_img": 4}, tokens_per_part=2)
n = 16
dataset = TensorDictDataset(
    pixel_values=torch.randn(n, 3, 8, 8),
    prompt_embeds=torch.randn(n, 5, 8),
    e_img=torch.randn(n, 4),
    index=torch.arange(n),
)
loss = DiffusionLoss(build_noise_scheduler(), torch.zeros(1, 5, 8), user_keys=("e_img",))
seen: list[list[int]] = []


def compute_loss(model, batch):
    seen.append(batch["index"].tolist())
    return loss(model, batch)


train(
    UserConditionedUnet(unet, adapter),
    dataset,
    compute_loss,
    TrainConfig(max_steps=3, batch_size=2, learning_rate=1e-2, checkpoint_every=10, log_every=1),
    checkpoint_root=str(out / "checkpoints"),
    name="adapter",
    trainable_parameters=list(adapter.parameters()),
)
rank = state.process_index
save_file(
    {k: v.contiguous() for k, v in adapter.state_dict().items()}, out / f"rank{rank}.safetensors"
)
(out / f"rank{rank}.json").write_text(json.dumps({"seen": seen, "world": state.num_processes}))
