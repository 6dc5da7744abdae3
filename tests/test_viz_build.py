"""`kedro viz build` makes a static site that shows every registered pipeline."""

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
    node_names = {node["name"] for node in main["nodes"]}
    assert {"tune_mllm", "fit_probes", "train_aligners", "train_user_branches"} <= node_names
