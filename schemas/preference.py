"""Scored candidates -> TRL preference pairs and a listwise candidates table.

Input: one row per candidate with `parent_id` (the instruction), `candidate_index`, `messages`
(prompt + assistant candidate, or `prompt` + `response`) and `reward` (null = unscored). Rows with
keep == False or a null reward don't count as scored.

Scores: only finite real numbers are scores. NaN / inf (`non_finite_score`), strings, bools and
anything else (`non_numeric_score`) and null (`unscored`) leave a candidate unscored: it never
decides a pair, whatever its position, and is counted in `PreferenceBuild.unscored`.

Per parent (Magpie DPO recipe): chosen = the max reward, rejected = the min reward; ties go to
the lowest candidate_index, so the result never depends on row order. A pair is kept only if
score_chosen - score_rejected > margin. The default margin 0.0 therefore drops exactly the
groups where every scored candidate got the same reward (chosen would equal rejected, which
teaches nothing); raise it to keep only clear preferences. Drop reasons:
  "too_few_candidates"  fewer than `min_candidates` (default 2) scored candidates,
  "low_margin"          score_chosen - score_rejected <= margin.

Ids: one per prompt group, hash of the parent id, the SAME in the preference and candidates
tables, so a split by id (storage.publish test_size) holds out the same prompts in both.

Candidates table: one row per parent with >= `min_candidates` scored candidates (margin is not
applied: listwise trainers use the full ranking), `candidates` = every live candidate (keep not
False, non-empty response) as {content, score, index, reason} in index order; an unscored one
has score null and its reason (never a NaN score).
"""

from __future__ import annotations

import math
from collections import Counter
from decimal import Decimal
from numbers import Real
from typing import Any, NamedTuple

import numpy as np
import polars as pl

from schemas import MESSAGES, SchemaError, row_id

ORIGIN = "preference@1"
CANDIDATES_ORIGIN = "candidates@1"
CANDIDATE_ENTRY = pl.Struct({"content": pl.Utf8, "score": pl.Float64, "index": pl.Int64, "reason": pl.Utf8})

TOO_FEW = "too_few_candidates"
LOW_MARGIN = "low_margin"
# Why a candidate's score is not a score.
UNSCORED = "unscored"
NON_FINITE_SCORE = "non_finite_score"
NON_NUMERIC_SCORE = "non_numeric_score"


def score_value(value: Any) -> tuple[float | None, str | None]:
    """(score, None) for a finite real number, else (None, reason).

    null -> "unscored"; NaN / +-inf (floats, Decimals, numpy) -> "non_finite_score"; bool, str
    (even "NaN" or "3.0": a text is not a score), lists and anything else -> "non_numeric_score"."""
    if value is None:
        return None, UNSCORED
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (Real, Decimal)):
        return None, NON_NUMERIC_SCORE  # numpy numbers register as Real; numpy bools do not count
    if isinstance(value, Decimal) and not value.is_finite():  # incl. sNaN, which float() refuses
        return None, NON_FINITE_SCORE
    try:
        number = float(value)
    except OverflowError:  # an int beyond float range
        return None, NON_FINITE_SCORE
    except (TypeError, ValueError):
        return None, NON_NUMERIC_SCORE
    if not math.isfinite(number):
        return None, NON_FINITE_SCORE
    return number, None


class PreferenceBuild(NamedTuple):
    preferences: pl.DataFrame  # TRL explicit-prompt rows (kept pairs only)
    candidates: pl.DataFrame   # listwise rows
    rejected: pl.DataFrame     # one row per dropped parent: parent_id, prompt, drop_reason, n_scored, margin
    # Live candidates whose score was not a score, by reason (unscored / non_finite_score / non_numeric_score).
    unscored: dict[str, int] = {}


PREFERENCE_COLUMNS = {"id": pl.Utf8, "parent_id": pl.Utf8, "origin": pl.Utf8, "prompt": MESSAGES,
                      "chosen": MESSAGES, "rejected": MESSAGES, "score_chosen": pl.Float64,
                      "score_rejected": pl.Float64}
CANDIDATES_COLUMNS = {"id": pl.Utf8, "parent_id": pl.Utf8, "origin": pl.Utf8, "prompt": MESSAGES,
                      "candidates": pl.List(CANDIDATE_ENTRY)}
REJECTED_COLUMNS = {"id": pl.Utf8, "parent_id": pl.Utf8, "origin": pl.Utf8, "prompt": MESSAGES,
                    "n_scored": pl.Int64, "margin": pl.Float64, "keep": pl.Boolean, "drop_reason": pl.Utf8}


def _split(df: pl.DataFrame) -> tuple[list[list[dict[str, str]]], list[str | None]]:
    if "messages" in df.columns:
        prompts, responses = [], []
        for messages in df["messages"].to_list():
            messages = list(messages or [])
            if messages and messages[-1]["role"] == "assistant":
                prompts.append([dict(m) for m in messages[:-1]])
                responses.append(messages[-1]["content"])
            else:
                prompts.append([dict(m) for m in messages])
                responses.append(None)
        return prompts, responses
    if "prompt" in df.columns and "response" in df.columns:
        return [[dict(m) for m in (p or [])] for p in df["prompt"].to_list()], df["response"].to_list()
    raise SchemaError(f"candidates need `messages` (prompt + assistant answer) or `prompt` + `response`; got {df.columns}",
                      column="messages", fix="pass the output of best_of_n + reward_label")


def build_preferences(candidates_df: pl.DataFrame, *, margin: float = 0.0, min_candidates: int = 2,
                      score_column: str = "reward", dataset: str | None = "candidates") -> PreferenceBuild:
    """Group scored candidates by parent and build chosen/rejected pairs (see module docstring)."""
    if min_candidates < 2:
        raise ValueError(f"min_candidates={min_candidates}: a pair needs at least 2 candidates")
    if not math.isfinite(margin):
        raise SchemaError(f"margin={margin} is not a finite number", column="margin",
                          fix="use a margin like 0.0 (drop exact ties only) or 0.5")
    for column in ("parent_id", "candidate_index", score_column):
        if column not in candidates_df.columns:
            raise SchemaError(f"missing column {column!r}; found {candidates_df.columns}", dataset=dataset,
                              column=column, fix="run best_of_n then reward_label on the rows first")
    prompts, responses = _split(candidates_df)
    keep = candidates_df["keep"].fill_null(True).to_list() if "keep" in candidates_df.columns else [True] * candidates_df.height
    groups: dict[str, dict[str, Any]] = {}
    unscored: Counter[str] = Counter()
    for row, (parent, index, raw, ok, prompt, response) in enumerate(zip(
            candidates_df["parent_id"].to_list(), candidates_df["candidate_index"].to_list(),
            candidates_df[score_column].to_list(), keep, prompts, responses)):
        if parent is None:
            raise SchemaError("candidate without parent_id", dataset=dataset, column="parent_id", row=row,
                              fix="every candidate needs the id of its instruction row")
        if isinstance(index, bool) or not isinstance(index, int):
            raise SchemaError(f"candidate_index {index!r} is not an integer", dataset=dataset,
                              column="candidate_index", row=row,
                              fix="number each parent's candidates 0..k-1 (best_of_n does)")
        group = groups.setdefault(parent, {"prompt": prompt, "scored": [], "live": []})
        if ok and response is not None and str(response).strip():
            score, reason = score_value(raw)
            group["live"].append((index, score, str(response), reason))
            if reason is None:
                group["scored"].append((index, score, str(response)))
            else:
                unscored[reason] += 1

    pref_rows: list[dict[str, Any]] = []
    cand_rows: list[dict[str, Any]] = []
    drop_rows: list[dict[str, Any]] = []
    for parent in sorted(groups):  # stable output order whatever the input order
        group = groups[parent]
        scored = sorted(group["scored"])  # by candidate_index: ties resolve to the lowest index
        prompt = group["prompt"]
        if len(scored) < min_candidates:
            drop_rows.append(_dropped(parent, prompt, len(scored), None, TOO_FEW))
            continue
        cand_rows.append({
            "id": group_id(parent),
            "parent_id": parent, "origin": CANDIDATES_ORIGIN, "prompt": prompt,
            "candidates": [{"content": t, "score": s, "index": i, "reason": r}
                           for i, s, t, r in sorted(group["live"], key=lambda c: (c[0], c[2]))],
        })
        best = max(scored, key=lambda c: (c[1], -c[0]))   # highest score, then lowest index
        worst = min(scored, key=lambda c: (c[1], c[0]))   # lowest score, then lowest index
        gap = best[1] - worst[1]
        if not gap > margin:
            drop_rows.append(_dropped(parent, prompt, len(scored), gap, LOW_MARGIN))
            continue
        pref_rows.append({
            "id": group_id(parent),
            "parent_id": parent, "origin": ORIGIN, "prompt": prompt,
            "chosen": [{"role": "assistant", "content": best[2]}],
            "rejected": [{"role": "assistant", "content": worst[2]}],
            "score_chosen": best[1], "score_rejected": worst[1],
            "chosen_index": best[0], "rejected_index": worst[0], "n_candidates": len(scored),
        })
    preferences = pl.DataFrame(pref_rows, schema={**PREFERENCE_COLUMNS, "chosen_index": pl.Int64,
                                                  "rejected_index": pl.Int64, "n_candidates": pl.Int64})
    return PreferenceBuild(preferences,
                           pl.DataFrame(cand_rows, schema=CANDIDATES_COLUMNS),
                           pl.DataFrame(drop_rows, schema=REJECTED_COLUMNS), dict(sorted(unscored.items())))


def group_id(parent: str) -> str:
    """Id of a prompt group's rows (pair, candidates list, drop record): same in every table."""
    return row_id(ORIGIN, parent)


def _dropped(parent: str, prompt: list, n_scored: int, gap: float | None, reason: str) -> dict[str, Any]:
    return {"id": group_id(parent), "parent_id": parent, "origin": ORIGIN, "prompt": prompt,
            "n_scored": n_scored, "margin": gap, "keep": False, "drop_reason": reason}
