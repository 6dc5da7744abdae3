"""The shared training loop: exact resume, NaN guard, run folders keyed by settings and
inputs, reuse of finished runs, accumulation, freezing, the precision a CPU can run, and a
run launched in several processes from a plain one (as a Kedro node does)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import cloudpickle
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import TensorDataset

from prefgen_kedro import precision
from prefgen_kedro.provenance import run_key
from prefgen_kedro.training import (
    RUN_KEY_FILE,
    NonFiniteLossError,
    TrainConfig,
    train,
)


def make_model(seed: int = 0, dropout: float = 0.1) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 16), nn.ReLU(), nn.Dropout(dropout), nn.Linear(16, 1))


def make_dataset(size: int = 20) -> TensorDataset:
    generator = torch.Generator().manual_seed(123)
    x = torch.randn(size, 3, generator=generator)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]]) + 0.1 * torch.randn(size, 1, generator=generator)
    return TensorDataset(x, y)


def mse(model: nn.Module, batch: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    x, y = batch
    prediction = model(x)
    return nn.functional.mse_loss(prediction, y), {"mae": (prediction - y).abs().mean().item()}


def config(**overrides: object) -> TrainConfig:
    settings = {
        "max_steps": 12,
        "batch_size": 4,
        "learning_rate": 1e-2,
        "weight_decay": 0.01,
        "warmup_steps": 2,
        "checkpoint_every": 4,
        "log_every": 2,
    }
    return TrainConfig(**{**settings, **overrides})


class Interrupted(Exception):
    """Stands in for a killed process."""


def test_interrupted_run_resumes_bit_for_bit(tmp_path: Path) -> None:
    # 20 samples in batches of 4: 12 steps cross two epoch boundaries; dropout checks RNG restore.
    reference_model = make_model()
    reference = train(
        reference_model, make_dataset(), mse, config(), checkpoint_root=tmp_path / "a", name="mlp"
    )

    def crash_at_step_6(step: int, entry: dict[str, float]) -> None:
        if step == 6:
            raise Interrupted

    with pytest.raises(Interrupted):
        train(
            make_model(),
            make_dataset(),
            mse,
            config(),
            checkpoint_root=tmp_path / "b",
            name="mlp",
            on_log=crash_at_step_6,
        )
    (crashed_at_4,) = (tmp_path / "b").glob("mlp-*/checkpoint-4")
    seconds_before_crash = json.loads((crashed_at_4 / "trainer_state.json").read_text())[
        "trained_seconds"
    ]
    fresh = make_model(seed=99)  # its own init is overwritten by the checkpoint
    resumed = train(
        fresh, make_dataset(), mse, config(), checkpoint_root=tmp_path / "b", name="mlp"
    )

    assert resumed.resumed_from == 4
    assert resumed.steps == reference.steps == 12
    # The 4 steps trained before the crash count with the 8 this call trained.
    assert resumed.trained_seconds > seconds_before_crash > 0
    assert resumed.history == reference.history
    assert [entry["step"] for entry in resumed.history] == [2, 4, 6, 8, 10, 12]
    assert set(resumed.history[0]) == {"step", "loss", "mae", "lr", "samples_seen"}
    assert resumed.history[-1]["samples_seen"] == 48
    for got, want in zip(
        fresh.state_dict().values(), reference_model.state_dict().values(), strict=True
    ):
        assert torch.equal(got, want)


def test_finished_run_started_again_trains_nothing_and_says_so(tmp_path: Path) -> None:
    key = run_key({"note": "mlp"}, data=make_dataset().tensors)

    def run(model: nn.Module):
        return train(
            model,
            make_dataset(),
            mse,
            config(max_steps=4),
            checkpoint_root=tmp_path,
            name="m",
            key=key,
        )

    first_model, again_model = make_model(), make_model(seed=5)
    first = run(first_model)
    again = run(again_model)
    assert again.resumed_from == 4
    assert again.steps == 4
    assert [entry["step"] for entry in again.history] == [2, 4]
    for got, want in zip(again_model.parameters(), first_model.parameters(), strict=True):
        assert torch.equal(got, want)
    assert (first.reused, again.reused) == (False, True)
    # The reused run tells how long its steps took when they were trained.
    assert first.trained_seconds > 0
    assert again.trained_seconds == pytest.approx(first.trained_seconds, abs=1e-6)
    assert again.summary()["trained_seconds"] == round(first.trained_seconds, 1)
    assert again.record() == {
        "run_dir": str(first.run_dir),
        "run_key": key.digest,
        "inputs": dict(key.inputs),
        "resumed_from": 4,
        "reused": True,
        "steps_trained": 0,
    }


def test_values_on_log_returns_join_the_history_and_survive_a_resume(tmp_path: Path) -> None:
    def score_step_4(step: int, entry: dict[str, float]) -> dict[str, float] | None:
        return {"val_score": 10.0 * step} if step == 4 else None

    first = train(
        make_model(),
        make_dataset(),
        mse,
        config(max_steps=4),
        checkpoint_root=tmp_path,
        name="m",
        on_log=score_step_4,
    )
    again = train(
        make_model(), make_dataset(), mse, config(max_steps=4), checkpoint_root=tmp_path, name="m"
    )
    assert [entry.get("val_score") for entry in first.history] == [None, 40.0]
    assert again.resumed_from == 4 and again.history == first.history


def test_non_finite_loss_names_the_step(tmp_path: Path) -> None:
    calls = 0

    def poisoned(model: nn.Module, batch: list[torch.Tensor]) -> torch.Tensor:
        nonlocal calls
        calls += 1
        loss, _ = mse(model, batch)
        return loss * float("nan") if calls == 3 else loss

    with pytest.raises(NonFiniteLossError, match="at step 3") as caught:
        train(make_model(), make_dataset(), poisoned, config(), checkpoint_root=tmp_path, name="m")
    assert caught.value.step == 3


def test_changed_settings_start_fresh_and_bookkeeping_does_not(tmp_path: Path) -> None:
    settings = config(max_steps=4)
    first = train(make_model(), make_dataset(), mse, settings, checkpoint_root=tmp_path, name="m")
    assert (first.run_dir / RUN_KEY_FILE).is_file()
    assert first.run_dir.name.startswith("m-")

    changed = train(
        make_model(),
        make_dataset(),
        mse,
        config(max_steps=4, learning_rate=5e-3),
        checkpoint_root=tmp_path,
        name="m",
    )
    assert changed.run_dir != first.run_dir
    assert changed.resumed_from is None

    other_data = train(
        make_model(),
        make_dataset(),
        mse,
        settings,
        checkpoint_root=tmp_path,
        name="m",
        key=run_key({}, data=make_dataset(21).tensors),
    )
    assert other_data.run_dir not in (first.run_dir, changed.run_dir)

    more_logging = train(
        make_model(),
        make_dataset(),
        mse,
        config(max_steps=4, log_every=1, checkpoint_every=1),
        checkpoint_root=tmp_path,
        name="m",
    )
    assert more_logging.run_dir == first.run_dir
    assert more_logging.resumed_from == 4


def test_gradient_accumulation_matches_one_big_batch(tmp_path: Path) -> None:
    # 16 samples: two micro-batches of 4 are exactly one batch of 8, epoch by epoch.
    data = make_dataset(16)
    accumulated = make_model(dropout=0.0)
    big_batch = make_model(dropout=0.0)
    result = train(
        accumulated,
        data,
        mse,
        config(max_steps=6, gradient_accumulation_steps=2),
        checkpoint_root=tmp_path,
        name="accumulated",
    )
    train(
        big_batch,
        data,
        mse,
        config(max_steps=6, batch_size=8),
        checkpoint_root=tmp_path,
        name="big",
    )
    assert result.history[-1]["samples_seen"] == 6 * 8
    for got, want in zip(accumulated.parameters(), big_batch.parameters(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_only_trainable_parameters_change(tmp_path: Path) -> None:
    model = make_model()
    frozen_before = [param.detach().clone() for param in model[0].parameters()]
    head_before = [param.detach().clone() for param in model[3].parameters()]
    train(
        model,
        make_dataset(),
        mse,
        config(max_steps=3),
        checkpoint_root=tmp_path,
        name="head",
        trainable_parameters=model[3].parameters(),
    )
    for after, before in zip(model[0].parameters(), frozen_before, strict=True):
        assert torch.equal(after, before)
    for after, before in zip(model[3].parameters(), head_before, strict=True):
        assert not torch.equal(after, before)
    assert all(param.requires_grad for param in model.parameters())  # flags restored


def test_checkpoints_hold_what_trains_and_resume_onto_the_frozen_base(tmp_path: Path) -> None:
    def run(model: nn.Module, **extra: object):
        return train(
            model,
            make_dataset(),
            mse,
            config(),
            checkpoint_root=tmp_path / str(extra.pop("root")),
            name="head",
            trainable_parameters=model[3].parameters(),
            **extra,
        )

    reference = make_model()
    run(reference, root="a")

    def crash_at_step_6(step: int, entry: dict[str, float]) -> None:
        if step == 6:
            raise Interrupted

    with pytest.raises(Interrupted):
        run(make_model(), root="b", on_log=crash_at_step_6)
    (checkpoint,) = (tmp_path / "b").glob("head-*/checkpoint-4")
    with safe_open(checkpoint / "model.safetensors", framework="pt") as weights:
        assert set(weights.keys()) == {"3.weight", "3.bias"}  # the frozen layer stays out

    resumed = make_model()  # the same frozen base, as the run key would ensure
    assert run(resumed, root="b").resumed_from == 4
    for got, want in zip(
        resumed.state_dict().values(), reference.state_dict().values(), strict=True
    ):
        assert torch.equal(got, want)

    # A checkpoint without the weights a run trains is refused, naming them.
    (run_dir,) = (tmp_path / "b").glob("head-*")
    final = run_dir / "checkpoint-12"
    save_file({"3.bias": torch.zeros(1)}, final / "model.safetensors")
    with pytest.raises(RuntimeError, match=r"lacks 1 trained weights \(3\.weight"):
        run(make_model(), root="b")


def test_checkpoints_are_atomic_and_pruned(tmp_path: Path) -> None:
    settings = config(max_steps=10, checkpoint_every=3, checkpoints_total_limit=2)
    first = train(make_model(), make_dataset(), mse, settings, checkpoint_root=tmp_path, name="m")
    run_dir = first.run_dir
    assert sorted(path.name for path in run_dir.iterdir()) == [
        "checkpoint-10",
        "checkpoint-9",
        RUN_KEY_FILE,
    ]
    assert {path.name for path in (run_dir / "checkpoint-10").iterdir()} >= {
        "model.safetensors",
        "trainer_state.json",
    }

    # A write cut short by a crash: never resumed from, and cleared on the next start.
    partial = run_dir / ".tmp-checkpoint-99"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"half")
    again = train(make_model(), make_dataset(), mse, settings, checkpoint_root=tmp_path, name="m")
    assert again.resumed_from == 10
    assert not any(path.name.startswith(".tmp") for path in run_dir.iterdir())


def test_mixed_precision_wrapper_is_removed(tmp_path: Path) -> None:
    model = make_model()
    train(
        model,
        make_dataset(),
        mse,
        config(max_steps=2, mixed_precision="bf16"),
        checkpoint_root=tmp_path,
        name="bf16",
    )
    assert "_original_forward" not in model.__dict__
    assert model(torch.randn(2, 3)).dtype == torch.float32


def test_config_rejects_unknown_keys() -> None:
    with pytest.raises(ValueError, match="learning_rat"):
        TrainConfig(max_steps=1, batch_size=1, learning_rate=1e-3, learning_rat=1e-3)


@pytest.mark.parametrize(
    ("flags", "requested", "runs_as"),
    [
        (frozenset({"avx2", "fma"}), "bf16", "no"),  # AVX2 only: emulated bf16, so fp32
        (frozenset({"avx2", "avx512_bf16"}), "bf16", "bf16"),
        (frozenset({"avx2", "amx_bf16"}), "bf16", "bf16"),
        (frozenset({"fp", "asimd", "bf16"}), "bf16", "bf16"),  # ARM with FEAT_BF16
        (frozenset({"avx2"}), "no", "no"),
    ],
)
def test_cpu_precision_follows_native_bf16(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    flags: frozenset[str],
    requested: str,
    runs_as: str,
) -> None:
    monkeypatch.setattr(precision, "cpu_flags", lambda: flags)
    precision._native_bf16_noted.cache_clear()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    autocasts: list[tuple[bool, torch.dtype]] = []

    def watched_model() -> nn.Module:
        model = make_model()
        # On a layer: the autocast that mixed precision wraps around the model's forward.
        model[0].register_forward_pre_hook(
            lambda *_: autocasts.append(
                (torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"))
            )
        )
        return model

    with caplog.at_level("INFO", logger="prefgen_kedro.precision"):
        for run in range(2):
            result = train(
                watched_model(),
                make_dataset(),
                mse,
                config(max_steps=1, mixed_precision=requested),
                checkpoint_root=tmp_path / str(run),
                name="m",
            )
    assert {enabled for enabled, _ in autocasts} == {runs_as == "bf16"}
    if runs_as == "bf16":
        assert {dtype for _, dtype in autocasts} == {torch.bfloat16}
    config_written = (result.run_dir / RUN_KEY_FILE).read_text()
    assert f'"mixed_precision": "{runs_as}"' in config_written
    fell_back = [r for r in caplog.records if "no native bf16" in r.getMessage()]
    assert len(fell_back) == (1 if requested != runs_as else 0)  # logged once, not per run
    precision._native_bf16_noted.cache_clear()


class RecordingMse:
    """``mse`` that notes, per rank, each batch's sample indices and the weights it met."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def __call__(self, model: nn.Module, batch: list[torch.Tensor]) -> torch.Tensor:
        x, y, index = batch
        weights = [param.detach().flatten().tolist() for param in model.parameters()]
        rank = os.environ.get("RANK", "0")
        with (self.folder / f"rank{rank}.jsonl").open("a") as record:
            record.write(json.dumps({"index": index.tolist(), "weights": weights}) + "\n")
        return nn.functional.mse_loss(model(x), y)


def test_a_run_launched_in_two_processes_splits_each_batch_and_loads_back_once(
    tmp_path: Path,
) -> None:
    # The loss is defined here, so it travels by value to the launched processes.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    x, y = make_dataset(16).tensors
    dataset = TensorDataset(x, y, torch.arange(16))
    records = tmp_path / "records"
    records.mkdir()
    settings = config(max_steps=3, batch_size=2, checkpoint_every=10, log_every=1)

    launched = make_model(dropout=0.0)
    result = train(
        launched,
        dataset,
        RecordingMse(records),
        settings.model_copy(update={"processes": 2}),
        checkpoint_root=tmp_path / "checkpoints",
        name="launched",
    )

    ranks = [
        [json.loads(line) for line in (records / f"rank{rank}.jsonl").read_text().splitlines()]
        for rank in (0, 1)
    ]
    assert sorted(path.name for path in records.iterdir()) == ["rank0.jsonl", "rank1.jsonl"]
    for first, second in zip(*ranks, strict=True):
        assert len(first["index"]) == len(second["index"]) == 2
        assert not set(first["index"]) & set(second["index"])
        assert first["weights"] == second["weights"]  # both ranks hold the same model
    assert len(ranks[0]) == 3
    assert (result.steps, result.resumed_from, result.reused) == (3, None, False)
    assert [entry["step"] for entry in result.history] == [1, 2, 3]
    # Written once, by the launched run; nothing of the launch is left beside it.
    assert [path.name for path in (tmp_path / "checkpoints").iterdir()] == [result.run_dir.name]

    # The same steps as one process taking the whole global batch of 4.
    alone = make_model(dropout=0.0)
    train(
        alone,
        dataset,
        lambda model, batch: nn.functional.mse_loss(model(batch[0]), batch[1]),
        settings.model_copy(update={"batch_size": 4}),
        checkpoint_root=tmp_path / "alone",
        name="alone",
    )
    torch.testing.assert_close(launched.state_dict(), alone.state_dict())
