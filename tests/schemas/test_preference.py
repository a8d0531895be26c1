import polars as pl
import pytest

import schemas
from schemas import MESSAGES
import math
from decimal import Decimal

import numpy as np

from schemas.preference import (LOW_MARGIN, NON_FINITE_SCORE, NON_NUMERIC_SCORE, TOO_FEW, UNSCORED, build_preferences,
                                score_value)


def candidates(groups: dict[str, list[tuple[int, float | None, str]]], system: str | None = None) -> pl.DataFrame:
    rows = []
    for parent, cands in groups.items():
        prompt = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": f"question {parent}"}]
        for index, score, text in cands:
            rows.append({"id": f"{parent}-{index}", "parent_id": parent, "candidate_index": index,
                         "messages": prompt + [{"role": "assistant", "content": text}], "reward": score})
    return pl.DataFrame(rows, schema={"id": pl.Utf8, "parent_id": pl.Utf8, "candidate_index": pl.Int64,
                                      "messages": MESSAGES, "reward": pl.Float64})


def test_chosen_is_max_rejected_is_min_with_trl_columns():
    df = candidates({"a": [(0, 0.5, "mid"), (1, 2.0, "best"), (2, -1.0, "worst"), (3, None, "unscored")]})
    built = build_preferences(df)
    prefs = built.preferences
    assert prefs.height == 1
    row = prefs.row(0, named=True)
    assert row["chosen"] == [{"role": "assistant", "content": "best"}]
    assert row["rejected"] == [{"role": "assistant", "content": "worst"}]
    assert (row["score_chosen"], row["score_rejected"]) == (2.0, -1.0)
    assert row["prompt"] == [{"role": "user", "content": "question a"}]
    assert row["parent_id"] == "a" and row["origin"] == "preference@1" and row["id"]
    schemas.validate(prefs, kind="preference", dataset="prefs")
    cands = built.candidates
    schemas.validate(cands, kind="candidates", dataset="cands")
    # Every live candidate in index order, with its score (null + reason when unscored).
    assert [c["index"] for c in cands["candidates"][0]] == [0, 1, 2, 3]
    assert [c["score"] for c in cands["candidates"][0]] == [0.5, 2.0, -1.0, None]
    assert [c["reason"] for c in cands["candidates"][0]] == [None, None, None, "unscored"]
    assert built.unscored == {"unscored": 1}
    # One id per prompt group, shared by both tables: a split by id holds out the same prompts.
    assert cands["id"].to_list() == prefs["id"].to_list()


def test_ties_resolve_to_first_index_whatever_the_row_order():
    groups = {"t": [(0, 1.0, "a"), (1, 3.0, "b"), (2, 3.0, "c"), (3, 1.0, "d")]}
    df = candidates(groups)
    forward = build_preferences(df).preferences
    backward = build_preferences(df.reverse()).preferences
    shuffled = build_preferences(df.sample(fraction=1.0, shuffle=True, seed=3)).preferences
    for prefs in (forward, backward, shuffled):
        assert prefs["chosen_index"].to_list() == [1]
        assert prefs["rejected_index"].to_list() == [0]
    assert forward["id"].to_list() == backward["id"].to_list() == shuffled["id"].to_list()


def test_margin_threshold_and_too_few_candidates():
    df = candidates({
        "clear": [(0, 0.0, "x"), (1, 1.0, "y")],
        "close": [(0, 0.0, "x"), (1, 0.2, "y")],
        "tie": [(0, 0.7, "x"), (1, 0.7, "y")],
        "lonely": [(0, 1.0, "x"), (1, None, "y")],
    })
    # Default margin 0.0 drops exact ties only.
    built = build_preferences(df)
    assert sorted(built.preferences["parent_id"].to_list()) == ["clear", "close"]
    reasons = dict(zip(built.rejected["parent_id"], built.rejected["drop_reason"]))
    assert reasons == {"tie": LOW_MARGIN, "lonely": TOO_FEW}
    assert built.rejected["keep"].to_list() == [False, False]
    # A higher margin also drops the close pair; the candidates table ignores the margin.
    built = build_preferences(df, margin=0.5)
    assert built.preferences["parent_id"].to_list() == ["clear"]
    assert dict(zip(built.rejected["parent_id"], built.rejected["drop_reason"]))["close"] == LOW_MARGIN
    assert sorted(built.candidates["parent_id"].to_list()) == ["clear", "close", "tie"]


def test_dropped_candidates_do_not_count_as_scored():
    df = candidates({"g": [(0, 5.0, "x"), (1, 1.0, "y"), (2, 3.0, "z")]}).with_columns(
        keep=pl.Series([False, True, True]), drop_reason=pl.Series(["truncated_response", None, None]))
    prefs = build_preferences(df).preferences
    assert prefs["chosen"][0].to_list()[0]["content"] == "z"


def test_missing_columns_is_a_clear_error():
    with pytest.raises(schemas.SchemaError, match="reward"):
        build_preferences(candidates({"a": [(0, 1.0, "x")]}).drop("reward"))


def test_rows_pass_trl_checks_with_the_embedded_tokenizer():
    from transformers import AutoTokenizer
    from trl.data_utils import is_conversational, maybe_apply_chat_template

    from engines.embedded import resolve_model

    df = candidates({"a": [(0, 1.0, "good answer"), (1, -1.0, "bad answer")],
                     "b": [(0, 0.0, "meh"), (1, 2.0, "great")]}, system="Be brief.")
    prefs = build_preferences(df).preferences
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(None))
    for row in prefs.select("prompt", "chosen", "rejected").to_dicts():
        assert is_conversational(row)
        assert row["prompt"][0]["role"] == "system"
        rendered = maybe_apply_chat_template(row, tokenizer)
        assert set(rendered) == {"prompt", "chosen", "rejected"}
        assert rendered["prompt"].rstrip().endswith("assistant")  # generation prompt ends the prompt
        assert "Be brief." in rendered["prompt"]
        assert rendered["chosen"].startswith(row["chosen"][0]["content"])
        assert rendered["rejected"].startswith(row["rejected"][0]["content"])
    try:
        from trl.data_utils import maybe_extract_prompt
    except ImportError:  # pragma: no cover - older trl
        return
    row = prefs.select("prompt", "chosen", "rejected").to_dicts()[0]
    assert maybe_extract_prompt(row) == row  # already explicit-prompt: nothing to extract


# ---------------------------------------------------------------- issue 8, fault kind 4

@pytest.mark.parametrize("order", [(math.nan, 3.0, 1.0), (3.0, math.nan, 1.0), (3.0, 1.0, math.nan)])
def test_nan_never_decides_a_pair_whatever_its_position(order):
    texts = {3.0: "three", 1.0: "one"}
    df = candidates({"p": [(i, s, texts.get(s, "nan answer")) for i, s in enumerate(order)]})
    built = build_preferences(df)
    row = built.preferences.row(0, named=True)
    assert (row["score_chosen"], row["score_rejected"]) == (3.0, 1.0)
    assert row["chosen"][0]["content"] == "three" and row["rejected"][0]["content"] == "one"
    assert row["n_candidates"] == 2
    assert built.rejected.height == 0
    assert built.unscored == {NON_FINITE_SCORE: 1}
    # The published candidates config: the NaN candidate has a null score and its reason.
    entries = built.candidates["candidates"][0].to_list()
    nan_index = order.index(next(s for s in order if s != s))
    assert entries[nan_index] == {"content": "nan answer", "score": None, "index": nan_index,
                                  "reason": NON_FINITE_SCORE}
    scores = built.candidates["candidates"].explode().struct.field("score")
    assert not scores.is_nan().any() and scores.null_count() == 1
    schemas.validate(built.candidates, kind="candidates", dataset="cands")


def test_infinite_scores_and_all_nan_groups():
    df = candidates({"inf": [(0, math.inf, "x"), (1, 2.0, "y"), (2, -math.inf, "z"), (3, 1.0, "w")],
                     "nan": [(0, math.nan, "x"), (1, math.nan, "y")]})
    built = build_preferences(df)
    row = built.preferences.row(0, named=True)
    assert (row["parent_id"], row["score_chosen"], row["score_rejected"]) == ("inf", 2.0, 1.0)
    assert dict(zip(built.rejected["parent_id"], built.rejected["drop_reason"])) == {"nan": TOO_FEW}
    assert built.rejected.filter(pl.col("parent_id") == "nan")["n_scored"].to_list() == [0]
    assert built.unscored == {NON_FINITE_SCORE: 4}
    assert built.candidates["parent_id"].to_list() == ["inf"]  # "nan" has no scored candidate


def test_scores_as_strings_or_bools_are_not_scores():
    rows = [("s", 0, "NaN"), ("s", 1, "3.0"), ("s", 2, "2.5"), ("s", 3, None)]
    df = pl.DataFrame({"parent_id": [r[0] for r in rows], "candidate_index": [r[1] for r in rows],
                       "messages": [[{"role": "user", "content": "q"}, {"role": "assistant", "content": f"a{r[1]}"}]
                                    for r in rows], "reward": [r[2] for r in rows]},
                      schema={"parent_id": pl.Utf8, "candidate_index": pl.Int64, "messages": MESSAGES,
                              "reward": pl.Utf8})
    built = build_preferences(df)
    assert built.preferences.height == 0
    assert built.rejected["drop_reason"].to_list() == [TOO_FEW]
    assert built.unscored == {NON_NUMERIC_SCORE: 3, UNSCORED: 1}
    flags = df.with_columns(pl.Series("reward", [True, False, True, True]))
    assert build_preferences(flags).unscored == {NON_NUMERIC_SCORE: 4}


def test_score_value():
    assert score_value(3) == (3.0, None) and score_value(-0.5) == (-0.5, None)
    assert score_value(np.float32(1.5)) == (1.5, None) and score_value(np.int64(2)) == (2.0, None)
    assert score_value(Decimal("2.5")) == (2.5, None)
    for bad in (math.nan, math.inf, -math.inf, np.float64("nan"), Decimal("NaN"), Decimal("sNaN"), 10**400):
        assert score_value(bad) == (None, NON_FINITE_SCORE), bad
    for bad in ("NaN", "3.0", "", True, False, np.bool_(True), [1.0], {"score": 1}, b"1", 1 + 2j):
        assert score_value(bad) == (None, NON_NUMERIC_SCORE), bad
    assert score_value(None) == (None, UNSCORED)


def test_bad_candidate_index_and_margin_are_clear_errors():
    df = candidates({"a": [(0, 1.0, "x"), (1, 0.0, "y")]})
    with pytest.raises(schemas.SchemaError, match="candidate_index.*row 1"):
        build_preferences(df.with_columns(pl.Series("candidate_index", [0, None], dtype=pl.Int64)))
    with pytest.raises(schemas.SchemaError, match="margin"):
        build_preferences(df, margin=math.nan)
