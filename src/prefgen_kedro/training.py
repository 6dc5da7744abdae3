"""One training loop for every model: seeded, resumable, atomic, NaN-guarded (DESIGN.md §6).

Written in the style of diffusers' training examples: an ``accelerate.Accelerator`` owns devices,
mixed precision, gradient accumulation and ``save_state``/``load_state``, so ``accelerate launch``
scales a trainer unchanged and a plain ``python`` process runs it on one device (or the CPU).

Public API:

- ``TrainConfig`` — the validated parameter model (a typo in a YAML key is an error).
- ``train(model, dataset, compute_loss, config, *, checkpoint_root, name, key=None,
  collate_fn=None, trainable_parameters=None, on_log=None, description=None) -> TrainResult``.
  ``compute_loss(prepared_model, batch)`` returns a scalar loss, or ``(loss, {metric: float})``;
  it is handed the *prepared* model (DDP-wrapped under ``accelerate launch``), so call that one.
  ``on_log(step, entry)`` may return values (a validation score) that join the history entry.
- ``TrainResult`` — ``history`` (one entry per ``log_every`` steps and at the end: the window
  means of ``loss`` and every metric, plus ``step``, ``lr`` and ``samples_seen``), ``steps``,
  ``wall_seconds`` (of this call), ``resumed_from`` (the step of the checkpoint resumed, or
  ``None``), ``steps_trained`` (by this call), ``reused`` (a finished run: nothing trained),
  ``trained_seconds`` (the loop's time over every call that trained the run, kept in its
  checkpoints, so a reused run still tells how long it took; ``None`` for checkpoints written
  before it was kept), ``run_dir``, and ``record()``: what a report says about the run.
- ``NonFiniteLossError`` — raised, naming the step, when the loss becomes NaN or infinite.

Checkpoints. A run lives in ``<checkpoint_root>/<name>-<hash[:10]>`` where the hash covers the
config (minus pure bookkeeping: ``log_every``, ``checkpoint_every``, ``checkpoints_total_limit``;
``mixed_precision`` as it runs on this machine, see ``precision``), the caller's ``key``
(``provenance.run_key`` of the parameters and the content of every input: data, pictures, the
model it starts from) and the number of processes; that folder holds ``run_key.json``. Any
changed setting or input therefore starts fresh in a new folder, and an identical run resumes
from the newest ``checkpoint-{step}`` (the weights that train and the model's buffers, not
the frozen base, which the run key covers and the model brings; optimizer, scheduler, RNG
states and ``trainer_state.json`` with the history). A checkpoint is written to
``.tmp-checkpoint-{step}`` and renamed into place, so a crash never leaves a half-written one
where a resume would find it; one is written every ``checkpoint_every`` steps and at the end
(a finished run started again loads the final weights and trains zero steps: it is reused).

Data. The dataset is read as an endless stream of epochs; epoch ``e`` is shuffled by a generator
seeded from ``(seed, e)`` and cut into ``max(1, len // (batch_size * processes))`` global batches
(the tail is dropped, different each epoch; a dataset smaller than one global batch is cycled).
Any position is thus recomputable from the step alone: a resumed run skips straight to it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import cloudpickle
import pydantic
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import DistributedDataParallelKwargs, send_to_device, set_seed
from safetensors import safe_open
from torch import nn
from torch.utils.data import DataLoader, Dataset
from transformers import PreTrainedModel, get_cosine_schedule_with_warmup

try:  # transformers 5 records hidden states with hooks on a registry of model classes
    from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY
except ImportError:  # older ones return them from forward
    _CAN_RECORD_REGISTRY = None

from prefgen_kedro.console import progress
from prefgen_kedro.precision import effective_precision
from prefgen_kedro.provenance import RunKey, write_json_atomic

logger = logging.getLogger(__name__)

LossFn = Callable[[nn.Module, Any], torch.Tensor | tuple[torch.Tensor, dict[str, float]]]
# Called with each history entry; what it returns (or None) is added to the entry.
LogFn = Callable[[int, dict[str, float]], Mapping[str, float] | None]

RUN_KEY_FILE = "run_key.json"
TRAINER_STATE_FILE = "trainer_state.json"
LAUNCH_RESULT_FILE = "result.json"
_CHECKPOINT_PREFIX = "checkpoint-"
_CHECKPOINT_WEIGHTS = "model.safetensors"  # accelerate's name for the (only) model's weights
_TMP_PREFIX = ".tmp-"
# Fields that change how often things are written, not what is trained: a run may resume with
# different values.
_BOOKKEEPING_FIELDS = frozenset({"log_every", "checkpoint_every", "checkpoints_total_limit"})
# Where a run trains, not what: the number of processes is hashed as it runs.
_PLACEMENT_FIELDS = frozenset({"processes"})
LAUNCH_MODULE = "prefgen_kedro.launch"
# transformers' output capturing (utils/output_capturing.py): the flag it sets on a model and
# the name of the forward hook it registers on its layers.
_CAPTURING_FLAG = "_output_capturing_hooks_installed"
_CAPTURING_HOOK = "output_capturing_hook"


class TrainConfig(pydantic.BaseModel, extra="forbid"):
    """Settings of one training run; every trainer's parameters embed one of these."""

    max_steps: int = pydantic.Field(ge=1)
    batch_size: int = pydantic.Field(ge=1)
    learning_rate: float = pydantic.Field(gt=0)
    weight_decay: float = pydantic.Field(default=0.0, ge=0)
    warmup_steps: int = pydantic.Field(default=0, ge=0)
    gradient_accumulation_steps: int = pydantic.Field(default=1, ge=1)
    max_grad_norm: float | None = pydantic.Field(default=1.0, gt=0)
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    checkpoint_every: int = pydantic.Field(default=500, ge=1)
    checkpoints_total_limit: int = pydantic.Field(default=2, ge=1)
    seed: int = pydantic.Field(default=0, ge=0)
    log_every: int = pydantic.Field(default=10, ge=1)
    num_workers: int = pydantic.Field(default=0, ge=0)
    # One process per GPU: above 1 the run is launched (torchrun) and loaded back here;
    # "auto" takes every visible GPU. The run's folder already names its process count.
    processes: int | Literal["auto"] = pydantic.Field(default=1)

    @pydantic.field_validator("processes")
    @classmethod
    def _at_least_one(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 1:
            raise ValueError(f"processes must be at least 1 or 'auto', got {value}")
        return value


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; ``step`` is the optimizer step (1-based) it happened in."""

    def __init__(self, name: str, step: int, value: float, last_checkpoint: Path | None) -> None:
        self.step = step
        self.value = value
        where = f"last checkpoint {last_checkpoint}" if last_checkpoint else "no checkpoint yet"
        super().__init__(
            f"{name}: loss is {value} at step {step} ({where}); lower the learning rate, "
            "check the data, or try mixed_precision='no'"
        )


@dataclass
class TrainResult:
    """What a run did; the model itself is trained in place."""

    history: list[dict[str, float]]
    steps: int
    wall_seconds: float
    resumed_from: int | None
    run_dir: Path
    key: RunKey | None = None
    trained_seconds: float | None = None

    @property
    def steps_trained(self) -> int:
        """The steps this call trained (``wall_seconds`` is theirs): 0 for a finished run."""
        return self.steps - (self.resumed_from or 0)

    @property
    def reused(self) -> bool:
        """Whether the run was found finished, so this call trained nothing."""
        return self.steps_trained == 0

    def record(self) -> dict[str, Any]:
        """The run as a report states it: its folder, key and inputs' digests, whether it
        resumed (``resumed_from``: the step) or was reused whole."""
        return {
            "run_dir": str(self.run_dir),
            "run_key": self.key.digest if self.key else None,
            "inputs": dict(self.key.inputs) if self.key else {},
            "resumed_from": self.resumed_from,
            "reused": self.reused,
            "steps_trained": self.steps_trained,
        }

    def summary(self) -> dict[str, Any]:
        """The run for a training report: its steps, ``record()``, the seconds this call
        took and those the run's steps took over every call, and the logged loss by step."""
        return {
            "steps": self.steps,
            "run": self.record(),
            "wall_seconds": round(self.wall_seconds, 1),
            "trained_seconds": None
            if self.trained_seconds is None
            else round(self.trained_seconds, 1),
            "learning_curve": [
                {"step": entry["step"], "loss": round(entry["loss"], 5)}
                for entry in self.history
                if "loss" in entry
            ],
        }


def shaping_settings(config: TrainConfig) -> dict[str, Any]:
    """The settings that shape what a run trains: the config minus bookkeeping."""
    return config.model_dump(exclude=set(_BOOKKEEPING_FIELDS | _PLACEMENT_FIELDS))


def run_hash(config: TrainConfig, key: RunKey | None, num_processes: int = 1) -> str:
    """The sha256 naming a run's checkpoint folder: the settings that shape what is trained
    and the key of what it is trained from."""
    payload = {
        "config": shaping_settings(config),
        "key": key.digest if key else None,
        "num_processes": num_processes,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def train(
    model: nn.Module,
    dataset: Dataset,
    compute_loss: LossFn,
    config: TrainConfig,
    *,
    checkpoint_root: str | Path,
    name: str,
    key: RunKey | None = None,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    trainable_parameters: Iterable[nn.Parameter] | None = None,
    on_log: LogFn | None = None,
    description: str | None = None,
) -> TrainResult:
    """Train ``model`` in place for ``config.max_steps`` optimizer steps, resuming if possible.

    ``trainable_parameters`` (default: those with ``requires_grad``) are the only ones optimized;
    the others get ``requires_grad=False`` for the run (their gradients would be wasted work),
    and every flag and the train/eval mode are restored afterwards. ``key``
    (``provenance.run_key``) must cover whatever else shapes the result (data, pictures, the
    model it starts from, loss, which parameters train), since it picks the run folder together
    with the config; without one, the config alone does (tests, benchmarks). A bf16 request
    on a CPU without native bf16 runs in fp32 (``precision.effective_precision``), and the
    folder is that of the precision it runs in. ``on_log(step, entry)`` is called on the main
    process with each history entry; the values it returns (a validation score, say) join that
    entry, so they are checkpointed with the history and a resumed run still reports them.
    ``description`` labels the progress bar (default ``name``).

    With ``config.processes`` above 1 (``"auto"``: the visible GPUs), a process that is not
    itself one of a launched group hands the whole call to ``torchrun`` (``launch_training``):
    every argument travels pickled, each process trains its share of every batch, the main
    one writes the checkpoints, and this process then loads the finished run into ``model``.
    So a Kedro node trains on every GPU and still saves its outputs once.
    """
    arguments = {
        "model": model,
        "dataset": dataset,
        "compute_loss": compute_loss,
        "config": config,
        "checkpoint_root": checkpoint_root,
        "name": name,
        "key": key,
        "collate_fn": collate_fn,
        # A list, not a generator: the call may travel pickled.
        "trainable_parameters": None
        if trainable_parameters is None
        else list(trainable_parameters),
        "on_log": on_log,
        "description": description,
    }
    processes = launch_processes(config.processes)
    if processes > 1 and launched_world_size() == 1:
        return launch_training(processes, arguments)
    return _train_here(**arguments)


def launch_processes(processes: int | str) -> int:
    """How many processes ``processes`` asks for on this machine (``"auto"``: one per
    visible GPU, at least one)."""
    if processes == "auto":
        return max(1, torch.cuda.device_count())
    return int(processes)


def launched_world_size() -> int:
    """The size of the process group this process was launched in (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launch_training(processes: int, arguments: dict[str, Any]) -> TrainResult:
    """Run ``train(**arguments)`` in ``processes`` processes under ``torchrun`` (one machine),
    then load the finished run into ``arguments["model"]`` here and return its result: the
    history and ``resumed_from`` of the launched run, the wall time of the whole launch."""
    started = time.perf_counter()
    model: nn.Module = arguments["model"]
    name = arguments["name"]
    devices = {param.device for param in model.parameters()}
    # Pickled on the CPU, so that no rank first materialises every copy on the first GPU.
    model.cpu()
    root = Path(arguments["checkpoint_root"])
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"{_TMP_PREFIX}launch-{name}-", dir=root) as folder:
        job = Path(folder) / "job.pkl"
        with _without_output_capturing(model):
            job.write_bytes(cloudpickle.dumps(arguments))
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={processes}",
            "-m",
            LAUNCH_MODULE,
            str(job),
        ]
        logger.info("%s: training in %d processes: %s", name, processes, " ".join(command))
        finished = subprocess.run(command, check=False)
        if finished.returncode != 0:
            raise RuntimeError(
                f"{name}: the {processes}-process run failed (exit {finished.returncode}); "
                f"its checkpoints under {root} resume when it is started again"
            )
        launched = json.loads((Path(folder) / LAUNCH_RESULT_FILE).read_text())
    model.to(next(iter(devices)) if len(devices) == 1 else "cpu")
    loaded = _train_here(**arguments, run_processes=processes)
    return TrainResult(
        history=loaded.history,
        steps=loaded.steps,
        wall_seconds=time.perf_counter() - started,
        resumed_from=launched["resumed_from"],
        run_dir=loaded.run_dir,
        key=loaded.key,
        trained_seconds=loaded.trained_seconds,
    )


@contextlib.contextmanager
def _without_output_capturing(model: nn.Module) -> Iterator[None]:
    """``model`` without the output-capturing hooks transformers installs at its first
    forward: they close over a context variable of their module, and pickled by value they
    would collect into a copy of it (``hidden_states`` would come back ``None``). A model
    without them installs them anew where it runs."""
    removed: list[tuple[nn.Module, Any, dict]] = []
    for module in model.modules():
        installed = module.__dict__.pop(_CAPTURING_FLAG, None)
        hooks = {
            handle: hook
            for handle, hook in module._forward_hooks.items()
            if getattr(hook, "__name__", "") == _CAPTURING_HOOK
        }
        for handle in hooks:
            del module._forward_hooks[handle]
        removed.append((module, installed, hooks))
    try:
        yield
    finally:
        for module, installed, hooks in removed:
            module._forward_hooks.update(hooks)
            if installed is not None:
                setattr(module, _CAPTURING_FLAG, installed)


def register_output_capturing(model: nn.Module) -> None:
    """Tell transformers what each pretrained part of an unpickled ``model`` records: it
    registers that when a model is built, which an unpickled one never was."""
    if _CAN_RECORD_REGISTRY is None:
        return
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            _CAN_RECORD_REGISTRY[module] = module._can_record_outputs


def _train_here(
    model: nn.Module,
    dataset: Dataset,
    compute_loss: LossFn,
    config: TrainConfig,
    *,
    checkpoint_root: str | Path,
    name: str,
    key: RunKey | None = None,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    trainable_parameters: Iterable[nn.Parameter] | None = None,
    on_log: LogFn | None = None,
    description: str | None = None,
    run_processes: int | None = None,
) -> TrainResult:
    """``train`` in this process (one of a launched group, or alone). ``run_processes``
    names a run trained by that many processes, to be loaded here (``launch_training``)."""
    started = time.perf_counter()
    size = len(dataset)  # type: ignore[arg-type]
    if size == 0:
        raise ValueError(f"{name}: the training dataset is empty")
    saved_flags = [(param, param.requires_grad) for param in model.parameters()]
    was_training = model.training
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = config.model_copy(
        update={"mixed_precision": effective_precision(config.mixed_precision, device)}
    )
    accelerator = Accelerator(
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        # Without a GPU, accelerate only forms a multi-process (gloo) group when told it is on
        # the CPU; `torchrun`/`accelerate launch` then scale a trainer here as on a cluster.
        cpu=not torch.cuda.is_available(),
        # A step may leave some trainable parameters unused (a LoRA'd layer a question
        # never reaches); DDP must then not wait for their gradients.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    prepared = model
    try:
        params = _select_trainable(model, trainable_parameters, name)
        set_seed(config.seed)
        run_dir = _open_run_dir(
            accelerator,
            Path(checkpoint_root),
            name=name,
            config=config,
            key=key,
            num_processes=run_processes or accelerator.num_processes,
        )
        optimizer = torch.optim.AdamW(
            params, lr=config.learning_rate, weight_decay=config.weight_decay
        )
        # Accelerate steps a prepared scheduler once per process for every optimizer step
        # (diffusers' examples scale the same way), so the schedule is counted in those units.
        scheduler = get_cosine_schedule_with_warmup(
            optimizer,
            num_warmup_steps=config.warmup_steps * accelerator.num_processes,
            num_training_steps=config.max_steps * accelerator.num_processes,
        )
        prepared, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
        prepared.train()
        frozen = _frozen_names(model, params)
        accelerator.register_save_state_pre_hook(functools.partial(_drop_frozen, frozen=frozen))

        state = {
            "step": 0,
            "history": [],
            "window": {"count": 0, "sums": {}},
            "trained_seconds": 0.0,
        }
        resumed_from = None
        last_checkpoint = _latest_checkpoint(run_dir)
        if last_checkpoint is not None:
            # The frozen weights are not in it: the model brings them (the run key covers them).
            accelerator.load_state(str(last_checkpoint), strict=False)
            _check_holds_trained(last_checkpoint, model, frozen)
            # A checkpoint written before the loop's time was kept: that time is unknown.
            state = {
                "trained_seconds": None,
                **json.loads((last_checkpoint / TRAINER_STATE_FILE).read_text()),
            }
            resumed_from = state["step"]
            if accelerator.is_main_process:
                finished = resumed_from >= config.max_steps
                logger.info(
                    "%s: %s %s",
                    name,
                    "reusing the finished run in" if finished else "resuming from",
                    last_checkpoint,
                )

        _run_steps(
            accelerator,
            prepared,
            optimizer,
            scheduler,
            compute_loss=compute_loss,
            config=config,
            state=state,
            batches=_micro_batches(
                dataset,
                config,
                collate_fn,
                start=state["step"] * config.gradient_accumulation_steps,
                rank=accelerator.process_index,
                world=accelerator.num_processes,
                pin_memory=accelerator.device.type == "cuda",
            ),
            params=params,
            run_dir=run_dir,
            last_checkpoint=last_checkpoint,
            name=name,
            on_log=on_log,
            description=description or name,
        )
        return TrainResult(
            history=state["history"],
            steps=state["step"],
            wall_seconds=time.perf_counter() - started,
            resumed_from=resumed_from,
            run_dir=run_dir,
            key=key,
            trained_seconds=state["trained_seconds"],
        )
    finally:
        # Removes DDP and the autocast wrapper that mixed precision patches onto ``forward``.
        accelerator.unwrap_model(prepared, keep_fp32_wrapper=False)
        model.train(was_training)
        for param, flag in saved_flags:
            param.requires_grad_(flag)
        accelerator.free_memory()
        # Accelerate keeps process-wide singletons, and a later Accelerator with another
        # mixed_precision would be refused; the next trainer in this process starts clean.
        AcceleratorState._reset_state()
        GradientState._reset_state()


def _run_steps(
    accelerator: Accelerator,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    *,
    compute_loss: LossFn,
    config: TrainConfig,
    state: dict[str, Any],
    batches: Iterator[Any],
    params: list[nn.Parameter],
    run_dir: Path,
    last_checkpoint: Path | None,
    name: str,
    on_log: LogFn | None,
    description: str,
) -> None:
    """The loop proper: ``state`` (step, history, open log window, the seconds its steps
    took) is updated in place."""
    samples_per_step = (
        config.batch_size * accelerator.num_processes * config.gradient_accumulation_steps
    )
    window = state["window"]
    bar = progress(
        total=config.max_steps,
        initial=state["step"],
        desc=description,
        disable=not accelerator.is_main_process,
        dynamic_ncols=True,
    )
    clock = time.perf_counter()
    try:
        while state["step"] < config.max_steps:
            step = state["step"] + 1
            for _ in range(config.gradient_accumulation_steps):
                batch = send_to_device(next(batches), accelerator.device)
                with accelerator.accumulate(model):
                    loss, metrics = _split_loss(compute_loss(model, batch), name)
                    values = _reduced_values(accelerator, loss, metrics)
                    if not math.isfinite(values["loss"]):
                        raise NonFiniteLossError(name, step, values["loss"], last_checkpoint)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and config.max_grad_norm is not None:
                        accelerator.clip_grad_norm_(params, config.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                sums = window["sums"]
                for key, value in values.items():
                    sums[key] = sums.get(key, 0.0) + value / config.gradient_accumulation_steps
            window["count"] += 1
            state["step"] = step
            running = window["sums"]["loss"] / window["count"]
            bar.update(1)
            bar.set_postfix(loss=f"{running:.4g}", refresh=False)

            if step % config.log_every == 0 or step == config.max_steps:
                entry = {
                    "step": step,
                    **{key: total / window["count"] for key, total in window["sums"].items()},
                    "lr": scheduler.get_last_lr()[0],
                    "samples_seen": step * samples_per_step,
                }
                state["history"].append(entry)
                state["window"] = window = {"count": 0, "sums": {}}
                if on_log is not None and accelerator.is_main_process:
                    entry.update(on_log(step, entry) or {})
            if state["trained_seconds"] is not None:
                now = time.perf_counter()
                state["trained_seconds"] += now - clock
                clock = now
            if step % config.checkpoint_every == 0 or step == config.max_steps:
                last_checkpoint = _save_checkpoint(accelerator, run_dir, state, config)
    finally:
        bar.close()
        close = getattr(batches, "close", None)
        if close is not None:
            close()  # stops DataLoader workers of an unfinished epoch now, not at GC


def _split_loss(
    output: torch.Tensor | tuple[torch.Tensor, dict[str, float]], name: str
) -> tuple[torch.Tensor, dict[str, float]]:
    loss, metrics = output if isinstance(output, tuple) else (output, {})
    if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
        raise ValueError(f"{name}: compute_loss must return a scalar tensor, got {loss!r}")
    if "loss" in metrics:
        raise ValueError(f"{name}: compute_loss's metrics must not be named 'loss'")
    return loss, metrics


def _reduced_values(
    accelerator: Accelerator, loss: torch.Tensor, metrics: dict[str, float]
) -> dict[str, float]:
    """Loss and metrics averaged over processes, so every process sees the same NaN check."""
    keys = sorted(metrics)
    stacked = torch.stack(
        [loss.detach().float()]
        + [torch.as_tensor(metrics[key], dtype=torch.float32, device=loss.device) for key in keys]
    )
    reduced = accelerator.reduce(stacked, reduction="mean").tolist()
    return dict(zip(["loss", *keys], reduced, strict=True))


def _micro_batches(
    dataset: Dataset,
    config: TrainConfig,
    collate_fn: Callable[[list[Any]], Any] | None,
    *,
    start: int,
    rank: int,
    world: int,
    pin_memory: bool,
) -> Iterator[Any]:
    """This process's batches from micro-batch ``start`` on, forever (see the module docstring)."""
    size = len(dataset)  # type: ignore[arg-type]
    global_batch = config.batch_size * world
    per_epoch = max(1, size // global_batch)
    epoch, skip = divmod(start, per_epoch)
    while True:
        generator = torch.Generator().manual_seed(_epoch_seed(config.seed, epoch))
        order = torch.randperm(size, generator=generator)
        order = order.repeat(math.ceil(per_epoch * global_batch / size))[: per_epoch * global_batch]
        indices = order.view(per_epoch, world, config.batch_size)[skip:, rank].tolist()
        # The loader's own generator (not the global RNG) seeds its workers, so building a loader
        # mid-run leaves the global RNG exactly where a resumed run's restored state expects it.
        loader = DataLoader(
            dataset,
            batch_sampler=indices,
            collate_fn=collate_fn,
            num_workers=config.num_workers,
            pin_memory=pin_memory,
            generator=generator,
        )
        yield from loader
        epoch, skip = epoch + 1, 0


def _epoch_seed(seed: int, epoch: int) -> int:
    digest = hashlib.blake2b(f"{seed}/{epoch}".encode(), digest_size=8).digest()
    return int.from_bytes(digest) >> 1  # manual_seed takes at most 63 bits here


def _select_trainable(
    model: nn.Module, trainable: Iterable[nn.Parameter] | None, name: str
) -> list[nn.Parameter]:
    """The parameters to optimize; with an explicit list, only those keep ``requires_grad``."""
    all_params = list(model.parameters())
    if trainable is None:
        params = [param for param in all_params if param.requires_grad]
    else:
        params = list(dict.fromkeys(trainable))  # de-duplicated, order kept
        owned = {id(param) for param in all_params}
        if any(id(param) not in owned for param in params):
            raise ValueError(f"{name}: trainable_parameters must be parameters of the model")
        chosen = {id(param) for param in params}
        for param in all_params:
            param.requires_grad_(id(param) in chosen)
    if not params:
        raise ValueError(f"{name}: no trainable parameters")
    return params


def _open_run_dir(
    accelerator: Accelerator,
    root: Path,
    *,
    name: str,
    config: TrainConfig,
    key: RunKey | None,
    num_processes: int,
) -> Path:
    """Create (or reopen) the run's folder, check its key and clear interrupted writes."""
    digest = run_hash(config, key, num_processes)
    run_dir = root / f"{name}-{digest[:10]}"
    record_path = run_dir / RUN_KEY_FILE
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        for leftover in run_dir.glob(f"{_TMP_PREFIX}*"):
            if leftover.is_dir():
                shutil.rmtree(leftover)
            else:
                leftover.unlink()
        if not record_path.exists():
            record = {
                "name": name,
                "hash": digest,
                "key": key.digest if key else None,
                "inputs": dict(key.inputs) if key else {},
                "num_processes": num_processes,
                "config": config.model_dump(),
            }
            write_json_atomic(record_path, record)
    accelerator.wait_for_everyone()
    # Checked on every process so that all of them stop, not only the main one.
    found = json.loads(record_path.read_text()).get("hash")
    if found != digest:
        raise RuntimeError(
            f"{name}: {run_dir} belongs to another run (hash {found}, expected {digest}); "
            "move it away rather than resume it"
        )
    return run_dir


def _frozen_names(model: nn.Module, trained: list[nn.Parameter]) -> frozenset[str]:
    """The state-dict names of ``model``'s parameters that do not train (tied names too)."""
    trained_ids = {id(param) for param in trained}
    return frozenset(
        name
        for name, param in model.named_parameters(remove_duplicate=False)
        if id(param) not in trained_ids
    )


def _drop_frozen(
    models: list[nn.Module], weights: list[dict[str, torch.Tensor]], output_dir: str, *, frozen
) -> None:
    """Accelerate's save-state hook: a checkpoint keeps what trains (and the buffers), not the
    frozen base (an SD 1.5 UNet or a 2B MLLM per checkpoint otherwise)."""
    for state in weights:
        for name in frozen & state.keys():
            del state[name]


def _check_holds_trained(checkpoint: Path, model: nn.Module, frozen: frozenset[str]) -> None:
    """Stop, naming them, if ``checkpoint`` lacks weights this run trains."""
    with safe_open(checkpoint / _CHECKPOINT_WEIGHTS, framework="pt") as weights:
        held = set(weights.keys())
    missing = sorted(set(model.state_dict()) - frozen - held)
    if missing:
        raise RuntimeError(
            f"{checkpoint} lacks {len(missing)} trained weights ({', '.join(missing[:3])}, ...); "
            "it was written by another run: move it away rather than resume it"
        )


def _latest_checkpoint(run_dir: Path) -> Path | None:
    steps = _checkpoint_steps(run_dir)
    return run_dir / f"{_CHECKPOINT_PREFIX}{steps[-1]}" if steps else None


def _checkpoint_steps(run_dir: Path) -> list[int]:
    found = [
        path.name.removeprefix(_CHECKPOINT_PREFIX)
        for path in run_dir.glob(f"{_CHECKPOINT_PREFIX}*")
        if path.is_dir()
    ]
    return sorted(int(step) for step in found if step.isdigit())


def _save_checkpoint(
    accelerator: Accelerator, run_dir: Path, state: dict[str, Any], config: TrainConfig
) -> Path:
    """Write ``checkpoint-{step}`` atomically, then prune the oldest beyond the limit."""
    step = state["step"]
    final = run_dir / f"{_CHECKPOINT_PREFIX}{step}"
    partial = run_dir / f"{_TMP_PREFIX}{_CHECKPOINT_PREFIX}{step}"
    # Every process calls save_state (each writes its own RNG state; FSDP/DeepSpeed need all).
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (partial / TRAINER_STATE_FILE).write_text(json.dumps(state))
        os.replace(partial, final)
        for old in _checkpoint_steps(run_dir)[: -config.checkpoints_total_limit]:
            doomed = run_dir / f"{_TMP_PREFIX}delete-{old}"
            # Renamed first so a crash mid-delete leaves no half checkpoint a resume could pick.
            os.replace(run_dir / f"{_CHECKPOINT_PREFIX}{old}", doomed)
            shutil.rmtree(doomed)
    accelerator.wait_for_everyone()
    return final
