"""`kedro viz build` makes a static site that shows every registered pipeline, the default
one as six collapsible stages."""

import json
import os
import subprocess
import sys
from pathlib import Path

from kedro.framework.startup import bootstrap_project

from prefgen_kedro.pipeline_registry import register_pipelines


def test_viz_build_lists_every_pipeline(smoke_project: Path) -> None:
    kedro = Path(sys.executable).with_name("kedro")
    completed = subprocess.run(
        [str(kedro), "viz", "build"],
        cwd=smoke_project,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    site = smoke_project / "build"
    assert (site / "index.html").is_file()
    main = json.loads((site / "api" / "main").read_text())
    bootstrap_project(smoke_project)
    assert {p["id"] for p in main["pipelines"]} == set(register_pipelines())
    tasks = {node["full_name"]: node for node in main["nodes"] if node["type"] == "task"}
    assert {
        "vqa_tuning.tune_mllm",
        "probing.fit_probes",
        "alignment.train_aligners",
        "diffusion.train_user_branches",
    } <= set(tasks)
    stages = {"data_ingestion", "vqa_tuning", "probing", "alignment", "diffusion", "evaluation"}
    assert set(main["modular_pipelines"]) - {"__root__"} == stages
    assert all(len(node["modular_pipelines"]) == 1 for node in tasks.values())
    assert "training" in tasks["diffusion.train_user_branches"]["tags"]
    assert "reporting" in tasks["evaluation.write_benchmark_report"]["tags"]
