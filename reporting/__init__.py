"""Look at what a run did: its steps, drops, score distributions and rows, as tables and plots.

    from reporting import load_run
    run = load_run("runs/demo")            # a run folder: stages/ + publish/
    run.steps_table()                      # rows in / kept / dropped by reason / seconds / tokens per step
    run.drop_reasons()                     # (step, reason, rows)
    run.rows()                             # kept rows of the last step + every dropped row, `status` + `dropped_at`
    score_columns(run.rows())              # the filters' score columns present (deita_*, reward, zipfit_*, ...)

`reporting.plots` draws PNGs with matplotlib (Agg; `pip install 'alignforge[report]'`),
`reporting.html` renders the one-page report of `alignforge report`, `reporting.methods` holds the
comparisons of `notebooks/compare_methods.py`. Reading only: nothing here writes into a stage folder.
"""

from reporting.run import (LENGTH_COLUMNS, RunView, load_run, score_columns, with_lengths)

__all__ = ["LENGTH_COLUMNS", "RunView", "load_run", "score_columns", "with_lengths"]
