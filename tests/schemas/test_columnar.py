"""The columnar import gives exactly the row importer's frame: same ids, rows, quarantine, errors."""

import sys

import polars as pl
import pytest
from polars.testing import assert_frame_equal

import schemas.columnar as columnar
from schemas import SchemaError
from schemas.mapping import load_rows

from .bad_inputs_cases import CASES


@pytest.fixture
def used(monkeypatch):
    """How many imports the columnar path answered (None = it handed over to the row importer)."""
    calls = {"columnar": 0}
    real = columnar.import_frame

    def spy(*args, **kw):
        out = real(*args, **kw)
        calls["columnar"] += out is not None
        return out

    monkeypatch.setattr(columnar, "import_frame", spy)
    return calls


def same_import(source, **kw) -> pl.DataFrame | None:
    """Both paths on `source`: equal frames, or the same SchemaError (message, column, row)."""
    try:
        expected = load_rows(source, columnar=False, **kw)
    except SchemaError as e:
        with pytest.raises(SchemaError) as got:
            load_rows(source, **kw)
        assert (got.value.message, got.value.column, got.value.row) == (e.message, e.column, e.row)
        return None
    actual = load_rows(source, **kw)
    assert_frame_equal(actual, expected)
    return actual


def test_bad_input_cases_as_parquet_match_the_row_importer(tmp_path, used):
    compared = 0
    for case in CASES:
        if case.rows is None or case.kind != "sft":
            continue
        try:
            frame = pl.DataFrame(case.rows)
            path = tmp_path / f"{case.name}.parquet"
            frame.write_parquet(path)
        except Exception:  # noqa: BLE001 - rows polars cannot hold as one frame: JSON-only cases
            continue
        same_import(str(path), mapping=case.mapping)
        compared += 1
    assert compared >= 10 and used["columnar"] >= 5, (compared, used)


BLANKS = ["", " ", "\n\t", "\x1c", "\x1f ", "\u3000", "\x85", "\u2028"]


def instruction_rows() -> pl.DataFrame:
    texts = ["Why is the sky blue?", 'Say "hi" \\ now', "tab\there\x01\x7f", "é 😀 \u2028 line",
             None, *BLANKS]
    rows = []
    for i, instruction in enumerate(texts):
        for j, output in enumerate(["Because of Rayleigh scattering.", None, " ", "\x1e", 'q"uote\\']):
            rows.append({"instruction": instruction, "output": output,
                         "input": [None, "", "extra context", "\x1d"][(i + j) % 4],
                         "system": [None, "Be brief.", "  ", "\x1f"][(i * j) % 4],
                         "keep": [None, True, False][(i + 2 * j) % 3],
                         "drop_reason": [None, "", "minhash_duplicate"][(i + j) % 3],
                         "score": i * 10 + j, "meta": {"k": i}})
    rows += [rows[0], rows[0], rows[2]]  # exact repeats: counter ids
    return pl.DataFrame(rows)


def test_instruction_layout_edge_cases_match(tmp_path, used):
    frame = instruction_rows()
    df = same_import(frame)
    assert used["columnar"] == 1
    same_import(frame.head(0))
    assert set(df["drop_reason"].drop_nulls()) >= {"import:missing_value", "import:empty_content", "unknown",
                                                   "minhash_duplicate"}
    path = tmp_path / "rows.parquet"
    frame.rename({"instruction": "question", "output": "answer"}).write_parquet(path)
    same_import(str(path), mapping={"instruction": "question", "response": "answer"})
    for ids in (pl.Series([f"r{i}" for i in range(frame.height)]), pl.Series(range(frame.height)),
                pl.Series(["dup"] * frame.height), pl.Series([" "] + [f"r{i}" for i in range(1, frame.height)])):
        same_import(frame.with_columns(ids.alias("id"), ids.alias("parent_id"),
                                       pl.Series([None, "", "mine@1"] * (frame.height // 3) + [None] * (frame.height % 3),
                                                 dtype=pl.Utf8).alias("origin")))
    same_import(frame.with_columns(pl.Series(["{\"messages\": []}"] * frame.height).alias("message_extras")))
    assert used["columnar"] == 8


def chats() -> list:
    user, answer = {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}
    return [
        [user, answer], [{"role": "system", "content": "Be brief."}, user, answer],
        [{"role": "system", "content": " Be brief. "}, user, answer], [{"role": "human", "content": "Hi"}, answer],
        [{"role": "USER", "content": "Hi"}, answer], [user], [], None, [user, {"role": "assistant", "content": None}],
        [user, {"role": "assistant", "content": "\x1c"}], [user, {"role": None, "content": "x"}],
        [user, {"role": "tool", "content": "7"}, answer], [user, answer, user, answer], [user, answer],
    ]


def test_messages_layout_edge_cases_match(used):
    conversations = chats()
    for system in (None, "Be brief.", " ", "Other."):
        frame = pl.DataFrame({"messages": conversations, "system": [system] * len(conversations)},
                             schema={"messages": pl.List(pl.Struct({"role": pl.Utf8, "content": pl.Utf8})),
                                     "system": pl.Utf8})
        same_import(frame)
    assert used["columnar"] == 4
    bad = pl.DataFrame({"messages": [[{"role": "user", "content": "a"}, {"role": "wizard", "content": "b"}]]})
    same_import(bad)  # unknown role: the same error, naming the row
    tool = pl.DataFrame({"messages": [[{"role": "function_call", "content": '{"name": "f"}'},
                                       {"role": "assistant", "content": "x"}], conversations[0]]})
    same_import(tool)  # tool calls change the column type: handed to the row importer


def test_blank_matches_python_whitespace():
    chars = [chr(c) for c in range(sys.maxunicode + 1) if not 0xD800 <= c <= 0xDFFF]
    blank = pl.Series(chars).str.contains(columnar._BLANK).to_list()
    assert [c for c, b in zip(chars, blank) if b != c.isspace()] == []
