"""Before the first node, a run names every path it would read and does not find."""

from pathlib import Path

import pytest
from kedro.framework.session import KedroSession
from kedro.framework.startup import bootstrap_project

from prefgen_kedro.errors import BadInputError

HUB_INPUTS = [
    "base_unet",
    "base_vae",
    "clip_tokenizer",
    "conditioning_clip",
    "evaluation_clip",
    "foundation_mllm",
    "foundation_mllm_processor",
    "noise_scheduler",
]


def _refusal(project: Path, env: str, pipeline: str) -> str:
    bootstrap_project(project)
    with (
        KedroSession.create(project_path=project, env=env) as session,
        pytest.raises(BadInputError) as refused,
    ):
        session.run(pipeline_names=[pipeline])
    return str(refused.value)


def test_gpu_without_its_downloads_gets_one_message_that_names_them_all(
    smoke_project: Path, monkeypatch
):
    monkeypatch.chdir(smoke_project)
    before = sorted(path for path in (smoke_project / "data").rglob("*"))
    message = _refusal(smoke_project, "gpu", "__default__")
    paths, remedies = message.split("\nTo get them:\n")
    lines = paths.splitlines()[1:]
    assert paths.startswith(f"this run reads {len(lines)} path(s) that are not there")
    assert [line.split(":")[0] for line in lines] == [
        *(f"- {name}" for name in HUB_INPUTS),
        "- Pick-a-Pic shards",
    ]
    assert lines[-1] == "- Pick-a-Pic shards: data/01_raw/pickapic/*.parquet"
    # one command per download, naming the datasets it brings
    assert remedies.count("hf download ") == 4 and remedies.count("- ") == 5
    assert "# base_unet, base_vae, clip_tokenizer, noise_scheduler" in remedies
    assert sorted(path for path in (smoke_project / "data").rglob("*")) == before  # wrote nothing


def test_a_stage_run_before_the_one_that_feeds_it_names_that_stage(
    smoke_project: Path, monkeypatch
):
    monkeypatch.chdir(smoke_project)
    message = _refusal(smoke_project, "gpu", "evaluation")
    assert "- user_branches: data/gpu/06_models/user_branches" in message.splitlines()
    assert any(
        line.startswith("- kedro run --env gpu --pipelines diffusion  # ")
        and "user_branches" in line
        for line in message.splitlines()
    )


def test_minihub_before_it_is_written_points_every_path_at_make_minihub(
    smoke_project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(smoke_project)
    paths, remedies = _refusal(smoke_project, "minihub", "__default__").split("\nTo get them:\n")
    assert [line.split(":")[0] for line in paths.splitlines()[1:]] == [
        *(f"- {name}" for name in HUB_INPUTS),
        "- Pick-a-Pic shards",
    ]
    assert "make minihub" in remedies and "parquet shards in" not in remedies


def test_a_bundle_names_each_missing_part_by_its_entry_and_the_stage_that_writes_it(
    smoke_project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``probing`` reads the tuned MLLM with its processor as one input: the tuned model is
    vqa_tuning's to write, the processor is the downloaded Qwen2-VL's."""
    monkeypatch.chdir(smoke_project)
    paths, remedies = _refusal(smoke_project, "gpu", "probing").split("\nTo get them:\n")
    assert {
        "- foundation_mllm_processor: data/06_models/hub/Qwen2-VL-2B-Instruct",
        "- tuned_mllm: data/gpu/06_models/tuned_mllm",
    } <= set(paths.splitlines())
    assert "tuned_mllm_with_processor" not in paths
    assert "- kedro run --env gpu --pipelines vqa_tuning  # tuned_mllm" in remedies.splitlines()
    assert "--local-dir data/06_models/hub/Qwen2-VL-2B-Instruct  # foundation_mllm_processor" in (
        remedies
    )
