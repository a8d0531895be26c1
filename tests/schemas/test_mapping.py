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
