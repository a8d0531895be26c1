import polars as pl
import pytest

from schemas import MESSAGES
from stages.tags import (DIFFICULTY, INPUT_QUALITY, TASK_CATEGORY, MagpieTags, magpie_official_filter, tag_prompt)


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
