"""Project hooks: what the run was, for the reports that must say how they were made."""

from __future__ import annotations

import shlex
import sys
from datetime import UTC, datetime
from typing import Any

from kedro.framework.hooks import hook_impl


class RunInfoHook:
    """Puts ``run_info`` (the command, env, pipeline and start time) into the catalog, so
    a report node can state the exact command that made it."""

    @hook_impl
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline: Any, catalog: Any) -> None:
        command = (
            shlex.join(["kedro", *sys.argv[1:]])
            if sys.argv and sys.argv[0].endswith("kedro")
            else _equivalent_command(run_params)
        )
        catalog["run_info"] = {
            "command": command,
            "env": run_params.get("env") or "local",
            "pipelines": run_params.get("pipeline_names") or ["__default__"],
            "started": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        }


def _equivalent_command(run_params: dict[str, Any]) -> str:
    """The CLI call a Python ``session.run`` corresponds to (e.g. in the tests)."""
    words = ["kedro", "run"]
    if run_params.get("pipeline_names"):
        words += ["--pipelines", ",".join(run_params["pipeline_names"])]
    if run_params.get("env"):
        words += ["--env", run_params["env"]]
    if run_params.get("node_names"):
        words += ["--nodes", ",".join(run_params["node_names"])]
    return shlex.join(words)
