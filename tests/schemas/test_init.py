import polars as pl
import pytest

import schemas
from schemas import SchemaError, validate


def sft_frame(conversations, ids=None):
    ids = ids or [f"r{i}" for i in range(len(conversations))]
    return pl.DataFrame({"id": ids, "parent_id": [None] * len(ids), "origin": ["test@1"] * len(ids),
                         "messages": conversations},
                        schema_overrides={"messages": schemas.MESSAGES, "parent_id": pl.Utf8})


GOOD = schemas.to_messages("What is 2+2?", "4")


def test_valid_sft_passes_and_returns_frame():
    df = sft_frame([GOOD, schemas.to_messages("hi", "hello", system="be brief")])
    assert validate(df, "sft", dataset="demo") is df


@pytest.mark.parametrize("conversation, needle", [
    (schemas.to_messages("only a question"), "does not end with an assistant turn"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}], "empty or null content"),
    ([{"role": "user", "content": None}, {"role": "assistant", "content": "a"}], "empty or null content"),
    ([{"role": "human", "content": "q"}, {"role": "assistant", "content": "a"}], "unknown role"),
    ([], "empty or null"),
])
def test_bad_messages_name_dataset_column_and_row(conversation, needle):
    df = sft_frame([GOOD, GOOD, conversation])
    with pytest.raises(SchemaError) as err:
        validate(df, "sft", dataset="my-data")
    text = str(err.value)
    assert needle in text
    assert "dataset 'my-data'" in text and "column 'messages'" in text and "row 2" in text
    assert "id 'r2'" in text and "Fix:" in text
    assert err.value.row == 2 and err.value.column == "messages"


def test_quarantined_rows_skip_content_checks_but_not_id_checks():
    df = sft_frame([GOOD, schemas.to_messages("no answer")]).with_columns(keep=pl.Series([True, False]))
    validate(df, "sft")
    with pytest.raises(SchemaError, match="duplicate id"):
        validate(df.with_columns(id=pl.lit("same")), "sft")


def test_missing_column_wrong_dtype_null_and_duplicate_id():
    df = sft_frame([GOOD, GOOD])
    with pytest.raises(SchemaError, match="missing column 'origin'.*found columns"):
        validate(df.drop("origin"), "sft", dataset="d")
    with pytest.raises(SchemaError, match="column 'id' has dtype Int64.*Fix: cast"):
        validate(df.with_columns(id=pl.Series([1, 2])), "sft")
    with pytest.raises(SchemaError, match="id is null.*row 1"):
        validate(df.with_columns(id=pl.Series(["a", None])), "sft")
    with pytest.raises(SchemaError, match=r"duplicate id.*row 1"):
        validate(df.with_columns(id=pl.lit("a")), "sft")
    with pytest.raises(SchemaError, match="unknown row kind"):
        validate(df, "nope")


def test_all_null_parent_id_is_accepted_and_conform_types_it():
    df = pl.DataFrame({"id": ["a"], "parent_id": [None], "origin": ["x"], "instruction": ["Say hi"]})
    assert df.schema["parent_id"] == pl.Null
    validate(df, "instructions")
    assert schemas.conform(df).schema["parent_id"] == pl.Utf8


def test_instructions_empty_text_is_an_error():
    df = pl.DataFrame({"id": ["a", "b"], "parent_id": [None, None], "origin": ["x", "x"],
                       "instruction": ["ok", " "]}, schema_overrides={"parent_id": pl.Utf8})
    with pytest.raises(SchemaError, match="instruction is empty.*row 1"):
        validate(df, "instructions", dataset="d")


def preference_frame(chosen, prompt=None):
    return pl.DataFrame({
        "id": ["p0"], "parent_id": [None], "origin": ["x"],
        "prompt": [prompt or schemas.to_messages("Which is better?")],
        "chosen": [chosen], "rejected": [schemas.assistant_turn("worse")],
        "score_chosen": [0.9], "score_rejected": [None],
    }, schema_overrides={"prompt": schemas.MESSAGES, "chosen": schemas.MESSAGES,
                         "rejected": schemas.MESSAGES, "parent_id": pl.Utf8, "score_rejected": pl.Float64})


def test_preference_rows():
    validate(preference_frame(schemas.assistant_turn("better")), "preference")
    with pytest.raises(SchemaError, match="chosen does not start and end with an assistant turn"):
        validate(preference_frame(schemas.to_messages("Which is better?", "better")), "preference", dataset="p")
    # A multi-turn continuation (TRL implicit-prompt rows split at the common prefix) is fine.
    later = [{"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another?"},
             {"role": "assistant", "content": "Green."}]
    validate(preference_frame(later), "preference")
    with pytest.raises(SchemaError, match="chosen does not start and end"):
        validate(preference_frame(later[:2]), "preference")
    with pytest.raises(SchemaError, match="prompt ends with an assistant turn"):
        validate(preference_frame(schemas.assistant_turn("b"), prompt=schemas.to_messages("q", "a")), "preference")


def test_candidates_rows_allow_extra_struct_fields():
    cands = [[schemas.candidate("a", 1.0, seed=3), schemas.candidate("b", None, seed=4)]]
    df = pl.DataFrame({"id": ["c"], "parent_id": [None], "origin": ["x"],
                       "prompt": [schemas.to_messages("q")], "candidates": cands},
                      schema_overrides={"prompt": schemas.MESSAGES, "parent_id": pl.Utf8})
    validate(df, "candidates")
    bad = df.with_columns(candidates=pl.Series([[schemas.candidate("", 1.0, seed=1)]]))
    with pytest.raises(SchemaError, match="candidate has empty"):
        validate(bad, "candidates")


def test_empty_frames_have_the_kind_schema():
    for kind in schemas.KINDS:
        frame = schemas.empty(kind)
        assert frame.height == 0
        validate(frame, kind)


TOOL_CALL = {"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a":2,"b":5}'}}


def tool_frame(conversations):
    fields = {"role": pl.Utf8, "content": pl.Utf8, "tool_calls": pl.List(pl.Struct({
        "id": pl.Utf8, "type": pl.Utf8, "function": pl.Struct({"name": pl.Utf8, "arguments": pl.Utf8})})),
        "tool_call_id": pl.Utf8}
    return pl.DataFrame({"id": [f"r{i}" for i in range(len(conversations))], "parent_id": [None] * len(conversations),
                         "origin": ["x"] * len(conversations), "messages": conversations},
                        schema_overrides={"messages": pl.List(pl.Struct(fields)), "parent_id": pl.Utf8})


def test_tool_call_turns_may_have_no_content_other_turns_may_not():
    ok = [{"role": "user", "content": "Add 2 and 5."},
          {"role": "assistant", "content": None, "tool_calls": [TOOL_CALL]},
          {"role": "tool", "content": "7", "tool_call_id": "c1"},
          {"role": "assistant", "content": "", "tool_calls": [TOOL_CALL]},
          {"role": "tool", "content": "7", "tool_call_id": "c1"},
          {"role": "assistant", "content": "2 + 5 = 7."}]
    validate(tool_frame([ok]), "sft")
    no_call = [{"role": "user", "content": "q"}, {"role": "assistant", "content": None, "tool_calls": []},
               {"role": "assistant", "content": "a"}]
    with pytest.raises(SchemaError, match="empty or null content"):
        validate(tool_frame([ok, no_call]), "sft")
    tool_without_text = ok[:2] + [{"role": "tool", "content": None, "tool_calls": [TOOL_CALL]}, ok[-1]]
    with pytest.raises(SchemaError, match="empty or null content.*row 0"):
        validate(tool_frame([tool_without_text]), "sft")


def test_clean_messages_drops_the_nulls_a_struct_column_adds():
    df = tool_frame([[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
                     [{"role": "user", "content": "Add"}, {"role": "assistant", "content": None,
                                                           "tool_calls": [{"function": {"name": "add"}}]}]])
    assert df["messages"][0].to_list()[0] == {"role": "user", "content": "hi", "tool_calls": None, "tool_call_id": None}
    assert schemas.clean_messages(df["messages"][0].to_list()) == [{"role": "user", "content": "hi"},
                                                                    {"role": "assistant", "content": "yo"}]
    # content null is kept (it is what a tool-calling turn has); null fields of calls are dropped too.
    assert schemas.clean_messages(df["messages"][1].to_list())[1] == {
        "role": "assistant", "content": None, "tool_calls": [{"function": {"name": "add"}}]}
    assert schemas.to_messages(df["messages"][1].to_list(), "7") == [
        {"role": "user", "content": "Add"},
        {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "add"}}]},
        {"role": "assistant", "content": "7"}]
    assert schemas.clean_messages(None) is None


def test_stable_hash_of_a_lone_surrogate_does_not_raise():
    assert schemas.stable_hash("\ud83d") != schemas.stable_hash("\ud83e")
    assert schemas.stable_hash("ok") == schemas.stable_hash("ok")
