"""Off a terminal a run logs one line per record and progress every few percent."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from prefgen_kedro.console import progress

# time, level, logger, message: console.LINE_FORMAT
RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d (DEBUG|INFO|WARNING|ERROR|CRITICAL) \S+: ")


def test_a_run_written_to_a_file_reads_line_by_line(smoke_project: Path, tmp_path: Path) -> None:
    log = tmp_path / "run.log"
    kedro = Path(sys.executable).with_name("kedro")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PREFGEN_TRACKING": "on"}  # a normal run
    env.pop("KEDRO_LOGGING_CONFIG", None)
    with log.open("w") as out:
        completed = subprocess.run(
            [str(kedro), "run", "--pipelines", "data_ingestion", "--env", "smoke"],
            cwd=smoke_project,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=600,
            check=False,
        )
    lines = log.read_text().splitlines()
    assert completed.returncode == 0, "\n".join(lines[-40:])
    fragments = [line for line in lines if not RECORD.match(line)]
    assert not fragments, f"lines that are not one whole record: {fragments[:5]}"
    warnings = [line for line in lines if " WARNING " in line or "Warning" in line]
    assert not warnings, warnings
    assert any("Pipeline execution completed successfully" in line for line in lines)
    assert any("agent world: 100%" in line for line in lines), "no progress line"


def test_progress_off_a_terminal_logs_every_five_percent(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.INFO, logger="prefgen_kedro.console"):
        for _ in progress(range(200), desc="steps", mininterval=0):
            pass
    shown = [record.getMessage() for record in caplog.records]
    assert len(shown) == 21, shown  # 0%, 5%, ..., 100%, each once
    assert shown[0].startswith("steps:   0%") and shown[-1].startswith("steps: 100%")


def test_off_a_terminal_the_libraries_progress_bars_are_off() -> None:
    import diffusers
    import transformers

    from prefgen_kedro.console import choose_console_logging

    choose_console_logging()  # pytest captures stdout: not a terminal
    assert not transformers.utils.logging.is_progress_bar_enabled()
    assert not diffusers.utils.logging.is_progress_bar_enabled()
