"""Experiment tracking: every ``kedro run`` as an MLflow run in a local store (no server).

``hooks.TrackingHook`` drives it: ``start_tracked_run`` opens the run with the run's tags
and every parameter (``flat_parameters``: one per key, so two runs compare key by key),
``tracked_metrics`` turns a report into metrics, ``log_artifact`` keeps a report file.
``PREFGEN_TRACKING=off`` turns tracking off (``tracking_enabled``).

kedro-mlflow (2.0.3) runs with this Kedro, but it logs each validated parameter block as one
string and warns on every CLI start under MLflow 3, so the project talks to MLflow directly.

Public API: ``EXPERIMENT``, ``REPORT_METRICS``, ``REPORT_ARTIFACTS``, ``tracking_enabled``,
``start_tracked_run``, ``flat_parameters``, ``tracked_metrics``, ``log_artifact``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

EXPERIMENT = "prefgen_kedro"

# Reports whose numbers become metrics (prefixed with the report's name); ``metrics`` (the
# benchmark table) gives one metric per method, metric and statistic.
REPORT_METRICS = frozenset(
    {
        "ingestion_report",
        "vqa_metrics",
        "layer_selection",
        "alignment_metrics",
        "taste_signal_audit",
        "metrics",
    }
)
# Files logged as artifacts when a run writes them.
REPORT_ARTIFACTS = frozenset(
    {"benchmark_markdown", "benchmark_html", "benchmark_figures", "metrics", "probe_metrics"}
)
# Parts of a report that are not its results: its training records and lineage.
_SKIPPED_KEYS = frozenset({"provenance", "training", "run"})


def tracking_enabled() -> bool:
    """False when the environment variable ``PREFGEN_TRACKING`` is ``off`` (or 0/false/no)."""
    switch = os.environ.get("PREFGEN_TRACKING", "on").strip().lower()
    return switch not in {"off", "0", "false", "no"}


def start_tracked_run(
    store: Path, *, run_name: str, tags: Mapping[str, str], params: Mapping[str, str]
) -> str:
    """Open an MLflow run in the local store ``store`` (``mlflow.db``, ``artifacts/``) under
    ``EXPERIMENT``, with ``tags`` and ``params``; returns its id."""
    store.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(f"sqlite:///{store.resolve() / 'mlflow.db'}")
    if mlflow.get_experiment_by_name(EXPERIMENT) is None:
        artifacts = (store / "artifacts").resolve().as_uri()
        mlflow.create_experiment(EXPERIMENT, artifact_location=artifacts)
    mlflow.set_experiment(EXPERIMENT)
    if mlflow.active_run() is not None:  # a run left open by a session that failed early
        mlflow.end_run(status="KILLED")
    run = mlflow.start_run(run_name=run_name, tags=dict(tags))
    items = list(params.items())
    for start in range(0, len(items), 100):  # MLflow's batch limit
        mlflow.log_params(dict(items[start : start + 100]))
    return run.info.run_id


def flat_parameters(parameters: Mapping[str, Any]) -> dict[str, str]:
    """Every parameter as ``block.key.subkey`` → its value as text (validated parameter
    models dumped first; lists kept whole; values cut to MLflow's length limit)."""
    flat: dict[str, str] = {}

    def walk(value: Any, name: str) -> None:
        if hasattr(value, "model_dump"):
            value = value.model_dump()
        if isinstance(value, Mapping) and value:
            for key, item in value.items():
                walk(item, f"{name}.{key}" if name else str(key))
        else:
            flat[name] = str(value)[:MAX_PARAM_VAL_LENGTH]

    walk(parameters, "")
    return flat


def log_artifact(path: Path) -> None:
    """Keep a report file, or a folder of them, with the active run."""
    if path.is_dir():
        mlflow.log_artifacts(str(path), artifact_path=path.name)
    else:
        mlflow.log_artifact(str(path))


def tracked_metrics(dataset_name: str, value: Any) -> dict[str, float]:
    """The metrics (name → finite number) a dataset adds to the run: every number of a
    report in ``REPORT_METRICS``, nothing for other datasets."""
    if dataset_name not in REPORT_METRICS:
        return {}
    if isinstance(value, pd.DataFrame):
        return _benchmark_rows(value)
    if isinstance(value, Mapping):
        return dict(_numbers(value, dataset_name))
    return {}


def _benchmark_rows(table: pd.DataFrame) -> dict[str, float]:
    """``{method}.{metric}.{mean|ci_low|ci_high}`` for each row of the benchmark table."""
    statistics = [column for column in ("mean", "ci_low", "ci_high") if column in table]
    return {
        f"{row['method']}.{row['metric']}.{statistic}": float(row[statistic])
        for _, row in table.iterrows()
        for statistic in statistics
        if _is_finite(row[statistic])
    }


def _numbers(report: Mapping, prefix: str) -> list[tuple[str, float]]:
    found = []
    for key, value in report.items():
        name = f"{prefix}.{key}"
        if key in _SKIPPED_KEYS:
            continue
        if isinstance(value, Mapping):
            found += _numbers(value, name)
        elif _is_finite(value):
            found.append((name, float(value)))
    return found


def _is_finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
