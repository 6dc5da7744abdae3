"""The metrics comparison a refactor is checked with finds every changed or missing row."""

import pandas as pd
import pytest

from benchmarks.compare_metrics import compare, main


def _metrics(**changes: float) -> pd.DataFrame:
    table = pd.DataFrame(
        {
            "method": ["base", "prefgen"],
            "metric": ["like_rate", "like_rate"],
            "mean": [0.3, 0.5],
            "ci_low": [0.2, 0.4],
            "ci_high": [0.4, float("nan")],
            "n": [72, 72],
        }
    )
    for column, value in changes.items():
        table.loc[1, column] = value
    return table


def test_identical_tables_agree_and_any_change_is_named(tmp_path):
    assert compare(_metrics(), _metrics(), tolerance=0.0) == []
    assert compare(_metrics(), _metrics(mean=0.5 + 1e-9), tolerance=1e-6) == []
    assert compare(_metrics(), _metrics(ci_high=0.6), tolerance=0.0) == [
        "prefgen like_rate ci_high: nan -> 0.6"
    ]
    assert compare(_metrics(), _metrics().iloc[:1], tolerance=0.0) == [
        "prefgen like_rate: only in before"
    ]
    _metrics().to_csv(tmp_path / "a.csv", index=False)
    _metrics(mean=0.51).to_csv(tmp_path / "b.csv", index=False)
    assert main([str(tmp_path / "a.csv"), str(tmp_path / "a.csv")]) == 0
    assert main([str(tmp_path / "a.csv"), str(tmp_path / "b.csv")]) == 1
    with pytest.raises(ValueError, match="no column"):
        compare(_metrics().drop(columns="n"), _metrics(), tolerance=0.0)
