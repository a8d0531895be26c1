import polars as pl
import pytest

from fractions import Fraction

from filters.heuristics import (Heuristics, exact_bound, is_structural_line, repeated_line_counts, repeated_line_ratio,
                                repeated_ngram_counts, repeated_ngram_ratio)
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
    assert out["heur_repeated_line_ratio"][5] == 0.5  # per message: 2 of the response's 4 lines repeat


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
    assert repeated_line_ratio("a\nb\na\n\n") == 1 / 3
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


# ---------------------------------------------------------------- issue 8, fault kind 5

CODE = "def add(a, b):\n    total = a - b  # the bug is on this line of the function\n    return total"


def test_a_response_quoting_its_instruction_is_not_repetition():
    instruction = f"Review this code and fix the bug:\n```python\n{CODE}\n```"
    response = (f"The function subtracts instead of adding. Here is your code:\n```python\n{CODE}\n```\n"
                "Change the minus sign to a plus sign and it returns the sum of both numbers.")
    out = Heuristics()(frame([instruction], [response]))
    assert out["heur_repeated_ngram_ratio"][0] == 0.0
    assert out["heur_repeated_line_ratio"][0] == 0.0
    assert out["drop_reason"][0] is None and out["keep"][0] is True
    # The same quote in the messages layout, and "fix this sentence".
    m = [{"role": "user", "content": "Fix this sentence: me and him goes to the big store every single days."},
         {"role": "assistant", "content": 'You wrote "me and him goes to the big store every single days." '
                                          'Corrected: "He and I go to the shop daily."'}]
    df = pl.DataFrame({"id": ["a"], "messages": [m]}, schema={"id": pl.Utf8, "messages": MESSAGES})
    assert Heuristics()(df)["drop_reason"][0] is None
    # Repetition inside one message is still caught.
    assert Heuristics()(frame(["Say hi."], ["hi there my friend how are you " * 6]))["drop_reason"][0] == \
        "repeated_ngrams"


def test_pretty_printed_json_is_kept():
    import json

    records = json.dumps([{"name": "Ada", "born": 1815}, {"name": "Alan", "born": 1912},
                          {"name": "Grace", "born": 1906}, {"name": "Linus", "born": 1969}], indent=2)
    nested = json.dumps({"team": [{"name": "Ada", "langs": ["en", "fr"]}, {"name": "Alan", "langs": ["de"]},
                                  {"name": "Grace", "langs": ["es", "it"]}, {"name": "Linus", "langs": ["fi"]}]},
                        indent=2)
    assert records.count("  },") == 3 and nested.count('"langs": [') == 4
    for answer in (records, nested):
        out = Heuristics()(frame(["Give the team as JSON with name and languages."], [answer]))
        assert out["heur_repeated_line_ratio"][0] == 0.0
        assert out["drop_reason"][0] is None
    for line in ("{", "},", "]", "],", "```", "```python", "---", "|---|---|", "</div>", "end", "  fi  ", "",
                 '"langs": [', "items = {"):
        assert is_structural_line(line), line
    for line in ('"name": "Ada",', "return total", "1.", "x = 1", "x = [1, 2]", '"en",', "🙂🙂🙂", "→"):
        assert not is_structural_line(line), line
    # Real content lines still count.
    assert repeated_line_counts("{\n  a\n  a\n}\n{\n  a\n}") == (2, 3)


def test_a_ratio_equal_to_the_bound_is_kept():
    ten_lines = "\n".join(["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "alpha", "beta", "gamma"])
    assert repeated_line_counts(ten_lines) == (3, 10)
    assert 1.0 - 7 / 10 > 0.3  # the float trap the old code fell into
    out = Heuristics(max_repeated_line_ratio=0.3, max_repeated_ngram_ratio=None)(frame(["List ten words."], [ten_lines]))
    assert out["heur_repeated_line_ratio"][0] == 0.3
    assert out["drop_reason"][0] is None and out["keep"][0] is True
    eleven = ten_lines + "\ndelta"  # 4 of 11 > 0.3
    out = Heuristics(max_repeated_line_ratio=0.3, max_repeated_ngram_ratio=None)(frame(["List words."], [eleven]))
    assert out["drop_reason"][0] == "repeated_lines"
    # n-gram ratio: exactly 1/2 of the characters repeated under bound 0.5 is kept, above it dropped.
    words = "aa bb cc aa bb dd ee ff"  # "aa bb" twice: 8 of 16 characters
    assert repeated_ngram_counts(words, 2) == (8, 16)
    keep = Heuristics(ngram=2, max_repeated_ngram_ratio=0.5, max_repeated_line_ratio=None)(frame(["Pair the letters."], [words]))
    assert keep["drop_reason"][0] is None
    drop = Heuristics(ngram=2, max_repeated_ngram_ratio=0.49, max_repeated_line_ratio=None)(frame(["Pair the letters."], [words]))
    assert drop["drop_reason"][0] == "repeated_ngrams"
    assert exact_bound(0.3) == Fraction(3, 10)


def test_polars_prefilter_gives_the_per_message_python_scores():
    """Rows the prefilter clears score 0; all rows scored in Python give the same numbers and drops."""
    import random

    from filters.heuristics import _line_repeats, _ngram_repeats, worst_message

    rng = random.Random(7)
    vocab = [f"w{i}" for i in range(300)] + ["{", "},", "---", "```", "end", "é", "a\u3000b", "x\x1cy"]
    seps = [" "] * 20 + ["\n"] * 4 + ["\n\n", "\t", "\r\n", "  ", "\x85", "\u2028", " \x1f"]

    def text():
        words = [rng.choice(vocab) for _ in range(rng.randint(0, 40))]
        if words and rng.random() < 0.3:  # plant a repeat: a copied stretch of words / a line
            start = rng.randrange(len(words))
            words += ["\n"] + words[start:start + rng.randint(1, 8)]
        return "".join(w + rng.choice(seps) for w in words)

    rows = [[{"role": "user", "content": text()}, {"role": "assistant", "content": text()}] for _ in range(600)]
    df = pl.DataFrame({"id": [f"r{i}" for i in range(len(rows))], "messages": rows}, schema={"id": pl.Utf8, "messages": MESSAGES})
    for n in (1, 3, 5):
        out = Heuristics(ngram=n, min_instruction_chars=None, min_instruction_words=None, min_response_chars=None,
                         template_tokens=(), drop_colon_ending=False)(df)
        texts = [[m["content"] for m in r] for r in rows]
        lines = [worst_message(t, _line_repeats) for t in texts]
        ngrams = [worst_message(t, lambda x: _ngram_repeats(x, n)) for t in texts]
        assert out["heur_repeated_line_ratio"].to_list() == [float(r) for r in lines]
        assert out["heur_repeated_ngram_ratio"].to_list() == [float(r) for r in ngrams]
        expected = ["repeated_lines" if a > Fraction(3, 10) else "repeated_ngrams" if b > Fraction(1, 5) else None
                    for a, b in zip(lines, ngrams)]
        assert out["drop_reason"].to_list() == expected
        assert 0 < sum(r > 0 for r in ngrams) < len(rows)  # both kinds of rows are present
