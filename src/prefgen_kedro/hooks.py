"""Project hooks: what the run was and where its time went, for the reports to state.

``RunInfoHook`` keeps ``run_info`` in the catalog — the command, env and start time, and the
wall time and peak memory of every node finished so far — so a report node can say how it was
made; at the end of a run the node table is saved as ``node_timings``
(``data/08_reporting/timings.json``).
"""

from __future__ import annotations

import contextlib
import resource
import shlex
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kedro.framework.hooks import hook_impl

_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


class RunInfoHook:
    """Records the run's command and each node's wall time and peak resident memory."""

    def __init__(self) -> None:
        self._info: dict[str, Any] = {}
        self._started: dict[str, float] = {}

    @hook_impl
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline: Any, catalog: Any) -> None:
        command = (
            shlex.join(["kedro", *sys.argv[1:]])
            if sys.argv and sys.argv[0].endswith("kedro")
            else _equivalent_command(run_params)
        )
        self._info = {
            "command": command,
            "env": run_params.get("env") or "local",
            "pipelines": run_params.get("pipeline_names") or ["__default__"],
            "started": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "nodes": [],
        }
        catalog["run_info"] = self._info

    @hook_impl
    def before_node_run(self, node: Any) -> None:
        _reset_peak_memory()
        self._started[node.name] = time.perf_counter()

    @hook_impl
    def after_node_run(self, node: Any, catalog: Any) -> None:
        self._info["nodes"].append(
            {
                "node": node.name,
                "seconds": round(time.perf_counter() - self._started.pop(node.name), 2),
                "peak_rss_gb": round(_peak_memory_bytes() / 2**30, 3),
            }
        )
        catalog["run_info"] = self._info  # a report node loading it sees every node so far

    @hook_impl
    def after_pipeline_run(self, catalog: Any) -> None:
        if "node_timings" in catalog:
            catalog.save(
                "node_timings",
                {
                    **self._info,
                    "total_seconds": round(sum(n["seconds"] for n in self._info["nodes"]), 1),
                },
            )


def _reset_peak_memory() -> None:
    """Linux: reset the process's peak RSS (VmHWM) so the next reading is this node's."""
    # Elsewhere the reading stays the process's peak so far: an upper bound.
    with contextlib.suppress(OSError):
        _CLEAR_REFS.write_text("5")


def _peak_memory_bytes() -> int:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


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
