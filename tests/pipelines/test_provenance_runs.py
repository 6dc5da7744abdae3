"""Provenance across ``kedro run``s on ``smoke``: an environment writes only below its own data
root, a second run trains nothing and says so, a changed upstream artifact retrains what
depends on it or stops a staged run that would mix versions, a run killed inside a trainer
resumes to the figures of an uninterrupted one, and bad input stops a run with its message."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file, save_file

from prefgen_kedro.data.pickapic import PAIR_COLUMNS
from prefgen_kedro.errors import BadInputError
from prefgen_kedro.provenance import StaleInputError

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def change_one_weight(folder: Path, name_part: str, everywhere: bool = False) -> str:
    """Add 1e-3 to the last value (or to every value) of the first tensor whose name contains
    ``name_part`` in a saved model (past the first values the old fingerprints read); returns
    its name."""
    file = folder / "model.safetensors"
    state = load_file(file)
    name = next(key for key in state if name_part in key)
    if everywhere:
        state[name] += 1e-3
    else:
        state[name].view(-1)[-1] += 1e-3
    save_file(state, file, metadata={"format": "pt"})
    return name


def snapshot(folder: Path) -> dict[Path, int]:
    return {path: path.stat().st_mtime_ns for path in folder.rglob("*") if path.is_file()}


def test_smoke_leaves_every_base_output_and_the_shipped_foundation_byte_identical(
    smoke_evaluated, smoke_project, base_stand_ins
):
    data = smoke_project / "data"
    shipped = PROJECT_ROOT / "data" / "06_models" / "foundation"
    for path, content in base_stand_ins.items():
        assert path.read_bytes() == content, path
    copied = {
        path: data / "06_models" / "foundation" / path.relative_to(shipped)
        for path in shipped.rglob("*")
        if path.is_file()
    }
    for original, copy in copied.items():
        assert copy.read_bytes() == original.read_bytes(), copy
    # Nothing else outside smoke's own root: every smoke output went below data/smoke.
    outside = {
        path
        for path in data.rglob("*")
        if path.is_file() and not path.is_relative_to(data / "smoke")
    }
    assert outside == set(base_stand_ins) | set(copied.values())


def test_the_shipped_foundation_is_read_only_to_other_environments(smoke_project, run_in):
    with pytest.raises(BadInputError, match=r"attribute_oracle .* is read-only"):
        run_in(smoke_project, "foundation", env="gpu")


def test_a_second_run_trains_nothing_and_says_so(smoke_evaluated, smoke_copy, run_in):
    data = run_in(smoke_copy())  # every default pipeline, as `make run`
    runs = read_json(data / "08_reporting" / "timings.json")["training_runs"]
    vqa = read_json(data / "08_reporting" / "vqa_tuning_report.json")
    assert all(stage["run"]["reused"] for stage in vqa["stages"])
    aligners = read_json(data / "08_reporting" / "alignment_training_report.json")
    aligners.pop("provenance")
    assert set(aligners) == {"prefgen", "prefgen_no_mmd", "oracle_state"}
    assert all(aligner["run"]["reused"] for aligner in aligners.values())
    branches = read_json(data / "08_reporting" / "diffusion_training_report.json")["variants"]
    trained = [variant for variant in branches.values() if variant["steps"]]  # not text-only
    assert runs["trained"] == []
    assert len(runs["reused"]) == len(vqa["stages"]) + len(aligners) + len(trained)
    assert all(variant["run"]["resumed_from"] == variant["steps"] for variant in trained)
    # A reused model is saved as the same files: kept, no copy moved aside.
    assert not list((data / "06_models").glob("*.previous-*"))


def test_a_new_mllm_stops_a_staged_diffusion_run_and_retrains_the_aligners(
    smoke_aligned, smoke_project, smoke_copy, run_in
):
    project = smoke_copy()
    data = project / "data" / "smoke"
    change_one_weight(data / "06_models" / "tuned_mllm", "language_model.norm")
    before = snapshot(data)
    with pytest.raises(StaleInputError) as refused:
        run_in(project, "diffusion")
    message = str(refused.value)
    assert "tuned_mllm itself is" in message and "aligners was made from tuned_mllm" in message
    assert snapshot(data) == before  # refused before any node ran

    run_in(project, "probing", "alignment")
    session = read_json(
        smoke_project / "data" / "smoke" / "08_reporting" / "alignment_training_report.json"
    )
    report = read_json(data / "08_reporting" / "alignment_training_report.json")
    for name in ("prefgen", "prefgen_no_mmd"):
        assert Path(session[name]["run"]["run_dir"]).name in {
            path.name for path in (data / "06_models" / "checkpoints").iterdir()
        }  # the old run was there to reuse
        assert report[name]["run"]["resumed_from"] is None
        assert report[name]["run"]["run_dir"] != session[name]["run"]["run_dir"]
        assert (
            report[name]["run"]["inputs"]["contexts"] != session[name]["run"]["inputs"]["contexts"]
        )


def test_the_taste_audit_follows_user_conditions_and_an_older_report_is_refused(
    smoke_evaluated, smoke_copy, run_in
):
    project = smoke_copy()
    data = project / "data" / "smoke"
    # every phrase state the aligner picks from: other e_sem_hat
    change_one_weight(data / "06_models" / "aligners", "mlps.prefgen.vocabulary", everywhere=True)
    run_in(project, node_names=["diffusion.make_user_conditions", "diffusion.audit_taste_signal"])
    made = read_json(data / "provenance" / "user_conditions.json")["digest"]
    audit = read_json(data / "08_reporting" / "taste_signal_audit.json")
    assert audit["provenance"]["inputs"]["user_conditions"] == made
    # The metrics still come from the older conditions: the report is refused, naming both.
    with pytest.raises(StaleInputError) as refused:
        run_in(project, node_names=["evaluation.write_benchmark_report"])
    message = str(refused.value)
    assert f"taste_signal_audit was made from user_conditions {made}" in message
    assert "metrics was made from user_conditions" in message


def test_a_changed_conditioning_clip_weight_retrains_the_base_unet(
    smoke_foundation, smoke_project, smoke_copy, run_in
):
    project = smoke_copy()
    foundation = project / smoke_foundation.relative_to(smoke_project)
    change_one_weight(foundation / "conditioning_clip", "text_model.encoder")
    data = run_in(
        project,
        "foundation",
        node_names=["foundation.make_render_sets", "foundation.train_base_diffusion"],
    )
    runs = read_json(data / "08_reporting" / "timings.json")["training_runs"]
    assert [Path(run).name.split("-")[0] for run in runs["trained"]] == ["base_unet"]


def killed_run(
    project: Path, model: str, checkpoint: str, arguments: list[str], kedro_run
) -> tuple[Path, Path]:
    """Set the copy's ``model`` folder aside as ``uninterrupted_<model>``, start ``kedro run
    ARGUMENTS`` and SIGKILL it as soon as a trainer checkpoint matches ``checkpoint``; checks
    that no ``model`` was written. Returns the project and its smoke data folder."""
    data = project / "data" / "smoke"
    (data / "06_models" / model).rename(data / f"uninterrupted_{model}")
    run = kedro_run(project, *arguments)
    checkpoints = data / "06_models" / "checkpoints"
    deadline = time.monotonic() + 600
    while not any(checkpoints.glob(checkpoint)):
        if run.process.poll() is not None or time.monotonic() > deadline:
            run.process.kill()
            raise AssertionError(f"no {checkpoint} seen:\n{run.console.read_text()[-3000:]}")
        time.sleep(0.01)
    run.process.send_signal(signal.SIGKILL)
    assert run.process.wait() == -signal.SIGKILL
    assert not (data / "06_models" / model).exists()  # nothing half-written
    return project, data


def without_timings(metrics: dict) -> dict:
    """A metrics report without what differs between runs of the same models (speed, the
    training report and provenance)."""
    return {
        method: {k: v for k, v in scores.items() if k != "images_per_second"}
        if isinstance(scores, dict)
        else scores
        for method, scores in metrics.items()
        if method not in ("training", "provenance")
    }


def assert_same_weights(folder: Path, reference: Path) -> None:
    ours, theirs = (
        load_file(folder / "model.safetensors"),
        load_file(reference / "model.safetensors"),
    )
    assert ours.keys() == theirs.keys()
    for name, value in theirs.items():
        assert torch.equal(ours[name], value), name


@pytest.mark.slow
def test_a_run_killed_inside_train_user_branches_resumes_to_the_uninterrupted_figures(
    smoke_diffused, smoke_copy, run_in, kedro_run
):
    # A checkpoint every step: killed after prefgen's first step, before its last.
    project, data = killed_run(
        smoke_copy("user_branch_*"),
        "user_branches",
        "user_branch_prefgen-*/checkpoint-1",
        ["--pipelines", "diffusion", "--params", "diffusion.train.checkpoint_every=1"],
        kedro_run,
    )

    run_in(project, "diffusion")
    report = read_json(data / "08_reporting" / "diffusion_training_report.json")["variants"]
    assert report["prefgen"]["run"]["resumed_from"] in (1, 2)
    assert all(
        v["run"]["resumed_from"] is None for k, v in report.items() if k != "prefgen" and v["steps"]
    )
    assert_same_weights(data / "06_models" / "user_branches", data / "uninterrupted_user_branches")
    assert without_timings(read_json(data / "08_reporting" / "diffusion_metrics.json")) == (
        without_timings(read_json(smoke_diffused / "08_reporting" / "diffusion_metrics.json"))
    )


@pytest.mark.slow
def test_a_run_killed_inside_tune_mllm_resumes_to_the_uninterrupted_figures(
    smoke_tuned, smoke_copy, run_in, kedro_run
):
    project, data = killed_run(
        smoke_copy("vqa_tuning_*"),
        "tuned_mllm",
        "vqa_tuning_stage0-*/checkpoint-2",
        ["--pipelines", "vqa_tuning"],
        kedro_run,
    )

    run_in(project, "vqa_tuning")
    stages = read_json(data / "08_reporting" / "vqa_tuning_report.json")["stages"]
    assert stages[0]["run"]["reused"] and stages[1]["run"]["resumed_from"] in (None, 2)
    assert_same_weights(data / "06_models" / "tuned_mllm", data / "uninterrupted_tuned_mllm")
    metrics, uninterrupted = (
        {
            k: v
            for k, v in read_json(folder / "08_reporting" / "vqa_metrics.json").items()
            if k not in ("training", "provenance")
        }
        for folder in (data, smoke_tuned)
    )
    assert metrics == uninterrupted


@pytest.mark.slow
def test_empty_pickapic_shards_stop_the_run_with_the_message_and_write_nothing(
    smoke_copy, kedro_run, tmp_path
):
    project = smoke_copy()
    shards = tmp_path / "shards"
    shards.mkdir()
    types = {
        "user_id": pa.int64(),
        "has_label": pa.bool_(),
        "label_0": pa.float64(),
        "label_1": pa.float64(),
        "jpg_0": pa.binary(),
        "jpg_1": pa.binary(),
    }
    schema = pa.schema([(name, types.get(name, pa.string())) for name in PAIR_COLUMNS])
    pq.write_table(schema.empty_table(), shards / "shard-000.parquet")
    tables = project / "data" / "smoke" / "02_intermediate"
    before = snapshot(tables) if tables.exists() else {}

    run = kedro_run(
        project,
        "--pipelines",
        "data_ingestion",
        "--params",
        f"data_ingestion.source=pickapic,data_ingestion.pickapic.shard_dir={shards}",
    )
    assert run.process.wait() != 0
    lines = run.console.read_text().rstrip().splitlines()
    assert lines[-2].startswith(
        "Node data_ingestion.ingest failed: EmptyIngestionError: "
        f"Pick-a-Pic shards in {shards}: the 1 shard(s) hold no row"
    )
    assert "Full traceback" in lines[-1] and (project / "logs" / "last_error.log").is_file()
    # Kedro's own report of the failure comes a few lines before, with no traceback between.
    failed = next(i for i, line in enumerate(lines) if "failed with error" in line)
    assert len(lines) - failed < 25 and not any(
        "Traceback" in line or "╭" in line for line in lines
    )
    assert (snapshot(tables) if tables.exists() else {}) == before
