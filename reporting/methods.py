"""Comparisons across generation methods and runs (notebooks/compare_methods.py).

- `kept_share_per_filter`: rows in / kept per step of each run (which filter removes how much);
- `method_table`: rows per generation method (`origin` = the stage that made the row) and how many
  survived, with the mean of every score column;
- `candidate_sets` / `diversity_table`: candidate sets, either rows with a `candidates` list
  (nc_sampling, publish candidates) or per-candidate rows (`candidate_index`, best_of_n) grouped by
  `parent_id`; distinct-2 over equal-length candidates (filters.diversity.distinct_n, as the
  Diversity step computes it) plus the step's own `diversity_*` columns when it ran;
- `reward_gains`: what a reward-ranked method gains: best-of-N (best - mean candidate reward per
  set) and rewrites (child reward - parent reward, rows derived from a scored parent, e.g. MCTS
  rewrites).
Every function returns an empty frame when the run has no such data; callers skip the section.
"""

from __future__ import annotations

from typing import Any

import polars as pl

from reporting.run import score_columns

DISTINCT_WORDS = 32  # filters.diversity.DiversityConfig.distinct_words default


def kept_share_per_filter(runs: dict[str, Any]) -> pl.DataFrame:
    """(run, step, rows_in, kept, dropped, kept_share, dropped_by_reason) for every step that took rows in."""
    parts = [run.steps_table().with_columns(run=pl.lit(name)) for name, run in runs.items()]
    if not parts:
        return pl.DataFrame()
    table = pl.concat(parts, how="diagonal_relaxed")
    return (table.filter(pl.col("rows_in") > 0)
            .select("run", "step", "rows_in", "kept", "dropped", "kept_share", "dropped_by_reason"))


def method_table(runs: dict[str, Any]) -> pl.DataFrame:
    """(run, method, rows, kept, kept_share, mean_<score>...) per generation method (row `origin`)."""
    parts = []
    for name, run in runs.items():
        rows = run.rows()
        if not rows.height or "origin" not in rows.columns:
            continue
        scores = score_columns(rows)
        parts.append(rows.with_columns(method=pl.col("origin").fill_null("(input)"))
                     .group_by("method").agg(pl.len().alias("rows"),
                                             (pl.col("status") == "kept").sum().alias("kept"),
                                             *[pl.col(c).cast(pl.Float64).mean().alias(f"mean_{c}") for c in scores])
                     .with_columns(run=pl.lit(name), kept_share=(pl.col("kept") / pl.col("rows")).round(4)))
    if not parts:
        return pl.DataFrame()
    table = pl.concat(parts, how="diagonal_relaxed").sort("run", "method")
    return table.select("run", "method", "rows", "kept", "kept_share", *[c for c in table.columns if c.startswith("mean_")])


def _texts_of(value: Any) -> str:
    if isinstance(value, list):  # messages: the last assistant turn
        turns = [m.get("content") or "" for m in value if isinstance(m, dict) and m.get("role") == "assistant"]
        return turns[-1] if turns else " ".join(str(m.get("content") or "") for m in value if isinstance(m, dict))
    return "" if value is None else str(value)


def candidate_sets(run: Any) -> pl.DataFrame:
    """One row per candidate set: method, set_id, candidates, distinct2, best/mean score, diversity_*."""
    from filters.diversity import distinct_n, equal_length

    out = []
    for stage in reversed(run.stages):  # the latest stage that holds sets has the most scores
        rows = pl.concat([stage.read(), stage.read(rejected=True)], how="diagonal_relaxed")
        if "candidates" in rows.columns:
            diversity = [c for c in rows.columns if c.startswith("diversity_") and rows.schema[c].is_numeric()]
            for row in rows.to_dicts():
                cands = row.get("candidates") or []
                texts = [_texts_of(c.get("content")) for c in cands if isinstance(c, dict)]
                scores = [c.get("score") for c in cands if isinstance(c, dict) and c.get("score") is not None]
                out.append(_set_row(stage.label, row.get("origin"), row.get("id"), texts, scores,
                                    {c: row.get(c) for c in diversity}, distinct_n, equal_length))
        elif "candidate_index" in rows.columns and "parent_id" in rows.columns:
            score = "reward" if "reward" in rows.columns else None
            for (parent,), group in rows.group_by("parent_id", maintain_order=True):
                texts = [_texts_of(v) for v in (group["messages"].to_list() if "messages" in group.columns
                                                 else group.get_column("response").to_list())]
                scores = [s for s in group[score].to_list() if s is not None] if score else []
                out.append(_set_row(stage.label, group["origin"][0] if "origin" in group.columns else None, parent,
                                    texts, scores, {}, distinct_n, equal_length))
        if out:
            break
    return pl.DataFrame(out, infer_schema_length=None) if out else pl.DataFrame()


def _set_row(stage, origin, set_id, texts, scores, diversity, distinct_n, equal_length) -> dict[str, Any]:
    cap = equal_length(texts, DISTINCT_WORDS) if texts else 0
    return {"stage": stage, "method": origin or stage, "set_id": set_id, "candidates": len(texts),
            "distinct2": distinct_n(texts, 2, cap) if len(texts) >= 2 else None,
            "best_score": max(scores) if scores else None,
            "mean_score": sum(scores) / len(scores) if scores else None, **diversity}


def diversity_table(sets: pl.DataFrame) -> pl.DataFrame:
    """Per method: sets, mean candidates per set, mean distinct-2 and mean of every diversity_* column."""
    if not sets.height:
        return pl.DataFrame()
    extra = [c for c in sets.columns if c.startswith("diversity_")]
    return (sets.group_by("method").agg(pl.len().alias("sets"), pl.col("candidates").mean().alias("mean_candidates"),
                                        pl.col("distinct2").mean().alias("mean_distinct2"),
                                        *[pl.col(c).mean().alias(f"mean_{c}") for c in extra])
            .sort("method"))


def reward_gains(run: Any, sets: pl.DataFrame | None = None) -> pl.DataFrame:
    """(kind, method, n, mean_gain, share_improved): best-of-N gain per set and rewrite gains."""
    rows = []
    sets = candidate_sets(run) if sets is None else sets
    if sets.height and sets["best_score"].drop_nulls().len():
        scored = sets.filter(pl.col("best_score").is_not_null())
        for (method,), group in scored.group_by("method", maintain_order=True):
            gains = (group["best_score"] - group["mean_score"]).to_list()
            rows.append({"kind": "best_of_n", "method": method, "n": len(gains),
                         "mean_gain": sum(gains) / len(gains), "share_improved": sum(g > 0 for g in gains) / len(gains)})
    every = run.all_stage_rows(columns=["id", "parent_id", "origin", "reward"])
    if every.height and "reward" in every.columns and "parent_id" in every.columns:
        scored = every.filter(pl.col("reward").is_not_null()).unique("id", keep="last")
        pairs = scored.join(scored.select(pl.col("id").alias("parent_id"), pl.col("reward").alias("parent_reward")),
                            on="parent_id", how="inner")
        for (method,), group in pairs.group_by("origin", maintain_order=True):
            gains = (group["reward"] - group["parent_reward"]).to_list()
            rows.append({"kind": "rewrite", "method": method, "n": len(gains), "mean_gain": sum(gains) / len(gains),
                         "share_improved": sum(g > 0 for g in gains) / len(gains)})
    return pl.DataFrame(rows, schema={"kind": pl.Utf8, "method": pl.Utf8, "n": pl.Int64, "mean_gain": pl.Float64,
                                      "share_improved": pl.Float64})
