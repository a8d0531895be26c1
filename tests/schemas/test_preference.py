import polars as pl
import pytest

import schemas
from schemas import MESSAGES
from schemas.preference import LOW_MARGIN, TOO_FEW, build_preferences


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
    # Candidates table: every scored candidate, in index order, with its score.
    cands = built.candidates
    schemas.validate(cands, kind="candidates", dataset="cands")
    assert [c["index"] for c in cands["candidates"][0]] == [0, 1, 2]
    assert [c["score"] for c in cands["candidates"][0]] == [0.5, 2.0, -1.0]
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
