"""The text a filter looks at, taken from whichever row layout we were given.

Rows come as SFT (`messages`), instruction pools (`instruction`, optional `response`), or
preference (`prompt` + `chosen`/`rejected`, each a message list or a plain string). Filters read
text only through these helpers so every filter agrees on what "the instruction" and "the
conversation" of a row are.

Also holds `mark_drops`, the one way a filter annotates `keep` / `drop_reason`: an earlier
drop reason is never overwritten (AND-combine), so a row's reason is the first filter that
rejected it.
"""

from __future__ import annotations

from typing import Literal

import polars as pl

from schemas import SchemaError

TextOn = Literal["instruction", "conversation"]

# Reasons every filter may give for rows it cannot score.
EMPTY_TEXT = "empty_text"
INVALID_UTF8 = "invalid_utf8"

_TEXT_COLUMNS = ("messages", "instruction", "prompt")


def _as_utf8(df: pl.DataFrame, column: str) -> pl.Expr:
    """A text column as Utf8; binary columns decode strictly (bad bytes -> null, flagged by callers)."""
    dtype = df.schema[column]
    if dtype == pl.Binary:
        return pl.col(column).map_elements(_decode_or_none, return_dtype=pl.Utf8)
    return pl.col(column).cast(pl.Utf8)


def _decode_or_none(value: bytes | None) -> str | None:
    if value is None:
        return None
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _messages_text(column: str, role: str | None, *, first: bool = False, last: bool = False) -> pl.Expr:
    """Contents of a messages column, optionally one role only, joined by blank lines."""
    msgs = pl.col(column)
    if role is not None:
        msgs = msgs.list.eval(pl.element().filter(pl.element().struct.field("role") == role))
    contents = msgs.list.eval(pl.element().struct.field("content"))
    if first:
        return contents.list.first()
    if last:
        return contents.list.last()
    return contents.list.join("\n\n")


def _side_text(df: pl.DataFrame, column: str, *, role: str | None, first: bool = False,
               last: bool = False) -> pl.Expr:
    """Text of a column that may be a message list or a plain string / binary."""
    dtype = df.schema[column]
    if isinstance(dtype, pl.List):
        return _messages_text(column, role, first=first, last=last)
    return _as_utf8(df, column)


def _require_text_columns(df: pl.DataFrame, what: str) -> None:
    if not any(c in df.columns for c in _TEXT_COLUMNS):
        raise SchemaError(
            f"no text to read for {what}: expected one of the columns {list(_TEXT_COLUMNS)}, "
            f"got {df.columns}",
            column=None,
            fix="map your file with schemas.mapping.load_rows(path, mapping=...) first, or name the "
                "instruction column 'instruction'",
        )


def instruction_expr(df: pl.DataFrame) -> pl.Expr:
    """The (first) user instruction of each row."""
    _require_text_columns(df, "the instruction")
    if "instruction" in df.columns:
        return _as_utf8(df, "instruction")
    if "messages" in df.columns:
        return _side_text(df, "messages", role="user", first=True)
    return _side_text(df, "prompt", role="user", first=True)


def conversation_expr(df: pl.DataFrame) -> pl.Expr:
    """Every turn of the row's conversation joined by blank lines (prompt + chosen for preference rows)."""
    _require_text_columns(df, "the conversation")
    if "messages" in df.columns:
        return _side_text(df, "messages", role=None)
    if "instruction" in df.columns:
        parts = [_as_utf8(df, "instruction")]
        if "response" in df.columns:
            parts.append(_as_utf8(df, "response"))
        return pl.concat_str(parts, separator="\n\n", ignore_nulls=True) if len(parts) > 1 else parts[0]
    parts = [_side_text(df, "prompt", role=None)]
    if "chosen" in df.columns:
        parts.append(_side_text(df, "chosen", role=None))
    return pl.concat_str(parts, separator="\n\n", ignore_nulls=True)


def response_expr(df: pl.DataFrame) -> pl.Expr | None:
    """The (last) assistant response of each row, or None when the layout has no response."""
    if "messages" in df.columns:
        return _side_text(df, "messages", role="assistant", last=True)
    if "response" in df.columns:
        return _as_utf8(df, "response")
    if "chosen" in df.columns:
        return _side_text(df, "chosen", role="assistant", last=True)
    return None


def message_texts_expr(df: pl.DataFrame) -> pl.Expr:
    """Each message of the row's conversation as its own text (a list per row, nulls as "").

    The same turns as `conversation_expr` (prompt + chosen for preference rows), not joined:
    per-message checks (repetition) must not count a response quoting its instruction."""
    _require_text_columns(df, "the messages")

    def side(column: str) -> pl.Expr:
        if isinstance(df.schema[column], pl.List):
            return pl.col(column).list.eval(pl.element().struct.field("content").fill_null("")).fill_null([])
        return pl.concat_list([_as_utf8(df, column).fill_null("")])

    if "messages" in df.columns:
        return side("messages")
    if "instruction" in df.columns:
        columns = ["instruction", *(["response"] if "response" in df.columns else [])]
    else:
        columns = ["prompt", *(["chosen"] if "chosen" in df.columns else [])]
    parts = [side(c) for c in columns]
    return pl.concat_list(parts) if len(parts) > 1 else parts[0]


def message_texts(df: pl.DataFrame) -> list[list[str]]:
    """`message_texts_expr` evaluated: one list of message texts per row."""
    if df.height == 0:
        return []
    return [list(m or []) for m in df.select(message_texts_expr(df).alias("m")).to_series().to_list()]


def row_text(df: pl.DataFrame, on: TextOn = "instruction") -> pl.Series:
    """The text of each row a filter scores: the instruction only, or the whole conversation."""
    if on == "instruction":
        expr = instruction_expr(df)
    elif on == "conversation":
        expr = conversation_expr(df)
    else:
        raise ValueError(f"on={on!r} is not a text view; use 'instruction' or 'conversation'")
    if df.height == 0:
        return pl.Series("text", [], dtype=pl.Utf8)
    return df.select(expr.alias("text")).to_series()


def unusable_text_reason(df: pl.DataFrame, texts: pl.Series) -> pl.Series:
    """Per row: why its text cannot be scored (invalid UTF-8 bytes, missing/blank), else null."""
    if df.height == 0:
        return pl.Series("reason", [], dtype=pl.Utf8)
    invalid = pl.Series([False] * df.height)
    for column in _TEXT_COLUMNS + ("response", "chosen"):
        if column in df.columns and df.schema[column] == pl.Binary:
            raw = df[column]
            invalid = invalid | (raw.is_not_null() & df.select(_as_utf8(df, column)).to_series().is_null())
    blank = texts.is_null() | (texts.str.strip_chars().str.len_bytes() == 0)
    return (
        pl.select(
            pl.when(invalid).then(pl.lit(INVALID_UTF8))
            .when(blank).then(pl.lit(EMPTY_TEXT))
            .otherwise(pl.lit(None, dtype=pl.Utf8))
            .alias("reason")
        ).to_series()
        if df.height else pl.Series("reason", [], dtype=pl.Utf8)
    )


from alignforge.step import carry_drops as mark_drops  # noqa: E402  (one implementation, re-exported)
