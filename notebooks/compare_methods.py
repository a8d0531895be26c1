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
# # Compare generation methods
#
# For the generation methods a run (or several runs) used: how much each filter keeps, rows and
# kept share per method (the `origin` stage of each row) with mean scores, the diversity of
# candidate sets (best-of-N, NC vs i.i.d. sampling) and reward gains (best-of-N: best minus mean
# candidate reward; rewrites: child minus parent reward). Sections a run has no data for are skipped.
#
#     ALIGNFORGE_RUNS=runs/demo:runs/demo-dpo jupyter lab notebooks/compare_methods.py
#
# `ALIGNFORGE_RUNS` is a list of run folders separated by `:` (`ALIGNFORGE_RUN`, one folder, works too).

# %% tags=["parameters"]
import os

RUN_DIRS = [p for p in os.environ.get("ALIGNFORGE_RUNS", os.environ.get("ALIGNFORGE_RUN", "runs/demo")).split(os.pathsep)
            if p]

# %%
from pathlib import Path

import matplotlib.pyplot as plt  # inline in Jupyter; MPLBACKEND=Agg when run headless
import polars as pl

from reporting import load_run
from reporting.methods import candidate_sets, diversity_table, kept_share_per_filter, method_table, reward_gains

pl.Config.set_tbl_rows(50)
names = [Path(p).name or p for p in RUN_DIRS]
if len(set(names)) < len(names):  # two runs of the same name: use the full paths
    names = list(RUN_DIRS)
runs = {name: load_run(path) for name, path in zip(names, RUN_DIRS)}
skipped = {}  # section -> why it shows nothing
print({name: [s.label for s in run.stages] for name, run in runs.items()})

# %% [markdown]
# ## Kept share per filter

# %%
kept_share = kept_share_per_filter(runs)
fig, ax = plt.subplots(figsize=(7, 0.35 * kept_share.height + 1))
labels = [f"{r}: {s}" for r, s in zip(kept_share["run"], kept_share["step"])]
ax.barh(labels[::-1], kept_share["kept_share"].fill_null(0).to_list()[::-1], color="#1f77b4")
ax.set_xlim(0, 1)
ax.set_xlabel("kept share (kept / rows in)")
plt.show()
kept_share

# %% [markdown]
# ## Rows and kept share per generation method

# %%
methods = method_table(runs)
methods if methods.height else skipped.setdefault("methods", "no row carries an origin")

# %% [markdown]
# ## Diversity of candidate sets
# distinct-2 over candidates cut to the same length (as filters/diversity.py computes it), and the
# Diversity step's own columns (embedding cosine distance, Vendi, on-topic rate) when it ran.

# %%
sets = {name: candidate_sets(run) for name, run in runs.items()}
diversity = pl.concat([diversity_table(s).with_columns(run=pl.lit(name)) for name, s in sets.items() if s.height],
                      how="diagonal_relaxed") if any(s.height for s in sets.values()) else pl.DataFrame()
if diversity.height:
    fig, ax = plt.subplots(figsize=(6, 2.5))
    for name, s in sets.items():
        if s.height:
            ax.hist(s["distinct2"].drop_nulls().to_list(), bins=20, alpha=0.6, label=name)
    ax.set_xlabel("distinct-2 per candidate set")
    ax.legend()
    plt.show()
else:
    skipped["diversity"] = "no candidate sets in these runs (best_of_n / nc_sampling did not run)"
diversity if diversity.height else skipped["diversity"]

# %% [markdown]
# ## Reward gains
# best_of_n: best minus mean candidate reward per set (what picking the best buys over one sample);
# rewrite: a rewritten row's reward minus its parent's.

# %%
gains = pl.concat([reward_gains(run, sets[name]).with_columns(run=pl.lit(name)) for name, run in runs.items()],
                  how="diagonal_relaxed")
if not gains.height:
    skipped["reward_gains"] = "no reward scores on candidate sets or rewrites in these runs"
gains if gains.height else skipped["reward_gains"]

# %%
print("skipped sections:", skipped or "none")
