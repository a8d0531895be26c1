import polars as pl
import pytest

from filters.heuristics import Heuristics, repeated_line_ratio, repeated_ngram_ratio
from schemas import MESSAGES


def frame(instructions, responses):
    return pl.DataFrame({"id": [f"r{i}" for i in range(len(instructions))], "instruction": instructions,
                         "response": responses})


def test_each_check_has_its_reason_and_score():
    df = frame(
        ["Write a poem about the sea.", "List the following:", "Tell me <|eot_id|> a joke", "Hi",
         "Explain gravity.", "Summarise this.", "Describe a cat.", "x" * 9000],
        ["The sea is wide and deep.", "one", "ha", "hello there", "",
         "line one\nline one\nline one\nline two", "cat " * 40, "fine"],
    )
    out = Heuristics(min_instruction_chars=3, max_repeated_ngram_ratio=0.5)(df)
    assert out["drop_reason"].to_list() == [
        None, "instruction_ends_with_colon", "template_token_leak", "instruction_too_short",
        "response_too_short", "repeated_lines", "repeated_ngrams", "instruction_too_long"]
    assert out["heur_template_leak"][2] == "<|eot_id|>"
    assert out["heur_instruction_chars"][0] == len("Write a poem about the sea.")
    assert out["heur_response_words"][0] == 6
    assert out["heur_repeated_line_ratio"][5] == pytest.approx(2 / 5)  # instruction line + 4 response lines


@pytest.mark.parametrize("token", ["<|im_start|>", "[INST]", "<start_of_turn>", "<|start_header_id|>"])
def test_template_tokens_of_several_families(token):
    out = Heuristics()(frame(["Tell me a story."], [f"Once upon a time {token} there was"]))
    assert out["drop_reason"][0] == "template_token_leak"


def test_disabled_bounds_and_earlier_reasons_kept():
    df = frame(["List:"], ["a"]).with_columns(pl.lit(False).alias("keep"), pl.lit("minhash_duplicate").alias("drop_reason"))
    out = Heuristics(drop_colon_ending=False)(df)
    assert out["drop_reason"][0] == "minhash_duplicate" and out["keep"][0] is False
    assert Heuristics(drop_colon_ending=False)(frame(["List:"], ["a"]))["keep"][0] is True


def test_language_restricted_to_a_set():
    df = frame(["Explain how photosynthesis works in plants.", "Explique comment fonctionne la photosynthèse des plantes."],
               ["Plants turn light into sugar.", "Les plantes transforment la lumière en sucre."])
    out = Heuristics(languages=("ENGLISH",), candidate_languages=("ENGLISH", "FRENCH"))(df)
    assert out["heur_language"].to_list() == ["ENGLISH", "FRENCH"]
    assert out["drop_reason"].to_list() == [None, "language_mismatch"]
    with pytest.raises(ValueError, match="lingua language"):
        Heuristics(languages=("KLINGON",))(df)


def test_ratios():
    assert repeated_line_ratio("a\nb\na\n\n") == pytest.approx(1 / 3)
    assert repeated_ngram_ratio("one two three four five six", 5) == 0.0
    assert repeated_ngram_ratio("a b c a b c a b c", 3) == 1.0


def test_messages_layout_and_bad_input():
    m = [{"role": "user", "content": "Explain rain."}, {"role": "assistant", "content": "Water falls from clouds."}]
    df = pl.DataFrame({"id": ["a", "b"], "messages": [m, []]}, schema={"id": pl.Utf8, "messages": MESSAGES})
    assert Heuristics()(df)["drop_reason"].to_list() == [None, "empty_text"]
    big = frame(["Explain " + "many different words " * 50_000], ["ok answer"])
    assert Heuristics()(big)["drop_reason"][0] == "instruction_too_long"
    binary = pl.DataFrame({"id": ["a"], "instruction": [b"\xff"], "response": ["x"]},
                          schema={"id": pl.Utf8, "instruction": pl.Binary, "response": pl.Utf8})
    assert Heuristics()(binary)["drop_reason"][0] == "invalid_utf8"
    empty = frame([], []).cast({"instruction": pl.Utf8, "response": pl.Utf8})
    out = Heuristics()(empty)
    assert out.height == 0 and "keep" in out.columns
