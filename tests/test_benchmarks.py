"""The benchmarks' quick mode: every figure is a real measurement, both FID roads agree, and
the results file goes where it is told (never over benchmarks/RESULTS.md in a test)."""

import importlib
import math
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

PROJECT_ROOT = Path(__file__).resolve().parents[1]
REAL_RESULTS = PROJECT_ROOT / "benchmarks" / "RESULTS.md"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[list, Path]:
    """``benchmarks.run_all --quick`` once, writing to a temporary file."""
    output = tmp_path_factory.mktemp("benchmarks") / "RESULTS.md"
    before = REAL_RESULTS.read_bytes() if REAL_RESULTS.exists() else None
    # benchmarks/ is a folder of the project, not of the installed package.
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(PROJECT_ROOT))
        run_all = importlib.import_module("benchmarks.run_all")
        comparisons = run_all.main(["--quick", "--output", str(output), "--note", "a test"])
    after = REAL_RESULTS.read_bytes() if REAL_RESULTS.exists() else None
    assert after == before, "a quick run must not touch benchmarks/RESULTS.md"
    return comparisons, output


def test_every_benchmark_measures_both_paths(quick_run):
    comparisons, _ = quick_run
    assert len(comparisons) == 3
    for comparison in comparisons:
        for timing in (comparison.project, comparison.reference):
            assert all(math.isfinite(s) and s > 0 for s in timing.seconds), comparison.title
            assert comparison.throughput(timing) > 0
        assert math.isfinite(comparison.time_ratio) and comparison.time_ratio > 0


def test_both_fid_roads_give_the_same_value(quick_run):
    comparisons, _ = quick_run
    (fid,) = [c for c in comparisons if "FID" in c.figures]
    project, direct = fid.figures["FID"]
    assert direct > 0
    assert project == pytest.approx(direct, rel=1e-3)


def test_results_file_states_the_command_and_one_table_per_benchmark(quick_run):
    comparisons, output = quick_run
    text = output.read_text()
    assert "python -m benchmarks.run_all --quick --output" in text
    assert "- note: a test" in text
    for comparison in comparisons:
        assert f"## {comparison.title}" in text
        assert comparison.labels[0] in text and comparison.labels[1] in text
