"""Issue 8's matrix: bad and odd inputs through the real CLI (`alignforge run curate`, in process).

Every case ends in one of two ways, never a crash (exit 1) or a lost row:
- a clear error: exit 2, ONE line on stderr naming the file (and row / column when the case says
  so) and a fix, no traceback;
- a run that publishes: every input row is accounted for, once: published rows (publish/data) +
  rejected rows (publish/rejected, each with its drop_reason) == input rows, ids disjoint and
  unique, and the import's quarantine reasons counted exactly as the case says. A run whose rows
  are all dropped exits 2 with "no row survived" and still publishes rejected/.

Import-side cases are the data of tests/schemas/bad_inputs_cases.py (also run there through
schemas.mapping.load_rows); the filter-side cases (MinHash on texts without words, repetition
heuristics, non-finite scores, ZIP-FIT targets) are below. One Prefect home for the module: the
temporary API server starts once.
"""

from __future__ import annotations

import glob
import json
import math
import re
from pathlib import Path

import polars as pl
import pytest

from schemas import clean_messages

from .schemas.bad_inputs_cases import (ADD_TOOLS, CASES, COLOR_CHOSEN, COLOR_REJECTED, TOOL_CONVERSATION,
                                       WEATHER_TOOLS, Case, chat, sharegpt)

CURATE_KINDS = ("sft", "instructions", "preference")  # the curate recipe's input.kind


@pytest.fixture(scope="module", autouse=True)
def _cli_env(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PREFECT_HOME", str(tmp_path_factory.mktemp("prefect-home")))
        mp.setenv("ALIGNFORGE_QUIET", "1")
        yield


def run_curate(capsys, path: Path, out: Path, *, kind: str = "sft", mapping: dict | None = None,
               sets: tuple[str, ...] = ()) -> tuple[int, str, str]:
    from flows.cli import main

    argv = ["run", "curate", "--set", f"input={path}", "--set", f"kind={kind}", "--out", str(out),
            "--workers", "2"]
    for ours, theirs in (mapping or {}).items():
        argv += ["--set", f"mapping.{ours}={theirs}"]
    for item in sets:
        argv += ["--set", item]
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line_error(code: int, err: str) -> str:
    assert code == 2, (code, err)
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("alignforge: error: "), lines[0]
    assert "Fix:" in lines[0], lines[0]
    return lines[0]


def read_publish(out: Path) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(published rows of every split of the default config, rejected rows)."""
    def read(pattern: str) -> pl.DataFrame:
        files = sorted(glob.glob(str(out / "publish" / pattern)))
        frames = [pl.read_parquet(f) for f in files]
        frames = [f for f in frames if f.height]
        return pl.concat(frames, how="diagonal_relaxed") if frames else pl.DataFrame(schema={"id": pl.Utf8})

    return read("data/*.parquet"), read("rejected/*.parquet")


def accounted(code: int, err: str, out: Path, input_rows: int) -> tuple[pl.DataFrame, pl.DataFrame, dict[str, int]]:
    """The run published (exit 0, or 2 with 'no row survived') and every input row is in exactly one
    of publish/data and publish/rejected, the rejected ones with a reason."""
    if code != 0:
        line = one_line_error(code, err)
        assert "no row survived" in line, line
    else:
        assert err.strip() == "", err
    kept, rejected = read_publish(out)
    assert (out / "publish" / "_manifest.json").exists()
    assert kept.height + rejected.height == input_rows, (kept.height, rejected.height, input_rows)
    ids = [*kept["id"].to_list(), *rejected["id"].to_list()]
    assert None not in ids and len(set(ids)) == len(ids), "a row published twice, or as both kept and rejected"
    reasons = dict(rejected["drop_reason"].value_counts().iter_rows()) if rejected.height else {}
    assert None not in reasons and "unspecified" not in reasons, reasons
    assert (code == 2) == (kept.height == 0)
    return kept, rejected, reasons


def import_reasons(reasons: dict[str, int]) -> dict[str, int]:
    return {k: v for k, v in reasons.items() if k.startswith("import:")}


def user_messages(kept: pl.DataFrame) -> list[list[dict]]:
    return [clean_messages(m) for m in kept.sort("id")["messages"].to_list()]


# ------------------------------------------------------------------ import-side cases (shared data)

# Extra value checks on the published rows of some shared cases (beyond the accounting).
def _check_tool_roundtrip(kept, rejected):
    by_len = {len(m): (m, t) for m, t in zip(user_messages(kept), kept.sort("id")["tools"].to_list())}
    assert len(TOOL_CONVERSATION) in by_len, rejected.to_dicts()
    messages, tools = by_len[len(TOOL_CONVERSATION)]
    assert messages == TOOL_CONVERSATION  # tool_calls / tool_call_id / null content unchanged
    assert json.loads(tools) == ADD_TOOLS if isinstance(tools, str) else tools == ADD_TOOLS


def _check_tools_per_row(kept, rejected):
    rows = {len(m): t for m, t in zip(user_messages(kept), kept.sort("id")["tools"].to_list())}
    assert all(isinstance(t, str) for t in rows.values()), rows  # JSON text: no struct unification
    assert json.loads(rows[len(TOOL_CONVERSATION)]) == ADD_TOOLS  # no `city` key added from the other row
    assert len(rows) == 1 or json.loads(rows[2]) == WEATHER_TOOLS


def _check_function_call(kept, rejected):
    (messages,) = user_messages(kept)
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "assistant"]
    call = messages[1]["tool_calls"][0]
    assert messages[1]["content"] is None and call["function"]["name"] == "add"
    assert json.loads(call["function"]["arguments"]) == {"a": 2, "b": 5}
    assert messages[2]["tool_call_id"] == call["id"] and messages[2]["content"] == "7"


def _check_color_pair(kept, rejected):
    (row,) = kept.to_dicts()
    assert clean_messages(row["prompt"]) == [COLOR_CHOSEN[0]]
    assert clean_messages(row["chosen"]) == COLOR_CHOSEN[1:] and row["chosen"][0]["content"] == "Blue."
    assert clean_messages(row["rejected"]) == COLOR_REJECTED[1:] and row["rejected"][0]["content"] == "Red."


def _check_alpaca_input(kept, rejected):
    (messages,) = user_messages(kept)
    assert "12" in messages[0]["content"] and messages[-1]["content"] == "144"


def _check_alpaca_output(kept, rejected):
    (messages,) = user_messages(kept)
    assert messages[-1] == {"role": "assistant", "content": "42"}


def _check_u2028(kept, rejected):
    texts = json.dumps([m for msgs in user_messages(kept) for m in msgs], ensure_ascii=False)
    assert "\u2028" in texts and "\u2029" in texts


def _check_scores(kept, rejected):
    scores = [*kept["score_chosen"].to_list(), *kept["score_rejected"].to_list()]
    assert all(s is None or (isinstance(s, float) and math.isfinite(s)) for s in scores), scores
    assert set(kept["score_chosen"].to_list()) <= {9.0, None}  # "9" parsed; "high" / True / "NaN" never published


VALUE_CHECKS = {
    "tool_call_roundtrip": _check_tool_roundtrip,
    "tools_column_schemas_differ": _check_tools_per_row,
    "sharegpt_function_call_observation": _check_function_call,
    "implicit_prompt_multi_turn": _check_color_pair,
    "alpaca_number_input": _check_alpaca_input,
    "alpaca_number_output": _check_alpaca_output,
    "u2028_inside_strings": _check_u2028,
    "scores_as_strings_and_bools": _check_scores,
}

IMPORT_CASES = [c for c in CASES if c.kind in CURATE_KINDS]


def check_case(case: Case, tmp_path: Path, capsys, *, sets: tuple[str, ...] = ()) -> tuple | None:
    path = case.write(tmp_path)
    out = tmp_path / "run"
    code, _, err = run_curate(capsys, path, out, kind=case.kind, mapping=case.mapping, sets=sets)
    if case.error is not None:
        line = one_line_error(code, err)
        assert re.search(case.error, line), line
        assert str(path) in line, line  # names the file
        if case.error_column is not None:
            assert f"column {case.error_column!r}" in line, line
        if case.error_row is not None:
            assert f"row {case.error_row!r}" in line, line
        assert not glob.glob(str(out / "stages" / "*")), "an input error must stop the run before any stage"
        return None
    kept, rejected, reasons = accounted(code, err, out, case.input_rows)
    assert import_reasons(reasons) == {k: v for k, v in case.reasons.items() if k.startswith("import:")}, reasons
    # Rows the import kept are published unless a filter dropped them, with the filter's reason.
    filter_drops = sum(v for k, v in reasons.items() if not k.startswith("import:")) - \
        sum(v for k, v in case.reasons.items() if not k.startswith("import:"))
    assert kept.height == case.kept - filter_drops, reasons
    return kept, rejected, reasons


@pytest.mark.parametrize("case", IMPORT_CASES, ids=lambda c: c.name)
def test_import_case_through_cli(case, tmp_path, capsys):
    # Value-checked cases have one-letter prompts ("q") the default length check would drop.
    sets = ("heuristics.min_instruction_chars=1",) if case.name in VALUE_CHECKS else ()
    result = check_case(case, tmp_path, capsys, sets=sets)
    if case.name in VALUE_CHECKS:
        kept, rejected, reasons = result
        VALUE_CHECKS[case.name](kept, rejected)


# ------------------------------------------------------------------ filter-side cases

def rows_file(tmp_path: Path, rows: list[dict], name: str = "in.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_texts_without_words_are_not_minhash_duplicates(tmp_path, capsys):
    """Kind 2: no word shingles must not give every such text the same all-max signature."""
    texts = ["🙂🙂🙂", "???", "!!!", "+-*/", "🎉🎉🎉🎉", "...?!", "(((", ":-)"]
    rows = [{"instruction": t, "output": f"Answer {i}."} for i, t in enumerate(texts)]
    rows += [{"instruction": "???", "output": "Again."}]  # an exact repeat IS a duplicate
    path = rows_file(tmp_path, rows)
    code, _, err = run_curate(capsys, path, tmp_path / "run", sets=("heuristics.min_instruction_words=null",))
    kept, rejected, reasons = accounted(code, err, tmp_path / "run", len(rows))
    assert reasons.get("minhash_duplicate", 0) <= 1, reasons
    assert kept.height >= len(texts), reasons


def test_texts_without_words_on_conversation_and_char_shingles(tmp_path, capsys):
    rows = [{"instruction": t, "output": t} for t in ["🙂🙂🙂", "???", "!!!", "+-*/", "%%%%"]]
    path = rows_file(tmp_path, rows)
    for i, shingle in enumerate(("word", "char")):
        code, _, err = run_curate(capsys, path, tmp_path / f"run{i}", sets=(
            "heuristics.min_instruction_words=null", "minhash.on=conversation", f"minhash.shingle={shingle}"))
        kept, rejected, reasons = accounted(code, err, tmp_path / f"run{i}", len(rows))
        assert "minhash_duplicate" not in reasons, (shingle, reasons)


REPETITION_ROWS = {
    "quoted_instruction": {  # kind 5a: the answer quotes the instruction; ratio per message
        "instruction": "Explain this proverb: the early bird catches the worm but the second mouse gets the cheese.",
        "output": "The proverb \"the early bird catches the worm but the second mouse gets the cheese\" says that "
                  "acting first often pays off, while waiting and learning from others can be wiser too."},
    "code_review": {
        "instruction": "Review this code:\n\ndef add(a, b):\n    result = a + b\n    return result\n",
        "output": "The function is fine:\n\ndef add(a, b):\n    result = a + b\n    return result\n\n"
                  "You could return a + b directly."},
    "pretty_json": {  # kind 5b: `{` / `},` lines are structure, not repetition
        "instruction": "Give three users as JSON.",
        "output": json.dumps([{"name": n, "age": a} for n, a in (("Ann", 31), ("Bob", 42), ("Cy", 27))], indent=2)},
    "three_of_ten_lines": {  # kind 5c: 3/10 duplicated lines == the 0.3 bound: kept
        "instruction": "List ten things.",
        "output": "\n".join(["apple", "apple", "apple", "apple", "pear", "plum", "kiwi", "fig", "lime", "date"])},
}


def test_repetition_heuristics_keep_quotes_json_and_the_exact_bound(tmp_path, capsys):
    rows = list(REPETITION_ROWS.values())
    path = rows_file(tmp_path, rows)
    code, _, err = run_curate(capsys, path, tmp_path / "run")
    kept, rejected, reasons = accounted(code, err, tmp_path / "run", len(rows))
    assert reasons == {}, reasons
    assert kept.height == len(rows)


def test_repetition_over_the_bound_is_a_counted_drop(tmp_path, capsys):
    rows = [{"instruction": "List ten things.",
             "output": "\n".join(["apple"] * 5 + ["pear", "plum", "kiwi", "fig", "lime"])},  # 4/10 repeats
            {"instruction": "Say something.", "output": " ".join(["the same five words again"] * 12)},
            {"instruction": "Say hi.", "output": "Hi there."}]
    path = rows_file(tmp_path, rows)
    code, _, err = run_curate(capsys, path, tmp_path / "run")
    kept, rejected, reasons = accounted(code, err, tmp_path / "run", len(rows))
    assert reasons == {"repeated_lines": 1, "repeated_ngrams": 1}, reasons


def test_non_finite_and_odd_scores_in_preference_files(tmp_path, capsys):
    """Kind 4: NaN / Infinity / "inf" / booleans are unscored with a counted reason, never published."""
    raw = (b'{"prompt": "Pick letter 1.", "chosen": "a", "rejected": "b", "score_chosen": NaN, "score_rejected": 1}\n'
           b'{"prompt": "Pick letter 2.", "chosen": "a", "rejected": "c", "score_chosen": Infinity, "score_rejected": 1}\n'
           b'{"prompt": "Pick letter 3.", "chosen": "a", "rejected": "d", "score_chosen": 2, "score_rejected": -Infinity}\n'
           b'{"prompt": "Pick letter 4.", "chosen": "a", "rejected": "e", "score_chosen": "inf", "score_rejected": 1}\n'
           b'{"prompt": "Pick letter 5.", "chosen": "a", "rejected": "f", "score_chosen": false, "score_rejected": 1}\n'
           b'{"prompt": "Pick letter 6.", "chosen": "a", "rejected": "g", "score_chosen": "3.5", "score_rejected": 1}\n'
           b'{"prompt": "Pick letter 7.", "chosen": "a", "rejected": "h", "score_chosen": 1e400, "score_rejected": 1}\n'
           b'{"prompt": "Pick letter 8.", "chosen": "a", "rejected": "i"}\n')
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(raw)
    code, _, err = run_curate(capsys, path, tmp_path / "run", kind="preference")
    kept, rejected, reasons = accounted(code, err, tmp_path / "run", 8)
    assert kept.height == 2 and reasons == {"import:invalid_score": 6}, reasons
    for column in ("score_chosen", "score_rejected"):
        values = kept[column].to_list()
        assert all(v is None or math.isfinite(v) for v in values), values
    assert sorted(kept["score_chosen"].drop_nulls().to_list()) == [3.5]


def test_zipfit_target_in_sharegpt_layout(tmp_path, capsys):
    """Kind 9: the target goes through the same import as the input."""
    rows = [{"instruction": f"Write a Python function number {i} that adds {i} to x.",
             "output": f"def add_{i}(x):\n    return x + {i}"} for i in range(6)]
    rows += [{"instruction": f"Describe the weather in city number {i}.", "output": f"It is sunny in city {i}."}
             for i in range(6)]
    path = rows_file(tmp_path, rows)
    target = rows_file(tmp_path, [sharegpt(("human", "Write a function that doubles y."),
                                           ("gpt", "def double(y):\n    return y * 2"))], "target.jsonl")
    code, _, err = run_curate(capsys, path, tmp_path / "run",
                              sets=("zipfit.enabled=true", f"zipfit.target={target}", "zipfit.top_k=6"))
    kept, rejected, reasons = accounted(code, err, tmp_path / "run", len(rows))
    assert reasons == {"zipfit_not_selected": 6}, reasons
    assert all("def add_" in m[-1]["content"] for m in user_messages(kept))


@pytest.mark.parametrize("target_bytes, needle", [
    (b"", "no rows"),
    (b'{"speaker": "x", "words": "y"}\n', "cannot find target texts"),
    (b'{"conversations": [{"from": "narrator", "value": "q"}]}\n', "unknown role 'narrator'"),
], ids=["empty", "unknown_layout", "unknown_role"])
def test_bad_zipfit_target_fails_before_any_stage(tmp_path, capsys, target_bytes, needle):
    path = rows_file(tmp_path, [{"instruction": "Say hi.", "output": "Hi."}])
    target = tmp_path / "target.jsonl"
    target.write_bytes(target_bytes)
    out = tmp_path / "run"
    code, _, err = run_curate(capsys, path, out, sets=("zipfit.enabled=true", f"zipfit.target={target}"))
    line = one_line_error(code, err)
    assert needle in line and str(target) in line, line
    assert not glob.glob(str(out / "stages" / "*")), "the target must be checked before any stage runs"


def test_tool_rows_and_plain_rows_in_one_file_publish_unchanged(tmp_path, capsys):
    """Kind 1 end to end: tool-calling rows beside plain rows; every message of every row equal to the input."""
    conversations = [
        TOOL_CONVERSATION,
        chat(("user", "What is the capital of France?"), ("assistant", "Paris.")),
        [{"role": "system", "content": "You can call tools."}, {"role": "user", "content": "Weather in Rome?"},
         {"role": "assistant", "content": "", "tool_calls": [
             {"id": "w1", "type": "function", "function": {"name": "weather", "arguments": "{\"city\":\"Rome\"}"}}]},
         {"role": "tool", "tool_call_id": "w1", "name": "weather", "content": "rain"},
         {"role": "assistant", "content": "It rains in Rome."}],
    ]
    rows = [{"messages": m, **({"tools": ADD_TOOLS} if i == 0 else {})} for i, m in enumerate(conversations)]
    path = rows_file(tmp_path, rows)
    code, _, err = run_curate(capsys, path, tmp_path / "run")
    kept, rejected, reasons = accounted(code, err, tmp_path / "run", len(rows))
    assert reasons == {}, reasons
    published = sorted(user_messages(kept), key=json.dumps)
    assert published == sorted(conversations, key=json.dumps)
    from datasets import load_dataset  # what a trainer reads

    ds = load_dataset("parquet", data_dir=str(tmp_path / "run" / "publish"), split="train")
    assert len(ds) == len(rows) and "messages" in ds.column_names


def test_odd_column_names_are_carried_not_a_crash(tmp_path, capsys):
    """Keys JSON allows but tools trip on ("" was renamed by polars, then a crash: exit 1)."""
    rows = [{"instruction": "Tell me a fact about owls.", "output": "Owls can rotate their heads.",
             "": 1, " ": "blank", "a.b": [1, 2], "x y": None},
            {"instruction": "Tell me a fact about cats.", "output": "Cats sleep a lot.", "": 2}]
    path = rows_file(tmp_path, rows)
    code, _, err = run_curate(capsys, path, tmp_path / "run")
    kept, rejected, reasons = accounted(code, err, tmp_path / "run", len(rows))
    assert reasons == {} and kept.height == 2, reasons
    kept = kept.sort("")
    assert kept[""].to_list() == [1, 2] and kept[" "].to_list() == ["blank", None]
    assert kept["a.b"].to_list() == [[1, 2], None]


@pytest.mark.parametrize("suffix, compress, tool", [
    (".jsonl.gz", "gzip", "gunzip"), (".jsonl", "gzip", "gunzip"), (".jsonl.bz2", "bz2", "bunzip2"),
    (".jsonl.xz", "lzma", "unxz"),
], ids=["gz", "gz_as_jsonl", "bz2", "xz"])
def test_compressed_file_says_decompress_not_reencode(tmp_path, capsys, suffix, compress, tool):
    """A compressed export is not a text-encoding problem: the error must not suggest iconv."""
    import importlib

    data = b'{"instruction": "Tell me about owls.", "output": "Owls."}\n'
    path = tmp_path / f"rows{suffix}"
    path.write_bytes(importlib.import_module(compress).compress(data))
    out = tmp_path / "run"
    code, _, err = run_curate(capsys, path, out)
    line = one_line_error(code, err)
    assert "compressed" in line and tool in line and "iconv" not in line and str(path) in line, line


@pytest.mark.parametrize("suffix, depth", [(".jsonl", 5000), (".json", 5000), (".jsonl", 150)])
def test_json_nested_too_deep_is_an_error_not_a_crash(tmp_path, capsys, suffix, depth):
    """Python's json raises RecursionError past ~1000 levels: was 'unexpected error', exit 1."""
    deep = "[" * depth + "]" * depth
    row = '{"instruction": "Tell me about owls.", "output": "Owls.", "meta": %s}' % deep
    path = tmp_path / f"rows{suffix}"
    path.write_text(f"[{row}]" if suffix == ".json" else '{"instruction": "a b c", "output": "d"}\n' + row + "\n")
    code, _, err = run_curate(capsys, path, tmp_path / "run")
    line = one_line_error(code, err)
    assert "nested too deeply" in line and str(path) in line, line
    if suffix == ".jsonl":
        assert "row 'line 2'" in line, line


def test_deeply_nested_but_parseable_value_is_carried(tmp_path, capsys):
    """60 levels: Arrow refuses such a schema ('Recursion level in ArrowSchema struct exceeded',
    exit 1): carried as JSON text instead."""
    meta = json.loads("[" * 60 + "1" + "]" * 60)
    rows = [{"instruction": "Tell me a fact about owls.", "output": "Owls hoot.", "meta": meta},
            {"instruction": "Tell me a fact about cats.", "output": "Cats purr."}]
    path = rows_file(tmp_path, rows)
    code, _, err = run_curate(capsys, path, tmp_path / "run")
    kept, rejected, reasons = accounted(code, err, tmp_path / "run", len(rows))
    assert kept.height == 2, reasons
    assert kept["meta"].drop_nulls().to_list() == [json.dumps(meta)]


@pytest.mark.parametrize("sets, needle", [
    (("kind=candidates",), "kind"),
    (("mapping.instruction=question",), "question"),
], ids=["kind_not_curatable", "mapping_to_missing_column"])
def test_wrong_settings_are_one_line_errors(tmp_path, capsys, sets, needle):
    path = rows_file(tmp_path, [{"instruction": "Say hi.", "output": "Hi."}])
    from flows.cli import main

    argv = ["run", "curate", "--set", f"input={path}", "--out", str(tmp_path / "run")]
    for item in sets:
        argv += ["--set", item]
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in err, err


def test_missing_input_file(tmp_path, capsys):
    code, _, err = run_curate(capsys, tmp_path / "nope.jsonl", tmp_path / "run")
    line = one_line_error(code, err)
    assert "nope.jsonl" in line and "does not exist" in line


def test_matrix_size():
    filter_side = 22  # test functions / parameters above beyond the shared import cases
    assert len(IMPORT_CASES) + filter_side >= 30
