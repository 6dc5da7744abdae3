"""A report built once as blocks and written twice: Markdown (figures as files beside it)
and a self-contained HTML page (figures inlined as base64 PNG), so both say the same.

Public API: ``Report`` (``heading``, ``paragraph``, ``table``, ``figure``, ``to_markdown``,
``to_html``, ``figures``), ``metric_table`` (methods × metrics with CIs, best in bold) and
``labelled_rows`` (an image grid with one labelled row per group).
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont

Picture = Figure | Image.Image


@dataclass
class _Table:
    frame: pd.DataFrame
    bold: pd.DataFrame | None  # same shape, True where the cell is shown in bold


@dataclass
class Report:
    """Ordered blocks: ("heading", level, text), ("paragraph", text), tables and figures."""

    title: str
    blocks: list[tuple] = field(default_factory=list)
    _figures: dict[str, Picture] = field(default_factory=dict)

    def heading(self, text: str, level: int = 2) -> None:
        self.blocks.append(("heading", level, text))

    def paragraph(self, text: str) -> None:
        """Plain text; ``code`` in backticks is kept as code in both outputs."""
        self.blocks.append(("paragraph", text))

    def table(self, frame: pd.DataFrame, bold: pd.DataFrame | None = None) -> None:
        self.blocks.append(("table", _Table(frame, bold)))

    def figure(self, name: str, picture: Picture, caption: str) -> None:
        """A figure saved as ``<name>.png`` beside the Markdown file."""
        if name in self._figures:
            raise ValueError(f"figure name {name!r} used twice")
        self._figures[name] = picture
        self.blocks.append(("figure", name, caption))

    @property
    def figures(self) -> dict[str, Image.Image]:
        """Every figure as a PIL image (matplotlib figures rendered to PNG)."""
        return {name: Image.open(io.BytesIO(png_bytes(p))) for name, p in self._figures.items()}

    def to_markdown(self, figure_dir: str) -> str:
        """Markdown whose figures are linked as ``<figure_dir>/<name>.png``."""
        lines = [f"# {self.title}", ""]
        for block in self.blocks:
            kind = block[0]
            if kind == "heading":
                lines += ["#" * block[1] + " " + block[2], ""]
            elif kind == "paragraph":
                lines += [block[1], ""]
            elif kind == "table":
                lines += [_markdown_table(block[1]), ""]
            else:
                _, name, caption = block
                lines += [f"![{caption}]({figure_dir}/{name}.png)", "", f"*{caption}*", ""]
        return "\n".join(lines)

    def to_html(self) -> str:
        """One page, no external files: figures are inlined."""
        body = [f"<h1>{_inline_code(self.title)}</h1>"]
        for block in self.blocks:
            kind = block[0]
            if kind == "heading":
                body.append(f"<h{block[1]}>{_inline_code(block[2])}</h{block[1]}>")
            elif kind == "paragraph":
                body.append(f"<p>{_inline_code(block[1])}</p>")
            elif kind == "table":
                body.append(_html_table(block[1]))
            else:
                _, name, caption = block
                data = base64.b64encode(png_bytes(self._figures[name])).decode()
                body.append(
                    f'<figure><img alt="{html.escape(caption)}" '
                    f'src="data:image/png;base64,{data}"/>'
                    f"<figcaption>{_inline_code(caption)}</figcaption></figure>"
                )
        return _PAGE.format(title=html.escape(self.title), body="\n".join(body))


def png_bytes(picture: Picture) -> bytes:
    buffer = io.BytesIO()
    if isinstance(picture, Figure):
        picture.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    else:
        picture.save(buffer, format="png")
    return buffer.getvalue()


def metric_table(
    metrics: pd.DataFrame,
    methods: Sequence[str],
    columns: Mapping[str, tuple[str, bool, float]],
    contenders: Sequence[str] | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Methods × metrics as "mean [low, high]" strings, and where to bold.

    ``metrics`` has rows (method, metric, mean, ci_low, ci_high). ``columns`` maps a metric
    to (column title, higher is better, display scale). The best mean among ``contenders``
    (default: all ``methods``) is bolded per column; a missing cell shows "–", a metric
    without an interval (NaN bounds) its mean alone.
    """
    contenders = list(methods if contenders is None else contenders)
    indexed = metrics.set_index(["method", "metric"])
    shown, bold = {}, {}
    for metric, (title, higher_is_better, scale) in columns.items():
        cells, means = [], {}
        for method in methods:
            if (method, metric) not in indexed.index:
                cells.append("–")
                continue
            row = indexed.loc[(method, metric)]
            means[method] = row["mean"]
            mean, low, high = (row[k] * scale for k in ("mean", "ci_low", "ci_high"))
            interval = "" if np.isnan(low) else f" [{low:.3g}, {high:.3g}]"
            cells.append(f"{mean:.3g}{interval}")
        ranked = {m: v for m, v in means.items() if m in contenders}
        best = (max if higher_is_better else min)(ranked, key=ranked.get) if ranked else None
        shown[title] = cells
        bold[title] = [method == best for method in methods]
    return pd.DataFrame(shown, index=list(methods)), pd.DataFrame(bold, index=list(methods))


def labelled_rows(
    rows: Sequence[tuple[str, Sequence[np.ndarray]]], *, scale: int = 3, label_width: int = 120
) -> Image.Image:
    """One row of uint8 (H, W, 3) images per (label, images), the label on the left;
    pixels enlarged ``scale`` times (nearest) so small renders can be seen."""
    if not rows:
        raise ValueError("labelled_rows needs at least one row")
    height, width = next(iter(img for _, images in rows for img in images)).shape[:2]
    cell_w, cell_h, pad = width * scale, height * scale, 3
    columns = max(len(images) for _, images in rows)
    grid = Image.new(
        "RGB",
        (label_width + columns * (cell_w + pad) + pad, len(rows) * (cell_h + pad) + pad),
        (255, 255, 255),
    )
    draw, font = ImageDraw.Draw(grid), ImageFont.load_default()
    for r, (label, images) in enumerate(rows):
        y = pad + r * (cell_h + pad)
        draw.text((4, y + cell_h // 2 - 6), label, fill=(0, 0, 0), font=font)
        for c, image in enumerate(images):
            enlarged = Image.fromarray(image).resize((cell_w, cell_h), Image.NEAREST)
            grid.paste(enlarged, (label_width + c * (cell_w + pad), y))
    return grid


def _markdown_table(table: _Table) -> str:
    frame = table.frame
    header = "| " + " | ".join([frame.index.name or "", *map(str, frame.columns)]) + " |"
    lines = [header, "|" + "---|" * (len(frame.columns) + 1)]
    for index, row in frame.iterrows():
        cells = []
        for column, value in row.items():
            text = str(value)
            if table.bold is not None and bool(table.bold.loc[index, column]):
                text = f"**{text}**"
            cells.append(text)
        lines.append("| " + " | ".join([str(index), *cells]) + " |")
    return "\n".join(lines)


def _html_table(table: _Table) -> str:
    frame = table.frame
    head = "".join(
        f"<th>{html.escape(str(c))}</th>" for c in [frame.index.name or "", *frame.columns]
    )
    rows = []
    for index, row in frame.iterrows():
        cells = []
        for column, value in row.items():
            text = html.escape(str(value))
            if table.bold is not None and bool(table.bold.loc[index, column]):
                text = f"<b>{text}</b>"
            cells.append(f"<td>{text}</td>")
        rows.append(f"<tr><th>{html.escape(str(index))}</th>{''.join(cells)}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _inline_code(text: str) -> str:
    parts = html.escape(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; }}
table {{ border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }}
th, td {{ border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; }}
thead th {{ background: #f3f3f3; }}
tbody th {{ text-align: left; }}
figure {{ margin: 1.5em 0; }} img {{ max-width: 100%; image-rendering: pixelated; }}
figcaption {{ color: #555; font-size: 0.9em; }}
code {{ background: #f3f3f3; padding: 0 0.2em; }}
</style></head>
<body>
{body}
</body></html>
"""
