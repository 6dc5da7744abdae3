"""The ``gpu`` chain on the miniature hub: ``conf/minihub`` makes gpu's choices on
checkpoints of the real architectures in the real layouts (``prefgen_kedro.minihub``, shrunk,
random weights) and Pick-a-Pic shards written here, and ``kedro run --env minihub`` runs the
whole default pipeline on them on a CPU: Pick-a-Pic ingestion, LoRA tuning of Qwen2-VL,
probing, alignment, user branches on SD's VAE latents, and the benchmark scored by the judge
and an open_clip model read in laion's layout."""

from __future__ import annotations

import fnmatch
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
import yaml
from kedro.config import OmegaConfigLoader
from PIL import Image
from safetensors.torch import load_file

from prefgen_kedro import settings
from prefgen_kedro.minihub import (
    MARKER,
    NotMinihubError,
    hub_folders,
    main,
    write_minihub,
    write_pickapic_shards,
)
from prefgen_kedro.provenance import files_digest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONF = PROJECT_ROOT / "conf"
DATA = Path("data") / "minihub"  # conf/minihub/globals.yml: data_root
HUB = DATA / "06_models" / "hub"  # hub_dir
SHARDS = DATA / "01_raw" / "pickapic"  # data_ingestion.pickapic.shard_dir
ORACLE = Path("data") / "06_models" / "foundation" / "attribute_oracle"  # read as in gpu
DEVICE_ARGS = {"device_map", "map_location"}
GPU_METHODS = [
    "base",
    "viper_style",
    "ip_adapter",
    "mean_clip",
    "prefgen",
    "prefgen_no_mmd",
    "prefgen_no_core",
    "prefgen_no_sem",
    "prefgen_no_img",
]
# The only gpu settings minihub changes: sizes, steps and where the data lies.
SIZES = [
    "data_ingestion.pickapic.shard_dir",
    "data_ingestion.pickapic.image_size",
    "data_ingestion.pickapic.workers",
    "data_ingestion.pickapic.work_dir",
    "vqa_tuning.stages.*.train.max_steps",
    "vqa_tuning.stages.*.train.batch_size",
    "vqa_tuning.stages.*.train.gradient_accumulation_steps",
    "vqa_tuning.stages.*.train.warmup_steps",
    "vqa_tuning.stages.*.train.log_every",
    "diffusion.train.max_steps",
    "diffusion.sampling.num_inference_steps",
]


def _config(env: str) -> OmegaConfigLoader:
    return OmegaConfigLoader(conf_source=str(CONF), env=env, **settings.CONFIG_LOADER_ARGS)


def _leaves(value: Any, prefix: str = "") -> dict[str, Any]:
    """Every leaf of nested mappings and lists, by its dotted path (list items by index)."""
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list) and value and isinstance(value[0], dict):
        items = enumerate(value)
    else:
        return {prefix: value}
    leaves: dict[str, Any] = {}
    for key, item in items:
        leaves.update(_leaves(item, f"{prefix}.{key}" if prefix else str(key)))
    return leaves


# ---- configuration: minihub is gpu but for sizes and places -------------------------------


def _with_parts(catalog: dict[str, Any]) -> dict[str, Any]:
    """The catalog's entries, and each model bundle's parts as entries ``bundle.part``."""
    entries = dict(catalog)
    for name, entry in catalog.items():
        for part, config in (entry.get("parts") or {}).items():
            entries[f"{name}.{part}"] = config or {}
    return entries


def test_minihub_catalog_loads_every_gpu_entry_with_the_same_class_and_arguments():
    gpu = _with_parts(_config("gpu")["catalog"])
    minihub = _with_parts(_config("minihub")["catalog"])
    gpu_hub, mini_hub = "data/06_models/hub/", "data/minihub/06_models/hub/"
    assert set(minihub) == set(gpu)
    assert "diffusion_stack.vae" in gpu  # SD 1.5's VAE, read through the stack
    for name, entry in gpu.items():
        mirrored = minihub[name]
        assert mirrored.get("type") == entry.get("type"), name
        assert mirrored.get("model_class") == entry.get("model_class"), name
        gpu_args, mini_args = entry.get("load_args", {}), mirrored.get("load_args", {})
        assert {k: v for k, v in mini_args.items() if k not in DEVICE_ARGS} == {
            k: v for k, v in gpu_args.items() if k not in DEVICE_ARGS
        }, name
        # gpu places a model on cuda; minihub the same one on the CPU
        assert {k: mini_args[k] for k in DEVICE_ARGS & set(mini_args)} == {
            k: "cpu" for k in DEVICE_ARGS & set(gpu_args)
        }, name
        location = entry.get("path") or entry.get("filepath")
        if location is None:  # held in memory
            assert mirrored.get("path") is mirrored.get("filepath") is None, name
        elif location.startswith(gpu_hub):  # the same folder below the miniature hub
            assert mirrored["path"] == mini_hub + location.removeprefix(gpu_hub), name
            assert Path(mirrored["path"]) in {
                HUB / path.relative_to("hub") for path in hub_folders("hub").values()
            }, name
        else:
            mirrored_location = mirrored.get("path") or mirrored.get("filepath")
            assert mirrored_location == location.replace("data/gpu", "data/minihub"), name


def test_minihub_parameters_are_gpus_except_sizes_and_places():
    gpu_set = {}
    for file in sorted((CONF / "gpu").glob("parameters*.yml")):
        gpu_set.update(_leaves(yaml.safe_load(file.read_text())))
    gpu = _leaves(_config("gpu")["parameters"])
    minihub = _leaves(_config("minihub")["parameters"])
    differing = {
        path
        for path in gpu_set
        if minihub.get(path, "(unset)") != gpu[path]
        and not any(fnmatch.fnmatchcase(path, size) for size in SIZES)
    }
    assert not differing, {path: (gpu[path], minihub.get(path)) for path in sorted(differing)}
    assert minihub["evaluation.methods"] == GPU_METHODS == gpu["evaluation.methods"]


# ---- the writer ----------------------------------------------------------------------------


@pytest.mark.slow
def test_the_minihub_writer_is_deterministic_and_writes_over_nothing_of_anyone_else(tmp_path):
    first = write_minihub(tmp_path / "a" / "hub", seed=3)
    marker = json.loads((tmp_path / "a" / "hub" / MARKER).read_text())
    assert marker["files_digest"] == files_digest(tmp_path / "a" / "hub", skip=[MARKER])
    write_minihub(tmp_path / "a" / "hub", seed=3)  # its own folder: rewritten, the same
    assert json.loads((tmp_path / "a" / "hub" / MARKER).read_text()) == marker
    assert all(path.is_dir() and any(path.iterdir()) for path in first.values())
    assert not list((tmp_path / "a" / "hub").rglob("*.bin"))  # safetensors only

    foreign = tmp_path / "b"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(NotMinihubError, match=str(foreign)):
        write_minihub(foreign)
    with pytest.raises(NotMinihubError, match=str(foreign)):
        write_pickapic_shards(foreign, n_users=2, pairs_per_user=2, image_size=16)
    assert [path.name for path in foreign.iterdir()] == ["notes.txt"]
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".")]  # no staging


# ---- the chain -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minihub_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the project's config with the shipped attribute oracle (gpu reads it from
    there), the miniature hub and Pick-a-Pic shards, written by the module's command line."""
    root = tmp_path_factory.mktemp("minihub_project")
    shutil.copy(PROJECT_ROOT / "pyproject.toml", root)
    shutil.copy(PROJECT_ROOT / ".telemetry", root)
    (root / "src").mkdir()  # kedro wants the folder; the package itself is installed
    shutil.copytree(CONF, root / "conf", ignore=shutil.ignore_patterns("local"))
    (root / "conf" / "local").mkdir()
    shutil.copytree(PROJECT_ROOT / ORACLE, root / ORACLE)
    main([str(root / HUB), "--pickapic", str(root / SHARDS)])
    return root


def _kedro_run(project: Path, log: str, *arguments: str) -> subprocess.CompletedProcess:
    console = project / log
    with console.open("w") as output:
        done = subprocess.run(
            [sys.executable, "-m", "kedro", "run", "--env", "minihub", *arguments],
            cwd=project,
            stdout=output,
            stderr=subprocess.STDOUT,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "PREFGEN_TRACKING": "off"},
            check=False,
        )
    assert done.returncode == 0, console.read_text()[-6000:]
    return done


@pytest.fixture(scope="module")
def minihub_run(minihub_project: Path) -> Path:
    """``kedro run --env minihub`` once; returns its data root."""
    _kedro_run(minihub_project, "kedro_run.log")
    return minihub_project / DATA


@pytest.mark.slow
def test_the_whole_gpu_chain_runs_on_the_minihub_and_reports_finite_metrics(minihub_run):
    reporting = minihub_run / "08_reporting"
    metrics = pd.read_csv(reporting / "metrics.csv")
    assert set(metrics["method"]) == {*GPU_METHODS, "real"}
    for method in GPU_METHODS:
        measured = set(metrics.loc[metrics["method"] == method, "metric"])
        assert {"judge_p_yes", "clip_score", "clip_i", "fid", "kid"} <= measured, method
    assert not {"like_rate", "utility", "subject_accuracy"} & set(metrics["metric"])
    assert metrics["mean"].map(math.isfinite).all()
    assert metrics.dropna(subset=["ci_low", "ci_high"]).shape[0] > 0
    markdown = (reporting / "benchmark.md").read_text()
    assert "kedro run --env minihub" in markdown and "judge P(yes)" in markdown
    assert "its user branch reads `e_sem_hat`, `e_core`, `e_img`" in markdown  # nothing said
    assert (reporting / "benchmark.html").read_text().lower().startswith("<!doctype html>")
    for name in ("vqa_metrics", "alignment_metrics", "diffusion_metrics", "layer_selection"):
        assert json.loads((reporting / f"{name}.json").read_text()), name


@pytest.mark.slow
def test_the_chain_ingests_pickapic_shards_of_real_users(minihub_run):
    report = json.loads((minihub_run / "08_reporting" / "ingestion_report.json").read_text())
    assert report["shards_read"] == 2 and report["users_kept"] == 32
    assert report["dropped_ties"] == report["dropped_unlabelled"] == 1
    # decoded by a pool of workers, each shard's result kept for a resumed run
    assert len(list((minihub_run / "02_intermediate" / "pickapic_shards").glob("*.pickle"))) == 2
    users = pd.read_parquet(minihub_run / "02_intermediate" / "users.parquet")
    assert users["user_id"].str.isdigit().all() and not users["liked_attributes"].map(len).any()
    picture = next((minihub_run / "01_raw" / "images").glob("*.png"))
    assert Image.open(picture).size == (64, 64)  # the shards' 72 px, resized


@pytest.mark.slow
def test_the_mllm_is_tuned_by_lora_merged_into_qwen2_vl_in_bf16(minihub_run, minihub_project):
    hub = load_file(hub_folders(minihub_project / HUB)["foundation_mllm"] / "model.safetensors")
    tuned = load_file(minihub_run / "06_models" / "tuned_mllm" / "model.safetensors")
    assert set(tuned) == set(hub)  # merged: no LoRA weights left
    assert {value.dtype for value in tuned.values()} == {torch.bfloat16}
    changed = {name for name in hub if not torch.equal(hub[name], tuned[name])}
    targets = {f"model.layers.{i}.self_attn.{p}_proj.weight" for i in range(6) for p in "qkvo"}
    assert changed and changed <= targets  # only what gpu's LoRA targets
    config = json.loads((minihub_run / "06_models" / "tuned_mllm" / "config.json").read_text())
    assert config["architectures"] == ["Qwen2VLForConditionalGeneration"]


@pytest.mark.slow
def test_user_branches_train_and_sample_on_the_vae_latents(minihub_run, minihub_project):
    folders = hub_folders(minihub_project / HUB)
    unet = json.loads((folders["base_unet"] / "config.json").read_text())
    training = json.loads(
        (minihub_run / "08_reporting" / "diffusion_training_report.json").read_text()
    )
    assert training["training_samples"] > 0
    # The stack's VAE is recorded by its own entry's name, as each of the stack's parts.
    assert training["provenance"]["inputs"]["base_vae"] == files_digest(folders["base_vae"])
    assert set(training["variants"]) == set(GPU_METHODS) - {"base", "viper_style"}
    generations = minihub_run / "07_model_output" / "generations"
    # The UNet denoises 8x8 latents; the pictures are the VAE's decoding of them.
    assert unet["sample_size"] == 8 and unet["in_channels"] == 4
    assert {Image.open(p).size for p in (generations / "prefgen").glob("*.png")} == {(64, 64)}


@pytest.mark.slow
def test_the_benchmark_read_the_laion_layout_clip_and_the_hub_stayed_as_written(
    minihub_run, minihub_project
):
    folders = hub_folders(minihub_project / HUB)
    laion = folders["evaluation_clip"]
    assert sorted(path.name for path in laion.iterdir()) == [
        "open_clip_config.json",
        "open_clip_model.safetensors",
    ]
    # read as open_clip's folder, not as a hub-mixin folder that lacks its config.json
    assert "config.json not found" not in (minihub_project / "kedro_run.log").read_text()
    lineage = json.loads((minihub_run / "provenance" / "generation_scores.json").read_text())
    assert lineage["inputs"]["evaluation_clip"] == files_digest(laion)
    marker = json.loads((minihub_project / HUB / MARKER).read_text())
    assert files_digest(minihub_project / HUB, skip=[MARKER]) == marker["files_digest"]
    # Everything the run wrote lies below minihub's data root.
    data = minihub_project / "data"
    written = {
        p
        for p in data.rglob("*")
        if p.is_file() and not p.is_relative_to(data / ORACLE.relative_to("data"))
    }
    assert all(path.is_relative_to(minihub_run) for path in written)


@pytest.mark.slow
def test_a_second_run_reuses_every_training_run(minihub_run, minihub_project):
    # The README's way on a GPU: the training stages, up to the user branches.
    _kedro_run(minihub_project, "kedro_rerun.log", "--to-nodes", "diffusion.train_user_branches")
    timings = json.loads((minihub_run / "08_reporting" / "timings.json").read_text())
    runs = timings["training_runs"]
    assert runs["trained"] == []
    assert sum("vqa_tuning_stage" in run for run in runs["reused"]) == 2  # LoRA, seeded
    assert len(runs["reused"]) == 2 + 2 + 7  # VQA stages, aligners, user branches
    # and gave the same models, byte for byte (a different one would be moved aside)
    assert not list((minihub_run / "06_models").glob("*.previous-*"))
