"""Compare two benchmark ``metrics.csv`` files row by row (method × metric).

    python -m benchmarks.compare_metrics BEFORE.csv AFTER.csv [--tolerance 0]

Prints every row whose mean or interval differs by more than ``--tolerance`` (and rows
present in one file only), then one summary line; exits 1 when anything differs, so a
refactor that should change nothing can be checked against the run before it.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import pandas as pd

KEY = ["method", "metric"]
VALUES = ["mean", "ci_low", "ci_high", "n"]


def compare(before: pd.DataFrame, after: pd.DataFrame, tolerance: float) -> list[str]:
    """One line per difference between the two tables (empty when they agree)."""
    for name, table in (("before", before), ("after", after)):
        missing = set(KEY + VALUES) - set(table.columns)
        if missing:
            raise ValueError(f"{name} has no column(s) {sorted(missing)}")
        if table.duplicated(KEY).any():
            raise ValueError(f"{name} has more than one row for some (method, metric)")
    joined = before.merge(
        after, on=KEY, how="outer", suffixes=("_before", "_after"), indicator=True
    )
    only = joined[joined["_merge"] != "both"]
    lines = [
        f"{row['method']} {row['metric']}: only in "
        + ("before" if row["_merge"] == "left_only" else "after")
        for _, row in only.iterrows()
    ]
    for _, row in joined[joined["_merge"] == "both"].iterrows():
        for column in VALUES:
            old, new = row[f"{column}_before"], row[f"{column}_after"]
            same = (pd.isna(old) and pd.isna(new)) or (
                not pd.isna(old) and not pd.isna(new) and abs(float(old) - float(new)) <= tolerance
            )
            if not same:
                lines.append(f"{row['method']} {row['metric']} {column}: {old} -> {new}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before")
    parser.add_argument("after")
    parser.add_argument("--tolerance", type=float, default=0.0)
    args = parser.parse_args(argv)
    before, after = pd.read_csv(args.before), pd.read_csv(args.after)
    differences = compare(before, after, args.tolerance)
    for line in differences:
        print(line)
    rows = len(before.merge(after, on=KEY))
    values = int(np.isfinite(before[VALUES].to_numpy(dtype=float)).sum())
    print(
        f"{rows} rows in both, {values} finite values before; "
        f"{len(differences)} difference(s) beyond {args.tolerance:g}"
    )
    return 1 if differences else 0


if __name__ == "__main__":
    sys.exit(main())
