import json

import fsspec
import polars as pl
import pytest

from schemas import SchemaError, row_id
from schemas.mapping import load_rows


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def test_sharegpt_jsonl(tmp_path):
    rows = [
        {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                           {"from": "gpt", "value": "Hello!"}], "source": "a"},
        {"conversations": [{"from": "human", "value": "Only a question"}], "source": "b"},
    ]
    df = load_rows(write_jsonl(tmp_path / "chat.jsonl", rows))
    assert df.columns[:4] == ["id", "parent_id", "origin", "messages"]
    assert df["messages"][0].to_list() == [{"role": "system", "content": "Be brief."},
                                           {"role": "user", "content": "Hi"},
                                           {"role": "assistant", "content": "Hello!"}]
    assert df["source"].to_list() == ["a", "b"]
    assert df["origin"].to_list() == ["import@1"] * 2 and df["parent_id"].null_count() == 2
    # Ending with a user turn: quarantined with a reason and its content, not dropped.
    assert df["keep"].to_list() == [True, False]
    assert df["drop_reason"][1] == "import:no_assistant_turn"
    assert df["messages"][1].to_list() == [{"role": "user", "content": "Only a question"}]


def test_ids_are_stable_and_unique_for_repeated_rows(tmp_path):
    rows = [{"instruction": "Add", "input": "1+1", "output": "2"}] * 2 + [{"instruction": "Sub", "output": "0"}]
    first = load_rows(rows)
    again = load_rows(list(rows))
    assert first["id"].to_list() == again["id"].to_list()
    assert first["id"].n_unique() == 3
    assert first["id"][0] == row_id("import@1", [{"role": "user", "content": "Add\n\n1+1"},
                                                 {"role": "assistant", "content": "2"}])
    assert first["messages"][0].to_list()[0]["content"] == "Add\n\n1+1"
    assert first["messages"][2].to_list()[0]["content"] == "Sub"


def test_instruction_response_with_explicit_mapping_from_parquet(tmp_path):
    path = tmp_path / "qa.parquet"
    pl.DataFrame({"question": ["Capital of France?", "Empty?"], "answer": ["Paris.", ""],
                  "id": [10, 11]}).write_parquet(path)
    df = load_rows(str(path), mapping={"instruction": "question", "response": "answer"})
    assert df["id"].to_list() == ["10", "11"]  # user ids kept when unique
    assert df["messages"][0].to_list()[-1] == {"role": "assistant", "content": "Paris."}
    assert df["keep"].to_list() == [True, False] and df["drop_reason"][1] == "import:empty_content"


def test_duplicate_user_ids_become_source_id():
    df = load_rows([{"id": 1, "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
                    {"id": 1, "messages": [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "b"}]}])
    assert df["source_id"].to_list() == ["1", "1"] and df["id"].n_unique() == 2


def test_preference_strings_and_implicit_prompt_format():
    rows = [
        {"prompt": "2+2?", "chosen": "4", "rejected": "5", "score_chosen": 9, "score_rejected": 1},
        # UltraFeedback-binarized style: chosen/rejected repeat the conversation.
        {"prompt": "Hi?", "chosen": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello"}],
         "rejected": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Go away"}],
         "score_chosen": None, "score_rejected": None},
    ]
    df = load_rows(rows, kind="preference")
    assert df["prompt"][0].to_list() == [{"role": "user", "content": "2+2?"}]
    assert df["chosen"][0].to_list() == [{"role": "assistant", "content": "4"}]
    assert df["rejected"][1].to_list() == [{"role": "assistant", "content": "Go away"}]
    assert df["prompt"][1].to_list() == [{"role": "user", "content": "Hi?"}]
    assert df["score_chosen"].to_list() == [9.0, None] and df.schema["score_chosen"] == pl.Float64
    assert df["keep"].all()


def test_preference_without_prompt_column_takes_the_conversation_prefix():
    conv = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]
    df = load_rows([{"good": conv + [{"role": "assistant", "content": "A"}], "bad": "B"}],
                   kind="preference", mapping={"chosen": "good", "rejected": "bad"})
    assert df["prompt"][0].to_list() == conv


def test_candidates_and_instructions():
    df = load_rows([{"prompt": "q", "completions": ["a", {"text": "b", "reward": 0.5}]}], kind="candidates")
    assert df["candidates"][0].to_list() == [{"content": "a", "score": None}, {"content": "b", "score": 0.5}]
    df = load_rows([{"conversations": [{"from": "human", "value": "Write a poem"}, {"from": "gpt", "value": "..."}]}],
                   kind="instructions")
    assert df["instruction"].to_list() == ["Write a poem"] and df.schema["instruction"] == pl.Utf8


def test_unmappable_columns_list_columns_and_mapping_to_pass():
    with pytest.raises(SchemaError) as err:
        load_rows([{"question": "q", "answer": "a"}], dataset="qa")
    text = str(err.value)
    assert "['question', 'answer']" in text and "mapping=" in text and "dataset 'qa'" in text
    with pytest.raises(SchemaError, match="not in the data"):
        load_rows([{"question": "q"}], mapping={"instruction": "nope", "response": "question"})


def test_unknown_role_is_an_error_naming_row_and_roles_fix():
    rows = [{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
            {"conversations": [{"from": "narrator", "value": "q"}, {"from": "gpt", "value": "a"}]}]
    with pytest.raises(SchemaError, match=r"unknown role 'narrator'.*row 1.*roles="):
        load_rows(rows, dataset="d")
    assert load_rows(rows, roles={"narrator": "system"})["messages"][1].to_list()[0]["role"] == "system"


def test_non_utf8_file_is_a_clear_error_with_line(tmp_path):
    path = tmp_path / "latin.jsonl"
    path.write_bytes(b'{"instruction": "ok", "output": "fine"}\n{"instruction": "caf\xe9", "output": "x"}\n')
    with pytest.raises(SchemaError, match=r"not valid UTF-8: byte 0xe9 at line 2.*iconv"):
        load_rows(str(path))


def test_invalid_json_line_is_a_clear_error(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": \n')
    with pytest.raises(SchemaError, match="invalid JSON on line 2"):
        load_rows(path)


def test_fsspec_url_json_array_and_folder():
    fs = fsspec.filesystem("memory")
    rows = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}]
    with fs.open("/imports/a.json", "w") as f:
        json.dump(rows, f)
    with fs.open("/imports/b.jsonl", "w") as f:
        f.write(json.dumps({"messages": [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]}))
    assert load_rows("memory://imports/a.json").height == 1
    assert load_rows("memory://imports").height == 2
    with pytest.raises(SchemaError, match="no such file"):
        load_rows("memory://imports/missing.jsonl")


# ------------------------------------------------------------------ issue 8: the handed examples

from schemas import MESSAGES, clean_messages  # noqa: E402

from .bad_inputs_cases import (ADD_TOOLS, COLOR_CHOSEN, COLOR_REJECTED, PLAIN, TOOL_CONVERSATION,  # noqa: E402
                               WEATHER_TOOLS, BY_NAME)


def test_tool_calling_conversation_round_trips_unchanged(tmp_path):
    # Kind 1: assistant content null + tool_calls, a tool turn with tool_call_id: kept, not
    # import:missing_value, and nothing removed.
    path = write_jsonl(tmp_path / "tools.jsonl", [{"messages": TOOL_CONVERSATION, "tools": ADD_TOOLS},
                                                  {"messages": PLAIN, "tools": WEATHER_TOOLS}])
    df = load_rows(str(path))
    assert df["keep"].to_list() == [True, True]
    assert clean_messages(df["messages"][0].to_list()) == TOOL_CONVERSATION
    assert clean_messages(df["messages"][1].to_list()) == PLAIN
    # The raw struct: fields other messages have read back as null (one struct type per column).
    assert df["messages"][1].to_list()[0] == {"role": "user", "content": "Hi", "tool_calls": None, "tool_call_id": None}
    # `tools`: the two rows' JSON schemas differ, so each is its own JSON text - no keys of the
    # other row (description, required, city...) added as nulls.
    assert df.schema["tools"] == pl.Utf8
    assert [json.loads(t) for t in df["tools"]] == [ADD_TOOLS, WEATHER_TOOLS]
    assert df["tools"].to_list() == [json.dumps(ADD_TOOLS, ensure_ascii=False), json.dumps(WEATHER_TOOLS, ensure_ascii=False)]
    # Stored and read back through parquet, nothing changes.
    df.write_parquet(tmp_path / "out.parquet")
    back = pl.read_parquet(tmp_path / "out.parquet")
    assert clean_messages(back["messages"][0].to_list()) == TOOL_CONVERSATION
    assert back["tools"].to_list() == df["tools"].to_list()
    # Re-importing our own output gives the same rows, ids and types.
    again = load_rows(back)
    assert again["id"].to_list() == df["id"].to_list() and again.schema == df.schema
    assert again["messages"].to_list() == df["messages"].to_list()


def test_tool_call_with_empty_string_content_is_kept_as_is():
    conv = [TOOL_CONVERSATION[0], {**TOOL_CONVERSATION[1], "content": ""}, *TOOL_CONVERSATION[2:]]
    df = load_rows([{"messages": conv}])
    assert df["keep"].to_list() == [True] and clean_messages(df["messages"][0].to_list()) == conv


def test_plain_rows_keep_todays_dtype_and_ids():
    rows = [{"messages": PLAIN}, {"conversations": None, "messages": [{**m, "tool_calls": None} for m in PLAIN]}]
    df = load_rows(rows)
    assert df.schema["messages"] == MESSAGES  # list<struct<role, content>> exactly
    assert df["id"][0] == row_id("import@1", PLAIN)  # the id today's import gives
    assert df["id"][1] == row_id("import@1", PLAIN, 1)  # null tool fields are no fields: an exact repeat
    # A plain row's id does not depend on tool rows elsewhere in the file.
    mixed = load_rows([{"messages": PLAIN}, {"messages": TOOL_CONVERSATION}])
    assert mixed.schema["messages"] != MESSAGES and mixed["id"][0] == row_id("import@1", PLAIN)
    assert mixed["id"][1] == row_id("import@1", TOOL_CONVERSATION)
    # Other columns of the same shape in every row stay native.
    df = load_rows([{"messages": PLAIN, "meta": {"a": 1, "b": "x"}}, {"messages": PLAIN, "meta": {"a": 2, "b": "y"}}])
    assert df.schema["meta"] == pl.Struct({"a": pl.Int64, "b": pl.Utf8})


def test_polars_struct_inference_would_drop_tool_fields_we_do_not():
    # pl.Series infers a struct from the first rows: tool_calls of a later row would vanish.
    rows = [{"messages": PLAIN}] * 3 + [{"messages": TOOL_CONVERSATION}]
    assert "tool_calls" not in str(pl.Series([r["messages"] for r in rows]).dtype)
    df = load_rows(rows)
    assert clean_messages(df["messages"][3].to_list()) == TOOL_CONVERSATION


def test_sharegpt_function_call_and_observation_become_tool_turns():
    case = BY_NAME["sharegpt_function_call_observation"]
    df = load_rows(case.rows)
    assert clean_messages(df["messages"][0].to_list()) == [
        {"role": "user", "content": "Add 2 and 5."},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_0", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 5}'}}]},
        {"role": "tool", "content": "7", "tool_call_id": "call_0"},
        {"role": "assistant", "content": "2 + 5 = 7."},
    ]
    assert df["tools"].to_list() == [json.dumps(ADD_TOOLS)]  # a JSON-text column stays byte-identical
    parallel = load_rows(BY_NAME["sharegpt_parallel_function_calls"].rows)["messages"][0].to_list()
    assert [c["id"] for c in parallel[1]["tool_calls"]] == ["call_0", "call_1"]
    assert [(m["role"], m["tool_call_id"]) for m in parallel[2:4]] == [("tool", "call_0"), ("tool", "call_1")]
    # A user who wants function_call turns as plain assistant text says so.
    df = load_rows(case.rows, roles={"function_call": "assistant"})
    assert df.schema["messages"] == MESSAGES and df["messages"][0].to_list()[1]["role"] == "assistant"


def test_legacy_function_call_name_and_object_arguments():
    df = load_rows(BY_NAME["legacy_function_call"].rows)
    msgs = clean_messages(df["messages"][0].to_list())
    assert msgs[1] == {"role": "assistant", "content": None,
                       "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": '{"a":2,"b":5}'}}]}
    assert msgs[2] == {"role": "tool", "content": "7", "name": "add"}
    # Object arguments of different shapes: each call's arguments become its JSON text.
    df = load_rows(BY_NAME["object_arguments_of_different_shapes"].rows)
    args = [clean_messages(m.to_list())[1]["tool_calls"][0]["function"]["arguments"] for m in df["messages"]]
    assert args == ['{"a": 2, "b": 5}', '{"city": "Paris"}']
    # The same shape everywhere: kept as objects.
    same = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "tool_calls": [
        {"type": "function", "function": {"name": "add", "arguments": {"a": a, "b": 1}}}]}]} for q, a in (("x", 1), ("y", 2))]
    df = load_rows(same)
    assert clean_messages(df["messages"][1].to_list())[1]["tool_calls"][0]["function"]["arguments"] == {"a": 2, "b": 1}
    # Ids hash the row's content as given, not how the column stored it.
    assert load_rows(BY_NAME["object_arguments_of_different_shapes"].rows[:1])["id"][0] == \
        load_rows(BY_NAME["object_arguments_of_different_shapes"].rows)["id"][0]


def test_unknown_message_keys_are_kept_aside_not_dropped():
    df = load_rows(BY_NAME["unknown_message_keys"].rows)
    assert df.schema["messages"] == MESSAGES
    assert json.loads(df["message_extras"][0]) == {"conversations": [{"weight": 0}, {"weight": 1}]}
    assert "message_extras" not in load_rows([{"messages": PLAIN}]).columns


def test_implicit_prompt_is_the_longest_common_prefix():
    # Kind 3, the example: not Green-vs-Green.
    df = load_rows([{"chosen": COLOR_CHOSEN, "rejected": COLOR_REJECTED}], kind="preference")
    assert df["keep"].to_list() == [True]
    assert df["prompt"][0].to_list() == [{"role": "user", "content": "Give me a color."}]
    assert df["chosen"][0].to_list() == COLOR_CHOSEN[1:]
    assert df["rejected"][0].to_list() == COLOR_REJECTED[1:]
    assert df["chosen"][0].to_list()[0]["content"] == "Blue." and df["rejected"][0].to_list()[0]["content"] == "Red."
    # Shared assistant turns before the divergence stay in both sides, the prompt ends at a user turn.
    c = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a1"}, {"role": "assistant", "content": "x"}]
    r = c[:2] + [{"role": "assistant", "content": "y"}]
    df = load_rows([{"chosen": c, "rejected": r}], kind="preference")
    assert df["prompt"][0].to_list() == c[:1] and df["chosen"][0].to_list() == c[1:]


def test_preference_pairs_that_disagree_are_quarantined():
    df = load_rows(BY_NAME["implicit_prompt_different_questions"].rows, kind="preference")
    assert df["drop_reason"].to_list() == ["import:prompt_mismatch"] * 3
    df = load_rows(BY_NAME["explicit_prompt_disagrees"].rows, kind="preference")
    assert df["drop_reason"].to_list() == ["import:prompt_mismatch", None]
    df = load_rows(BY_NAME["identical_pair"].rows, kind="preference")
    assert df["drop_reason"].to_list() == ["import:identical_pair", "import:identical_pair", None]
    # Quarantined pairs keep what was built, for rejected/.
    assert df["chosen"][0].to_list() == [{"role": "assistant", "content": "4"}]


def test_u2028_inside_strings_is_text_not_a_line_break(tmp_path):
    # Kind 6: str.splitlines() would cut these rows apart.
    path = BY_NAME["u2028_inside_strings"].write(tmp_path)
    df = load_rows(str(path))
    assert df["messages"][0].to_list() == [{"role": "user", "content": "Line\u2028separator"},
                                           {"role": "assistant", "content": "Para\u2029graph\x85"}]
    assert df.height == 2


def test_lone_surrogate_row_is_quarantined_and_the_rest_imported(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text('{"instruction": "Smile \\ud83d", "output": "ok"}\n{"instruction": "a", "output": "b"}\n')
    df = load_rows(str(path))
    assert df["keep"].to_list() == [False, True]
    assert df["drop_reason"][0] == "import:invalid_utf8"
    # rejected/ shows the row with the surrogate written as its escape text.
    assert df["messages"][0].to_list()[0]["content"] == "Smile \\ud83d"
    df.write_parquet(tmp_path / "out.parquet")  # storable: no UnicodeEncodeError
    # Same from Python rows.
    assert load_rows([{"instruction": "x\udfff", "output": "y"}])["drop_reason"].to_list() == ["import:invalid_utf8"]


def test_non_string_text_values_are_written_into_the_text():
    # Kind 7: Alpaca `input: 12` is not dropped, `output: 42` is not an error naming `response`.
    df = load_rows([{"instruction": "Square the number given as input.", "input": 12, "output": "144"},
                    {"instruction": "What is 6 times 7?", "output": 42},
                    {"instruction": ["a", "b"], "output": {"answer": 1}},
                    {"instruction": "Is it?", "output": True}])
    assert df["keep"].all()
    assert df["messages"][0].to_list() == [{"role": "user", "content": "Square the number given as input.\n\n12"},
                                           {"role": "assistant", "content": "144"}]
    assert df["messages"][1].to_list()[1] == {"role": "assistant", "content": "42"}
    assert df["messages"][2].to_list() == [{"role": "user", "content": '["a", "b"]'},
                                           {"role": "assistant", "content": '{"answer": 1}'}]
    assert df["messages"][3].to_list()[1]["content"] == "true"
    df = load_rows([{"q": "Add 1", "a": 2}], mapping={"instruction": "q", "response": "a"})
    assert df["messages"][0].to_list()[1]["content"] == "2"
    df = load_rows([{"prompt": 7, "chosen": 8, "rejected": 9.5}], kind="preference")
    assert [df[c][0].to_list()[0]["content"] for c in ("prompt", "chosen", "rejected")] == ["7", "8", "9.5"]


def test_errors_name_the_users_column_not_ours():
    with pytest.raises(SchemaError) as err:
        load_rows([{"prompt": "q", "answer": [1, 2]}], mapping={"completion": "answer"}, dataset="d")
    assert err.value.column == "answer" and "column 'answer'" in str(err.value) and "row 0" in str(err.value)
    with pytest.raises(SchemaError) as err:
        load_rows([{"chat": [{"from": "narrator", "value": "x"}]}], mapping={"messages": "chat"})
    assert err.value.column == "chat"
    with pytest.raises(SchemaError) as err:
        load_rows([{"prompt": "q", "options": "a"}], kind="candidates", mapping={"candidates": "options"})
    assert err.value.column == "options"


def test_whole_file_errors_are_clear(tmp_path):
    with pytest.raises(SchemaError, match=r"no rows: .*empty_file.jsonl is empty.*Fix:"):
        load_rows(str(BY_NAME["empty_file"].write(tmp_path)))
    with pytest.raises(SchemaError, match=r"look like preference rows: pass kind='preference' \(CLI: --set kind=preference\)"):
        load_rows([{"prompt": "q", "chosen": "a", "rejected": "b"}])
    # An empty frame with known columns is zero rows, not an error.
    empty = pl.DataFrame(schema={"messages": MESSAGES})
    assert load_rows(empty).height == 0


def test_roles_must_map_to_known_roles():
    with pytest.raises(SchemaError, match=r"roles= maps to unknown roles: \{'narrator': 'villain'\}.*Fix:"):
        load_rows([{"messages": PLAIN}], roles={"narrator": "villain"})


def test_message_extras_survive_a_re_import():
    df = load_rows(BY_NAME["unknown_message_keys"].rows)
    again = load_rows(df)
    assert again["message_extras"].to_list() == df["message_extras"].to_list()
    assert again["id"].to_list() == df["id"].to_list()
