"""Shared fixtures: a throwaway copy of the project to run pipelines on ``smoke``."""

from __future__ import annotations

import os
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


def _run_pipelines(project: Path, pipeline_names: list[str], runtime_params: dict | None) -> dict:
    bootstrap_project(project)
    with KedroSession.create(
        project_path=project, env="smoke", runtime_params=runtime_params
    ) as session:
        return session.run(pipeline_names=pipeline_names)


@pytest.fixture
def run_smoke(smoke_project: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., dict]:
    """Run named pipelines of the project copy on ``smoke``; returns the run's outputs."""

    def run(*pipeline_names: str, runtime_params: dict | None = None) -> dict:
        monkeypatch.chdir(smoke_project)
        return _run_pipelines(smoke_project, list(pipeline_names), runtime_params)

    return run


@pytest.fixture(scope="session")
def smoke_foundation(smoke_project: Path) -> Path:
    """The smoke-sized foundation models (made once per test session), which the smoke
    runs of later pipelines start from; returns their folder."""
    _run_once(smoke_project, ["foundation"])
    return smoke_project / "data" / "06_models" / "foundation_smoke"


def _run_once(project: Path, pipeline_names: list[str]) -> Path:
    here = Path.cwd()
    os.chdir(project)
    try:
        _run_pipelines(project, pipeline_names, None)
    finally:
        os.chdir(here)
    return project / "data"


@pytest.fixture(scope="session")
def smoke_tuned(smoke_foundation: Path, smoke_project: Path) -> Path:
    """``data_ingestion`` and ``vqa_tuning`` run once on ``smoke`` (later stages stand on
    them); returns the project copy's data folder."""
    return _run_once(smoke_project, ["data_ingestion", "vqa_tuning"])


@pytest.fixture(scope="session")
def smoke_aligned(smoke_tuned: Path, smoke_project: Path) -> Path:
    """``probing`` and ``alignment`` run once on ``smoke``, after ``smoke_tuned``."""
    return _run_once(smoke_project, ["probing", "alignment"])


@pytest.fixture(scope="session")
def smoke_diffused(smoke_aligned: Path, smoke_project: Path) -> Path:
    """``diffusion`` run once on ``smoke``, after ``smoke_aligned``."""
    return _run_once(smoke_project, ["diffusion"])


@pytest.fixture(scope="session")
def smoke_evaluated(smoke_diffused: Path, smoke_project: Path) -> Path:
    """``evaluation`` run once on ``smoke``, after ``smoke_diffused``."""
    return _run_once(smoke_project, ["evaluation"])
