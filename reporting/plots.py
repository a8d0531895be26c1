"""PNG plots of a run (matplotlib, Agg backend: no display, no network).

Every plot function returns PNG bytes; `run_plots` draws the standard set for a run: rows kept per
step, drop reasons, and one histogram per score / length column present, kept vs dropped rows
stacked. matplotlib is optional: `require_matplotlib()` raises one error with the install command.
"""

from __future__ import annotations

import io
import math
from typing import Any

import polars as pl

from alignforge.errors import AlignforgeError

INSTALL_HINT = "pip install 'alignforge[report]'"
KEPT_COLOR = "#1f77b4"     # matplotlib's tab:blue; the report test looks for it in a screenshot
DROPPED_COLOR = "#d62728"  # tab:red


class MissingDependency(AlignforgeError):
    """An optional package the command needs is not installed; the message says how to install it."""


def require_matplotlib() -> Any:
    """matplotlib.pyplot on the Agg backend, or MissingDependency naming the extra to install."""
    try:
        import matplotlib
    except ImportError:
        raise MissingDependency(f"plots need matplotlib, which is not installed. Fix: {INSTALL_HINT}") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any) -> bytes:
    plt = require_matplotlib()
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=80)
    plt.close(fig)
    return buffer.getvalue()


def histogram(rows: pl.DataFrame, column: str, *, bins: int = 30, title: str | None = None) -> bytes | None:
    """Histogram of `column`, kept and dropped rows stacked (None when it has no finite value)."""
    plt = require_matplotlib()
    groups = []
    for status, color in (("kept", KEPT_COLOR), ("dropped", DROPPED_COLOR)):
        part = rows.filter(pl.col("status") == status) if "status" in rows.columns else (
            rows if status == "kept" else rows.head(0))
        values = [float(v) for v in part[column].drop_nulls().to_list() if v is not None and math.isfinite(v)]
        if values:
            groups.append((status, color, values))
    if not groups:
        return None
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.hist([g[2] for g in groups], bins=bins, stacked=True, color=[g[1] for g in groups],
            label=[f"{g[0]} ({len(g[2])})" for g in groups])
    ax.set_title(title or column)
    ax.set_xlabel(column)
    ax.set_ylabel("rows")
    ax.legend(fontsize=8)
    return _png(fig)


def bar(labels: list[str], values: list[float], *, title: str, xlabel: str, color: str = KEPT_COLOR) -> bytes | None:
    """Horizontal bar chart (None when there is nothing to draw)."""
    if not labels:
        return None
    plt = require_matplotlib()
    fig, ax = plt.subplots(figsize=(6, max(1.6, 0.35 * len(labels) + 0.9)))
    ax.barh(list(range(len(labels)))[::-1], values, color=color)
    ax.set_yticks(list(range(len(labels)))[::-1], labels, fontsize=8)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    return _png(fig)


def run_plots(run: Any) -> dict[str, bytes]:
    """{file stem: PNG} for a `reporting.RunView`: steps, drop reasons, every score and length column."""
    from reporting.run import LENGTH_COLUMNS, score_columns

    plots: dict[str, bytes] = {}
    steps = run.steps_table()
    png = bar(steps["step"].to_list(), steps["kept"].to_list(), title="rows kept per step", xlabel="rows")
    if png:
        plots["steps_kept"] = png
    drops = run.drop_reasons()
    if drops.height:
        png = bar([f"{s}: {r}" for s, r in zip(drops["step"], drops["reason"])], drops["rows"].to_list(),
                  title="dropped rows by reason", xlabel="rows", color=DROPPED_COLOR)
        if png:
            plots["drop_reasons"] = png
    rows = run.rows()
    for column in [*score_columns(rows), *[c for c in LENGTH_COLUMNS if c in rows.columns]]:
        png = histogram(rows, column)
        if png:
            plots[f"hist_{column}"] = png
    return plots
