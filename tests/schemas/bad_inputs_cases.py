"""Bad and odd import inputs, as data: what a new user feeds the importer, and what must happen.

Each Case is one input file (JSON lines written from `rows`, or the exact bytes in `raw` when
the bytes are the point) plus the import settings (kind, mapping) and the expected outcome:
- an error: a SchemaError whose text matches `error` (a regex) and names `error_column` /
  `error_row` when given (the CLI exits 2 with it), or
- rows: `kept` rows published and `reasons` ({drop_reason: count}) quarantined, with
  kept + sum(reasons) == the input rows (`n_rows`).

tests/schemas/test_bad_inputs_cases.py runs every case through schemas.mapping.load_rows;
tests/test_bad_inputs.py can run the same cases through the CLI (`case.write(folder)` gives the
file; `case.kind` / `case.mapping` are the input settings).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# --------------------------------------------------------------------------------- building blocks

ADD_CALL = {"id": "c1", "type": "function", "function": {"name": "add", "arguments": "{\"a\":2,\"b\":5}"}}
# The example: a tool-calling conversation (assistant content null + tool_calls, a tool
# turn answering it, the final answer).
TOOL_CONVERSATION = [
    {"role": "user", "content": "Add 2 and 5."},
    {"role": "assistant", "content": None, "tool_calls": [ADD_CALL]},
    {"role": "tool", "tool_call_id": "c1", "content": "7"},
    {"role": "assistant", "content": "2 + 5 = 7."},
]
ADD_TOOLS = [{"type": "function", "function": {
    "name": "add", "description": "Add two integers.",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                   "required": ["a", "b"]}}}]
WEATHER_TOOLS = [{"type": "function", "function": {
    "name": "weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
PLAIN = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]


def chat(*turns: tuple[str, str]) -> list[dict[str, str]]:
    return [{"role": r, "content": c} for r, c in turns]


def sharegpt(*turns: tuple[str, str]) -> dict[str, Any]:
    return {"conversations": [{"from": f, "value": v} for f, v in turns]}


COLOR_CHOSEN = chat(("user", "Give me a color."), ("assistant", "Blue."), ("user", "Another?"), ("assistant", "Green."))
COLOR_REJECTED = chat(("user", "Give me a color."), ("assistant", "Red."), ("user", "Another?"), ("assistant", "Green."))


@dataclass(frozen=True)
class Case:
    name: str
    kind: str = "sft"
    rows: list[dict] | None = None
    raw: bytes | None = None
    suffix: str = ".jsonl"
    mapping: dict[str, str] | None = None
    # expected: an error...
    error: str | None = None
    error_column: str | None = None
    error_row: int | str | None = None
    # ...or rows
    kept: int | None = None
    reasons: dict[str, int] = field(default_factory=dict)
    n_rows: int | None = None  # input rows when given as raw bytes
    why: str = ""

    @property
    def input_rows(self) -> int:
        return len(self.rows) if self.rows is not None else int(self.n_rows or 0)

    def content(self) -> bytes:
        if self.raw is not None:
            return self.raw
        # ensure_ascii: lone surrogates travel as their "\ud83d" escape, as in a real file.
        return "".join(json.dumps(r) + "\n" for r in self.rows or []).encode("utf-8")

    def write(self, folder: str | Path) -> Path:
        path = Path(folder) / f"{self.name}{self.suffix}"
        path.write_bytes(self.content())
        return path


def ok(name: str, rows: list[dict], kind: str = "sft", kept: int | None = None, **kw) -> Case:
    return Case(name, kind, rows=rows, kept=len(rows) if kept is None else kept, **kw)


def bad(name: str, rows: list[dict] | None, error: str, kind: str = "sft", **kw) -> Case:
    return Case(name, kind, rows=rows, error=error, **kw)


CASES: list[Case] = [
    # ---- kind 1: tool calling -------------------------------------------------------------
    ok("tool_call_roundtrip", [{"messages": TOOL_CONVERSATION, "tools": ADD_TOOLS}, {"messages": PLAIN}],
       why="assistant content null + tool_calls, tool turn with tool_call_id: kept unchanged"),
    ok("tool_call_empty_content", [{"messages": [TOOL_CONVERSATION[0], {**TOOL_CONVERSATION[1], "content": ""},
                                                 *TOOL_CONVERSATION[2:]]}],
       why='content "" beside tool_calls is not empty_content'),
    ok("tools_column_schemas_differ", [{"messages": TOOL_CONVERSATION, "tools": ADD_TOOLS},
                                       {"messages": PLAIN, "tools": WEATHER_TOOLS}],
       why="per-row tools kept as JSON text, no keys of other rows added as nulls"),
    ok("tool_name_field", [{"messages": [{"role": "user", "content": "Hi", "name": "alice"},
                                         {"role": "assistant", "content": "Hello alice"}]}]),
    ok("sharegpt_function_call_observation",
       [{**sharegpt(("human", "Add 2 and 5."), ("function_call", json.dumps({"name": "add", "arguments": {"a": 2, "b": 5}})),
                    ("observation", "7"), ("gpt", "2 + 5 = 7.")), "tools": json.dumps(ADD_TOOLS)}],
       why="function_call -> assistant tool call, observation -> tool turn answering it"),
    ok("sharegpt_parallel_function_calls",
       [sharegpt(("human", "Weather in Paris and Rome?"),
                 ("function_call", json.dumps([{"name": "weather", "arguments": {"city": "Paris"}},
                                               {"name": "weather", "arguments": {"city": "Rome"}}])),
                 ("observation", "sunny"), ("observation", "rain"), ("gpt", "Paris sunny, Rome rain."))]),
    Case("sharegpt_function_call_not_json", rows=[
        sharegpt(("human", "Add"), ("function_call", "add(2, 5)"), ("observation", "7"), ("gpt", "7")),
        sharegpt(("human", "Hi"), ("gpt", "Hello"))], kept=1, reasons={"import:invalid_tool_call": 1}),
    Case("tool_calls_not_a_list", rows=[
        {"messages": [{"role": "user", "content": "Add"}, {"role": "assistant", "content": None, "tool_calls": "add(2,5)"},
                      {"role": "assistant", "content": "7"}]}], kept=0, reasons={"import:invalid_tool_call": 1}),
    Case("tool_call_id_not_a_string", rows=[
        {"messages": [TOOL_CONVERSATION[0], TOOL_CONVERSATION[1], {"role": "tool", "tool_call_id": 1, "content": "7"},
                      TOOL_CONVERSATION[3]]}, {"messages": PLAIN}], kept=1, reasons={"import:invalid_tool_call": 1}),
    Case("assistant_null_content_without_tool_calls", rows=[
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None}]}, {"messages": PLAIN}],
        kept=1, reasons={"import:missing_value": 1}),
    ok("legacy_function_call", [{"messages": [
        {"role": "user", "content": "Add 2 and 5."},
        {"role": "assistant", "content": None, "function_call": {"name": "add", "arguments": "{\"a\":2,\"b\":5}"}},
        {"role": "function", "name": "add", "content": "7"}, {"role": "assistant", "content": "7"}]}]),
    ok("object_arguments_of_different_shapes", [
        {"messages": [{"role": "user", "content": "Add"}, {"role": "assistant", "tool_calls": [
            {"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 5}}}]},
            {"role": "tool", "content": "7"}, {"role": "assistant", "content": "7"}]},
        {"messages": [{"role": "user", "content": "Weather?"}, {"role": "assistant", "tool_calls": [
            {"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}}]},
            {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "Sunny."}]}],
       why="arguments stored as JSON text: a struct would add a/b/city as nulls"),
    Case("content_parts", rows=[
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "Describe it."}]},
                      {"role": "assistant", "content": "A cat."}]},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                                   {"type": "image_url", "image_url": {"url": "x.png"}}]},
                      {"role": "assistant", "content": "A cat."}]}], kept=1, reasons={"import:non_text_content": 1}),
    ok("unknown_message_keys", [{"conversations": [{"from": "human", "value": "Hi", "weight": 0},
                                                   {"from": "gpt", "value": "Hello", "weight": 1}]}],
       why="kept in message_extras; messages stay list<struct<role, content>>"),

    # ---- kind 3: preference pairs ------------------------------------------------------------
    ok("implicit_prompt_multi_turn", [{"chosen": COLOR_CHOSEN, "rejected": COLOR_REJECTED}], kind="preference",
       why="prompt = longest common prefix, not chosen's last user turn"),
    ok("implicit_prompt_agreeing_prompt_column",
       [{"prompt": "Hi?", "chosen": chat(("user", "Hi?"), ("assistant", "Hello")),
         "rejected": chat(("user", "Hi?"), ("assistant", "Go away"))}], kind="preference"),
    Case("implicit_prompt_different_questions", "preference", rows=[
        {"chosen": chat(("user", "Capital of France?"), ("assistant", "Paris.")),
         "rejected": chat(("user", "Capital of Spain?"), ("assistant", "Madrid."))},
        {"chosen": chat(("system", "Be brief."), ("user", "2+2?"), ("assistant", "4")),
         "rejected": chat(("system", "Be brief."), ("user", "3+3?"), ("assistant", "6"))},
        {"chosen": chat(("user", "Color?"), ("assistant", "Blue."), ("user", "Why?"), ("assistant", "Sky.")),
         "rejected": chat(("user", "Color?"), ("assistant", "Blue."), ("user", "Sure?"), ("assistant", "No."))}],
        kept=0, reasons={"import:prompt_mismatch": 3}),
    Case("explicit_prompt_disagrees", "preference", rows=[
        {"prompt": "Capital of Italy?", "chosen": chat(("user", "Capital of France?"), ("assistant", "Paris.")),
         "rejected": chat(("user", "Capital of France?"), ("assistant", "Lyon."))},
        {"prompt": "Capital of France?", "chosen": chat(("user", "Capital of France?"), ("assistant", "Paris.")),
         "rejected": chat(("user", "Capital of France?"), ("assistant", "Lyon."))}],
        kept=1, reasons={"import:prompt_mismatch": 1}),
    Case("identical_pair", "preference", rows=[
        {"prompt": "2+2?", "chosen": "4", "rejected": "4"},
        {"chosen": chat(("user", "2+2?"), ("assistant", "4")), "rejected": chat(("user", "2+2?"), ("assistant", "4 "))},
        {"prompt": "2+2?", "chosen": "4", "rejected": "5"}], kept=1, reasons={"import:identical_pair": 2}),
    Case("preference_missing_prompt", "preference", rows=[
        {"chosen": "4", "rejected": "5"}], kept=0, reasons={"import:missing_prompt": 1}),
    Case("preference_side_without_answer", "preference", rows=[
        {"chosen": chat(("user", "q"), ("assistant", "a")), "rejected": chat(("user", "q"),)}],
        kept=0, reasons={"import:no_assistant_turn": 1}),

    # ---- kind 6: text decoding ---------------------------------------------------------------
    Case("u2028_inside_strings", raw=(json.dumps({"instruction": "Line\u2028separator", "output": "Para\u2029graph\x85"},
                                                  ensure_ascii=False) + "\n"
                                      + json.dumps({"instruction": "b", "output": "c"}) + "\n").encode("utf-8"),
         n_rows=2, kept=2, why="JSON lines split on \\n only"),
    Case("lone_surrogate", rows=[{"instruction": "Smile \ud83d", "output": "ok"}, {"instruction": "a", "output": "b"},
                                 {"instruction": "c", "output": "d"}],
         kept=2, reasons={"import:invalid_utf8": 1}),
    Case("lone_surrogate_in_extra_column", rows=[{"instruction": "a", "output": "b", "note": "x\udc00"},
                                                 {"instruction": "c", "output": "d", "note": "y"}],
         kept=1, reasons={"import:invalid_utf8": 1}),
    Case("crlf_line_endings", raw=b'{"instruction": "a", "output": "b"}\r\n{"instruction": "c", "output": "d"}\r\n',
         n_rows=2, kept=2),
    Case("utf8_bom", raw=b'\xef\xbb\xbf{"instruction": "a", "output": "b"}\n', n_rows=1, kept=1),
    Case("mixed_encodings", raw=b'{"instruction": "ok", "output": "fine"}\n{"instruction": "caf\xe9", "output": "x"}\n',
         error=r"not valid UTF-8: byte 0xe9 at line 2.*iconv", error_row="line 2"),
    Case("utf16_file", raw='{"instruction": "a", "output": "b"}\n'.encode("utf-16"),
         error=r"UTF-16.*iconv -f utf-16"),

    # ---- kind 7: non-string values -----------------------------------------------------------
    ok("alpaca_number_input", [{"instruction": "Square the number given as input.", "input": 12, "output": "144"}]),
    ok("alpaca_number_output", [{"instruction": "What is 6 times 7?", "input": "", "output": 42}]),
    ok("list_and_object_values", [{"instruction": ["a", "b"], "output": {"answer": 1}},
                                  {"instruction": "Is it?", "output": True}]),
    Case("null_and_nan_output", raw=b'{"instruction": "a", "output": null}\n{"instruction": "b", "output": NaN}\n'
                                    b'{"instruction": "c", "output": "d"}\n',
         n_rows=3, kept=1, reasons={"import:missing_value": 2}, why="NaN is pandas' missing value, not text"),
    bad("messages_not_a_list_names_users_column", [{"chat": 42}], r"expected a list of messages, got int",
        mapping={"messages": "chat"}, error_column="chat", error_row=0),
    bad("completion_of_numbers_names_users_column", [{"prompt": "q", "answer": [1, 2]}], r"a message is a int",
        mapping={"completion": "answer"}, error_column="answer", error_row=0),

    # ---- empty files, wrong kinds, bad shapes -----------------------------------------------------
    Case("empty_file", raw=b"", error=r"no rows: .* is empty"),
    Case("whitespace_only_file", raw=b"\n  \n\n", error=r"no rows"),
    Case("empty_json_array", raw=b"[]", suffix=".json", error=r"no rows"),
    Case("csv_file", raw=b"instruction,output\na,b\n", suffix=".csv", error=r"cannot import \.csv files.*parquet"),
    bad("wrong_kind_preference_as_sft", [{"prompt": "q", "chosen": "a", "rejected": "b"}],
        r"cannot map columns.*look like preference rows: pass kind='preference'"),
    bad("wrong_kind_sft_as_preference", [{"messages": PLAIN}], r"look like sft rows", kind="preference"),
    Case("invalid_json_line", raw=b'{"instruction": "a", "output": "b"}\n{"instruction": \n',
         error=r"invalid JSON on line 2", error_row="line 2"),
    Case("row_not_an_object", raw=b'{"instruction": "a", "output": "b"}\n[1, 2]\n', error=r"row is a list", error_row=1),
    bad("unknown_role", [sharegpt(("human", "q"), ("gpt", "a")), sharegpt(("narrator", "q"), ("gpt", "a"))],
        r"unknown role 'narrator'.*roles=", error_column="conversations", error_row=1),
    bad("message_without_role", [{"messages": [{"speaker": "user", "content": "q"}]}], r"message without role/from",
        error_column="messages", error_row=0),
    ok("non_alternating_roles", [{"messages": chat(("user", "a"), ("user", "b"), ("assistant", "c"), ("assistant", "d"))}],
       why="consecutive turns of one role are valid chat data; templates that need alternation check it"),

    # ---- ids -------------------------------------------------------------------------------------
    ok("duplicate_ids", [{"id": 7, "instruction": "a", "output": "b"}, {"id": 7, "instruction": "c", "output": "d"}],
       why="ids become content hashes, theirs kept as source_id"),
    ok("ids_of_mixed_types", [{"id": 1, "instruction": "a", "output": "b"}, {"id": "1", "instruction": "c", "output": "d"},
                              {"id": 2.5, "instruction": "e", "output": "f"}]),
    ok("blank_and_null_ids", [{"id": "", "instruction": "a", "output": "b"}, {"id": None, "instruction": "c", "output": "d"}]),

    # ---- nested nulls and gaps -----------------------------------------------------------------
    Case("nested_nulls", rows=[
        {"messages": [None, {"role": "assistant", "content": "a"}]},
        {"messages": [{"role": None, "content": "q"}, {"role": "assistant", "content": "a"}]},
        {"messages": [{"role": "user", "content": None}, {"role": "assistant", "content": "a"}]},
        {"messages": None},
        {"messages": []},
        {"messages": PLAIN}],
        kept=1, reasons={"import:missing_value": 4, "import:empty_conversation": 1}),
    Case("blank_text", rows=[{"instruction": "a", "output": "  \n"}, {"instruction": "", "output": "b"},
                             {"instruction": "c", "output": "d"}], kept=1, reasons={"import:empty_content": 2}),
    Case("no_assistant_turn", rows=[{"messages": chat(("user", "only a question"))}, {"messages": PLAIN}],
         kept=1, reasons={"import:no_assistant_turn": 1}),
    Case("system_column_conflicts", rows=[
        {"messages": [{"role": "system", "content": "Be brief."}, *PLAIN], "system": "Be verbose."},
        {"messages": PLAIN, "system": "Be brief."}], kept=1, reasons={"import:system_mismatch": 1}),
    Case("quarantined_upstream", rows=[{"messages": PLAIN, "keep": False, "drop_reason": "minhash_duplicate"},
                                      {"messages": chat(("user", "x"), ("assistant", "y")), "keep": True}],
         kept=1, reasons={"minhash_duplicate": 1}),

    # ---- scores --------------------------------------------------------------------------------
    Case("scores_as_strings_and_bools", "preference", rows=[
        {"prompt": "q", "chosen": "a", "rejected": "b", "score_chosen": "9", "score_rejected": " 1.5 "},
        {"prompt": "q", "chosen": "a", "rejected": "c", "score_chosen": "high", "score_rejected": 1},
        {"prompt": "q", "chosen": "a", "rejected": "d", "score_chosen": True, "score_rejected": 1},
        {"prompt": "q", "chosen": "a", "rejected": "e", "score_chosen": "NaN", "score_rejected": 1},
        {"prompt": "q", "chosen": "a", "rejected": "f", "score_chosen": None, "score_rejected": None}],
        kept=2, reasons={"import:invalid_score": 3}),
    Case("candidate_scores", "candidates", rows=[
        {"prompt": "q", "candidates": ["a", {"text": "b", "reward": "0.5"}]},
        {"prompt": "q", "candidates": [{"content": "a", "score": "bad"}]},
        {"prompt": "q", "candidates": []}],
        kept=1, reasons={"import:invalid_score": 1, "import:no_candidates": 1}),

    # ---- size ----------------------------------------------------------------------------------
    ok("huge_row", [{"instruction": "Summarise:\n" + "word " * 400_000, "output": "Words."},
                    {"instruction": "a", "output": "b"}]),
]

BY_NAME = {case.name: case for case in CASES}
assert len(BY_NAME) == len(CASES), "case names must be unique"
