"""Shared timing: a benchmark's two paths in turn, warm-up rounds, then medians; its table.

The two paths of a benchmark alternate (project, reference, project, ...), so that a load that
comes and goes on a shared machine weighs on both alike. ``time_alternately`` does it for two
plain functions; ``time_training`` for the project's trainer (``prefgen_kedro.training.train``:
data loading, NaN check, clipping, scheduler) and a plain reference step run from its
``on_log`` callback between two training steps. ``Comparison`` holds both sides of one
benchmark and renders its table.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
from torch import nn
from torch.utils.data import Dataset

from prefgen_kedro.report import Report
from prefgen_kedro.training import LossFn, TrainConfig, train

# How a step ran, by ``precision.effective_precision``'s answer to a bf16 request.
PRECISION_LABELS = {"bf16": "bf16 autocast", "no": "fp32 (this CPU has no native bf16)"}


@dataclass(frozen=True)
class Timing:
    """Seconds of each timed call (warm-up calls excluded)."""

    seconds: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.seconds:
            raise ValueError("no timed calls")

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


def time_alternately(
    project: Callable[[], object],
    reference: Callable[[], object],
    *,
    warmup: int,
    repeats: int,
) -> tuple[Timing, Timing]:
    """``project`` then ``reference``, ``warmup`` rounds untimed, then ``repeats`` timed."""
    seconds: tuple[list[float], list[float]] = ([], [])
    for round_ in range(warmup + repeats):
        for call, timed in zip((project, reference), seconds, strict=True):
            started = time.perf_counter()
            call()
            if round_ >= warmup:
                timed.append(time.perf_counter() - started)
    return Timing(tuple(seconds[0])), Timing(tuple(seconds[1]))


def time_training(
    model: nn.Module,
    dataset: Dataset,
    compute_loss: LossFn,
    config: dict[str, Any],
    reference: Callable[[], object],
    *,
    warmup: int,
    repeats: int,
    **train_kwargs: Any,
) -> tuple[Timing, Timing]:
    """Steps of ``train(model, dataset, compute_loss, ...)`` and calls of ``reference`` in
    turn: one call after each step. ``warmup`` of each untimed, then ``repeats`` timed; a step
    is timed from the end of the reference call before it to its own end.

    ``config`` is a ``TrainConfig`` without the step counts; logging every step gives the
    clock (a history entry per step: negligible), and the one checkpoint is written after the
    last step into a temporary folder.
    """
    if warmup < 1:
        raise ValueError("time_training needs a warm-up step: the first step has no start mark")
    steps = warmup + repeats
    marks: list[tuple[float, float]] = []  # per step: (it ended, the reference call after it ended)

    def between_steps(step: int, entry: dict[str, float]) -> None:
        ended = time.perf_counter()
        reference()
        marks.append((ended, time.perf_counter()))

    with tempfile.TemporaryDirectory() as root:
        train(
            model,
            dataset,
            compute_loss,
            TrainConfig(**config, max_steps=steps, log_every=1, checkpoint_every=steps),
            checkpoint_root=root,
            name="benchmark",
            on_log=between_steps,
            **train_kwargs,
        )
    project = [marks[i][0] - marks[i - 1][1] for i in range(warmup, steps)]
    plain = [finished - ended for ended, finished in marks[warmup:]]
    return Timing(tuple(project)), Timing(tuple(plain))


@dataclass(frozen=True)
class Comparison:
    """One benchmark: the project's path and its plain reference, timed in the same run.

    Each timed ``call`` (a training step, an FID computation) processes ``items`` ``unit``;
    ``figures`` are per-path results to show beside the times (e.g. both FID values).
    """

    title: str
    call: str
    unit: str
    items: int
    labels: tuple[str, str]  # (project, reference)
    project: Timing
    reference: Timing
    details: str  # the settings and what differs between the paths
    figures: dict[str, tuple[float, float]] = field(default_factory=dict)

    @property
    def time_ratio(self) -> float:
        """Project ÷ reference seconds per call (medians): above 1, the project is slower."""
        return self.project.median / self.reference.median

    def throughput(self, timing: Timing) -> float:
        """``unit`` per second of ``timing`` (the project's or the reference's)."""
        return self.items / timing.median

    def table(self) -> pd.DataFrame:
        rows = {}
        for index, (label, timing) in enumerate(
            zip(self.labels, (self.project, self.reference), strict=True)
        ):
            rows[label] = {
                f"s per {self.call} (median)": f"{timing.median:.4f}",
                "min – max": f"{min(timing.seconds):.4f} – {max(timing.seconds):.4f}",
                f"{self.unit}/s": f"{self.throughput(timing):.1f}",
                "throughput ÷ reference": f"{self.reference.median / timing.median:.2f}×",
                **{name: f"{values[index]:.6f}" for name, values in self.figures.items()},
            }
        frame = pd.DataFrame.from_dict(rows, orient="index")
        frame.index.name = "path"
        return frame

    def summary(self) -> str:
        return (
            f"The project's {self.call} takes {self.time_ratio:.2f}× the reference's time "
            f"({1 / self.time_ratio:.2f}× its throughput). {self.details}"
        )

    def add_to(self, report: Report) -> None:
        """This benchmark as a section of ``report``."""
        report.heading(self.title)
        self._fill(report)

    def markdown(self) -> str:
        """This benchmark alone, as Markdown."""
        report = Report(self.title)
        self._fill(report)
        return report.to_markdown(figure_dir=".")

    def _fill(self, report: Report) -> None:
        report.table(self.table())
        report.paragraph(self.summary())


def main(
    run: Callable[[bool], Comparison], description: str, argv: Sequence[str] | None = None
) -> None:
    """A benchmark module's command line (``--quick``: a few steps, to check it runs): run it
    and print its table."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="a few steps, to check it runs")
    print(run(parser.parse_args(argv).quick).markdown())
