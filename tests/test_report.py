"""The report writer: one set of blocks, the same content in Markdown and in HTML."""

import re

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from PIL import Image

from prefgen_kedro.report import Report, labelled_rows, metric_table

METRICS = pd.DataFrame(
    [
        ("a", "like_rate", 0.50, 0.40, 0.60),
        ("b", "like_rate", 0.70, 0.60, 0.80),
        ("real", "like_rate", 0.95, 0.90, 1.00),
        ("a", "fid", 90.0, 80.0, 100.0),
        ("b", "fid", 120.0, 110.0, 130.0),
    ],
    columns=["method", "metric", "mean", "ci_low", "ci_high"],
)
COLUMNS = {"like_rate": ("like %", True, 100), "fid": ("FID", False, 1), "kid": ("KID", False, 1)}


def test_metric_table_bolds_the_best_contender_in_each_direction():
    shown, bold = metric_table(METRICS, ["real", "a", "b"], COLUMNS, contenders=["a", "b"])
    assert shown.loc["b", "like %"] == "70 [60, 80]"
    assert shown.loc["a", "FID"] == "90 [80, 100]"
    assert shown.loc["real", "FID"] == "–" and (shown["KID"] == "–").all()
    # real has the highest like-rate but is not a contender; lower FID wins
    assert bold["like %"].tolist() == [False, False, True]
    assert bold["FID"].tolist() == [False, True, False]
    assert not bold["KID"].any()


def test_report_writes_the_same_blocks_as_markdown_and_self_contained_html():
    report = Report("Bench")
    report.heading("Main: `prefgen`")
    report.paragraph("Made by `kedro run`.")
    report.table(*metric_table(METRICS, ["a", "b"], COLUMNS))
    figure = Figure(figsize=(2, 2))
    figure.add_subplot().plot([0, 1], [1, 0])
    report.figure("bars", figure, "Bars.")
    grid = labelled_rows([("liked", [np.zeros((4, 4, 3), np.uint8)] * 3), ("x", [])])
    report.figure("grid", grid, "Grid <one>.")

    markdown = report.to_markdown("figs")
    assert markdown.startswith("# Bench\n") and "## Main: `prefgen`" in markdown
    assert "| b | **70 [60, 80]** |" in markdown and "![Bars.](figs/bars.png)" in markdown
    page = report.to_html()
    assert "<h2>Main: <code>prefgen</code></h2>" in page
    assert "<code>kedro run</code>" in page and "<b>70 [60, 80]</b>" in page
    assert "Grid &lt;one&gt;." in page
    # every image is inlined: nothing for a browser to fetch
    sources = re.findall(r'src="([^"]*)"', page)
    assert len(sources) == 2 and all(s.startswith("data:image/png;base64,") for s in sources)
    figures = report.figures
    assert set(figures) == {"bars", "grid"} and all(
        isinstance(f, Image.Image) for f in figures.values()
    )
    assert figures["grid"].size == grid.size
