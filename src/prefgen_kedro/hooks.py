"""Project hooks: what the run was, what each artifact was made from, and errors told plainly.

- ``RunInfoHook`` keeps ``run_info`` in the catalog — the command, env and start time, and the
  wall time and peak memory of every node finished so far — so a report node can say how it
  was made; at the end of a run the node table and which training runs trained or were
  reused are saved as ``node_timings`` (``<data_root>/08_reporting/timings.json``).
- ``ProvenanceHook`` records, for every dataset a run writes, the digest of its files and the
  digests of everything it was made from (its lineage), in ``<data_root>/provenance/`` and,
  for a model folder, in the folder's ``provenance.json``; a report JSON gets a
  ``provenance`` key. Before the run and before each node it refuses inputs made from
  different versions of one artifact (a staged run that would show an old aligner beside a
  new MLLM), naming both; it refuses a run that would write into a ``read_only_dirs`` folder
  (``globals.yml``); and it hands a node that takes ``input_lineage`` the lineage of its
  other inputs (the benchmark lists the models it evaluated). A model bundle
  (``datasets.ModelBundleDataset``) counts part by part, each part under the name of the
  catalog entry it is configured as (``stored_parts``): one artifact, however it is read.
- ``TrackingHook`` records every ``kedro run`` as an MLflow run (``tracking``): parameters,
  the reports' numbers and files, and the provenance digest of every dataset it wrote.
- ``ConsoleErrorHook`` ends a failed ``kedro run`` with the failing node and its message, not
  with a page of library frames: bad input (``BadInputError``, a parameter error) gets the
  message alone, any other error the project's own frames; the full traceback goes to
  ``logs/last_error.log`` (``PREFGEN_TRACEBACK=1`` prints it instead).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import resource
import shlex
import sys
import time
import traceback
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

import mlflow
from kedro.framework.hooks import hook_impl
from kedro.validation.exceptions import ParameterValidationError
from kedro_datasets.json import JSONDataset

from prefgen_kedro.datasets import ModelBundleDataset, PretrainedModelDataset
from prefgen_kedro.errors import BadInputError
from prefgen_kedro.provenance import (
    PROVENANCE_FILE,
    digest_of,
    files_digest,
    require_consistent,
    write_json_atomic,
)
from prefgen_kedro.tracking import (
    REPORT_ARTIFACTS,
    flat_parameters,
    log_artifact,
    start_tracked_run,
    tracked_metrics,
    tracking_enabled,
)

logger = logging.getLogger(__name__)

_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


class RunInfoHook:
    """Records the run's command, each node's wall time and peak resident memory, and which
    training runs trained and which were reused (found finished)."""

    def __init__(self) -> None:
        self._info: dict[str, Any] = {}
        self._started: dict[str, float] = {}
        self._runs: dict[str, bool] = {}  # training run folder -> reused

    @hook_impl
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline: Any, catalog: Any) -> None:
        command = _command(run_params)
        self._info = {
            "command": command,
            "env": run_params.get("env") or "local",
            "pipelines": run_params.get("pipeline_names") or ["__default__"],
            "started": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "nodes": [],
        }
        self._runs = {}
        catalog.save("run_info", self._info)  # declared in the catalog: no "replacing" warning

    @hook_impl
    def before_node_run(self, node: Any) -> None:
        _reset_peak_memory()
        self._started[node.name] = time.perf_counter()

    @hook_impl
    def after_node_run(self, node: Any, catalog: Any, outputs: dict[str, Any]) -> None:
        # A report may repeat a run (the manifest, a stage list): one entry per run folder.
        self._runs.update((run["run_dir"], run["reused"]) for run in _training_runs(outputs))
        self._info["nodes"].append(
            {
                "node": node.name,
                "seconds": round(time.perf_counter() - self._started.pop(node.name), 2),
                "peak_rss_gb": round(_peak_memory_bytes() / 2**30, 3),
            }
        )
        catalog.save("run_info", self._info)  # a report node loading it sees every node so far

    @hook_impl
    def after_pipeline_run(self, catalog: Any) -> None:
        runs = {
            outcome: sorted(folder for folder, reused in self._runs.items() if reused == is_reuse)
            for outcome, is_reuse in (("trained", False), ("reused", True))
        }
        self._info["training_runs"] = runs
        if self._runs:
            logger.info(
                "Training runs: %d trained, %d reused%s",
                len(runs["trained"]),
                len(runs["reused"]),
                "" if runs["trained"] else " (all of them: nothing was trained)",
            )
        if "node_timings" in catalog:
            catalog.save(
                "node_timings",
                {
                    **self._info,
                    "total_seconds": round(sum(n["seconds"] for n in self._info["nodes"]), 1),
                },
            )


def _training_runs(value: Any) -> Iterator[dict[str, Any]]:
    """The training runs a node's outputs report (``TrainResult.record()``), at any depth."""
    if isinstance(value, Mapping):
        if {"run_key", "reused", "run_dir"} <= set(value):
            yield value
            return
        for item in value.values():
            yield from _training_runs(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _training_runs(item)


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


def _command(run_params: dict[str, Any]) -> str:
    """The command line of this run: as typed, or its equivalent for an in-process run."""
    if sys.argv and sys.argv[0].endswith("kedro"):
        return shlex.join(["kedro", *sys.argv[1:]])
    return _equivalent_command(run_params)


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


# A node input the ProvenanceHook fills with the lineage of the node's other inputs.
INPUT_LINEAGE = "input_lineage"


class ProvenanceHook:
    """Records what every written dataset was made from and refuses mixed versions (see the
    module docstring)."""

    def __init__(self) -> None:
        self._ledger = Path("data/provenance")
        self._read_only: list[Path] = []
        self._catalog: Any = None
        # This run's view: each dataset's lineage, each node's inputs and what they came from.
        self._lineages: dict[str, dict[str, str]] = {}
        self._inputs: dict[str, dict[str, str]] = {}
        self._made_from: dict[str, dict[str, str]] = {}
        self._stored_datasets: dict[str, Any] = {}  # a stored part's name -> its dataset

    @hook_impl
    def after_context_created(self, context: Any) -> None:
        self._ledger = _data_root(context) / "provenance"
        project = Path(context.project_path)
        read_only = context.config_loader["globals"].get("read_only_dirs", [])
        self._read_only = [project / folder for folder in read_only]

    @hook_impl
    def before_pipeline_run(self, pipeline: Any, catalog: Any) -> None:
        self._catalog = catalog
        self._lineages, self._inputs, self._made_from = {}, {}, {}
        self._stored_datasets = {}
        self._refuse_read_only_outputs(pipeline.all_outputs())
        lineages: dict[str, dict[str, str]] = {}
        for name in pipeline.inputs():
            lineages.update(self._source_lineages(name))
        require_consistent(lineages, "this run")

    @hook_impl
    def before_node_run(self, node: Any, inputs: dict[str, Any]) -> dict[str, Any] | None:
        # Each parameter's digest and each stored input's (a bundle's: each of its parts').
        lineages: dict[str, dict[str, str]] = {}
        digests: dict[str, str] = {}
        for name, value in inputs.items():
            if name.startswith("params:"):
                digests[name] = digest_of(value)
                continue
            for source, lineage in self._source_lineages(name).items():
                lineages[source] = lineage
                if source in lineage:
                    digests[source] = lineage[source]
        require_consistent(lineages, f"node {node.name}")
        self._made_from[node.name] = {
            k: v for lineage in lineages.values() for k, v in lineage.items()
        }
        self._inputs[node.name] = digests
        if INPUT_LINEAGE not in node.inputs:
            return None
        made_from = self._made_from[node.name]
        models = {
            name for name in made_from if isinstance(self._dataset(name), PretrainedModelDataset)
        }
        return {
            INPUT_LINEAGE: {
                "models": {name: made_from[name] for name in sorted(models)},
                "datasets": {name: made_from[name] for name in sorted(set(made_from) - models)},
            }
        }

    @hook_impl
    def after_node_run(self, node: Any, outputs: dict[str, Any]) -> None:
        for name, value in outputs.items():
            dataset = self._dataset(name)
            if not (isinstance(dataset, JSONDataset) and isinstance(value, dict)):
                continue
            # A file keyed by its own names (the foundation manifest) opts out in the catalog.
            if (dataset.metadata or {}).get("prefgen", {}).get("provenance_key", True):
                value["provenance"] = {
                    "made_by": node.name,
                    "inputs": self._inputs[node.name],
                    "made_from": self._made_from[node.name],
                }

    @hook_impl
    def after_dataset_saved(self, dataset_name: str, node: Any) -> None:
        made_from = self._made_from[node.name]
        written = [part for part in self._stored(dataset_name) if part.written]
        if not written:  # in memory: it carries its inputs' lineage to the nodes that read it
            self._lineages[dataset_name] = made_from
            return
        for part in written:
            digest = files_digest(part.path)
            self._lineages[part.name] = {**made_from, part.name: digest}
            record = {
                "dataset": part.name,
                "digest": digest,
                "made_by": node.name,
                "made_at": datetime.now(UTC).isoformat(timespec="seconds"),
                "inputs": self._inputs[node.name],
                "lineage": self._lineages[part.name],
            }
            self._ledger.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self._ledger / f"{part.name}.json", record)
            if isinstance(part.dataset, PretrainedModelDataset):
                write_json_atomic(part.path / PROVENANCE_FILE, record)

    def _source_lineages(self, name: str) -> dict[str, dict[str, str]]:
        """What ``name`` was made from, by the name of each stored thing it reads (itself; a
        bundle's parts), so a bundle's parts are checked against each other and against the
        same artifacts read elsewhere; a dataset in memory goes by its own name."""
        parts = self._stored(name)
        if not parts:
            return {name: self._lineages.get(name, {})}
        return {part.name: self._part_lineage(part) for part in parts}

    def _part_lineage(self, part: StoredPart) -> dict[str, str]:
        """What a stored folder or file was made from (itself included): as this run made it,
        or as the ledger recorded it if its files are still those; else only itself (made
        elsewhere, or changed since, like a shipped or downloaded checkpoint)."""
        if part.name not in self._lineages:
            if not part.path.exists():
                return {}
            digest = files_digest(part.path)
            record = self._ledger / f"{part.name}.json"
            recorded = json.loads(record.read_text()) if record.is_file() else {}
            self._lineages[part.name] = (
                recorded["lineage"] if recorded.get("digest") == digest else {part.name: digest}
            )
        return self._lineages[part.name]

    def _stored(self, name: str) -> list[StoredPart]:
        parts = stored_parts(self._catalog, name)
        self._stored_datasets.update((part.name, part.dataset) for part in parts)
        return parts

    def _dataset(self, name: str) -> Any:
        if name in self._stored_datasets:  # a bundle's part without an entry of its own
            return self._stored_datasets[name]
        return self._catalog.get(name, fallback_to_runtime_pattern=True)

    def _refuse_read_only_outputs(self, outputs: set[str]) -> None:
        for name in sorted(outputs):
            for part in self._stored(name):
                folder = next((f for f in self._read_only if part.path.is_relative_to(f)), None)
                if part.written and folder is not None:
                    raise BadInputError(
                        f"this run would write {part.name} into {part.path}, but {folder} is "
                        "read-only in this environment (globals.yml: read_only_dirs); the "
                        "shipped foundation checkpoints are made by `kedro run --pipelines "
                        "foundation` on base"
                    )


class PreflightHook:
    """Before the first node, every path the run would read and does not find, listed at once
    with how to get it: a checkpoint's ``metadata.fetch`` command (``conf/gpu`` has one per
    hub folder), the pipeline that makes a dataset, and the Pick-a-Pic shards when the run
    ingests them. Without it, a run stops at the first missing path, deep in a node."""

    @hook_impl(tryfirst=True)
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline: Any, catalog: Any) -> None:
        missing = missing_inputs(pipeline, catalog, run_params.get("env"))
        if not missing:
            return
        remedies: dict[str, list[str]] = {}
        for name, _, remedy in missing:
            remedies.setdefault(remedy, []).append(name)
        raise BadInputError(
            f"this run reads {len(missing)} path(s) that are not there:\n"
            + "\n".join(f"- {name}: {path}" for name, path, _ in missing)
            + "\nTo get them:\n"
            + "\n".join(f"- {remedy}  # {', '.join(names)}" for remedy, names in remedies.items())
        )


def missing_inputs(pipeline: Any, catalog: Any, env: str | None) -> list[tuple[str, str, str]]:
    """(dataset, path, how to get it) for every path ``pipeline`` reads that does not exist: a
    bundle's parts by their own names, and the parts a bundle the run writes only reads."""
    inputs = pipeline.inputs()
    found: dict[str, tuple[str, str, str]] = {}
    for name in inputs | pipeline.all_outputs():
        for part in stored_parts(catalog, name):
            if (name in inputs or not part.written) and not part.path.exists():
                path = part.path
                shown = path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path
                found[part.name] = (part.name, str(shown), _how_to_get(part, name, env))
    missing = [found[name] for name in sorted(found)]
    if "params:data_ingestion" in inputs:  # the run ingests
        ingestion = catalog.load("params:data_ingestion")
        if hasattr(ingestion, "model_dump"):  # validated against the node's parameter model
            ingestion = ingestion.model_dump()
        shards = Path(ingestion["pickapic"]["shard_dir"])
        if ingestion["source"] == "pickapic" and not any(shards.glob("*.parquet")):
            remedy = ingestion["pickapic"].get("fetch") or (
                f"put the Pick-a-Pic v2 parquet shards in {shards} (README: Running on GPUs)"
            )
            missing.append(("Pick-a-Pic shards", f"{shards}/*.parquet", remedy))
    return missing


def _how_to_get(part: StoredPart, dataset_name: str, env: str | None) -> str:
    """A part's ``metadata.fetch``, else the first pipeline that writes it (or the bundle
    ``dataset_name`` it is written through)."""
    fetch = (getattr(part.dataset, "metadata", None) or {}).get("fetch")
    if fetch:
        return fetch
    from kedro.framework.project import pipelines  # the registry, once the project is set up

    names = {part.name, dataset_name} if part.written else {part.name}
    makers = [
        stage
        for stage, pipeline in pipelines.items()
        if stage != "__default__" and names & pipeline.all_outputs()
    ]
    if not makers:
        return "no pipeline makes it"
    return f"kedro run{f' --env {env}' if env else ''} --pipelines {makers[0]}"


@dataclass(frozen=True)
class StoredPart:
    """A folder or file a dataset keeps its data in: ``name``, the name its provenance and
    the preflight's list go by; ``written``, whether saving the dataset writes it."""

    name: str
    path: Path
    dataset: Any
    written: bool


def stored_parts(catalog: Any, name: str) -> list[StoredPart]:
    """The local folders and files of the dataset ``name``: its own path, under its own name;
    for a model bundle, each part's, under the name of the catalog entry configured as that
    part (the catalog writes a part as ``${entry}``), else ``<name>.<part>``. None for a
    dataset held in memory (or remotely)."""
    if name.startswith("params:"):
        return []
    dataset = catalog.get(name, fallback_to_runtime_pattern=True)
    if not isinstance(dataset, ModelBundleDataset):
        path = _local_path(dataset)
        return [] if path is None else [StoredPart(name, path, dataset, written=True)]
    parts = []
    for part, part_dataset in dataset.parts.items():
        path = None if part_dataset is None else _local_path(part_dataset)
        if path is not None:
            entry = _entry_configured_as(catalog, part_dataset) or f"{name}.{part}"
            parts.append(StoredPart(entry, path, part_dataset, part in dataset.saved_parts))
    return parts


def _entry_configured_as(catalog: Any, dataset: Any) -> str | None:
    """The catalog entry whose dataset is of ``dataset``'s type and described the same."""
    described = dataset._describe()
    for name in sorted(catalog):  # lazy entries come first, so the order would move
        entry = catalog.get(name)
        if type(entry) is type(dataset) and entry._describe() == described:
            return name
    return None


def _local_path(dataset: Any) -> Path | None:
    """Where a dataset's files are, or None for one held in memory (or remote)."""
    described = dataset._describe()
    location = described.get("filepath") or described.get("path")
    if location is None or described.get("protocol", "file") != "file":
        return None
    return Path(str(location))


# Errors whose message is the whole story: no traceback on the console.
_PLAIN_ERRORS = (BadInputError, ParameterValidationError)


def _data_root(context: Any) -> Path:
    """The environment's data root (``globals.yml``: ``data_root``) in the project."""
    return Path(context.project_path) / context.config_loader["globals"]["data_root"]


class TrackingHook:
    """Records every ``kedro run`` as an MLflow run in a local store below the environment's
    data root (``<data_root>/tracking``: ``mlflow.db`` and ``artifacts/``): its command,
    environment and pipelines as tags, every parameter (one per key), the numbers of the
    reports (``tracking.REPORT_METRICS``), the report files (``tracking.REPORT_ARTIFACTS``)
    and the provenance digest of every dataset it wrote. ``PREFGEN_TRACKING=off`` turns it
    off."""

    def __init__(self) -> None:
        self._catalog: Any = None
        self._context: Any = None
        self._on = False

    @hook_impl
    def after_context_created(self, context: Any) -> None:
        self._context = context

    @hook_impl
    def before_pipeline_run(self, run_params: dict[str, Any], catalog: Any) -> None:
        self._catalog = catalog
        self._on = tracking_enabled()
        if not self._on:
            return
        pipelines = run_params.get("pipeline_names") or ["__default__"]
        start_tracked_run(
            _data_root(self._context) / "tracking",
            run_name="+".join(pipelines),
            tags={
                "command": _command(run_params),
                "env": run_params.get("env") or "local",
                "pipelines": ",".join(pipelines),
            },
            params=flat_parameters(self._context.params),
        )

    @hook_impl
    def after_node_run(self, outputs: dict[str, Any]) -> None:
        if not self._on:
            return
        for name, value in outputs.items():
            if metrics := tracked_metrics(name, value):
                mlflow.log_metrics(metrics)

    @hook_impl(trylast=True)  # after ProvenanceHook has written the dataset's record
    def after_dataset_saved(self, dataset_name: str) -> None:
        if not self._on:
            return
        for part in stored_parts(self._catalog, dataset_name):
            record = _data_root(self._context) / "provenance" / f"{part.name}.json"
            if part.written and record.is_file():
                mlflow.set_tag(f"digest.{part.name}", json.loads(record.read_text())["digest"])
            if dataset_name in REPORT_ARTIFACTS and part.path.exists():
                log_artifact(part.path)

    @hook_impl
    def after_pipeline_run(self) -> None:
        if self._on:
            mlflow.end_run()

    @hook_impl
    def on_pipeline_error(self) -> None:
        if self._on:
            mlflow.end_run(status="FAILED")


class ConsoleErrorHook:
    """Ends a failed run with the node and its message (see the module docstring)."""

    def __init__(self) -> None:
        self._log = Path("logs/last_error.log")
        self._failed_nodes: dict[int, str] = {}
        self._previous_hook: Any = None

    @hook_impl
    def after_context_created(self, context: Any) -> None:
        self._log = Path(context.project_path) / "logs" / "last_error.log"
        if self._previous_hook is None:  # once per process: sessions come and go in tests
            self._previous_hook = sys.excepthook
            sys.excepthook = self._report

    @hook_impl
    def on_node_error(self, error: Exception, node: Any) -> None:
        self._failed_nodes[id(error)] = node.name

    def _report(
        self, kind: type[BaseException], error: BaseException, trace: TracebackType | None
    ) -> None:
        node = self._failed_nodes.get(id(error))
        if os.environ.get("PREFGEN_TRACEBACK") or not (node or isinstance(error, _PLAIN_ERRORS)):
            self._previous_hook(kind, error, trace)
            return
        self._log.parent.mkdir(parents=True, exist_ok=True)
        self._log.write_text("".join(traceback.format_exception(kind, error, trace)))
        lines = [f"{f'Node {node}' if node else 'The run'} failed: {kind.__name__}: {error}"]
        if not isinstance(error, _PLAIN_ERRORS):  # a bug, maybe: where in the project
            lines += [
                f"  at {frame.filename}:{frame.lineno} in {frame.name}"
                for frame in traceback.extract_tb(trace)
                if "prefgen_kedro" in frame.filename
            ]
        lines.append(f"(Full traceback: {self._log}; PREFGEN_TRACEBACK=1 prints it here.)")
        print("\n".join(lines), file=sys.stderr)
