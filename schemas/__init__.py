"""What the data looks like: column types, stable row ids, validation with clear errors.

Every row carries `id` (stable content hash), `parent_id` (row it was derived from, null for
roots) and `origin` (`stage@version`). Conversations are `messages: list<struct<role, content>>`.

Tool-calling conversations (OpenAI / TRL format) carry the optional message fields in
TOOL_FIELDS as extra struct fields: `tool_calls` (on an assistant turn, whose `content` may then
be null or ""), `tool_call_id` (on a tool turn) and `name`. Only columns whose input has them
get these fields, so plain conversations keep `list<struct<role, content>>` exactly. A parquet
struct has one set of fields per column, so a message without a field reads back with it null;
`clean_messages` removes those nulls again (what the row looked like when imported).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import polars as pl

from alignforge.errors import AlignforgeError

MESSAGE = pl.Struct({"role": pl.Utf8, "content": pl.Utf8})
MESSAGES = pl.List(MESSAGE)

# Columns every row has, whatever the stage.
LINEAGE = {"id": pl.Utf8, "parent_id": pl.Utf8, "origin": pl.Utf8}
# Filters add these; storage routes keep == False rows to rejected/ with the reason.
KEEP = {"keep": pl.Boolean, "drop_reason": pl.Utf8}


class SchemaError(AlignforgeError, ValueError):
    """Bad input: names the dataset, column and row, and says how to fix it."""

    def __init__(self, message: str, *, dataset: str | None = None, column: str | None = None,
                 row: int | str | None = None, fix: str | None = None):
        where = ", ".join(
            f"{k} {v!r}" for k, v in (("dataset", dataset), ("column", column), ("row", row)) if v is not None
        )
        text = f"{message}" + (f" (at {where})" if where else "") + (f". Fix: {fix}" if fix else "")
        super().__init__(text)
        self.dataset, self.column, self.row, self.fix = dataset, column, row, fix
        self.message = message


def stable_hash(*parts: Any, length: int = 16) -> str:
    """Deterministic hex digest of JSON-serialisable parts (same input -> same id on any machine)."""
    payload = json.dumps(parts, sort_keys=True, ensure_ascii=False, default=str, separators=(",", ":"))
    return digest_text(payload, length)


def digest_text(payload: str, length: int = 16) -> str:
    """stable_hash's digest of its JSON text (for callers that write that text themselves)."""
    # surrogatepass: a lone surrogate (e.g. from a "\\ud83d" JSON escape) hashes instead of raising;
    # it changes nothing for valid text.
    return hashlib.blake2b(payload.encode("utf-8", "surrogatepass"), digest_size=length // 2 if length <= 128 else 64).hexdigest()


def row_id(origin: str, *content: Any) -> str:
    """Stable id of a row: hash of the producing stage and the content that defines the row."""
    return stable_hash(origin, *content)


# ---------------------------------------------------------------------------------------------
# Row kinds. Each maps column -> dtype; frames may carry any extra columns (scores, metadata).
# ---------------------------------------------------------------------------------------------

ROLES = ("system", "user", "assistant", "tool")
# Optional message fields of tool-calling conversations (OpenAI / TRL / HF chat-template format):
# tool_calls: [{id, type: "function", function: {name, arguments}}] on an assistant turn,
# tool_call_id on a tool turn answering that call, name (tool / participant name).
TOOL_FIELDS = ("tool_calls", "tool_call_id", "name")
# One candidate answer of a listwise / pluralistic row; stages may add fields (seed, reward...).
CANDIDATE = pl.Struct({"content": pl.Utf8, "score": pl.Float64})
CANDIDATES = pl.List(CANDIDATE)

SFT = {**LINEAGE, "messages": MESSAGES}
# Prompts before any response exists (Magpie / Self-Align output), a plain string column.
INSTRUCTIONS = {**LINEAGE, "instruction": pl.Utf8}
# TRL explicit-prompt conversational preference format: chosen/rejected hold the assistant turn.
PREFERENCE = {**LINEAGE, "prompt": MESSAGES, "chosen": MESSAGES, "rejected": MESSAGES,
              "score_chosen": pl.Float64, "score_rejected": pl.Float64}
CANDIDATES_ROW = {**LINEAGE, "prompt": MESSAGES, "candidates": CANDIDATES}

KINDS: dict[str, dict[str, pl.DataType]] = {
    "sft": SFT,
    "instructions": INSTRUCTIONS,
    "preference": PREFERENCE,
    "candidates": CANDIDATES_ROW,
}
# Columns that may be null in every row (so an all-null polars column of dtype Null is fine too).
NULLABLE = {"parent_id", "score_chosen", "score_rejected", "drop_reason"}
# Known column dtypes, used to give all-null (dtype Null) columns their real type before writing.
KNOWN_DTYPES: dict[str, pl.DataType] = {**KEEP}
for _kind in KINDS.values():
    KNOWN_DTYPES.update(_kind)


def schema_of(kind: str) -> dict[str, pl.DataType]:
    try:
        return dict(KINDS[kind])
    except KeyError:
        raise SchemaError(f"unknown row kind {kind!r}", fix=f"use one of {sorted(KINDS)}") from None


def empty(kind: str) -> pl.DataFrame:
    """A zero-row frame with the columns of `kind` (what a shard with no rows looks like)."""
    return pl.DataFrame(schema=schema_of(kind))


def conform(df: pl.DataFrame) -> pl.DataFrame:
    """Give all-null columns of known names their real dtype (e.g. `parent_id` of a root stage)."""
    casts = [pl.col(name).cast(KNOWN_DTYPES[name]) for name, dtype in df.schema.items()
             if name in KNOWN_DTYPES and _has_null_dtype(dtype)]
    return df.with_columns(casts) if casts else df


def _has_null_dtype(dtype: pl.DataType) -> bool:
    if dtype == pl.Null:
        return True
    if isinstance(dtype, (pl.List, pl.Array)):
        return _has_null_dtype(dtype.inner)
    if isinstance(dtype, pl.Struct):
        return any(_has_null_dtype(f.dtype) for f in dtype.fields)
    return False


# ---------------------------------------------------------------------------------------------
# Message helpers
# ---------------------------------------------------------------------------------------------

def message(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


def to_messages(prompt: str | list | None = None, response: str | None = None, *,
                system: str | None = None) -> list[dict[str, str]]:
    """Build a conversation: optional system turn, the user prompt (a string, or a message list
    used as is, tool fields included), then the assistant response if given."""
    out: list[dict[str, str]] = []
    if system:
        out.append(message("system", system))
    if isinstance(prompt, str):
        out.append(message("user", prompt))
    elif prompt is not None:
        out.extend(clean_messages(prompt))
    if response is not None:
        out.append(message("assistant", response))
    return out


def clean_messages(messages: list | None) -> list[dict[str, Any]] | None:
    """Messages as plain dicts without null optional fields: `role` and `content` always (content
    may be null on a tool-calling assistant turn), tool fields and others only where set. Undoes
    the nulls a struct column adds to messages that lacked a field other messages have."""
    if messages is None:
        return None
    out = []
    for m in messages:
        m = {k: v for k, v in dict(m).items() if k in ("role", "content") or v is not None}
        if m.get("tool_calls") is not None:  # calls of one column share fields too (id, type...)
            m["tool_calls"] = [_drop_nulls(call) for call in m["tool_calls"]]
        out.append(m)
    return out


def _drop_nulls(call: dict) -> dict:
    call = {k: v for k, v in dict(call).items() if v is not None}
    if isinstance(call.get("function"), dict):
        call["function"] = {k: v for k, v in call["function"].items() if v is not None}
    return call


def assistant_turn(text: str) -> list[dict[str, str]]:
    """`chosen` / `rejected` value of a preference row: a list of one assistant message."""
    return [message("assistant", text)]


def candidate(content: str, score: float | None = None, **extra: Any) -> dict[str, Any]:
    return {"content": content, "score": score, **extra}


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------

def validate(df: pl.DataFrame, kind: str = "sft", *, dataset: str | None = None) -> pl.DataFrame:
    """Check `df` holds rows of `kind`; return it unchanged, or raise SchemaError at the first bad
    row naming dataset, column and row index (and its id), and saying how to fix it.

    Checks: required columns present with the right dtype; `id` non-null and unique; message
    lists non-empty with known roles and non-empty content (an assistant turn with tool_calls may
    have null / empty content); SFT conversations end with an assistant turn; preference
    `chosen`/`rejected` start and end with an assistant turn (the rest of a multi-turn
    continuation may sit between); candidates have content.
    Rows already quarantined (`keep == False`) are only checked for ids: their content may be
    the very reason they were dropped.
    """
    expected = schema_of(kind)
    for column, dtype in expected.items():
        if column not in df.columns:
            raise SchemaError(
                f"missing column {column!r} for {kind} rows; found columns {df.columns}",
                dataset=dataset, column=column,
                fix=_missing_fix(column, kind))
        actual = df.schema[column]
        if not _dtype_ok(actual, dtype, nullable=column in NULLABLE):
            raise SchemaError(
                f"column {column!r} has dtype {actual}, expected {dtype}", dataset=dataset,
                column=column,
                fix=f"cast it, e.g. df.with_columns(pl.col({column!r}).cast({_dtype_src(dtype)}))"
                    if not isinstance(dtype, (pl.List, pl.Struct))
                    else "build it with schemas.to_messages(...) / schemas.candidate(...), or import "
                         "the file with schemas.mapping.load_rows(path, kind=...)")

    ids = df["id"]
    _first_bad(df, ids.is_null(), dataset, "id", "id is null",
               "give every row an id, e.g. schemas.row_id(origin, content)")
    _first_bad(df, ~ids.is_first_distinct(), dataset, "id", "duplicate id (an earlier row has it)",
               "ids must be unique; derive them from the row content and a per-row counter/seed")

    # Rows to check are marked, not filtered out: a filtered copy of a million-row frame cost
    # as much memory as the frame.
    live = df.with_row_index("__row").with_columns(
        (pl.col("keep").fill_null(True) if "keep" in df.columns else pl.lit(True)).alias(_LIVE))
    if kind == "instructions":
        text = pl.col("instruction")
        _first_bad_expr(live, text.is_null() | (text.str.strip_chars() == ""), dataset, "instruction",
                        "instruction is empty or null",
                        "drop the row or mark it keep=False with a drop_reason")
    message_columns = [c for c, t in expected.items() if t == MESSAGES]
    for column in message_columns:
        _check_messages(live, column, dataset, kind)
    if kind == "candidates":
        cands = pl.col("candidates")
        _first_bad_expr(live, cands.is_null() | (cands.list.len() == 0), dataset, "candidates",
                        "candidates list is empty or null", "give each prompt at least one candidate")
        content = pl.element().struct.field("content")
        _first_bad_expr(live, cands.list.eval(content.is_null() | (content.str.strip_chars() == "")).list.any(),
                        dataset, "candidates", "a candidate has empty or null content",
                        "remove empty candidates or mark the row keep=False with a drop_reason")
    return df


def _missing_fix(column: str, kind: str) -> str:
    if column in LINEAGE:
        return ("add lineage columns id / parent_id / origin (schemas.mapping.load_rows adds them "
                "for imported files)")
    return f"add column {column!r}, or import the file with schemas.mapping.load_rows(path, kind={kind!r}, mapping={{{column!r}: '<your column>'}})"


def _dtype_src(dtype: pl.DataType) -> str:
    return f"pl.{dtype}"


def _dtype_ok(actual: pl.DataType, expected: pl.DataType, *, nullable: bool) -> bool:
    if actual == expected:
        return True
    if actual == pl.Null:
        return nullable
    if expected == pl.Float64:
        return actual.is_numeric()
    if isinstance(expected, pl.List) and isinstance(actual, pl.List):
        return _dtype_ok(actual.inner, expected.inner, nullable=False)
    if isinstance(expected, pl.Struct) and isinstance(actual, pl.Struct):
        # Extra struct fields are fine (candidates carry seeds, rewards...); required ones must match.
        fields = {f.name: f.dtype for f in actual.fields}
        return all(f.name in fields and _dtype_ok(fields[f.name], f.dtype, nullable=True)
                   for f in expected.fields)
    return False


def _first_bad(df: pl.DataFrame, mask: pl.Series, dataset, column, what, fix) -> None:
    if mask.any():
        index = int(mask.arg_true()[0])
        raise SchemaError(f"{what}{_describe(df, index, column)}", dataset=dataset, column=column,
                          row=index, fix=fix)


_LIVE = "__live"


def _first_bad_expr(live: pl.DataFrame, expr: pl.Expr, dataset, column, what, fix) -> None:
    bad = live.filter(pl.col(_LIVE) & expr.fill_null(True)).head(1)
    if bad.height:
        index = int(bad["__row"][0])
        raise SchemaError(f"{what}{_describe(bad, 0, column)}", dataset=dataset, column=column,
                          row=index, fix=fix)


def _describe(df: pl.DataFrame, index: int, column: str) -> str:
    parts = []
    if "id" in df.columns and column != "id":
        parts.append(f"id {df['id'][index]!r}")
    value = df[column][index]
    if isinstance(value, pl.Series):
        value = value.to_list()
    text = repr(value)
    parts.append(f"value {text[:200] + '...' if len(text) > 200 else text}")
    return " [" + ", ".join(parts) + "]"


def _check_messages(live: pl.DataFrame, column: str, dataset, kind: str) -> None:
    col = pl.col(column)
    fix = f"every message needs a role in {list(ROLES)} and non-empty string content; " \
          "drop the row or mark it keep=False with a drop_reason"
    _first_bad_expr(live, col.is_null() | (col.list.len() == 0), dataset, column,
                    "message list is empty or null", fix)
    role = pl.element().struct.field("role")
    content = pl.element().struct.field("content")
    _first_bad_expr(live, col.list.eval(~role.is_in(ROLES).fill_null(False)).list.any(), dataset, column,
                    "message with an unknown role", fix)
    no_content = content.is_null() | content.str.contains(r"^\s*$")  # = strip_chars() == "", without a copy
    fields = _message_fields(live.schema[column])
    if "tool_calls" in fields:  # an assistant tool call needs no text
        calls = (pl.element().struct.field("tool_calls").list.len() > 0).fill_null(False)
        no_content = no_content & ~(calls & (role == "assistant"))
    _first_bad_expr(live, col.list.eval(no_content).list.any(),
                    dataset, column, "message with empty or null content", fix)
    last_role = col.list.last().struct.field("role")
    first_role = col.list.first().struct.field("role")
    if kind == "sft" and column == "messages":
        _first_bad_expr(live, last_role != "assistant", dataset, column,
                        "conversation does not end with an assistant turn",
                        "SFT rows need the assistant's answer last; generate a response or drop the row")
    if kind in ("preference", "candidates") and column == "prompt":
        _first_bad_expr(live, last_role == "assistant", dataset, column,
                        "prompt ends with an assistant turn",
                        "the prompt holds the conversation up to the user turn; put answers in chosen/rejected")
    if kind == "preference" and column in ("chosen", "rejected"):
        _first_bad_expr(live, (first_role != "assistant") | (last_role != "assistant"), dataset, column,
                        f"{column} does not start and end with an assistant turn",
                        f"{column} holds the answer (TRL explicit-prompt format): "
                        "[{'role': 'assistant', 'content': ...}], optionally followed by later turns of the "
                        "same conversation; move the prompt into `prompt`")


def _message_fields(dtype: pl.DataType) -> set[str]:
    if isinstance(dtype, pl.List) and isinstance(dtype.inner, pl.Struct):
        return {f.name for f in dtype.inner.fields}
    return set()
