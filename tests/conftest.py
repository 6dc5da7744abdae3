"""Shared fixtures: a throwaway copy of the project to run pipelines on ``smoke``."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from kedro.framework.session import KedroSession
from kedro.framework.startup import bootstrap_project

PROJECT_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def smoke_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the project's config and shipped models with an empty data folder, so
    pipeline tests never touch the working tree's data."""
    root = tmp_path_factory.mktemp("project")
    shutil.copy(PROJECT_ROOT / "pyproject.toml", root)
    shutil.copy(PROJECT_ROOT / ".telemetry", root)
    (root / "src").mkdir()  # kedro wants the folder; the package itself is installed
    shutil.copytree(PROJECT_ROOT / "conf", root / "conf", ignore=shutil.ignore_patterns("local"))
    (root / "conf" / "local").mkdir()
    (root / "data").mkdir()
    foundation = PROJECT_ROOT / "data" / "06_models" / "foundation"
    if foundation.exists():
        shutil.copytree(foundation, root / "data" / "06_models" / "foundation")
    return root


@pytest.fixture
def run_smoke(smoke_project: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., dict]:
    """Run named pipelines of the project copy on ``smoke``; returns the run's outputs."""

    def run(*pipeline_names: str, runtime_params: dict | None = None) -> dict:
        monkeypatch.chdir(smoke_project)
        bootstrap_project(smoke_project)
        with KedroSession.create(
            project_path=smoke_project, env="smoke", runtime_params=runtime_params
        ) as session:
            return session.run(pipeline_names=list(pipeline_names))

    return run
