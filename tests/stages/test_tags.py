import polars as pl
import pytest

from schemas import MESSAGES
from engines.base import Completion, GenerationResult
from filters.magpie_filter import magpie_official_filter
from stages.tags import (DIFFICULTY, INPUT_QUALITY, TASK_CATEGORY, UNPARSED_TAG, MagpieTags,
                         parse_label, tag_prompt)


def test_label_sets_match_magpie():
    assert INPUT_QUALITY == ("very poor", "poor", "average", "good", "excellent")
    assert DIFFICULTY == ("very easy", "easy", "medium", "hard", "very hard")
    assert len(TASK_CATEGORY) == 12 and "coding & debugging" in TASK_CATEGORY and TASK_CATEGORY[-1] == "others"
    prompt = tag_prompt("task_category", "Sort this list")
    assert "Sort this list" in prompt[-1]["content"] and "brainstorming" in prompt[-1]["content"]


def test_unknown_tag_is_an_error():
    with pytest.raises(ValueError, match="unknown tags"):
        MagpieTags(tags=("safety",))


def rows() -> pl.DataFrame:
    data = [
        # id, instruction, quality, reward, cluster, response
        ("a", "Explain photosynthesis.", "good", 1.0, "c1", "x" * 50),
        ("b", "Explain photosynthesis please.", "excellent", 2.0, "c1", "x" * 500),  # near-dup of a; a has lower id
        ("c", "List these items:", "good", 1.0, None, "x" * 400),                   # ends with ':'
        ("d", "hm", "poor", 1.0, None, "x" * 900),                                   # low quality
        ("e", "Write a poem.", "average", -20.0, None, "x" * 800),                   # low reward
        ("f", "Write a story.", "average", 0.0, None, "x" * 300),
        ("g", "Plan a trip.", "excellent", None, None, "x" * 200),                   # null reward fails
        ("h", "Name a colour.", "good", 0.5, None, "x" * 10),
    ]
    return pl.DataFrame({
        "id": [r[0] for r in data],
        "instruction": [r[1] for r in data],
        "input_quality": [r[2] for r in data],
        "reward": pl.Series([r[3] for r in data], dtype=pl.Float64),
        "minhash_cluster": pl.Series([r[4] for r in data], dtype=pl.Utf8),
        "messages": pl.Series([[{"role": "user", "content": r[1]}, {"role": "assistant", "content": r[5]}]
                               for r in data], dtype=MESSAGES),
    })


def test_official_filter_rules_and_reasons():
    out = magpie_official_filter(rows(), n=2)
    assert out.columns == [*rows().columns, "keep", "drop_reason"]
    reasons = dict(zip(out["id"], out["drop_reason"]))
    # Survivors of the rules: a (first of cluster c1), f, h; top-2 by response length: f (300), a (50).
    assert reasons == {"a": None, "b": "near_duplicate", "c": "instruction_ends_with_colon",
                       "d": "low_input_quality", "e": "low_reward", "f": None, "g": "low_reward", "h": "not_in_top_n"}
    assert out.filter("keep")["id"].to_list() == ["a", "f"]
    assert out.height == rows().height  # annotated, never deleted


def test_official_filter_options_and_prior_drops():
    strict = magpie_official_filter(rows(), n=10, min_quality="good")
    assert dict(zip(strict["id"], strict["drop_reason"]))["f"] == "low_input_quality"
    assert sorted(strict.filter("keep")["id"].to_list()) == ["a", "h"]
    prior = rows().with_columns(keep=pl.col("id") != "f", drop_reason=pl.when(pl.col("id") == "f")
                                .then(pl.lit("minhash_duplicate")).otherwise(None))
    out = magpie_official_filter(prior, n=10)
    assert dict(zip(out["id"], out["drop_reason"]))["f"] == "minhash_duplicate"
    # Without reward / cluster columns those rules are skipped.
    bare = magpie_official_filter(rows().drop("reward", "minhash_cluster"), n=10)
    assert set(bare.filter("keep")["id"].to_list()) == {"a", "b", "e", "f", "g", "h"}
    with pytest.raises(ValueError, match="MagpieTags"):
        magpie_official_filter(rows().drop("input_quality"), n=1)


@pytest.mark.engine
def test_tags_on_the_embedded_model_always_parse(engine):
    df = pl.DataFrame({"id": ["1", "2", "3", "4"], "instruction": [
        "Write a Python function that reverses a linked list.",
        "What is 17 * 23?",
        "Give me ideas for a birthday party for a 6 year old.",
        "asdf",
    ]})
    step = MagpieTags(engine=engine)
    out = step(df)
    for column, labels in (("input_quality", INPUT_QUALITY), ("difficulty", DIFFICULTY),
                           ("task_category", TASK_CATEGORY)):
        assert out[column].null_count() == 0, out
        assert set(out[column].to_list()) <= set(labels)
    assert step.stats["unparsed"] == 0 and step.stats["requests"] == 12
    # Greedy + constrained: the same rows tag the same way.
    assert step(df).select("input_quality", "difficulty", "task_category").equals(
        out.select("input_quality", "difficulty", "task_category"))


# ---------------------------------------------------------------- label parsing (issue 8)

@pytest.mark.parametrize("text, expected", [
    ("good", "good"), ("Good.", "good"), ("  GOOD\n", "good"), ('"good"', "good"), ("**good**", "good"),
    ("Label: good", "good"), ("input quality: good", "good"), ('{"label": "Good"}', "good"),
    ('{"input_quality": "very poor"}', "very poor"), ('["excellent"]', "excellent"), ("very  poor", "very poor"),
])
def test_parse_label_reads_plain_quoted_and_json_answers(text, expected):
    assert parse_label(text, INPUT_QUALITY, "input_quality") == (expected, None)


@pytest.mark.parametrize("text", [
    "", "   ", "not poor", "good or poor", "The request is good.", "{", '{"label": 3}', '{"a": "good", "b": "poor"}',
    "[]", '["good", "poor"]', "goodness", None, 3, b"good",
])
def test_parse_label_never_guesses(text):
    assert parse_label(text, INPUT_QUALITY, "input_quality") == (None, UNPARSED_TAG)


def test_parse_label_task_categories():
    assert parse_label("Coding and Debugging", TASK_CATEGORY) == ("coding & debugging", None)
    assert parse_label("coding & debugging.", TASK_CATEGORY) == ("coding & debugging", None)
    assert parse_label("Information seeking", TASK_CATEGORY) == ("information seeking", None)


class TextEngine:
    """An engine without structured outputs: answers each tag question with a fixed text per tag."""

    model_id = "text"

    def __init__(self, answers):
        self.answers = answers

    def tokenizer(self, text, add_special_tokens=False):
        return {"input_ids": text.split()}

    def chat(self, conversations, samplings, desc=None):
        out = []
        for conversation, sampling in zip(conversations, samplings):
            column = next(c for c, labels in (("input_quality", INPUT_QUALITY), ("difficulty", DIFFICULTY),
                                              ("task_category", TASK_CATEGORY)) if tuple(sampling.choice) == labels)
            text = self.answers[column](conversation[-1]["content"])
            out.append(GenerationResult(prompt="", completions=[Completion(text=text, token_ids=[1])]))
        return out


def test_unparsed_tags_stay_null_with_a_reason_per_row():
    engine = TextEngine({
        "input_quality": lambda q: "Good." if "poem" in q else "I think it is decent",
        "difficulty": lambda q: '{"difficulty": "Easy"}',
        "task_category": lambda q: "creative writing",
    })
    df = pl.DataFrame({"id": ["a", "b", "c"], "instruction": ["Write a poem.", "Fix my bike.", "   "]})
    step = MagpieTags(engine=engine)
    out = step(df)
    assert out["input_quality"].to_list() == ["good", None, None]
    assert out["difficulty"].to_list() == ["easy", "easy", None]
    assert out["task_category"].to_list() == ["creative writing", "creative writing", None]
    assert out["tag_error"].to_list() == [None, "unparsed_tag:input_quality", "empty_instruction"]
    assert step.stats["unparsed"] == 1 and step.stats["empty_instruction"] == 1
    # Every row with a null tag has a reason.
    nulls = out.filter(pl.any_horizontal(pl.col("input_quality", "difficulty", "task_category").is_null()))
    assert nulls["tag_error"].null_count() == 0
