"""The columnar path of `schemas.mapping.load_rows`: SFT rows imported with polars expressions,
without a Python object per row (a million-row parquet file used to cost ~6 GiB of dicts).

It covers a polars frame (a parquet file, a published or stage folder, a DataFrame) whose layout is
`instruction` + `output` / `response` [+ `input`, `system`] with text columns, or `messages` stored
as list<struct<role, content>> [+ `system`]. Each row is either clean, meaning expressions show it
passes every check of the row importer with nothing to repair (canonical roles, no blank or null
text, ends with an assistant turn, no own system turn to compare with a `system` column), or it
goes through the row importer itself (`mapping._import_row`), so quarantine reasons and errors are
the row importer's by construction. Ids hash the same JSON text `schemas.row_id` hashes, written by
polars (keys sorted, json.dumps(ensure_ascii=False) escapes); only the digest is a Python call per
row. Anything else (other kinds, JSON input, `roles=`, other dtypes, tool fields) returns None and
the row importer runs. tests/schemas/test_columnar.py checks the two paths give identical frames.
"""

from __future__ import annotations

import json
from typing import Any

import polars as pl

from schemas import KEEP, MESSAGES, ROLES, digest_text, row_id, schema_of, validate

# Python's str.strip()/isspace() also count \x1c-\x1f as whitespace; regex \s (Unicode White_Space)
# does not, so they are added to agree with the row importer's `not text.strip()`.
_BLANK = r"^[\s\x1c-\x1f]*$"
# json.dumps(ensure_ascii=False) escapes: these two, the five short forms, other controls as \u00XX.
_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t", "\b": "\\b", "\f": "\\f"}
_ESCAPES.update({chr(c): f"\\u{c:04x}" for c in range(0x20) if chr(c) not in _ESCAPES})
_TEXT_DTYPES = (pl.Utf8, pl.Null)
_INT_DTYPES = (pl.Int8, pl.Int16, pl.Int32, pl.Int64, pl.UInt8, pl.UInt16, pl.UInt32, pl.UInt64)
_LINEAGE = ("id", "parent_id", "origin")
_LAYOUTS = ("messages", "instruction_output", "instruction_response")
_STEP = 50_000  # rows per slice where whole-frame temporaries would cost memory


def import_frame(frame: pl.DataFrame, columns: list[str], consumed: set[str], ctx: Any, name: str,
                 origin: str) -> pl.DataFrame | None:
    """`frame` imported as load_rows would import it, or None where this path does not apply."""
    from schemas.mapping import MESSAGE_EXTRAS

    if ctx.kind != "sft" or ctx.layout not in _LAYOUTS:
        return None
    df = frame.select([pl.col(ctx.col(c)).alias(c) for c in columns])
    if not _dtypes_supported(df.schema, consumed, MESSAGE_EXTRAS):
        return None
    text = [c for c in consumed if c != "messages"]
    df = df.with_columns(pl.col(c).cast(pl.Utf8) for c in text)
    clean, messages = _clean_and_messages(ctx.layout, consumed)
    upstream = (pl.col("keep") == False).fill_null(False) if "keep" in columns else pl.lit(False)  # noqa: E712
    given = pl.col("drop_reason") if "drop_reason" in columns else pl.lit(None, dtype=pl.Utf8)
    columns_out = [
        pl.when(clean).then(messages).alias("messages"),
        (~upstream).alias("keep"),
        pl.when(upstream).then(pl.when(given != "").then(given).otherwise(pl.lit("unknown")))
        .otherwise(pl.lit(None, dtype=pl.Utf8)).alias("drop_reason"),
        clean.fill_null(False).alias("__clean")]
    # A slice at a time: building the messages of all rows at once held ~1.4x their size in temporaries.
    body = pl.concat([df.slice(start, _STEP).select(columns_out) for start in range(0, max(df.height, 1), _STEP)],
                     rechunk=False)
    fallback = body.with_row_index("__row").filter(~pl.col("__clean"))["__row"].to_list()
    body = body.drop("__clean")
    if fallback:
        body = _with_row_importer(body, df, fallback, ctx, name)
        if body is None:
            return None
    ids, source_id = _ids(df, body, columns, origin)
    out = {"messages": body["messages"]}
    extras = [c for c in columns if c not in consumed and c not in _LINEAGE and c not in schema_of("sft")
              and c not in KEEP and c != MESSAGE_EXTRAS]
    out.update({c: df[c] for c in extras})
    if MESSAGE_EXTRAS in columns and df[MESSAGE_EXTRAS].null_count() < df.height:
        out[MESSAGE_EXTRAS] = df[MESSAGE_EXTRAS].cast(pl.Utf8)
    if source_id is not None:
        out["source_id"] = source_id
    out["id"] = ids
    out["parent_id"] = (df["parent_id"].cast(pl.Utf8) if "parent_id" in columns
                        else pl.repeat(None, df.height, dtype=pl.Utf8, eager=True))
    out["origin"] = (df.select(pl.when(pl.col("origin").is_null() | (pl.col("origin") == "")).then(pl.lit(origin))
                               .otherwise(pl.col("origin"))).to_series()
                     if "origin" in columns else pl.repeat(origin, df.height, dtype=pl.Utf8, eager=True))
    out["keep"], out["drop_reason"] = body["keep"], body["drop_reason"]
    result = pl.DataFrame({k: v.alias(k) for k, v in out.items()})
    ordered = list(schema_of("sft")) + extras + [c for c in (MESSAGE_EXTRAS, "source_id") if c in out] + list(KEEP)
    return validate(result.select(ordered), "sft", dataset=name)


def _dtypes_supported(schema: pl.Schema, consumed: set[str], message_extras: str) -> bool:
    def absent_or(column: str, *dtypes) -> bool:
        return column not in schema or schema[column] in dtypes

    if "messages" in consumed and schema["messages"] != MESSAGES:
        return False
    return (all(schema[c] in _TEXT_DTYPES for c in consumed if c != "messages")
            and absent_or("keep", pl.Boolean, pl.Null) and absent_or("drop_reason", *_TEXT_DTYPES)
            and absent_or(message_extras, *_TEXT_DTYPES) and absent_or("origin", *_TEXT_DTYPES)
            and absent_or("id", *_TEXT_DTYPES, *_INT_DTYPES) and absent_or("parent_id", *_TEXT_DTYPES, *_INT_DTYPES))


def _missing_or_blank(expr: pl.Expr) -> pl.Expr:
    return expr.is_null() | expr.str.contains(_BLANK).fill_null(False)


def _message(role: str, content: pl.Expr) -> pl.Expr:
    return pl.struct(pl.lit(role).alias("role"), content.alias("content"))


def _clean_and_messages(layout: str, consumed: set[str]) -> tuple[pl.Expr, pl.Expr]:
    """(row passes every row-importer check untouched, its messages) as expressions."""
    system = pl.col("system") if "system" in consumed else pl.lit(None, dtype=pl.Utf8)
    has_system = ~_missing_or_blank(system)
    if layout == "messages":
        conversation, element = pl.col("messages"), pl.element()
        role, content = element.struct.field("role"), element.struct.field("content")
        bad = (element.is_null() | role.is_null() | ~role.is_in(list(ROLES)) | _missing_or_blank(content)).fill_null(True)
        first_role = conversation.list.first().struct.field("role")
        clean = (conversation.is_not_null() & (conversation.list.len() > 0)
                 & ~conversation.list.eval(bad).list.any()
                 & (conversation.list.last().struct.field("role") == "assistant")
                 # an own system turn must be compared with the column's (stripped): row importer
                 & ~(has_system & (first_role == "system")))
        messages = pl.when(has_system).then(pl.concat_list([_message("system", system), conversation])) \
            .otherwise(conversation)
        return clean, messages
    answer = pl.col("output" if layout == "instruction_output" else "response")
    instruction = pl.col("instruction")
    clean = ~_missing_or_blank(instruction) & ~_missing_or_blank(answer)
    if "input" in consumed:
        extra = pl.col("input")
        user = pl.when(~_missing_or_blank(extra)).then(pl.concat_str([instruction, pl.lit("\n\n"), extra])) \
            .otherwise(instruction)
    else:
        user = instruction
    turns = [_message("user", user), _message("assistant", answer)]
    messages = pl.when(has_system).then(pl.concat_list([_message("system", system), *turns])) \
        .otherwise(pl.concat_list(turns))
    return clean, messages


def _with_row_importer(body: pl.DataFrame, df: pl.DataFrame, fallback: list[int], ctx: Any,
                       name: str) -> pl.DataFrame | None:
    """`body` with the `fallback` rows built by the row importer (None: they need tool fields or
    message extras, which change the column's type: the whole file goes the row way)."""
    from schemas.mapping import _import_row, _to_frame

    raws = df[fallback].to_dicts()
    built = []
    for index, raw in zip(fallback, raws):
        values = _import_row(index, raw, raws, ctx, False, name)
        if ctx.extras or any(set(m) != {"role", "content"} for m in values["messages"] or ()):
            return None
        built.append(values)
    rebuilt = _to_frame(built, raws, "sft", [], None, ctx.names).select(body.columns)
    rows = pl.Series("__row", fallback, dtype=pl.UInt32)
    return (pl.concat([body.with_row_index("__row").filter(~pl.col("__row").is_in(rows)),
                       rebuilt.select(rows, *body.columns)], how="vertical")
            .sort("__row").drop("__row"))


def _json_string(expr: pl.Expr) -> pl.Expr:
    return pl.when(expr.is_null()).then(pl.lit("null")).otherwise(
        pl.concat_str([pl.lit('"'), expr.str.replace_many(_ESCAPES), pl.lit('"')]))


def _ids(df: pl.DataFrame, body: pl.DataFrame, columns: list[str], origin: str) -> tuple[pl.Series, pl.Series | None]:
    """(id, source_id or None) exactly as mapping._assign_lineage gives them."""
    if "id" in columns:
        given = df["id"].cast(pl.Utf8)
        usable = given.to_frame().select(pl.when(pl.col("id").str.contains(_BLANK)).then(None)
                                         .otherwise(pl.col("id"))).to_series()
        if usable.null_count() == 0 and usable.n_unique() == len(usable):
            return usable, None
        source_id = given.alias("source_id")
    else:
        source_id = None
    # The JSON text stable_hash(origin, messages) hashes, for rows with messages.
    element = pl.element()
    message = pl.concat_str([pl.lit('{"content":'), _json_string(element.struct.field("content")),
                             pl.lit(',"role":'), _json_string(element.struct.field("role")), pl.lit("}")])
    payload = pl.concat_str([pl.lit("[" + json.dumps(origin, ensure_ascii=False) + ",["),
                             pl.col("messages").list.eval(message).list.join(","), pl.lit("]]")])
    keys: list[str | None] = []
    for start in range(0, body.height, _STEP):  # the JSON text of all rows at once would double the memory
        texts = body.slice(start, _STEP).select(payload).to_series().to_list()
        keys.extend(None if p is None else digest_text(p) for p in texts)
    # Rows without messages (quarantined) hash their whole input row, as the row importer does.
    empty = [i for i, k in enumerate(keys) if k is None]
    for i, raw in zip(empty, df[empty].to_dicts() if empty else []):
        keys[i] = row_id(origin, raw)
    seen = pl.DataFrame({"k": keys}).select(pl.int_range(pl.len()).over("k")).to_series()
    repeats = (seen > 0).arg_true().to_list()
    if repeats:
        conversations = body["messages"][repeats].to_list()
        raws = df[repeats].to_dicts()
        for i, conversation, raw, n in zip(repeats, conversations, raws, seen[repeats].to_list()):
            keys[i] = row_id(origin, conversation if conversation is not None else raw, n)
    return pl.Series("id", keys, dtype=pl.Utf8), source_id
