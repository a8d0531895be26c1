"""Import user files into our row kinds.

`load_rows(source, mapping=None, kind="sft")` reads a parquet / JSONL / JSON file (local path or
fsspec URL such as `s3://bucket/x.jsonl`; a folder reads every such file in it, sorted), or takes
a polars DataFrame / list of dicts, and returns rows of `kind` with lineage columns.

Recognised layouts (after applying `mapping`):

| kind           | input columns                                              | becomes                                  |
|----------------|------------------------------------------------------------|------------------------------------------|
| sft            | `messages` [{role, content}]                               | `messages` as is                         |
| sft            | `conversations` [{from: human/gpt/system, value}] (ShareGPT) | `messages` (human->user, gpt->assistant) |
| sft            | `instruction` [+ `input`] + `output` or `response` [+ `system`] | `messages`: [system], user (instruction + blank line + input), assistant |
| sft            | `prompt` + `completion` or `response` (strings or message lists) | `messages`                          |
| instructions   | `instruction` [+ `input`], or `prompt`, or `messages`/`conversations` (first user turn) | `instruction` (plain string) |
| preference     | `chosen`, `rejected` [+ `prompt`] [+ `score_chosen`, `score_rejected`] | `prompt` (messages), `chosen`/`rejected` (list of one assistant message) |
| candidates     | `prompt` + `candidates` (or `completions`/`responses`): strings or {content/text, score} | `prompt`, `candidates: list<struct<content, score>>` |

Preference values may be strings (prompt -> one user message, chosen/rejected -> one assistant
message) or message lists. A `chosen` list that repeats the conversation (TRL implicit-prompt
format, e.g. UltraFeedback-binarized) is split: the turns up to the last non-assistant message
become `prompt`, the rest stay in `chosen`.

`mapping` is `{our_column: their_column}` and overrides detection, e.g.
`load_rows("qa.jsonl", mapping={"instruction": "question", "response": "answer"})` or
`load_rows("pairs.parquet", kind="preference", mapping={"prompt": "q", "chosen": "good", "rejected": "bad"})`.
Message roles accept ShareGPT aliases (human, gpt, model, bot, function...); `roles={"narrator": "system"}`
adds your own.

Lineage: an existing `id` column is kept when it is non-null and unique (as strings); otherwise
the old column is kept as `source_id` and ids are content hashes (`schemas.row_id("import@1", ...)`;
exact repeats get a counter, so ids stay unique and stable across reruns). `parent_id` is null,
`origin` is "import@1" (existing `parent_id` / `origin` columns are kept). Other columns are
carried along unchanged.

Bad input, decided as follows:
- whole-file problems are errors (SchemaError naming the file, line and fix): file not UTF-8,
  invalid JSON, unreadable parquet, no recognisable columns (the error lists the columns found and
  the `mapping=` to pass), a value of the wrong type, an unknown role.
- row-level gaps are quarantined, never silently dropped: a null/missing value, empty message
  content, an empty conversation, an SFT conversation not ending with an assistant turn, or a
  preference/candidates row without an answer gets `keep=False` and
  `drop_reason="import:<reason>"`. Every result has `keep` and `drop_reason` columns; storage writes
  `keep == False` rows to `rejected/`.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from typing import Any, Iterable

import polars as pl

from schemas import (CANDIDATES, KEEP, MESSAGES, SchemaError, row_id, schema_of, validate)

ORIGIN = "import@1"
FILE_SUFFIXES = (".parquet", ".jsonl", ".ndjson", ".json")

ROLE_ALIASES = {
    "system": "system", "user": "user", "human": "user", "prompter": "user", "question": "user",
    "assistant": "assistant", "gpt": "assistant", "model": "assistant", "bot": "assistant",
    "chatgpt": "assistant", "bard": "assistant", "bing": "assistant", "answer": "assistant",
    "tool": "tool", "function": "tool", "observation": "tool", "ipython": "tool",
}

# Which of our logical columns each layout consumes (so the rest are carried as extra columns).
_LAYOUTS = {
    "sft": [
        ("messages", ("messages",)),
        ("sharegpt", ("conversations",)),
        ("instruction_output", ("instruction", "output")),
        ("instruction_response", ("instruction", "response")),
        ("prompt_completion", ("prompt", "completion")),
        ("prompt_response", ("prompt", "response")),
    ],
    "instructions": [
        ("instruction", ("instruction",)),
        ("prompt", ("prompt",)),
        ("messages", ("messages",)),
        ("sharegpt", ("conversations",)),
    ],
    "preference": [("preference", ("chosen", "rejected"))],
    "candidates": [
        ("candidates", ("prompt", "candidates")),
        ("completions", ("prompt", "completions")),
        ("responses", ("prompt", "responses")),
    ],
}
_OPTIONAL = {"input", "system", "prompt", "score_chosen", "score_rejected"}
_LINEAGE_COLUMNS = ("id", "parent_id", "origin")


class _Quarantine(Exception):
    """A row-level gap: the row is kept with keep=False and this reason (plus what could be built)."""

    def __init__(self, reason: str, values: dict[str, Any] | None = None):
        super().__init__(reason)
        self.reason, self.values = reason, values or {}


def load_rows(source: Any, mapping: dict[str, str] | None = None, kind: str = "sft", *,
              dataset: str | None = None, roles: dict[str, str] | None = None,
              origin: str = ORIGIN) -> pl.DataFrame:
    """Read `source` (path / fsspec URL / folder / DataFrame / list of dicts) as rows of `kind`.

    See the module docstring for the accepted layouts and how bad input is handled.
    """
    schema_of(kind)  # unknown kind -> clear error
    name = dataset or (str(source) if isinstance(source, (str, os.PathLike)) else "<dataframe>")
    rows, columns = _read_source(source, name)
    rows, columns = _apply_mapping(rows, columns, mapping, name, kind)
    layout, consumed = _detect_layout(columns, kind, name, mapping)
    role_map = {**ROLE_ALIASES, **{k.lower(): v for k, v in (roles or {}).items()}}

    built: list[dict[str, Any]] = []
    for index, row in enumerate(rows):
        try:
            values, reason = _build_row(row, kind, layout, role_map), None
        except _Quarantine as q:
            values, reason = {**_partial(row, kind), **q.values}, f"import:{q.reason}"
        except SchemaError as e:
            raise SchemaError(e.message, dataset=name, column=e.column,
                              row=index, fix=e.fix) from None
        values["keep"], values["drop_reason"] = reason is None, reason
        built.append(values)

    extras = [c for c in columns if c not in consumed and c not in _LINEAGE_COLUMNS
              and c not in schema_of(kind) and c not in KEEP]
    df = _to_frame(built, rows, kind, extras)
    df = _assign_lineage(df, rows, columns, kind, origin)
    ordered = list(schema_of(kind)) + extras + [c for c in df.columns if c not in schema_of(kind)
                                               and c not in extras and c not in KEEP] + list(KEEP)
    df = df.select(ordered)
    return validate(df, kind, dataset=name)


# ------------------------------------------------------------------------------------- reading

def _read_source(source: Any, name: str) -> tuple[list[dict], list[str]]:
    if isinstance(source, pl.LazyFrame):
        source = source.collect()
    if isinstance(source, pl.DataFrame):
        return source.to_dicts(), list(source.columns)
    if isinstance(source, list):
        columns: dict[str, None] = {}
        for row in source:
            if not isinstance(row, dict):
                raise SchemaError(f"expected a list of dicts, got an item of type {type(row).__name__}",
                                  dataset=name, fix="pass rows as dicts of column -> value")
            columns.update(dict.fromkeys(row))
        return source, list(columns)
    if hasattr(source, "to_dict") and hasattr(source, "columns"):  # pandas
        frame = pl.from_pandas(source)
        return frame.to_dicts(), list(frame.columns)
    if not isinstance(source, (str, os.PathLike)):
        raise SchemaError(f"cannot read rows from a {type(source).__name__}", dataset=name,
                          fix="pass a path / fsspec URL, a polars DataFrame or a list of dicts")
    import fsspec

    url = os.fspath(source)
    fs, path = fsspec.core.url_to_fs(url)
    if not fs.exists(path):
        raise SchemaError(f"no such file or folder: {url}", dataset=name,
                          fix="check the path (local path or fsspec URL like s3://bucket/file.jsonl)")
    if fs.isdir(path):
        files = sorted(p for p in fs.find(path) if p.endswith(FILE_SUFFIXES)
                       and not os.path.basename(p).startswith((".", "_")))
        if not files:
            raise SchemaError(f"folder {url} holds no {'/'.join(FILE_SUFFIXES)} files", dataset=name,
                              fix="point at a data file or a folder of them")
    else:
        files = [path]
    rows: list[dict] = []
    columns: dict[str, None] = {}
    for file in files:
        shown = fs.unstrip_protocol(file) if len(files) > 1 or "://" in url else url
        file_rows, file_columns = _read_file(fs, file, shown)
        rows.extend(file_rows)
        columns.update(dict.fromkeys(file_columns))
    return rows, list(columns)


def _read_file(fs, path: str, shown: str) -> tuple[list[dict], list[str]]:
    if path.endswith(".parquet"):
        try:
            with fs.open(path, "rb") as f:
                frame = pl.read_parquet(f)
        except Exception as e:  # noqa: BLE001 - any reader failure becomes one clear error
            raise SchemaError(f"cannot read parquet file: {type(e).__name__}: {e}", dataset=shown,
                              fix="check the file is a valid parquet file (e.g. pyarrow.parquet.read_table)") from None
        return frame.to_dicts(), list(frame.columns)
    with fs.open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise SchemaError(
            f"file is not valid UTF-8: byte 0x{data[e.start]:02x} at line {line}", dataset=shown,
            row=f"line {line}",
            fix=f"re-encode the file as UTF-8, e.g. `iconv -f latin1 -t utf-8 {shown} > fixed.jsonl`") from None
    if path.endswith(".json") and text.lstrip()[:1] in ("[", "{"):
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            if text.lstrip().startswith("{"):  # maybe JSON lines with a .json suffix
                return _parse_json_lines(text, shown)
            raise SchemaError(f"invalid JSON: {e.msg} at line {e.lineno} column {e.colno}", dataset=shown,
                              row=f"line {e.lineno}", fix="fix the JSON syntax at that position") from None
        if isinstance(doc, dict):
            lists = [v for v in doc.values() if isinstance(v, list)]
            if len(lists) != 1:
                raise SchemaError("JSON object is not a list of rows", dataset=shown,
                                  fix="use a JSON array of objects, JSON lines, or {\"data\": [...]}")
            doc = lists[0]
        return _check_dict_rows(doc, shown)
    return _parse_json_lines(text, shown)


def _parse_json_lines(text: str, shown: str) -> tuple[list[dict], list[str]]:
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise SchemaError(f"invalid JSON on line {number}: {e.msg} (column {e.colno})", dataset=shown,
                              row=f"line {number}", fix="each line must be one JSON object") from None
    return _check_dict_rows(rows, shown)


def _check_dict_rows(rows: list, shown: str) -> tuple[list[dict], list[str]]:
    columns: dict[str, None] = {}
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise SchemaError(f"row is a {type(row).__name__}, expected a JSON object", dataset=shown,
                              row=index, fix="each row must be an object of column -> value")
        columns.update(dict.fromkeys(row))
    return rows, list(columns)


# ------------------------------------------------------------------------------------- mapping

def _apply_mapping(rows, columns, mapping, name, kind):
    if not mapping:
        return rows, columns
    missing = {ours: theirs for ours, theirs in mapping.items() if theirs not in columns}
    if missing:
        raise SchemaError(f"mapping names columns that are not in the data: {missing}; found columns {columns}",
                          dataset=name, fix="map our column names to columns that exist: mapping={our: their}")
    renamed_from = set(mapping.values())
    out_columns = list(mapping) + [c for c in columns if c not in renamed_from and c not in mapping]
    out_rows = []
    for row in rows:
        new = {ours: row.get(theirs) for ours, theirs in mapping.items()}
        for column, value in row.items():
            if column not in renamed_from and column not in new:
                new[column] = value
        out_rows.append(new)
    return out_rows, out_columns


def _detect_layout(columns: list[str], kind: str, name: str, mapping) -> tuple[str, set[str]]:
    present = set(columns)
    for layout, needed in _LAYOUTS[kind]:
        if present.issuperset(needed):
            return layout, set(needed) | (_OPTIONAL & present)
    examples = {
        "sft": "mapping={'messages': '<chat column>'} or mapping={'instruction': '<question>', 'response': '<answer>'}",
        "instructions": "mapping={'instruction': '<prompt column>'}",
        "preference": "mapping={'prompt': '<prompt>', 'chosen': '<better answer>', 'rejected': '<worse answer>'}",
        "candidates": "mapping={'prompt': '<prompt>', 'candidates': '<list of answers>'}",
    }
    accepted = " | ".join("+".join(needed) for _, needed in _LAYOUTS[kind])
    raise SchemaError(
        f"cannot map columns {columns} to {kind} rows{' with mapping ' + str(mapping) if mapping else ''}; "
        f"recognised layouts: {accepted}", dataset=name,
        fix=f"pass load_rows(..., kind={kind!r}, {examples[kind]})")


# ------------------------------------------------------------------------------------ row logic

def _build_row(row: dict, kind: str, layout: str, role_map: dict) -> dict[str, Any]:
    if kind == "sft":
        if layout in ("messages", "sharegpt"):
            messages = _messages(row.get("messages" if layout == "messages" else "conversations"),
                                 layout, role_map)
        elif layout.startswith("instruction"):
            answer = row.get("output" if layout == "instruction_output" else "response")
            messages = _system(row) + [{"role": "user", "content": _user_text(row)},
                                       {"role": "assistant", "content": _text(answer, "response")}]
        else:  # prompt + completion / response
            answer = row.get("completion" if layout == "prompt_completion" else "response")
            messages = _prompt(row.get("prompt"), role_map, _system(row)) + _answer(answer, role_map, "completion")
        _check_contents(messages, {"messages": messages})
        if messages[-1]["role"] != "assistant":
            raise _Quarantine("no_assistant_turn", {"messages": messages})
        return {"messages": messages}

    if kind == "instructions":
        if layout == "instruction":
            return {"instruction": _user_text(row)}
        if layout == "prompt" and isinstance(row.get("prompt"), str):
            return {"instruction": _text(row.get("prompt"), "prompt")}
        source = row.get({"prompt": "prompt", "messages": "messages", "sharegpt": "conversations"}[layout])
        messages = _messages(source, layout, role_map)
        users = [m["content"] for m in messages if m["role"] == "user"]
        if not users:
            raise _Quarantine("no_user_turn")
        return {"instruction": _text(users[0], "instruction")}

    if kind == "preference":
        prefix_c, chosen = _split_answer(row.get("chosen"), role_map, "chosen")
        prefix_r, rejected = _split_answer(row.get("rejected"), role_map, "rejected")
        prompt = prefix_c or prefix_r or _prompt(row.get("prompt"), role_map, _system(row))
        values = {"prompt": prompt, "chosen": chosen, "rejected": rejected,
                  "score_chosen": _score(row.get("score_chosen"), "score_chosen"),
                  "score_rejected": _score(row.get("score_rejected"), "score_rejected")}
        _check_contents(prompt + chosen + rejected, values)
        if not prompt:
            raise _Quarantine("missing_prompt", values)
        return values

    # candidates
    prompt = _prompt(row.get("prompt"), role_map, _system(row))
    raw = row.get({"candidates": "candidates", "completions": "completions", "responses": "responses"}[layout])
    if raw is None:
        raise _Quarantine("missing_value")
    if not isinstance(raw, list):
        raise SchemaError(f"candidates must be a list, got {type(raw).__name__}", column="candidates",
                          fix="give a list of strings or of {content, score} objects")
    candidates = [_candidate(c) for c in raw]
    if not candidates:
        raise _Quarantine("no_candidates")
    values = {"prompt": prompt, "candidates": candidates}
    _check_contents(prompt + candidates, values)
    return values


def _partial(row: dict, kind: str) -> dict[str, Any]:
    """Columns of a quarantined row: nulls (the raw row's columns are carried as extras)."""
    return {column: None for column in schema_of(kind) if column not in _LINEAGE_COLUMNS}


def _text(value: Any, column: str) -> str:
    if value is None:
        raise _Quarantine("missing_value")
    if not isinstance(value, str):
        raise SchemaError(f"expected a string, got {type(value).__name__}: {str(value)[:80]!r}", column=column,
                          fix=f"map a text column to {column!r}")
    if not value.strip():
        raise _Quarantine("empty_content")
    return value


def _user_text(row: dict) -> str:
    instruction = _text(row.get("instruction"), "instruction")
    extra = row.get("input")
    if isinstance(extra, str) and extra.strip():
        return f"{instruction}\n\n{extra}"
    return instruction


def _system(row: dict) -> list[dict[str, str]]:
    system = row.get("system")
    return [{"role": "system", "content": system}] if isinstance(system, str) and system.strip() else []


def _messages(value: Any, layout: str, role_map: dict) -> list[dict[str, str]]:
    if value is None:
        raise _Quarantine("missing_value")
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise SchemaError("expected a list of messages, got a plain string", column=layout,
                              fix="this column holds text: map it with mapping={'instruction'/'prompt': ...}") from None
    if not isinstance(value, list):
        raise SchemaError(f"expected a list of messages, got {type(value).__name__}", column=layout,
                          fix="messages are [{'role': ..., 'content': ...}] or ShareGPT [{'from': ..., 'value': ...}]")
    if not value:
        raise _Quarantine("empty_conversation")
    out = []
    for message in value:
        if not isinstance(message, dict):
            raise SchemaError(f"a message is a {type(message).__name__}, expected an object", column=layout,
                              fix="messages are [{'role': ..., 'content': ...}]")
        role = message.get("role", message.get("from"))
        content = message.get("content", message.get("value"))
        if role is None:
            raise SchemaError(f"message without role/from: {str(message)[:80]}", column=layout,
                              fix="each message needs 'role' (or ShareGPT 'from')")
        mapped = role_map.get(str(role).lower())
        if mapped is None:
            raise SchemaError(f"unknown role {role!r}", column=layout,
                              fix=f"use one of {sorted(set(role_map))}, or pass roles={{{str(role)!r}: 'user'}}")
        if content is not None and not isinstance(content, str):
            raise SchemaError(f"message content is a {type(content).__name__}, expected a string", column=layout,
                              fix="multi-part/multimodal content is not supported; flatten it to text")
        out.append({"role": mapped, "content": content})
    return out


def _prompt(value: Any, role_map: dict, system: list) -> list[dict[str, str]]:
    if value is None:
        raise _Quarantine("missing_value")
    if isinstance(value, str):
        return system + [{"role": "user", "content": _text(value, "prompt")}]
    return system + _messages(value, "prompt", role_map)


def _answer(value: Any, role_map: dict, column: str) -> list[dict[str, str]]:
    if isinstance(value, str) or value is None:
        return [{"role": "assistant", "content": _text(value, column)}]
    return _messages(value, column, role_map)


def _split_answer(value: Any, role_map: dict, column: str):
    """(conversation prefix, assistant turns) of a chosen/rejected value (string or messages)."""
    messages = _answer(value, role_map, column)
    last_other = max((i for i, m in enumerate(messages) if m["role"] != "assistant"), default=-1)
    prefix, answer = messages[:last_other + 1], messages[last_other + 1:]
    if not answer:
        raise _Quarantine("no_assistant_turn")
    return prefix, answer


def _candidate(value: Any) -> dict[str, Any]:
    if isinstance(value, str) or value is None:
        return {"content": value, "score": None}
    if isinstance(value, dict):
        content = next((value[k] for k in ("content", "text", "response", "completion") if k in value), None)
        score = next((value[k] for k in ("score", "reward", "rating") if k in value), None)
        return {"content": content, "score": _score(score, "candidates.score")}
    raise SchemaError(f"a candidate is a {type(value).__name__}", column="candidates",
                      fix="candidates are strings or {content, score} objects")


def _score(value: Any, column: str) -> float | None:
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise SchemaError(f"score {value!r} is not a number", column=column,
                          fix="scores must be numbers (or null)") from None


def _check_contents(messages: Iterable[dict], values: dict[str, Any]) -> None:
    for message in messages:
        content = message.get("content")
        if content is None:
            raise _Quarantine("missing_value", values)
        if not isinstance(content, str):
            raise SchemaError(f"content is a {type(content).__name__}, expected a string", column="content",
                              fix="flatten content to text")
        if not content.strip():
            raise _Quarantine("empty_content", values)


# ------------------------------------------------------------------------------------ assembly

def _to_frame(built: list[dict], rows: list[dict], kind: str, extras: list[str]) -> pl.DataFrame:
    schema = {c: t for c, t in schema_of(kind).items() if c not in _LINEAGE_COLUMNS}
    schema.update({"keep": pl.Boolean, "drop_reason": pl.Utf8})
    columns = {c: pl.Series(c, [b[c] for b in built], dtype=t) for c, t in schema.items()}
    for column in extras:
        values = [row.get(column) for row in rows]
        try:
            columns[column] = pl.Series(column, values, strict=False)
        except Exception:  # noqa: BLE001 - mixed nested types: keep them as JSON text, not dropped
            columns[column] = pl.Series(column, [None if v is None else json.dumps(v, ensure_ascii=False)
                                                 for v in values], dtype=pl.Utf8)
    return pl.DataFrame(list(columns.values())) if columns else pl.DataFrame()


def _assign_lineage(df: pl.DataFrame, rows: list[dict], columns: list[str], kind: str, origin: str) -> pl.DataFrame:
    content_columns = [c for c in schema_of(kind) if c not in _LINEAGE_COLUMNS]
    theirs = [row.get("id") for row in rows] if "id" in columns else None
    if theirs is not None:
        as_text = [None if v is None else str(v) for v in theirs]
        if None not in as_text and len(set(as_text)) == len(as_text):
            ids = as_text
            theirs = None
        else:
            df = df.with_columns(pl.Series("source_id", as_text, dtype=pl.Utf8))
    if "id" not in columns or theirs is not None:
        seen: Counter[str] = Counter()
        ids = []
        # Hash the raw row for quarantined rows (their mapped content is null, so it would collide).
        for mapped, raw in zip(df.select(content_columns).iter_rows(), rows):
            content = list(mapped) if any(v is not None for v in mapped) else [raw]
            key = row_id(origin, *content)
            ids.append(key if not seen[key] else row_id(origin, *content, seen[key]))
            seen[key] += 1
    parents = [row.get("parent_id") for row in rows] if "parent_id" in columns else [None] * len(rows)
    origins = [row.get("origin") or origin for row in rows] if "origin" in columns else [origin] * len(rows)
    return df.with_columns(
        pl.Series("id", ids, dtype=pl.Utf8),
        pl.Series("parent_id", [None if p is None else str(p) for p in parents], dtype=pl.Utf8),
        pl.Series("origin", origins, dtype=pl.Utf8),
    )


__all__ = ["load_rows", "ROLE_ALIASES", "ORIGIN", "MESSAGES", "CANDIDATES"]
