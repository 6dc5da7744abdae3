"""Every run is an MLflow run: two smoke runs with other seeds read back side by side."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
from mlflow.tracking import MlflowClient

from prefgen_kedro.tracking import EXPERIMENT, flat_parameters, tracked_metrics


def test_two_tracked_smoke_runs_read_back_through_mlflow(
    smoke_project: Path, tmp_path: Path
) -> None:
    kedro = Path(sys.executable).with_name("kedro")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PREFGEN_TRACKING": "on"}
    for seed in (11, 12):
        completed = subprocess.run(
            [
                str(kedro),
                "run",
                "--pipelines",
                "data_ingestion",
                "--env",
                "smoke",
                "--params",
                f"data_ingestion.agent_world.seed={seed}",
            ],
            cwd=smoke_project,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        assert completed.returncode == 0, completed.stdout[-3000:]
    store = smoke_project / "data" / "smoke" / "tracking" / "mlflow.db"
    client = MlflowClient(tracking_uri=f"sqlite:///{store}")
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time"])
    assert len(runs) >= 2
    first, second = runs[-2], runs[-1]
    assert [r.data.params["data_ingestion.agent_world.seed"] for r in (first, second)] == [
        "11",
        "12",
    ]
    for run in (first, second):
        assert run.info.status == "FINISHED"
        assert run.data.tags["pipelines"] == "data_ingestion" and run.data.tags["env"] == "smoke"
        assert run.data.metrics["ingestion_report.users"] > 0
        assert len(run.data.tags["digest.users"]) >= 16
    # other seeds, other users: their tables' digests differ
    assert first.data.tags["digest.users"] != second.data.tags["digest.users"]


def test_parameters_are_flattened_key_by_key_and_reports_become_metrics() -> None:
    assert flat_parameters({"a": {"b": 1, "c": [1, 2]}, "d": "x"}) == {
        "a.b": "1",
        "a.c": "[1, 2]",
        "d": "x",
    }
    table = pd.DataFrame(
        [{"method": "prefgen", "metric": "like_rate", "mean": 0.5, "ci_low": 0.4, "ci_high": 0.6}]
    )
    assert tracked_metrics("metrics", table) == {
        "prefgen.like_rate.mean": 0.5,
        "prefgen.like_rate.ci_low": 0.4,
        "prefgen.like_rate.ci_high": 0.6,
    }
    report = {"accuracy": 0.7, "flag": True, "training": {"loss": 1.0}, "k": {"8": 0.6}}
    assert tracked_metrics("vqa_metrics", report) == {
        "vqa_metrics.accuracy": 0.7,
        "vqa_metrics.k.8": 0.6,
    }
    assert tracked_metrics("images", table) == {}
