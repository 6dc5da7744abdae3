"""Run every benchmark and (re)write ``benchmarks/RESULTS.md``: when, on what, by which command.

``python -m benchmarks.run_all [--quick] [--output PATH] [--note TEXT]``; ``make benchmarks``
runs it with the defaults. ``--note`` goes into the file as is (e.g. that the machine was
shared while it ran); the 1-minute load average at the start is recorded either way. The
file's "GPU check" section (``benchmarks.gpu_check``, measured on a GPU machine, not here) is
kept as it is.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shlex
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import torch

from benchmarks import adapter_step, fid, mllm_vqa_step
from benchmarks.timing import Comparison
from prefgen_kedro.report import Report

RESULTS = Path(__file__).resolve().with_name("RESULTS.md")
BENCHMARKS = (adapter_step, fid, mllm_vqa_step)
# The environment the command ran with (the thread count changes the figures).
_ENVIRONMENT = ("OMP_NUM_THREADS", "HF_HUB_OFFLINE")
# Sections of the results file that this run does not measure, kept as they are.
KEPT_HEADING = "## GPU check"


def main(argv: Sequence[str] | None = None) -> list[Comparison]:
    """Run the benchmarks, print each section as it finishes, write the results file."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few steps each, to check")
    parser.add_argument("--output", type=Path, default=RESULTS, help="default: %(default)s")
    parser.add_argument("--note", default="", help="a remark written into the results")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    environment = [f"{name}={os.environ[name]}" for name in _ENVIRONMENT if name in os.environ]
    command = shlex.join([*environment, "python", "-m", "benchmarks.run_all", *argv])
    report = Report("Benchmarks" + (" (quick check, not figures to quote)" if args.quick else ""))
    lines = [
        f"- date: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: {_machine()}",
        f"- command: `{command}`",
    ]
    if args.note:
        lines.append(f"- note: {args.note}")
    report.paragraph("\n".join(lines))
    report.paragraph(
        "Each benchmark times the project's path and a plain reference doing the same work "
        "in turn (project, reference, project, ...) in this run: warm-up rounds, then the "
        "median of the timed ones. Compare the ratios; the absolute figures belong to this "
        "machine."
    )
    comparisons = []
    for module in BENCHMARKS:
        comparison = module.run(quick=args.quick)
        print(comparison.markdown(), flush=True)
        comparison.add_to(report)
        comparisons.append(comparison)
    kept = kept_sections(args.output)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    text = report.to_markdown(figure_dir=".")
    args.output.write_text(text.rstrip("\n") + "\n\n" + kept if kept else text)
    return comparisons


def kept_sections(path: Path) -> str:
    """The sections of the results file at ``path`` that start with ``KEPT_HEADING`` (the
    GPU check's, measured elsewhere), as written; empty if none."""
    if not path.exists():
        return ""
    sections = re.split(r"(?m)^(?=## )", path.read_text())
    return "".join(section for section in sections if section.startswith(KEPT_HEADING))


def _machine() -> str:
    """CPU model and counts, torch version and build, the device benchmarked, load average."""
    cpu = platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        models = [
            line.split(":", 1)[1].strip()
            for line in cpuinfo.read_text().splitlines()
            if line.startswith("model name")
        ]
        cpu = models[0] if models else cpu
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return (
        f"{cpu}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}, device {device}, "
        f"1-min load average {os.getloadavg()[0]:.2f} at the start"
    )


if __name__ == "__main__":
    main()
