# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Explore a run
#
# What one `alignforge run` did: rows in / kept per step, drop reasons per step, a histogram of
# every score column present (Deita complexity / quality, reward, ZIP-FIT alignment, MinHash
# cluster sizes, semantic max-sim, heuristics ratios), length distributions, and 5 kept and 5
# dropped examples per reason. Point it at any run folder (the `--out` of `alignforge run`):
#
#     ALIGNFORGE_RUN=runs/demo jupyter lab notebooks/explore_run.py     # jupytext opens .py notebooks
#
# or edit the parameter cell below. Sections a run has no data for are skipped.

# %% tags=["parameters"]
import os

RUN_DIR = os.environ.get("ALIGNFORGE_RUN", "runs/demo")
EXAMPLES = 5

# %%
import matplotlib.pyplot as plt  # inline in Jupyter; MPLBACKEND=Agg when run headless
import polars as pl

from reporting import LENGTH_COLUMNS, load_run, score_columns

pl.Config.set_tbl_rows(50)
pl.Config.set_fmt_str_lengths(80)
run = load_run(RUN_DIR)
print(f"run folder {run.path}: {len(run.stages)} steps; published: {run.publish is not None}")

# %% [markdown]
# ## Rows in / kept per step

# %%
steps = run.steps_table()
steps.select("step", "version", "rows_in", "kept", "dropped", "kept_share", "seconds", "tokens")

# %%
fig, ax = plt.subplots(figsize=(7, 0.4 * steps.height + 1))
ax.barh(steps["step"].to_list()[::-1], steps["rows_in"].to_list()[::-1], color="#cccccc", label="rows in")
ax.barh(steps["step"].to_list()[::-1], steps["kept"].to_list()[::-1], color="#1f77b4", label="kept")
ax.set_xlabel("rows")
ax.legend()
plt.show()

# %% [markdown]
# ## Drop reasons per step

# %%
drops = run.drop_reasons()
drops_by_step = {step: dict(zip(part["reason"], part["rows"])) for (step,), part in
                 drops.group_by("step", maintain_order=True)} if drops.height else {}
drops if drops.height else print("no row was dropped")

# %% [markdown]
# ## Score distributions
# Kept rows (blue) and dropped rows (red) stacked; a dropped row has the scores of the steps it got
# through, so a filter's own scores show where its threshold cut.

# %%
rows = run.rows()
scores = score_columns(rows)
score_summary = (pl.DataFrame([{"column": c, "rows": rows[c].drop_nulls().len(),
                                "kept_mean": rows.filter(pl.col("status") == "kept")[c].mean(),
                                "dropped_mean": rows.filter(pl.col("status") == "dropped")[c].mean(),
                                "min": rows[c].min(), "max": rows[c].max()} for c in scores])
                 if scores else pl.DataFrame())
print("score columns:", scores or "none in this run")
score_summary


# %%
def hist(columns, title):
    if not columns:
        print(f"no {title} in this run")
        return
    cols = 3
    n_rows = -(-len(columns) // cols)
    fig, axes = plt.subplots(n_rows, cols, figsize=(4.2 * cols, 2.8 * n_rows), squeeze=False)
    for ax, column in zip(axes.flat, columns):
        parts = [rows.filter(pl.col("status") == s)[column].drop_nulls().cast(pl.Float64).to_list()
                 for s in ("kept", "dropped")]
        ax.hist(parts, bins=30, stacked=True, color=["#1f77b4", "#d62728"],
                label=[f"kept ({len(parts[0])})", f"dropped ({len(parts[1])})"])
        ax.set_title(column, fontsize=10)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(columns):]:
        ax.axis("off")
    fig.tight_layout()
    plt.show()


hist(scores, "score columns")

# %% [markdown]
# ## Lengths
# Characters of the (first) instruction and the (last) response of each row.

# %%
lengths = [c for c in LENGTH_COLUMNS if c in rows.columns and rows[c].drop_nulls().len()]
length_summary = (rows.group_by("status").agg([pl.col(c).median().alias(f"{c}_median") for c in lengths])
                  .sort("status") if lengths else pl.DataFrame())
hist(lengths, "length columns")
length_summary

# %% [markdown]
# ## Examples: kept, and dropped per reason

# %%
examples = run.examples(EXAMPLES)
text_columns = [c for c in ("messages", "instruction", "response", "prompt", "chosen", "rejected") if c in rows.columns]
for group, df in examples.items():
    print(f"\n=== {'kept' if group == 'kept' else 'dropped: ' + group} ({df.height} shown)")
    for row in df.select([c for c in ("id", "dropped_at", *text_columns, *scores) if c in df.columns]).to_dicts():
        print({k: (str(v)[:300] if k in text_columns else v) for k, v in row.items() if v is not None})
