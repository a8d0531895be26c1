"""Import user files into our row kinds.

`load_rows(source, mapping=None, kind="sft")` reads a parquet / JSONL / JSON file (local path or
fsspec URL such as `s3://bucket/x.jsonl`; a folder reads every such file in it, sorted), or takes
a polars DataFrame / list of dicts, and returns rows of `kind` with lineage columns.

Recognised layouts (after applying `mapping`):

| kind           | input columns                                              | becomes                                  |
|----------------|------------------------------------------------------------|------------------------------------------|
| sft            | `messages` [{role, content, ...}] [+ `system`]              | `messages` as is                         |
| sft            | `conversations` [{from: human/gpt/system/function_call/observation, value}] (ShareGPT) [+ `system`] | `messages` (human->user, gpt->assistant, function_call->assistant tool call, observation->tool) |
| sft            | `instruction` [+ `input`] + `output` or `response` [+ `system`] | `messages`: [system], user (instruction + blank line + input), assistant |
| sft            | `prompt` + `completion` or `response` (strings or message lists) [+ `system`] | `messages`         |
| instructions   | `instruction` [+ `input`], or `prompt`, or `messages`/`conversations` (first user turn) | `instruction` (plain string) |
| preference     | `chosen`, `rejected` [+ `prompt`] [+ `system`] [+ `score_chosen`, `score_rejected`] | `prompt` (messages), `chosen`/`rejected` (messages starting with the answer) |
| candidates     | `prompt` + `candidates` (or `completions`/`responses`): strings or {content/text, score} [+ `system`] | `prompt`, `candidates: list<struct<content, score>>` |

Tool calling (OpenAI / TRL format) round-trips: an assistant turn may have `content` null (or "")
with `tool_calls: [{id, type, function: {name, arguments}}]`, a tool turn has `tool_call_id`,
any turn may have `name`. Those fields become extra fields of the message struct, only in
columns whose input has them: plain conversations keep `list<struct<role, content>>` exactly.
A message without a field another message has reads back with it null (one struct type per
column); `schemas.clean_messages` drops those nulls. `function.arguments` is kept as given when
it is a string (JSON text, as the OpenAI API sends it); object arguments are kept as objects when
every tool call of the column has the same argument keys in the same order, else each is stored
as its JSON text (a struct would add other calls' keys as nulls). ShareGPT `function_call` turns
(value: JSON {name, arguments}, or a list of them) become an assistant turn with content null and
tool_calls with ids `call_0`, `call_1`... in conversation order; each following `observation`
turn becomes a tool turn answering the next unanswered call. Legacy OpenAI `function_call` on an
assistant turn becomes one tool call. Other message keys (e.g. `weight`) are not part of the
message: they are kept as JSON text in a `message_extras` column ({column: [one object per
message]}), present only when some message had them.

Other columns are carried along unchanged: natively when polars stores the column without
changing any value (a struct column must not gain keys from other rows as nulls, ints must not
become strings...), else each value as its JSON text (strings as they are). So a per-row `tools`
JSON-schema column comes back identical per row: `json.loads(value)` equals the input (its text
is `json.dumps(value, ensure_ascii=False)`, or the string itself if the input held JSON text).

Preference values may be strings (prompt -> one user message, chosen/rejected -> one assistant
message) or message lists. When `chosen` and `rejected` are whole conversations (TRL
implicit-prompt format, e.g. UltraFeedback-binarized) the prompt is their longest common message
prefix, cut back to its last non-assistant turn; the rest of each conversation stays in its side
(so chosen [user Q, assistant A1, user Q2, assistant A2] vs rejected [user Q, assistant B1, ...]
gives prompt [user Q], chosen [A1, Q2, A2], rejected [B1, ...]). When only one side is a
conversation, its turns up to the last non-assistant message become the prompt. An explicit
`prompt` column must agree with that prefix (equal messages, or a string equal to its first or
last user turn).

`mapping` is `{our_column: their_column}` and overrides detection, e.g.
`load_rows("qa.jsonl", mapping={"instruction": "question", "response": "answer"})` or
`load_rows("pairs.parquet", kind="preference", mapping={"prompt": "q", "chosen": "good", "rejected": "bad"})`.
Message roles accept ShareGPT aliases (human, gpt, model, bot, function...); `roles={"narrator": "system"}`
adds your own.

Lineage: an existing `id` column is kept when it is non-null, non-blank and unique (as strings);
otherwise the old column is kept as `source_id` and ids are content hashes
(`schemas.row_id("import@1", ...)` of the row's content with tool fields, not of how a column
happened to be stored; exact repeats get a counter, so ids stay unique and stable across reruns).
`parent_id` is null, `origin` is "import@1" (existing `parent_id` / `origin` columns are kept).
Rows that arrive with `keep == False` stay quarantined with their `drop_reason`.

Bad input, decided as follows:
- whole-file problems are errors (SchemaError naming the file, line, column and fix): file not
  UTF-8 (or UTF-16), invalid JSON, unreadable parquet, no rows at all, no recognisable columns
  (the error lists the columns found and the `mapping=` or `kind=` to pass), a message that is
  not an object or lacks role/from, a conversation that is not a list, an unknown role. Errors
  name the USER's column (`output`, `conversations`, ...), not ours.
- non-string values in text fields (numbers, booleans, lists, objects) are written into the text
  as JSON (`input: 12` -> "12"); a one-part `[{"type": "text", "text": ...}]` content is its text.
- row-level gaps are quarantined, never silently dropped: the row gets `keep=False` and
  `drop_reason="import:<reason>"` with the reasons in REASONS. Every result has `keep` and
  `drop_reason` columns; storage writes `keep == False` rows to `rejected/`; kept + quarantined
  rows always equal the input rows.

JSON lines are split on "\\n" only (U+2028 / U+2029 / \\x85 inside strings are text, as JSON says).

Polars frames (parquet files, published or stage folders) in the SFT instruction / messages
layouts take a columnar path (`schemas.columnar`) with the same result, and no Python object per row.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable

import polars as pl

from schemas import (CANDIDATES, KEEP, MESSAGE, MESSAGES, ROLES, TOOL_FIELDS, SchemaError, row_id, schema_of,
                     validate)

ORIGIN = "import@1"
FILE_SUFFIXES = (".parquet", ".jsonl", ".ndjson", ".json")
_UNSUPPORTED_SUFFIXES = (".csv", ".tsv", ".txt", ".xlsx", ".xls", ".arrow", ".feather")
# Rows nesting lists / objects deeper than this are an error (Python's json and our recursive checks
# give up near 1000); columns nesting deeper than MAX_NATIVE_DEPTH are carried as JSON text (Arrow
# refuses deep schemas: "Recursion level in ArrowSchema struct exceeded").
MAX_JSON_DEPTH = 100
MAX_NATIVE_DEPTH = 32
# Magic bytes of compressed files -> (format, the command that unpacks one: `<command> FILE`).
_COMPRESSED = ((b"\x1f\x8b", ("gzip", "gunzip -k")), (b"BZh", ("bzip2", "bunzip2 -k")),
               (b"\xfd7zXZ\x00", ("xz", "unxz -k")), (b"\x28\xb5\x2f\xfd", ("zstd", "unzstd")),
               (b"PK\x03\x04", ("zip", "unzip")))

ROLE_ALIASES = {
    "system": "system", "user": "user", "human": "user", "prompter": "user", "question": "user",
    "assistant": "assistant", "gpt": "assistant", "model": "assistant", "bot": "assistant",
    "chatgpt": "assistant", "bard": "assistant", "bing": "assistant", "answer": "assistant",
    "tool": "tool", "function": "tool", "observation": "tool", "ipython": "tool",
}
# ShareGPT turns whose value is a tool call (LLaMA-Factory / glaive style): become an assistant
# turn with tool_calls, unless `roles=` maps them to a plain role.
TOOL_CALL_ROLES = ("function_call", "tool_call")

# Every quarantine reason load_rows gives (drop_reason is "import:<reason>").
REASONS = {
    "missing_value": "a required value is null or missing (text field, message, role, conversation)",
    "empty_content": "a text field or message content is empty or whitespace",
    "empty_conversation": "the message list is empty",
    "no_assistant_turn": "an SFT conversation or a preference side does not end with an assistant answer",
    "no_user_turn": "an instructions row's conversation has no user turn",
    "missing_prompt": "a preference / candidates row has no prompt",
    "prompt_mismatch": "chosen and rejected answer different questions, or the `prompt` column disagrees "
                       "with the conversation they share",
    "identical_pair": "chosen equals rejected: the pair teaches nothing",
    "system_mismatch": "the `system` column disagrees with the conversation's own system turn",
    "invalid_tool_call": "a tool call that is not {id, type, function: {name, arguments}} (or a ShareGPT "
                         "function_call value that is not JSON {name, arguments}), or a non-string "
                         "tool_call_id / name",
    "non_text_content": "message content made of several parts or non-text parts (images, audio)",
    "invalid_score": "a score that is not a finite number (NaN, inf, 'high', true)",
    "no_candidates": "a candidates row with an empty candidate list",
    "invalid_utf8": "a string that cannot be UTF-8 encoded (a lone surrogate such as \"\\ud83d\")",
    "unrepresentable": "a message list parquet cannot store unchanged (should not happen; please report)",
}

# Which of our logical columns each layout needs; _USES: the optional ones it reads (the rest
# of the row is carried as extra columns).
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
_USES = {
    ("sft", "messages"): ("system",), ("sft", "sharegpt"): ("system",),
    ("sft", "instruction_output"): ("input", "system"), ("sft", "instruction_response"): ("input", "system"),
    ("sft", "prompt_completion"): ("system",), ("sft", "prompt_response"): ("system",),
    ("instructions", "instruction"): ("input",),
    ("preference", "preference"): ("prompt", "system", "score_chosen", "score_rejected"),
    ("candidates", "candidates"): ("system",), ("candidates", "completions"): ("system",),
    ("candidates", "responses"): ("system",),
}
_LINEAGE_COLUMNS = ("id", "parent_id", "origin")
MESSAGE_EXTRAS = "message_extras"
_CALL_KEYS = ("id", "type", "function", "name", "arguments")
_FUNCTION_KEYS = ("name", "arguments")
_SURROGATE = re.compile("[\ud800-\udfff]")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89abcdefABCDEF][0-9a-fA-F]{2}")


class _Quarantine(Exception):
    """A row-level gap: the row is kept with keep=False and this reason (plus what could be built)."""

    def __init__(self, reason: str, values: dict[str, Any] | None = None):
        super().__init__(reason)
        assert reason in REASONS, reason
        self.reason, self.values = reason, values or {}


@dataclass
class _Ctx:
    kind: str
    layout: str
    role_map: dict[str, str]
    user_roles: set[str]
    names: dict[str, str]  # our column -> the user's column (for errors)
    extras: dict[str, list] = field(default_factory=dict)  # per row: column -> unknown message keys

    def col(self, ours: str) -> str:
        return self.names.get(ours, ours)


def load_rows(source: Any, mapping: dict[str, str] | None = None, kind: str = "sft", *,
              dataset: str | None = None, roles: dict[str, str] | None = None,
              origin: str = ORIGIN, columnar: bool = True) -> pl.DataFrame:
    """Read `source` (path / fsspec URL / folder / DataFrame / list of dicts) as rows of `kind`.

    See the module docstring for the accepted layouts and how bad input is handled.
    `columnar=False` runs every row through the row importer (the columnar path must match it).
    """
    schema_of(kind)  # unknown kind -> clear error
    name = dataset or (str(source) if isinstance(source, (str, os.PathLike)) else "<dataframe>")
    wrong = {k: v for k, v in (roles or {}).items() if v not in ROLES}
    if wrong:
        raise SchemaError(f"roles= maps to unknown roles: {wrong}", dataset=name,
                          fix=f"map each of your roles to one of {list(ROLES)}")
    read = _read_source(source, name)
    if read.empty:
        raise SchemaError(f"no rows: {name} is empty", dataset=name,
                          fix="give a file with at least one row (JSON lines: one object per line)")
    columns, names = _mapped_columns(read.columns, mapping, name)
    layout, consumed = _detect_layout(columns, kind, name, mapping)
    user_roles = {k.lower() for k in (roles or {})}
    ctx = _Ctx(kind, layout, {**ROLE_ALIASES, **{k.lower(): v for k, v in (roles or {}).items()}},
               user_roles, names)
    if columnar and read.frame is not None and not roles:
        from schemas.columnar import import_frame

        df = import_frame(read.frame, columns, consumed, ctx, name, origin)
        if df is not None:
            return df
    rows = _map_rows(read.rows, mapping)
    built = [_import_row(index, raw, rows, ctx, read.check_utf8, name) for index, raw in enumerate(rows)]

    extras = [c for c in columns if c not in consumed and c not in _LINEAGE_COLUMNS
              and c not in schema_of(kind) and c not in KEEP and c != MESSAGE_EXTRAS]
    content = [{c: v for c, v in b.items() if c in schema_of(kind)} for b in built]
    df = _to_frame(built, rows, kind, extras, read.frame, names)
    df = _assign_lineage(df, content, rows, columns, kind, origin)
    ordered = list(schema_of(kind)) + extras + [c for c in df.columns if c not in schema_of(kind)
                                               and c not in extras and c not in KEEP] + list(KEEP)
    df = df.select(ordered)
    return validate(df, kind, dataset=name)


def _import_row(index: int, raw: dict, rows: list[dict], ctx: _Ctx, check_utf8: bool, name: str) -> dict[str, Any]:
    """One row through the row importer: its content columns, message_extras, keep, drop_reason."""
    bad_utf8 = check_utf8 and _has_surrogate(raw)
    row = _sanitize(raw) if bad_utf8 else raw
    if bad_utf8:
        rows[index] = row  # extras and ids see the escaped text, never the raw surrogate
    ctx.extras = {}
    try:
        values, reason = _build_row(row, ctx), None
    except _Quarantine as q:
        values, reason = {**_partial(ctx.kind), **q.values}, q.reason
    except SchemaError as e:
        if not bad_utf8:
            raise SchemaError(e.message, dataset=name, column=e.column, row=index, fix=e.fix) from None
        values, reason = _partial(ctx.kind), None
    if bad_utf8:
        reason = "invalid_utf8"
    carried = row.get(MESSAGE_EXTRAS)  # re-importing our own output keeps them
    values[MESSAGE_EXTRAS] = (json.dumps(ctx.extras, ensure_ascii=False, default=str) if ctx.extras
                              else carried if isinstance(carried, str) else None)
    if reason is not None:
        values["keep"], values["drop_reason"] = False, f"import:{reason}"
    elif row.get("keep") is False:  # quarantined upstream: stays so, with its reason
        values["keep"], values["drop_reason"] = False, row.get("drop_reason") or "unknown"
    else:
        values["keep"], values["drop_reason"] = True, None
    return values


# ------------------------------------------------------------------------------------- reading

def read_records(source: Any, *, dataset: str | None = None) -> tuple[list[dict], list[str]]:
    """The raw rows and column names of a file / folder / URL, with load_rows' reading checks
    (UTF-8, JSON syntax, rows are objects, not empty); pass the rows on to load_rows."""
    name = dataset or (str(source) if isinstance(source, (str, os.PathLike)) else "<dataframe>")
    read = _read_source(source, name)
    if read.empty:
        raise SchemaError(f"no rows: {name} is empty", dataset=name,
                          fix="give a file with at least one row (JSON lines: one object per line)")
    return read.rows, read.columns


def kind_of(columns: Iterable[str], kinds: Iterable[str] = ("preference", "candidates", "sft", "instructions")) -> str | None:
    """The first of `kinds` whose layouts (see the module docstring) these columns match."""
    present = set(columns)
    return next((k for k in kinds if any(present.issuperset(n) for _, n in _LAYOUTS[k])), None)


class _Read:
    """What was read: a polars frame (rows built from it only when the row importer needs them),
    or rows parsed from JSON."""

    def __init__(self, rows: list[dict] | None, columns: list[str], frame: pl.DataFrame | None = None,
                 check_utf8: bool = True):
        self._rows, self.columns, self.frame = rows, columns, frame
        self.check_utf8 = check_utf8  # rows may hold lone surrogates (never true of polars strings)

    @property
    def rows(self) -> list[dict]:
        if self._rows is None:
            self._rows = self.frame.to_dicts()
        return self._rows

    @property
    def empty(self) -> bool:
        return not self.columns and (self.frame.height == 0 if self.frame is not None else not self._rows)


def _read_source(source: Any, name: str) -> _Read:
    if isinstance(source, pl.LazyFrame):
        source = source.collect()
    if isinstance(source, pl.DataFrame):
        return _Read(None, list(source.columns), source, False)
    if isinstance(source, list):
        columns: dict[str, None] = {}
        for index, row in enumerate(source):
            if not isinstance(row, dict):
                raise SchemaError(f"expected a list of dicts, got an item of type {type(row).__name__}",
                                  dataset=name, row=index, fix="pass rows as dicts of column -> value")
            columns.update(dict.fromkeys(row))
        return _Read(list(source), list(columns))
    if hasattr(source, "to_dict") and hasattr(source, "columns"):  # pandas
        frame = pl.from_pandas(source)
        return _Read(None, list(frame.columns), frame, False)
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
        if path.lower().endswith(_UNSUPPORTED_SUFFIXES):
            raise SchemaError(f"cannot import {os.path.splitext(path)[1]} files", dataset=url,
                              fix="convert it to parquet or JSON lines first, e.g. "
                                  "pl.read_csv(path).write_parquet('data.parquet')")
    if len(files) == 1 and files[0].endswith(".parquet"):
        frame = _read_parquet(fs, files[0], url if "://" in url or len(files) == 1 else files[0])
        return _Read(None, list(frame.columns), frame, False)
    rows: list[dict] = []
    columns: dict[str, None] = {}
    check_utf8 = False
    for file in files:
        shown = fs.unstrip_protocol(file) if len(files) > 1 or "://" in url else url
        file_rows, file_columns, file_check = _read_file(fs, file, shown)
        rows.extend(file_rows)
        columns.update(dict.fromkeys(file_columns))
        check_utf8 = check_utf8 or file_check
    return _Read(rows, list(columns), None, check_utf8)


def _read_parquet(fs, path: str, shown: str) -> pl.DataFrame:
    try:
        with fs.open(path, "rb") as f:
            return pl.read_parquet(f)
    except Exception as e:  # noqa: BLE001 - any reader failure becomes one clear error
        raise SchemaError(f"cannot read parquet file: {type(e).__name__}: {e}", dataset=shown,
                          fix="check the file is a valid parquet file (e.g. pyarrow.parquet.read_table)") from None


def _read_file(fs, path: str, shown: str) -> tuple[list[dict], list[str], bool]:
    """(rows, columns, may hold lone surrogates) of one file."""
    if path.endswith(".parquet"):
        frame = _read_parquet(fs, path, shown)
        return frame.to_dicts(), list(frame.columns), False
    with fs.open(path, "rb") as f:
        data = f.read()
    packed = next((c for magic, c in _COMPRESSED if data.startswith(magic)), None)
    if packed is not None:  # not a text encoding problem: iconv would not help
        raise SchemaError(f"file is {packed[0]}-compressed", dataset=shown,
                          fix=f"decompress it first, e.g. `{packed[1]} {shown}`, and import the "
                              "JSON lines / JSON file inside")
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise SchemaError("file is UTF-16 encoded (it starts with a UTF-16 byte order mark)", dataset=shown,
                          row="line 1", fix=f"re-encode it as UTF-8, e.g. `iconv -f utf-16 -t utf-8 {shown} > fixed.jsonl`")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise SchemaError(
            f"file is not valid UTF-8: byte 0x{data[e.start]:02x} at line {line}", dataset=shown,
            row=f"line {line}",
            fix=f"re-encode the file as UTF-8, e.g. `iconv -f latin1 -t utf-8 {shown} > fixed.jsonl`") from None
    check_utf8 = _SURROGATE_ESCAPE.search(text) is not None
    if path.endswith(".json") and text.lstrip()[:1] in ("[", "{"):
        try:
            doc = _checked_depth(json.loads(text), shown, "line 1")
        except RecursionError:
            raise _too_deep(shown, "line 1") from None
        except json.JSONDecodeError as e:
            if text.lstrip().startswith("{"):  # maybe JSON lines with a .json suffix
                return (*_parse_json_lines(text, shown), check_utf8)
            raise SchemaError(f"invalid JSON: {e.msg} at line {e.lineno} column {e.colno}", dataset=shown,
                              row=f"line {e.lineno}", fix="fix the JSON syntax at that position") from None
        if isinstance(doc, dict):
            lists = [v for v in doc.values() if isinstance(v, list)]
            if len(lists) != 1:
                raise SchemaError("JSON object is not a list of rows", dataset=shown,
                                  fix="use a JSON array of objects, JSON lines, or {\"data\": [...]}")
            doc = lists[0]
        return (*_check_dict_rows(doc, shown), check_utf8)
    return (*_parse_json_lines(text, shown), check_utf8)


def _parse_json_lines(text: str, shown: str) -> tuple[list[dict], list[str]]:
    # "\n" only: str.splitlines() would also split on U+2028 / U+2029 / \x85 / \x1c-\x1e, which
    # JSON allows unescaped inside strings. A trailing "\r" (CRLF files) is JSON whitespace.
    rows = []
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            rows.append(_checked_depth(json.loads(line), shown, f"line {number}"))
        except json.JSONDecodeError as e:
            raise SchemaError(f"invalid JSON on line {number}: {e.msg} (column {e.colno})", dataset=shown,
                              row=f"line {number}", fix="each line must be one JSON object") from None
        except RecursionError:  # Python's json gives up near 1000 levels
            raise _too_deep(shown, f"line {number}") from None
    return _check_dict_rows(rows, shown)


def _too_deep(shown: str, where: str) -> SchemaError:
    return SchemaError(f"JSON value nested too deeply (more than {MAX_JSON_DEPTH} levels)", dataset=shown, row=where,
                       fix="flatten that value, or store it as a JSON string")


def _checked_depth(value: Any, shown: str, where: str) -> Any:
    """`value` unless lists / objects nest deeper than MAX_JSON_DEPTH (iterative: no recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (list, dict)):
            if depth > MAX_JSON_DEPTH:
                raise _too_deep(shown, where)
            stack.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict) else item))
    return value


def _check_dict_rows(rows: list, shown: str) -> tuple[list[dict], list[str]]:
    columns: dict[str, None] = {}
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise SchemaError(f"row is a {type(row).__name__}, expected a JSON object", dataset=shown,
                              row=index, fix="each row must be an object of column -> value")
        columns.update(dict.fromkeys(row))
    return rows, list(columns)


def _has_surrogate(value: Any) -> bool:
    if isinstance(value, str):
        return _SURROGATE.search(value) is not None
    if isinstance(value, dict):
        return any(_has_surrogate(k) or _has_surrogate(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return any(_has_surrogate(v) for v in value)
    return False


def _sanitize(value: Any) -> Any:
    """Lone surrogates written as their escape text (`\\ud83d`), so the row can be stored."""
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, dict):
        return {_sanitize(k): _sanitize(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_sanitize(v) for v in value]
    return value


# ------------------------------------------------------------------------------------- mapping

def _mapped_columns(columns: list[str], mapping, name: str) -> tuple[list[str], dict[str, str]]:
    """(our column names in order, {ours: theirs}) after `mapping`; unknown source columns are an error."""
    if not mapping:
        return columns, {}
    missing = {ours: theirs for ours, theirs in mapping.items() if theirs not in columns}
    if missing:
        raise SchemaError(f"mapping names columns that are not in the data: {missing}; found columns {columns}",
                          dataset=name, fix="map our column names to columns that exist: mapping={our: their}")
    renamed_from = set(mapping.values())
    return list(mapping) + [c for c in columns if c not in renamed_from and c not in mapping], dict(mapping)


def _map_rows(rows: list[dict], mapping) -> list[dict]:
    if not mapping:
        return rows
    renamed_from = set(mapping.values())
    out_rows = []
    for row in rows:
        new = {ours: row.get(theirs) for ours, theirs in mapping.items()}
        for column, value in row.items():
            if column not in renamed_from and column not in new:
                new[column] = value
        out_rows.append(new)
    return out_rows


def _detect_layout(columns: list[str], kind: str, name: str, mapping) -> tuple[str, set[str]]:
    present = set(columns)
    for layout, needed in _LAYOUTS[kind]:
        if present.issuperset(needed):
            return layout, set(needed) | (set(_USES.get((kind, layout), ())) & present)
    examples = {
        "sft": "mapping={'messages': '<chat column>'} or mapping={'instruction': '<question>', 'response': '<answer>'}",
        "instructions": "mapping={'instruction': '<prompt column>'}",
        "preference": "mapping={'prompt': '<prompt>', 'chosen': '<better answer>', 'rejected': '<worse answer>'}",
        "candidates": "mapping={'prompt': '<prompt>', 'candidates': '<list of answers>'}",
    }
    accepted = " | ".join("+".join(needed) for _, needed in _LAYOUTS[kind])
    other = kind_of(present, [k for k in ("preference", "candidates", "sft", "instructions") if k != kind])
    if other is not None:
        fix = (f"these columns look like {other} rows: pass kind={other!r} (CLI: --set kind={other}), "
               f"or load_rows(..., kind={kind!r}, {examples[kind]})")
    else:
        fix = f"pass load_rows(..., kind={kind!r}, {examples[kind]})"
    raise SchemaError(
        f"cannot map columns {columns} to {kind} rows{' with mapping ' + str(mapping) if mapping else ''}; "
        f"recognised layouts: {accepted}", dataset=name, fix=fix)


# ------------------------------------------------------------------------------------ row logic

def _build_row(row: dict, ctx: _Ctx) -> dict[str, Any]:
    kind, layout = ctx.kind, ctx.layout
    if kind == "sft":
        if layout in ("messages", "sharegpt"):
            column = "messages" if layout == "messages" else "conversations"
            messages = _with_system(_messages(row.get(column), column, ctx), row, ctx)
        elif layout.startswith("instruction"):
            column = "output" if layout == "instruction_output" else "response"
            messages = _system(row, ctx) + [{"role": "user", "content": _user_text(row, ctx)},
                                            {"role": "assistant", "content": _text(row.get(column), column, ctx)}]
        else:  # prompt + completion / response
            column = "completion" if layout == "prompt_completion" else "response"
            messages = (_with_system(_prompt(row.get("prompt"), ctx), row, ctx)
                        + _answer(row.get(column), column, ctx))
        _check_contents(messages, {"messages": messages})
        if messages[-1]["role"] != "assistant":
            raise _Quarantine("no_assistant_turn", {"messages": messages})
        return {"messages": messages}

    if kind == "instructions":
        if layout == "instruction":
            return {"instruction": _user_text(row, ctx)}
        value = row.get("prompt" if layout == "prompt" else "messages" if layout == "messages" else "conversations")
        if layout == "prompt" and not isinstance(value, (list, dict)):
            return {"instruction": _text(value, "prompt", ctx)}
        messages = _messages(value, {"prompt": "prompt", "messages": "messages", "sharegpt": "conversations"}[layout], ctx)
        users = [m["content"] for m in messages if m["role"] == "user"]
        if not users:
            raise _Quarantine("no_user_turn")
        return {"instruction": _text(users[0], "instruction", ctx)}

    if kind == "preference":
        return _preference(row, ctx)

    # candidates
    prompt = _with_system(_prompt(row.get("prompt"), ctx), row, ctx)
    column = {"candidates": "candidates", "completions": "completions", "responses": "responses"}[layout]
    raw = row.get(column)
    if raw is None:
        raise _Quarantine("missing_value", {"prompt": prompt})
    if not isinstance(raw, list):
        raise SchemaError(f"candidates must be a list, got {type(raw).__name__}", column=ctx.col(column),
                          fix="give a list of strings or of {content, score} objects")
    candidates = [_candidate(c, column, ctx) for c in raw]
    if not candidates:
        raise _Quarantine("no_candidates", {"prompt": prompt})
    raw_scores = [c["score"] for c in candidates]
    for c in candidates:
        c["score"] = None
    values = {"prompt": prompt, "candidates": candidates}
    _check_contents(prompt + candidates, values)
    for c, score in zip(candidates, raw_scores):
        c["score"] = _score(score, values)
    return values


def _partial(kind: str) -> dict[str, Any]:
    """Columns of a quarantined row: nulls (the raw row's columns are carried as extras)."""
    return {column: None for column in schema_of(kind) if column not in _LINEAGE_COLUMNS}


def _as_text(value: Any) -> str | None:
    """A text field's value as text: strings as they are; numbers, booleans, lists and objects as
    their JSON (12 -> "12", true -> "true"); NaN / inf (pandas' missing value) and null -> None;
    empty lists / objects -> ""."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (list, tuple, dict)) and not value:
        return ""
    if isinstance(value, (bool, int, float, list, tuple, dict)):
        return json.dumps(value, ensure_ascii=False, default=str)
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    return str(value)  # dates, decimals from parquet


def _text(value: Any, column: str, ctx: _Ctx) -> str:
    text = _as_text(value)
    if text is None:
        raise _Quarantine("missing_value")
    if not text.strip():
        raise _Quarantine("empty_content")
    return text


def _user_text(row: dict, ctx: _Ctx) -> str:
    instruction = _text(row.get("instruction"), "instruction", ctx)
    extra = _as_text(row.get("input"))
    if extra is not None and extra.strip():
        return f"{instruction}\n\n{extra}"
    return instruction


def _system(row: dict, ctx: _Ctx) -> list[dict[str, Any]]:
    system = _as_text(row.get("system"))
    return [{"role": "system", "content": system}] if system is not None and system.strip() else []


def _with_system(messages: list[dict], row: dict, ctx: _Ctx) -> list[dict]:
    """A `system` column's turn in front of a conversation that has none; a conversation whose own
    system turn says something else is quarantined (system_mismatch)."""
    system = _system(row, ctx)
    if not system:
        return messages
    if messages and messages[0]["role"] == "system":
        if (messages[0]["content"] or "").strip() != system[0]["content"].strip():
            raise _Quarantine("system_mismatch")
        return messages
    return system + messages


def _content(value: Any) -> str | None:
    """Message content: text, or null (allowed on a tool-calling assistant turn). A one-part
    [{"type": "text", "text": ...}] is its text; several parts or non-text parts are quarantined."""
    if isinstance(value, list) and value and all(isinstance(p, dict) for p in value):
        if len(value) == 1 and value[0].get("type", "text") == "text" and isinstance(value[0].get("text"), str):
            return value[0]["text"]
        raise _Quarantine("non_text_content")
    return _as_text(value)


def _messages(value: Any, column: str, ctx: _Ctx) -> list[dict[str, Any]]:
    """Normalised messages of a conversation value (list of messages, or its JSON text)."""
    theirs = ctx.col(column)
    if value is None:
        raise _Quarantine("missing_value")
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise SchemaError("expected a list of messages, got a plain string", column=theirs,
                              fix="this column holds text: map it with mapping={'instruction'/'prompt': ...}") from None
    if isinstance(value, dict) and ("role" in value or "from" in value):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise SchemaError(f"expected a list of messages, got {type(value).__name__}", column=theirs,
                          fix="messages are [{'role': ..., 'content': ...}] or ShareGPT [{'from': ..., 'value': ...}]")
    if not value:
        raise _Quarantine("empty_conversation")
    out, extras = [], []
    calls_made, unanswered = 0, []  # ShareGPT function_call ids waiting for their observation
    for message in value:
        if message is None:
            raise _Quarantine("missing_value")
        if not isinstance(message, dict):
            raise SchemaError(f"a message is a {type(message).__name__}, expected an object", column=theirs,
                              fix="messages are [{'role': ..., 'content': ...}]")
        role_key = "role" if "role" in message else "from" if "from" in message else None
        if role_key is None:
            raise SchemaError(f"message without role/from: {str(message)[:80]}", column=theirs,
                              fix="each message needs 'role' (or ShareGPT 'from')")
        content_key = "content" if "content" in message else "value" if "value" in message else None
        role = message[role_key]
        if role is None:
            raise _Quarantine("missing_value")
        key = str(role).strip().lower()
        used = {role_key, content_key}
        if key in TOOL_CALL_ROLES and key not in ctx.user_roles:
            calls = _sharegpt_calls(message.get(content_key) if content_key else None, calls_made)
            calls_made += len(calls)
            unanswered.extend(c["id"] for c in calls)
            msg: dict[str, Any] = {"role": "assistant", "content": None, "tool_calls": calls}
        else:
            mapped = ctx.role_map.get(key)
            if mapped is None:
                raise SchemaError(f"unknown role {role!r}", column=theirs,
                                  fix=f"use one of {sorted(set(ctx.role_map) | set(TOOL_CALL_ROLES))}, "
                                      f"or pass roles={{{str(role)!r}: 'user'}}")
            msg = {"role": mapped, "content": _content(message.get(content_key) if content_key else None)}
            for name in TOOL_FIELDS:
                used.add(name)
                v = message.get(name)
                if v is None:
                    continue
                if name == "tool_calls":
                    msg[name] = _tool_calls(v)
                elif isinstance(v, str):
                    msg[name] = v
                else:
                    raise _Quarantine("invalid_tool_call")
            legacy = message.get("function_call")
            if legacy is not None and mapped == "assistant" and "tool_calls" not in msg:
                used.add("function_call")
                msg["tool_calls"] = _tool_calls([{"type": "function", "function": legacy}])
            if mapped == "tool" and "tool_call_id" not in msg and unanswered:
                msg["tool_call_id"] = unanswered.pop(0)
        out.append(msg)
        extras.append({k: v for k, v in message.items() if k not in used})
    if any(extras):
        ctx.extras[theirs] = extras
    return out


def _sharegpt_calls(value: Any, start: int) -> list[dict[str, Any]]:
    """tool_calls of a ShareGPT function_call turn: value is JSON {name, arguments} or a list of them."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise _Quarantine("invalid_tool_call") from None
    items = value if isinstance(value, list) else [value]
    calls = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not item["name"].strip() \
                or set(item) - {"name", "arguments"}:
            raise _Quarantine("invalid_tool_call")
        arguments = item.get("arguments", {})
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments, ensure_ascii=False)
        calls.append({"id": f"call_{start + i}", "type": "function",
                      "function": {"name": item["name"], "arguments": arguments}})
    if not calls:
        raise _Quarantine("invalid_tool_call")
    return calls


def _tool_calls(value: Any) -> list[dict[str, Any]]:
    """OpenAI / TRL tool calls, checked and copied (null keys dropped; order kept)."""
    if not isinstance(value, (list, tuple)):
        raise _Quarantine("invalid_tool_call")
    out = []
    for call in value:
        if not isinstance(call, dict) or set(call) - set(_CALL_KEYS):
            raise _Quarantine("invalid_tool_call")
        call = {k: v for k, v in call.items() if v is not None}
        if any(not isinstance(call.get(k, ""), str) for k in ("id", "type", "name")):
            raise _Quarantine("invalid_tool_call")
        function = call.get("function")
        if function is not None:
            if not isinstance(function, dict) or set(function) - set(_FUNCTION_KEYS) \
                    or not isinstance(function.get("name"), str):
                raise _Quarantine("invalid_tool_call")
            call["function"] = {k: v for k, v in function.items() if v is not None}
        elif not isinstance(call.get("name"), str):
            raise _Quarantine("invalid_tool_call")
        out.append(call)
    return out


def _prompt(value: Any, ctx: _Ctx) -> list[dict[str, Any]]:
    if value is None:
        raise _Quarantine("missing_value")
    if isinstance(value, (list, tuple)) or (isinstance(value, dict) and ("role" in value or "from" in value)):
        return _messages(value, "prompt", ctx)
    return [{"role": "user", "content": _text(value, "prompt", ctx)}]


def _answer(value: Any, column: str, ctx: _Ctx) -> list[dict[str, Any]]:
    if isinstance(value, (list, tuple)) or (isinstance(value, dict) and ("role" in value or "from" in value)):
        return _messages(value, column, ctx)
    return [{"role": "assistant", "content": _text(value, column, ctx)}]


def _key(messages: list[dict]) -> list[tuple]:
    """What makes two message lists the same conversation (content compared without surrounding
    whitespace)."""
    return [(m["role"], (m.get("content") or "").strip(),
             json.dumps({k: v for k, v in m.items() if k not in ("role", "content")}, sort_keys=True, default=str))
            for m in messages]


def _preference(row: dict, ctx: _Ctx) -> dict[str, Any]:
    chosen_side = _answer(_required(row.get("chosen")), "chosen", ctx)
    rejected_side = _answer(_required(row.get("rejected")), "rejected", ctx)
    explicit = row.get("prompt")
    conv_c = any(m["role"] != "assistant" for m in chosen_side)
    conv_r = any(m["role"] != "assistant" for m in rejected_side)
    values: dict[str, Any] = {"prompt": None, "chosen": chosen_side, "rejected": rejected_side,
                              "score_chosen": None, "score_rejected": None}
    if conv_c and conv_r:
        # TRL implicit prompt: the longest common prefix, cut back to its last non-assistant turn.
        kc, kr = _key(chosen_side), _key(rejected_side)
        common = 0
        while common < min(len(kc), len(kr)) and kc[common] == kr[common]:
            common += 1
        cut = max((i for i in range(common) if chosen_side[i]["role"] != "assistant"), default=-1) + 1
        prompt, chosen, rejected = chosen_side[:cut], chosen_side[cut:], rejected_side[cut:]
        values.update(prompt=prompt or None, chosen=chosen or None, rejected=rejected or None)
        if kc == kr:
            raise _Quarantine("identical_pair", values)
        if not any(m["role"] == "user" for m in prompt):
            raise _Quarantine("prompt_mismatch", values)  # no question in common
        if common < min(len(kc), len(kr)) and \
                (chosen_side[common]["role"] != "assistant" or rejected_side[common]["role"] != "assistant"):
            raise _Quarantine("prompt_mismatch", values)  # they part at a question, not at an answer
    elif conv_c or conv_r:
        conversation = chosen_side if conv_c else rejected_side
        cut = max(i for i, m in enumerate(conversation) if m["role"] != "assistant") + 1
        prompt = conversation[:cut]
        chosen = chosen_side[cut:] if conv_c else chosen_side
        rejected = rejected_side[cut:] if conv_r else rejected_side
        values.update(prompt=prompt, chosen=chosen or None, rejected=rejected or None)
    else:
        chosen, rejected = chosen_side, rejected_side
        if explicit is None:
            raise _Quarantine("missing_prompt", values)
        try:
            prompt = _prompt(explicit, ctx)
        except _Quarantine as q:
            raise _Quarantine(q.reason, values) from None
        values["prompt"] = prompt
        explicit = None  # it is the prompt: nothing to compare
    try:
        prompt = _with_system(prompt, row, ctx)
    except _Quarantine as q:
        raise _Quarantine(q.reason, values) from None
    values["prompt"] = prompt
    if explicit is not None and not _agrees(explicit, prompt, ctx):
        raise _Quarantine("prompt_mismatch", values)
    if not chosen or not rejected or chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
        raise _Quarantine("no_assistant_turn", values)
    if not prompt:
        raise _Quarantine("missing_prompt", values)
    _check_contents(prompt + chosen + rejected, values)
    if _key(chosen) == _key(rejected):
        raise _Quarantine("identical_pair", values)
    values["score_chosen"] = _score(row.get("score_chosen"), values)
    values["score_rejected"] = _score(row.get("score_rejected"), values)
    return values


def _required(value: Any) -> Any:
    if value is None:
        raise _Quarantine("missing_value")
    return value


def _agrees(explicit: Any, prompt: list[dict], ctx: _Ctx) -> bool:
    """An explicit `prompt` value agrees with the conversation prefix: the same messages (a
    leading system turn aside), or a string equal to its first or last user turn."""
    try:
        given = _prompt(explicit, ctx)
    except _Quarantine:
        return True  # an empty / null prompt column says nothing to disagree with
    bare = [m for i, m in enumerate(prompt) if not (i == 0 and m["role"] == "system")]
    if _key(given) in (_key(prompt), _key(bare)):
        return True
    if isinstance(explicit, (list, tuple, dict)):
        return False
    users = [(m.get("content") or "").strip() for m in prompt if m["role"] == "user"]
    return bool(users) and given[0]["content"].strip() in (users[0], users[-1])


def _candidate(value: Any, column: str, ctx: _Ctx) -> dict[str, Any]:
    if isinstance(value, dict):
        content = next((value[k] for k in ("content", "text", "response", "completion") if k in value), None)
        score = next((value[k] for k in ("score", "reward", "rating") if k in value), None)
        return {"content": _content(content), "score": score}
    return {"content": _content(value), "score": None}


def _score(value: Any, values: dict[str, Any]) -> float | None:
    """A finite float, or None for a missing score; NaN / inf / non-numbers / booleans quarantine
    the row (invalid_score) instead of being published as scores."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise _Quarantine("invalid_score", values)
    try:
        number = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        raise _Quarantine("invalid_score", values) from None
    if not math.isfinite(number):
        raise _Quarantine("invalid_score", values)
    return number


def _check_contents(messages: Iterable[dict], values: dict[str, Any]) -> None:
    for message in messages:
        content = message.get("content")
        if message.get("tool_calls") and message.get("role") == "assistant":
            continue  # a tool call needs no text
        if content is None:
            raise _Quarantine("missing_value", values)
        if not content.strip():
            raise _Quarantine("empty_content", values)


# ------------------------------------------------------------------------------------ assembly

def _to_frame(built: list[dict], rows: list[dict], kind: str, extras: list[str],
              frame: pl.DataFrame | None, names: dict[str, str]) -> pl.DataFrame:
    schema = {c: t for c, t in schema_of(kind).items() if c not in _LINEAGE_COLUMNS}
    columns: dict[str, pl.Series] = {}
    for column, dtype in schema.items():
        values = [b[column] for b in built]
        if dtype == MESSAGES:
            series, unstorable = _messages_series(column, values)
            if unstorable:  # safety net: never publish a conversation parquet would change
                for i in unstorable:
                    built[i].update(keep=False, drop_reason="import:unrepresentable")
                    built[i][column] = None
                series, _ = _messages_series(column, [b[column] for b in built])
            columns[column] = series
        else:
            columns[column] = pl.Series(column, values, dtype=dtype)
    for column, dtype in KEEP.items():
        columns[column] = pl.Series(column, [b[column] for b in built], dtype=dtype)
    if any(b[MESSAGE_EXTRAS] is not None for b in built):
        columns[MESSAGE_EXTRAS] = pl.Series(MESSAGE_EXTRAS, [b[MESSAGE_EXTRAS] for b in built], dtype=pl.Utf8)
    for column in extras:
        theirs = names.get(column, column)
        if frame is not None and theirs in frame.columns:
            columns[column] = frame[theirs].alias(column)  # already a polars column: as it is
        else:
            columns[column] = freeze(column, [row.get(column) for row in rows])
    return pl.DataFrame(columns)  # by name: a list of Series would rename a column named ""


def freeze(name: str, values: list) -> pl.Series:
    """A column of user values stored unchanged: natively when polars keeps every value as it was
    (no keys added to structs as nulls, no ints turned into strings, key order kept), else each
    value as its JSON text (strings as they are, so JSON text columns stay byte-identical)."""
    try:
        series = pl.Series(name, values, strict=False)
        if series.dtype != pl.Object and _dtype_depth(series.dtype) <= MAX_NATIVE_DEPTH and _same(series.to_list(), values):
            return series
    except Exception:  # noqa: BLE001 - polars refused the mix of types: JSON text below
        pass
    return pl.Series(name, [_json_text(v) for v in values], dtype=pl.Utf8)


def _dtype_depth(dtype: Any) -> int:
    if isinstance(dtype, (pl.List, pl.Array)):
        return 1 + _dtype_depth(dtype.inner)
    if isinstance(dtype, pl.Struct):
        return 1 + max((_dtype_depth(f.dtype) for f in dtype.fields), default=0)
    return 0


def _json_text(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, default=str)


def _same(a: Any, b: Any, *, absent_is_null: bool = False) -> bool:
    """a (read back from polars) equals b (given), types and dict key order included; ints and
    floats compare by value, NaN equals NaN. absent_is_null: keys of a missing from b may be null."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b or (a != a and b != b)
    if isinstance(a, dict):
        if not isinstance(b, dict):
            return False
        keys = [k for k in a if not (absent_is_null and k not in b and a[k] is None)]
        return keys == list(b) and all(_same(a[k], b[k]) for k in keys)
    if isinstance(a, (list, tuple)):
        return (isinstance(b, (list, tuple)) and len(a) == len(b)
                and all(_same(x, y, absent_is_null=absent_is_null) for x, y in zip(a, b)))
    return type(a) is type(b) and a == b


def _messages_series(column: str, values: list[list[dict] | None]) -> tuple[pl.Series, list[int]]:
    """A message-list column: list<struct<role, content>> when no message has a tool field
    (today's type, exactly), else with the tool fields its messages have. Returns the series and
    the rows it could not store unchanged (none, unless polars surprises us)."""
    messages = [m for conv in values if conv for m in conv]
    present = [f for f in TOOL_FIELDS if any(f in m for m in messages)]
    if not present:
        return pl.Series(column, values, dtype=MESSAGES), []
    calls = [c for m in messages for c in (m.get("tool_calls") or ())]
    call_keys = [k for k in _CALL_KEYS if any(k in c for c in calls)]
    functions = [c["function"] for c in calls if "function" in c]
    function_keys = [k for k in _FUNCTION_KEYS if any(k in f for f in functions)]
    arguments = [x["arguments"] for x in calls + functions if x.get("arguments") is not None]
    arguments_dtype, as_text = _arguments_dtype(arguments)
    if as_text:  # object arguments of differing shapes: each stored as its JSON text
        values = [None if conv is None else [_arguments_as_text(m) for m in conv] for conv in values]
    call_fields = {"id": pl.Utf8, "type": pl.Utf8, "name": pl.Utf8, "arguments": arguments_dtype,
                   "function": pl.Struct({k: pl.Utf8 if k == "name" else arguments_dtype for k in function_keys})}
    message_fields = {"role": pl.Utf8, "content": pl.Utf8}
    for name in present:
        message_fields[name] = (pl.List(pl.Struct({k: call_fields[k] for k in call_keys}))
                                if name == "tool_calls" else pl.Utf8)
    dtype = pl.List(pl.Struct(message_fields))
    try:
        series = pl.Series(column, values, dtype=dtype)
    except Exception:  # noqa: BLE001 - cannot happen for checked values; never crash the import
        series = None
    if series is None:
        return _messages_series(column, [None] * len(values))[0], [i for i, v in enumerate(values) if v]
    unstorable = [i for i, (got, given) in enumerate(zip(series.to_list(), values))
                  if not _same_messages(got, given)]
    return series, unstorable


def _arguments_dtype(arguments: list) -> tuple[pl.DataType, bool]:
    """(dtype of function.arguments, whether object arguments must become JSON text)."""
    if all(isinstance(a, str) for a in arguments):
        return pl.Utf8, False
    if not any(isinstance(a, str) for a in arguments):
        try:
            series = pl.Series("arguments", arguments, strict=False)
            if series.dtype != pl.Object and _same(series.to_list(), arguments):
                return series.dtype, False
        except Exception:  # noqa: BLE001
            pass
    return pl.Utf8, True


def _arguments_as_text(message: dict) -> dict:
    if "tool_calls" not in message:
        return message
    calls = []
    for call in message["tool_calls"]:
        call = dict(call)
        if "arguments" in call:
            call["arguments"] = _json_text(call["arguments"])
        if "function" in call and "arguments" in call["function"]:
            call["function"] = {**call["function"], "arguments": _json_text(call["function"]["arguments"])}
        calls.append(call)
    return {**message, "tool_calls": calls}


def _same_messages(got: list | None, given: list | None) -> bool:
    if got is None or given is None:
        return got is None and given is None
    if len(got) != len(given):
        return False
    for g, m in zip(got, given):
        if not _same(g, m, absent_is_null=True):
            return False
    return True


def _assign_lineage(df: pl.DataFrame, content: list[dict], rows: list[dict], columns: list[str], kind: str,
                    origin: str) -> pl.DataFrame:
    content_columns = [c for c in schema_of(kind) if c not in _LINEAGE_COLUMNS]
    theirs = [row.get("id") for row in rows] if "id" in columns else None
    if theirs is not None:
        as_text = [None if v is None or (isinstance(v, str) and not v.strip()) else _id_text(v) for v in theirs]
        if None not in as_text and len(set(as_text)) == len(as_text):
            ids = as_text
            theirs = None
        else:
            df = df.with_columns(pl.Series("source_id", [None if v is None else _id_text(v) for v in theirs],
                                           dtype=pl.Utf8))
    if "id" not in columns or theirs is not None:
        seen: Counter[str] = Counter()
        ids = []
        # Ids hash each row's own content (tool fields included, as given), never how its column
        # was stored. Quarantined rows with no content hash the raw row (else they'd collide).
        for values, raw in zip(content, rows):
            mapped = [values.get(c) for c in content_columns]
            parts = mapped if any(v is not None for v in mapped) else [raw]
            key = row_id(origin, *parts)
            ids.append(key if not seen[key] else row_id(origin, *parts, seen[key]))
            seen[key] += 1
    parents = [row.get("parent_id") for row in rows] if "parent_id" in columns else [None] * len(rows)
    origins = [row.get("origin") or origin for row in rows] if "origin" in columns else [origin] * len(rows)
    return df.with_columns(
        pl.Series("id", ids, dtype=pl.Utf8),
        pl.Series("parent_id", [None if p is None else _id_text(p) for p in parents], dtype=pl.Utf8),
        pl.Series("origin", [o if isinstance(o, str) else _json_text(o) for o in origins], dtype=pl.Utf8),
    )


def _id_text(value: Any) -> str:
    return value if isinstance(value, str) else _json_text(value) if isinstance(value, (dict, list)) else str(value)


__all__ = ["load_rows", "read_records", "kind_of", "freeze", "ROLE_ALIASES", "TOOL_CALL_ROLES", "REASONS", "ORIGIN", "MESSAGES",
           "MESSAGE", "CANDIDATES", "MESSAGE_EXTRAS"]
