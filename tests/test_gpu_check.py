"""``benchmarks.gpu_check``, the script a session with a GPU runs, checked here on the CPU:
its ``--smoke`` run (minihub's sizes, every part in its own process, the chain's ingestion
only) measures every part and writes the files a GPU session brings back, never
``benchmarks/RESULTS.md``; a part past its time box is stopped and recorded; the minihub
catalog it runs is the project's with every model on the GPU."""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path

import pytest
import yaml

PROJECT_ROOT = Path(__file__).resolve().parents[1]
REAL_RESULTS = PROJECT_ROOT / "benchmarks" / "RESULTS.md"
CONF = PROJECT_ROOT / "conf"
DEVICE_ARGS = {"device_map", "map_location"}


@pytest.fixture(scope="module")
def gpu_check():
    # benchmarks/ is a folder of the project, not of the installed package.
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(PROJECT_ROOT))
        yield importlib.import_module("benchmarks.gpu_check")


@pytest.fixture(scope="module")
def smoke_run(gpu_check, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    """``python -m benchmarks.gpu_check --smoke`` once (about 80 s on 2 cores)."""
    out = tmp_path_factory.mktemp("gpu_check")
    before = REAL_RESULTS.read_bytes()
    report = gpu_check.main(["--smoke", "--out", str(out)])
    assert REAL_RESULTS.read_bytes() == before, "the check must not touch benchmarks/RESULTS.md"
    return report, out


@pytest.mark.slow
def test_every_part_runs_and_measures_on_the_cpu(smoke_run, gpu_check):
    report, _ = smoke_run
    assert list(report["parts"]) == list(gpu_check.PARTS)
    for name, part in report["parts"].items():
        assert part["status"] == "ok", (name, part.get("error"))
    for name in ("unet_training", "sampling", "vqa_tuning"):
        measurements = report["parts"][name]["measurements"]
        assert measurements, name
        for m in measurements:
            assert math.isfinite(m["per_second"]) and m["per_second"] > 0, m
            assert m["min_s"] <= m["median_s"] <= m["max_s"], m
            assert m["peak_gpu_gib"] is None  # no GPU here
    unet = report["parts"]["unet_training"]
    assert [m["gradient_checkpointing"] for m in unet["measurements"]] == [True, False]
    vqa = report["parts"]["vqa_tuning"]["settings"]
    assert vqa["k"] == 8 and vqa["pictures_per_sample"] == 2 * 8 + 1  # K liked + K disliked + 1
    assert vqa["lora"]["gradient_checkpointing"] and vqa["trainable_parameters"] > 0


@pytest.mark.slow
def test_the_chain_runs_kedro_with_the_catalogs_models_placed_on_the_device(smoke_run):
    chain = smoke_run[0]["parts"]["minihub_chain"]["settings"]
    assert chain["passed"] and chain["command"].startswith("kedro run --env minihub")
    assert chain["models_placed"] and all(
        set(arguments.values()) == {chain["device"]}
        for arguments in chain["models_placed"].values()
    )
    assert Path(chain["log"]).read_text().count("Completed node") >= 1


@pytest.mark.slow
def test_the_results_files_hold_every_figure(smoke_run):
    report, out = smoke_run
    assert json.loads((out / "gpu_check.json").read_text()) == json.loads(
        json.dumps(report, default=str)
    )
    markdown = (out / "gpu_check.md").read_text()
    assert markdown.startswith("## GPU check (smoke run on the CPU, not figures to quote)")
    assert "python -m benchmarks.gpu_check --smoke --out" in markdown
    for part in report["parts"].values():
        for m in part["measurements"]:
            assert f"| {m['name']} |" in markdown
    log = (out / "gpu_check.log").read_text()
    assert all(f"==== {name} (" in log for name in report["parts"])


def test_a_part_past_its_time_box_is_stopped_and_recorded(gpu_check, tmp_path):
    result = gpu_check._run_child("unet_training", True, tmp_path, 1.0, tmp_path / "log")
    assert result["status"] == "timeout" and result["wall_s"] < 30


def test_parts_left_without_time_are_skipped_and_still_reported(gpu_check, tmp_path):
    report = gpu_check.main(["--smoke", "--out", str(tmp_path), "--budget-s", "0"])
    assert {part["status"] for part in report["parts"].values()} == {"skipped"}
    assert json.loads((tmp_path / "gpu_check.json").read_text())["parts"].keys() == set(
        gpu_check.PARTS
    )


def _placements(catalog: dict) -> dict[str, dict[str, str]]:
    """The device arguments of each entry that has some."""
    placements = {
        name: {k: v for k, v in entry.get("load_args", {}).items() if k in DEVICE_ARGS}
        for name, entry in catalog.items()
        if isinstance(entry, dict)
    }
    return {name: arguments for name, arguments in placements.items() if arguments}


def test_the_minihub_catalog_goes_to_the_gpu_where_gpus_does(gpu_check):
    text, changed = gpu_check.on_device_catalog(
        (CONF / "minihub" / "catalog.yml").read_text(), "cuda"
    )
    minihub, gpu = yaml.safe_load(text), yaml.safe_load((CONF / "gpu" / "catalog.yml").read_text())
    placements, expected = _placements(minihub), _placements(gpu)
    assert placements == expected and changed == sum(map(len, expected.values())) > 0


def test_the_command_line_refuses_an_unknown_part(gpu_check, capsys):
    with pytest.raises(SystemExit):
        gpu_check.main(["--parts", "unet_training,warp_drive"])
    assert "warp_drive" in capsys.readouterr().err


def test_make_benchmarks_keeps_the_gpu_check_section(tmp_path):
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(PROJECT_ROOT))
        run_all = importlib.import_module("benchmarks.run_all")
    kept = run_all.kept_sections(REAL_RESULTS)
    assert kept.startswith("## GPU check") and "python -m benchmarks.gpu_check" in kept
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmarks\n\n## A step\n\ntext\n\n## GPU check (H100)\n\nfigures\n")
    assert run_all.kept_sections(results) == "## GPU check (H100)\n\nfigures\n"
    assert run_all.kept_sections(tmp_path / "missing.md") == ""


def test_the_check_reads_gpus_parameters_as_a_kedro_run_does(gpu_check):
    from prefgen_kedro import settings

    assert gpu_check.CONFIG_LOADER_ARGS == settings.CONFIG_LOADER_ARGS
