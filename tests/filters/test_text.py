import polars as pl
import pytest

from filters.text import (EMPTY_TEXT, INVALID_UTF8, mark_drops, message_texts, response_expr, row_text,
                          unusable_text_reason)
from schemas import MESSAGES, SchemaError


def msgs(*pairs):
    return [{"role": r, "content": c} for r, c in pairs]


def test_instruction_and_conversation_from_messages():
    df = pl.DataFrame({"messages": [msgs(("system", "be nice"), ("user", "hi"), ("assistant", "hello"),
                                         ("user", "more"), ("assistant", "sure"))]},
                      schema={"messages": MESSAGES})
    assert row_text(df, "instruction").to_list() == ["hi"]
    assert row_text(df, "conversation").to_list() == ["be nice\n\nhi\n\nhello\n\nmore\n\nsure"]
    assert df.select(response_expr(df)).to_series().to_list() == ["sure"]


def test_instruction_column_and_response():
    df = pl.DataFrame({"instruction": ["a", None], "response": ["b", "c"]})
    assert row_text(df, "instruction").to_list() == ["a", None]
    assert row_text(df, "conversation").to_list() == ["a\n\nb", "c"]


def test_preference_prompt_messages_or_strings():
    df = pl.DataFrame({"prompt": [msgs(("user", "q?"))], "chosen": [msgs(("assistant", "yes"))]},
                      schema={"prompt": MESSAGES, "chosen": MESSAGES})
    assert row_text(df, "instruction").to_list() == ["q?"]
    assert row_text(df, "conversation").to_list() == ["q?\n\nyes"]
    df2 = pl.DataFrame({"prompt": ["q2"], "chosen": ["a2"]})
    assert row_text(df2, "conversation").to_list() == ["q2\n\na2"]


def test_no_text_column_is_a_clear_error():
    with pytest.raises(SchemaError, match="instruction"):
        row_text(pl.DataFrame({"x": [1]}))


def test_unusable_reasons_for_binary_and_blank():
    df = pl.DataFrame({"instruction": [b"ok", b"\xff\xfe bad", b"  ", None]}, schema={"instruction": pl.Binary})
    texts = row_text(df)
    assert texts.to_list()[0] == "ok"
    assert unusable_text_reason(df, texts).to_list() == [None, INVALID_UTF8, EMPTY_TEXT, EMPTY_TEXT]


def test_mark_drops_never_overwrites_an_earlier_reason():
    df = pl.DataFrame({"keep": [True, False, True], "drop_reason": [None, "first", None]})
    out = mark_drops(df, pl.Series([None, "second", "second"], dtype=pl.Utf8))
    assert out["keep"].to_list() == [True, False, False]
    assert out["drop_reason"].to_list() == [None, "first", "second"]
    fresh = mark_drops(pl.DataFrame({"a": [1, 2]}), pl.Series([None, "x"], dtype=pl.Utf8))
    assert fresh["keep"].to_list() == [True, False] and fresh["drop_reason"].to_list() == [None, "x"]


def test_message_texts_keep_each_turn_apart():
    convo = pl.DataFrame({"messages": [msgs(("user", "q"), ("assistant", None)), None, []]}, schema={"messages": MESSAGES})
    assert message_texts(convo) == [["q", ""], [], []]
    pool = pl.DataFrame({"instruction": ["a", None], "response": ["b", "c"]})
    assert message_texts(pool) == [["a", "b"], ["", "c"]]
    pref = pl.DataFrame({"prompt": [msgs(("system", "s"), ("user", "q"))], "chosen": ["yes"]},
                        schema={"prompt": MESSAGES, "chosen": pl.Utf8})
    assert message_texts(pref) == [["s", "q", "yes"]]
    assert message_texts(pool.head(0)) == []
