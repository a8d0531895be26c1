"""`alignforge report`: one self-contained HTML page about a run (no network; plots inline as base64 PNG).

Sections: the step table (rows in / kept / dropped by reason / seconds / tokens), drop reasons,
a histogram per score and length column (kept vs dropped), and a browsable sample of kept and
dropped rows with their scores (`<details>` per reason: opens without JavaScript).
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
from typing import Any

import polars as pl

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:24px auto;max-width:1200px;color:#222}
h1{font-size:1.5em}h2{border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:1.6em}
table{border-collapse:collapse;font-size:13px;margin:8px 0}th,td{border:1px solid #ccc;padding:3px 7px;
text-align:left;vertical-align:top}th{background:#f3f3f3}td.num{text-align:right}
.plots{display:flex;flex-wrap:wrap;gap:12px}.plots figure{margin:0;border:1px solid #eee;padding:4px}
figcaption{font-size:12px;color:#555}details{margin:6px 0}summary{cursor:pointer;font-weight:600}
pre{white-space:pre-wrap;max-width:720px;max-height:240px;overflow:auto;margin:0;font-size:12px}
.muted{color:#777;font-size:13px}
"""
SAMPLE_ROWS = 10
TEXT_LIMIT = 1200


def _esc(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def table_html(df: pl.DataFrame, *, css_id: str | None = None) -> str:
    head = "".join(f"<th>{_esc(c)}</th>" for c in df.columns)
    body = []
    for row in df.iter_rows():
        cells = []
        for value in row:
            num = isinstance(value, (int, float)) and not isinstance(value, bool)
            shown = f"{value:.4g}" if isinstance(value, float) else value
            cells.append(f"<td class=\"num\">{_esc(shown)}</td>" if num else f"<td>{_esc(shown)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    ident = f' id="{css_id}"' if css_id else ""
    return f"<table{ident}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _text(value: Any) -> str:
    if isinstance(value, list) and value and isinstance(value[0], dict) and "role" in value[0]:
        text = "\n".join(f"[{m.get('role')}] {m.get('content')}" for m in value)
    elif isinstance(value, (list, dict)):
        text = json.dumps(value, ensure_ascii=False, default=str)
    else:
        text = "" if value is None else str(value)
    return text if len(text) <= TEXT_LIMIT else text[:TEXT_LIMIT] + f" ... ({len(text)} chars)"


def sample_html(df: pl.DataFrame, scores: list[str]) -> str:
    """Rows as a table: id, reason, the text columns, then every score column."""
    text_cols = [c for c in ("messages", "instruction", "response", "prompt", "chosen", "rejected", "candidates")
                 if c in df.columns]
    cols = [c for c in ("id", "origin", "dropped_at", "drop_reason") if c in df.columns]
    shown = [*cols, *text_cols, *[c for c in scores if c in df.columns]]
    head = "".join(f"<th>{_esc(c)}</th>" for c in shown)
    body = []
    for row in df.select(shown).to_dicts():
        cells = []
        for c in shown:
            v = row[c]
            if c in text_cols:
                cells.append(f"<td><pre>{_esc(_text(v))}</pre></td>")
            elif isinstance(v, float):
                cells.append(f"<td class=\"num\">{v:.4g}</td>")
            else:
                cells.append(f"<td>{_esc(v)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table class=\"sample\"><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def render_report(run: Any, *, plots: dict[str, bytes] | None = None, sample_rows: int = SAMPLE_ROWS) -> str:
    """The report page of a `reporting.RunView` (plots: {stem: PNG}; drawn here when None)."""
    from reporting.plots import run_plots
    from reporting.run import LENGTH_COLUMNS, score_columns

    plots = run_plots(run) if plots is None else plots
    steps = run.steps_table()
    drops = run.drop_reasons()
    rows = run.rows()
    scores = [*score_columns(rows), *[c for c in LENGTH_COLUMNS if c in rows.columns]]
    title = f"alignforge run report: {run.path.name}"
    recipe_line = ""
    if run.publish:
        configs = ", ".join(f"{c} ({sum(s.get('num_examples', 0) for s in splits.values())} rows)"
                            for c, splits in (run.publish.get("configs") or {}).items())
        recipe_line = (f"<p>Published: <code>{_esc(run.publish.get('url'))}</code>: {_esc(configs)}; model "
                       f"<code>{_esc(run.publish.get('model'))}</code>; {_esc(run.publish.get('created_at'))}.</p>")
    parts = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{_esc(title)}</title>",
             f"<style>{CSS}</style></head><body>", f"<h1>{_esc(title)}</h1>",
             f"<p class=\"muted\">Run folder <code>{_esc(run.path)}</code>; written "
             f"{_dt.datetime.now(_dt.timezone.utc).isoformat(timespec='seconds')}.</p>", recipe_line,
             "<h2 id=\"steps\">Steps</h2>", table_html(steps, css_id="step-table"),
             "<h2 id=\"drops\">Drop reasons</h2>"]
    parts.append(table_html(drops, css_id="drop-table") if drops.height else "<p>No rows were dropped.</p>")
    parts.append("<h2 id=\"plots\">Plots</h2>")
    if plots:
        figures = [f"<figure><img class=\"plot\" alt=\"{_esc(stem)}\" src=\"data:image/png;base64,"
                   f"{base64.b64encode(png).decode('ascii')}\"><figcaption>{_esc(stem)}</figcaption></figure>"
                   for stem, png in plots.items()]
        parts.append(f"<div class=\"plots\">{''.join(figures)}</div>")
    else:
        parts.append("<p>No plots (no score column and no row).</p>")
    parts.append("<h2 id=\"rows\">Rows</h2><p class=\"muted\">Up to "
                 f"{sample_rows} rows per group, with every score column present. Click a group to open it.</p>")
    for group, df in run.examples(sample_rows).items():
        total = (run.kept().height if group == "kept"
                 else run.dropped().filter(pl.col("drop_reason").fill_null("(none)") == group).height)
        label = "kept rows" if group == "kept" else f"dropped: {group}"
        opened = " open" if group == "kept" else ""
        parts.append(f"<details{opened} data-group=\"{_esc(group)}\"><summary>{_esc(label)} ({total})</summary>"
                     + (sample_html(df, scores) if df.height else "<p>none</p>") + "</details>")
    parts.append("</body></html>")
    return "\n".join(p for p in parts if p)
