"""``PretrainedModelDataset`` round-trips transformers, diffusers and own modules as safetensors."""

from __future__ import annotations

from pathlib import Path

import fsspec
import pytest
import torch
from diffusers import UNet2DConditionModel
from huggingface_hub import PyTorchModelHubMixin
from kedro.io import DataCatalog
from kedro.io.core import DatasetError
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel

from prefgen_kedro.datasets import PretrainedModelDataset


class TinyHead(nn.Module, PyTorchModelHubMixin):
    """Stands in for the project's own modules."""

    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.linear = nn.Linear(width, 2)


TINY_HEAD = f"{TinyHead.__module__}.TinyHead"


def tiny_clip_text() -> CLIPTextModel:
    torch.manual_seed(0)
    config = CLIPTextConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=1,
        num_attention_heads=4,
        max_position_embeddings=16,
    )
    return CLIPTextModel(config)


def tiny_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1,
        norm_num_groups=4,
        cross_attention_dim=16,
        attention_head_dim=2,
    )


def assert_same_weights(got: nn.Module, want: nn.Module) -> None:
    got_state, want_state = got.state_dict(), want.state_dict()
    assert got_state.keys() == want_state.keys()
    for key, value in want_state.items():
        assert torch.equal(got_state[key], value), key


def file_names(directory: Path) -> set[str]:
    return {path.name for path in directory.rglob("*") if path.is_file()}


@pytest.mark.parametrize(
    ("make", "model_class"),
    [
        (tiny_clip_text, "transformers.CLIPTextModel"),
        (tiny_unet, "diffusers.UNet2DConditionModel"),
        (lambda: TinyHead(width=6), TINY_HEAD),
    ],
    ids=["transformers", "diffusers", "own-module"],
)
def test_round_trip_as_safetensors(tmp_path: Path, make, model_class: str) -> None:
    model = make()
    dataset = PretrainedModelDataset(path=tmp_path / "model", model_class=model_class)
    assert not dataset.exists()
    dataset.save(model)
    assert dataset.exists()

    names = file_names(tmp_path / "model")
    assert any(name.endswith(".safetensors") for name in names)
    assert not any(name.endswith((".bin", ".pt", ".pth", ".pkl")) for name in names)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model"]  # no staging left

    loaded = dataset.load()
    assert type(loaded) is type(model)
    assert_same_weights(loaded, model)


def test_saving_over_an_existing_directory_moves_it_aside(tmp_path: Path) -> None:
    dataset = PretrainedModelDataset(path=tmp_path / "head", model_class=TINY_HEAD)
    torch.manual_seed(1)
    first = TinyHead()
    torch.manual_seed(2)
    second = TinyHead()
    dataset.save(first)
    dataset.save(second)

    previous = [path for path in tmp_path.iterdir() if path.name.startswith("head.previous-")]
    assert len(previous) == 1
    assert (tmp_path / "head").is_dir()
    assert_same_weights(dataset.load(), second)
    assert_same_weights(TinyHead.from_pretrained(previous[0]), first)


def test_tokenizer_through_an_auto_class(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"[UNK]": 0, "red": 1, "cat": 2}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    dataset = PretrainedModelDataset(
        path=tmp_path / "tok", model_class="transformers.AutoTokenizer"
    )
    dataset.save(tokenizer)
    assert dataset.load()("red dog cat")["input_ids"] == [1, 0, 2]


def test_describe_and_load_args(tmp_path: Path) -> None:
    dataset = PretrainedModelDataset(
        path=tmp_path / "clip",
        model_class="transformers.CLIPTextModel",
        load_args={"dtype": "bfloat16"},
    )
    description = dataset._describe()
    assert description["model_class"] == "transformers.CLIPTextModel"
    assert description["protocol"] == "file"
    assert "CLIPTextModel" in repr(dataset)
    dataset.save(tiny_clip_text())
    assert dataset.load().dtype == torch.bfloat16


def test_bad_model_class_is_named() -> None:
    with pytest.raises(DatasetError, match="transformers.NoSuchModel"):
        PretrainedModelDataset(path="x", model_class="transformers.NoSuchModel")
    with pytest.raises(DatasetError, match="no_such_package.Model"):
        PretrainedModelDataset(path="x", model_class="no_such_package.Model")


def test_refuses_remote_code_and_pickled_weights(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="trust_remote_code"):
        PretrainedModelDataset(
            path=tmp_path,
            model_class="transformers.AutoModel",
            load_args={"trust_remote_code": True},
        )
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "pytorch_model.bin").write_bytes(b"not really")
    dataset = PretrainedModelDataset(path=tmp_path / "old", model_class=TINY_HEAD)
    with pytest.raises(DatasetError, match="refusing to unpickle"):
        dataset.load()


def test_remote_filesystem_loads_but_does_not_save(tmp_path: Path) -> None:
    model = TinyHead()
    model.save_pretrained(tmp_path / "head")
    memory = fsspec.filesystem("memory")
    memory.put(str(tmp_path / "head"), "/prefgen-test/head", recursive=True)
    dataset = PretrainedModelDataset(path="memory:///prefgen-test/head", model_class=TINY_HEAD)
    try:
        assert dataset.exists()
        assert_same_weights(dataset.load(), model)
        with pytest.raises(DatasetError, match="local filesystem") as caught:
            dataset.save(model)
        assert isinstance(caught.value.__cause__, NotImplementedError)
    finally:
        memory.rm("/prefgen-test", recursive=True)


def test_through_the_data_catalog(tmp_path: Path) -> None:
    catalog = DataCatalog.from_config(
        {
            "text_encoder": {
                "type": "prefgen_kedro.datasets.PretrainedModelDataset",
                "path": str(tmp_path / "text_encoder"),
                "model_class": "transformers.CLIPTextModel",
            }
        }
    )
    model = tiny_clip_text()
    assert not catalog.exists("text_encoder")
    catalog.save("text_encoder", model)
    assert catalog.exists("text_encoder")
    assert_same_weights(catalog.load("text_encoder"), model)
