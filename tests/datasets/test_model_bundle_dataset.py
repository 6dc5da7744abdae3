"""``DiffusionStackDataset`` and ``MllmWithProcessorDataset``: models that travel together
load together, each part afresh from its own folder on every load (here: base's entries, on
the shipped foundation); and every environment's bundles are made of that environment's own
entries."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from kedro.config import OmegaConfigLoader
from kedro.io import DataCatalog
from kedro.io.core import DatasetError
from transformers import CLIPModel, PreTrainedTokenizerBase

from prefgen_kedro import settings
from prefgen_kedro.datasets import DiffusionStackDataset, MllmWithProcessorDataset
from prefgen_kedro.models.stack import DiffusionStack, MllmWithProcessor
from prefgen_kedro.provenance import digest_of, files_digest

PROJECT_ROOT = Path(__file__).resolve().parents[2]
CONF = PROJECT_ROOT / "conf"


def catalog_config(env: str) -> dict[str, Any]:
    loader = OmegaConfigLoader(conf_source=str(CONF), env=env, **settings.CONFIG_LOADER_ARGS)
    return loader["catalog"]


@pytest.fixture
def base_catalog(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """base's catalog configuration, its paths read from the project (the shipped
    foundation; nothing here writes there)."""
    monkeypatch.chdir(PROJECT_ROOT)
    return catalog_config("local")


def test_every_load_gives_fresh_parts_so_what_one_node_changes_no_other_sees(base_catalog):
    catalog = DataCatalog.from_config({"diffusion_stack": base_catalog["diffusion_stack"]})
    first = catalog.load("diffusion_stack")
    assert isinstance(first, DiffusionStack) and first.vae is None  # base: pixel space
    assert isinstance(first.unet, UNet2DConditionModel)
    assert isinstance(first.scheduler, DDPMScheduler) and isinstance(first.clip, CLIPModel)
    assert isinstance(first.tokenizer, PreTrainedTokenizerBase)
    loaded = digest_of(first.unet)
    # What the user-branch training does to its UNet: weights, precision, checkpointing.
    with torch.no_grad():
        first.unet.conv_out.weight.add_(1.0)
    first.unet.half().enable_gradient_checkpointing()
    second = catalog.load("diffusion_stack")
    for part in ("unet", "scheduler", "clip", "tokenizer"):
        assert getattr(second, part) is not getattr(first, part), part
    assert second.unet.dtype == torch.float32 and not second.unet.is_gradient_checkpointing
    assert digest_of(second.unet) == loaded


def test_a_stack_with_a_vae_loads_it(base_catalog, tmp_path):
    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=(8,), latent_channels=4, norm_num_groups=4).save_pretrained(
        tmp_path / "vae"
    )
    vae = {
        "type": "prefgen_kedro.datasets.PretrainedModelDataset",
        "path": str(tmp_path / "vae"),
        "model_class": "diffusers.AutoencoderKL",
    }
    parts = {**base_catalog["diffusion_stack"]["parts"], "vae": vae}
    assert isinstance(DiffusionStackDataset(parts=parts).load().vae, AutoencoderKL)


def test_a_missing_part_is_named_with_its_folder(base_catalog, tmp_path):
    parts = base_catalog["diffusion_stack"]["parts"]
    missing = tmp_path / "noise_scheduler"
    dataset = DiffusionStackDataset(
        parts={**parts, "scheduler": {**parts["scheduler"], "path": str(missing)}}
    )
    assert not dataset.exists()
    with pytest.raises(DatasetError, match="part 'scheduler'") as caught:
        dataset.load()
    assert str(missing) in str(caught.value)


def test_parts_are_checked_when_the_catalog_is_made(base_catalog):
    parts = base_catalog["diffusion_stack"]["parts"]
    renamed = {**{k: v for k, v in parts.items() if k != "clip"}, "text_model": parts["clip"]}
    with pytest.raises(DatasetError, match=r"unknown: \['text_model'\], missing: \['clip'\]"):
        DiffusionStackDataset(parts=renamed)
    with pytest.raises(DatasetError, match="needs its 'unet' part"):
        DiffusionStackDataset(parts={**parts, "unet": None})
    with pytest.raises(DatasetError, match="cannot be imported"):
        DiffusionStackDataset(
            parts={**parts, "unet": {**parts["unet"], "model_class": "diffusers.NoSuchUNet"}}
        )


def test_the_stack_is_read_only(base_catalog):
    dataset = DiffusionStackDataset(parts=base_catalog["diffusion_stack"]["parts"])
    with pytest.raises(DatasetError, match="read-only"):
        dataset.save(dataset.load())


def test_an_mllm_bundle_saves_its_model_and_only_reads_its_processor(base_catalog, tmp_path):
    importlib.import_module("prefgen_kedro.models.mllm")  # registers the tiny MLLM's class
    parts = base_catalog["foundation_mllm_with_processor"]["parts"]
    processor_folder = Path(parts["processor"]["path"])
    processor_files = files_digest(processor_folder)
    shipped = MllmWithProcessorDataset(parts=parts).load()
    assert isinstance(shipped, MllmWithProcessor)
    tuned = MllmWithProcessorDataset(
        parts={**parts, "model": {**parts["model"], "path": str(tmp_path / "tuned")}}
    )
    assert not tuned.exists()
    tuned.save(shipped)
    assert tuned.exists() and files_digest(processor_folder) == processor_files
    read, saved = tuned.load().model.state_dict(), shipped.model.state_dict()
    assert read.keys() == saved.keys()
    assert all(torch.equal(value, saved[key]) for key, value in read.items())
    with pytest.raises(DatasetError, match="Expected a MllmWithProcessor"):
        tuned.save(shipped.model)


# Each bundle's parts, by the entry each is written as (``${entry}``); base has no VAE.
BUNDLES = {
    "diffusion_stack": {
        "unet": "base_unet",
        "vae": "base_vae",
        "scheduler": "noise_scheduler",
        "clip": "conditioning_clip",
        "tokenizer": "clip_tokenizer",
    },
    "foundation_mllm_with_processor": {
        "model": "foundation_mllm",
        "processor": "foundation_mllm_processor",
    },
    "tuned_mllm_with_processor": {"model": "tuned_mllm", "processor": "foundation_mllm_processor"},
}


@pytest.mark.parametrize("env", ["local", "smoke", "gpu", "minihub"])
def test_every_bundle_is_made_of_its_environments_own_entries(env):
    """``${entry}`` reads the entries of the bundle's own files: an environment that changed
    a part but not the bundle would still load base's part."""
    catalog = catalog_config(env)
    for bundle, entries in BUNDLES.items():
        parts = catalog[bundle]["parts"]
        assert set(parts) == set(entries), bundle
        for part, entry in entries.items():
            if entry == "base_vae" and env in {"local", "smoke"}:  # base's pixel-space UNet
                assert parts[part] is None, bundle
            else:
                assert parts[part] == catalog[entry], (bundle, part)
