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
    with pytest.raises(SchemaError, match="chosen holds a non-assistant message"):
        validate(preference_frame(schemas.to_messages("Which is better?", "better")), "preference", dataset="p")
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
