"""Property tests (hypothesis) for every parser of model output and of scores (issue 8).

For arbitrary input each parser either returns a usable value or a null with a reason; it never
raises anything but its documented error, never yields a non-finite score, and a step built on
it never leaves a row (or a null value) without a reason: kept + rejected == input rows.
"""

from __future__ import annotations

import json
import math
import random

import polars as pl
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from engines.base import Completion, GenerationResult
from engines.reward import NO_RATING_TOKEN, RewardResult, expected_rating
from filters.heuristics import Heuristics, repeated_line_counts, repeated_ngram_counts
from filters.minhash import DUPLICATE, MinHashDedup
from filters.reward import RewardLabel
from schemas import MESSAGES
from schemas.preference import NON_FINITE_SCORE, NON_NUMERIC_SCORE, UNSCORED, build_preferences, score_value
from stages.tags import DIFFICULTY, INPUT_QUALITY, TAG_LABELS, TASK_CATEGORY, UNPARSED_TAG, MagpieTags, parse_label

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SCORE_REASONS = {UNSCORED, NON_FINITE_SCORE, NON_NUMERIC_SCORE}

# Text that looks like model output: labels, JSON, markdown, prose, control characters, emoji.
label_words = st.sampled_from([*INPUT_QUALITY, *DIFFICULTY, *TASK_CATEGORY, "Label:", "label", "{", "}", '"', "[",
                               "]", ":", "**", "not", "and", "&", "\n", "."])
model_text = st.one_of(
    st.text(),
    st.lists(label_words, max_size=6).map(" ".join),
    st.recursive(st.none() | st.booleans() | st.floats(allow_nan=True) | st.text(max_size=20) | label_words,
                 lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=12) | label_words,
                                                                               inner, max_size=3),
                 max_leaves=6).map(json.dumps),
)
any_value = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
                      st.text(max_size=8), st.sampled_from(["NaN", "inf", "-Infinity", "3.0", "1e999"]),
                      st.lists(st.floats(), max_size=2), st.binary(max_size=4), st.decimals(allow_nan=True))


# ---------------------------------------------------------------- stages.tags: label answers

@SETTINGS
@given(text=model_text, tag=st.sampled_from(sorted(TAG_LABELS)))
def test_parse_label_returns_a_label_or_a_reason(text, tag):
    label, reason = parse_label(text, TAG_LABELS[tag], tag)
    assert (label in TAG_LABELS[tag] and reason is None) or (label is None and reason == UNPARSED_TAG)


@SETTINGS
@given(value=any_value)
def test_parse_label_of_non_text_never_raises(value):
    assert parse_label(value, INPUT_QUALITY, "input_quality") == (None, UNPARSED_TAG) or isinstance(value, str)


@SETTINGS
@given(tag=st.sampled_from(sorted(TAG_LABELS)), data=st.data())
def test_parse_label_reads_every_label_however_it_is_wrapped(tag, data):
    label = data.draw(st.sampled_from(TAG_LABELS[tag]))
    cased = "".join(c.upper() if data.draw(st.booleans()) else c for c in label)
    wrap = data.draw(st.sampled_from(["{}", "{}.", '"{}"', "**{}**", "  {}\n", "Label: {}", json.dumps({"label": "{}"}),
                                      json.dumps(["{}"])]))
    assert parse_label(wrap.replace("{}", cased) if "{}" in wrap else wrap, TAG_LABELS[tag], tag) == (label, None)


class TextEngine:
    """Answers every tag question with a drawn text (no structured outputs)."""

    model_id = "text"

    def __init__(self, texts):
        self.texts = texts

    def tokenizer(self, text, add_special_tokens=False):
        return {"input_ids": text.split()}

    def chat(self, conversations, samplings, desc=None):
        return [GenerationResult(prompt="", completions=[Completion(text=self.texts[i % len(self.texts)])])
                for i in range(len(conversations))]


@settings(max_examples=60, deadline=None)
@given(texts=st.lists(model_text, min_size=1, max_size=6), instructions=st.lists(st.text(max_size=30), min_size=1,
                                                                                   max_size=4))
def test_magpie_tags_never_leave_a_null_tag_without_a_reason(texts, instructions):
    df = pl.DataFrame({"id": [str(i) for i in range(len(instructions))], "instruction": instructions})
    out = MagpieTags(engine=TextEngine(texts))(df)
    assert out.height == df.height
    for row in out.iter_rows(named=True):
        for tag, labels in TAG_LABELS.items():
            assert row[tag] is None or row[tag] in labels
        if any(row[tag] is None for tag in TAG_LABELS):
            assert row["tag_error"] is not None
        else:
            assert row["tag_error"] is None


# ---------------------------------------------------------------- engines.reward: judge ratings

rating_tables = st.one_of(
    st.dictionaries(st.sampled_from(["1", "2", "3", "4", "5", "6", "0", "x", " 3"]), any_value, max_size=7),
    st.dictionaries(st.sampled_from(["1", "2", "3", "4", "5"]),
                    st.floats(max_value=0.0, allow_nan=False) | st.just(-math.inf), max_size=5),
    any_value,
)


@SETTINGS
@given(table=rating_tables, scale=st.integers(2, 9))
def test_judge_rating_is_in_range_or_null_with_a_reason(table, scale):
    ratings = [str(i) for i in range(1, scale + 1)]
    result, missing = expected_rating(table, ratings)
    assert 0 <= missing <= scale
    if result.score is None:
        assert result.reason == NO_RATING_TOKEN
    else:
        assert result.reason is None and math.isfinite(result.score) and 1.0 <= result.score <= scale


# ---------------------------------------------------------------- scores: preference pairs

@SETTINGS
@given(value=any_value)
def test_score_value_is_finite_or_a_reason(value):
    score, reason = score_value(value)
    assert (score is not None and math.isfinite(score) and reason is None) or (score is None and reason in SCORE_REASONS)
    if isinstance(value, (bool, str)):
        assert score is None


score_cells = st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True, width=64),
                        st.sampled_from([math.nan, math.inf, -math.inf, 0.0, 3.0, 1.0]))


@SETTINGS
@given(groups=st.lists(st.lists(score_cells, min_size=1, max_size=6), min_size=1, max_size=4),
       seed=st.integers(0, 2**16))
def test_build_preferences_ignores_unusable_scores_whatever_the_order(groups, seed):
    rows = []
    for g, scores in enumerate(groups):
        for index, score in enumerate(scores):
            rows.append({"parent_id": f"p{g}", "candidate_index": index, "reward": score,
                         "messages": [{"role": "user", "content": f"q{g}"},
                                      {"role": "assistant", "content": f"answer {g}-{index}"}]})
    df = pl.DataFrame(rows, schema={"parent_id": pl.Utf8, "candidate_index": pl.Int64, "reward": pl.Float64,
                                    "messages": MESSAGES})
    built = build_preferences(df)
    shuffled = build_preferences(df.sample(fraction=1.0, shuffle=True, seed=seed))
    assert built.preferences.equals(shuffled.preferences) and built.candidates.equals(shuffled.candidates)
    # Every group is a pair or a counted drop; nothing is published as a non-finite score.
    assert built.preferences.height + built.rejected.height == len(groups)
    for column in ("score_chosen", "score_rejected"):
        assert built.preferences[column].is_finite().all()
    entries = built.candidates["candidates"].explode()
    if entries.len():
        scores = entries.struct.field("score")
        assert not scores.drop_nulls().is_nan().any() and scores.drop_nulls().is_finite().all()
        assert entries.filter(scores.is_null()).struct.field("reason").null_count() == 0
    assert sum(built.unscored.values()) == sum(1 for s in df["reward"].to_list() if s is None or not math.isfinite(s))
    for g, scores in enumerate(groups):
        finite = [s for s in scores if s is not None and math.isfinite(s)]
        pair = built.preferences.filter(pl.col("parent_id") == f"p{g}")
        if len(finite) >= 2 and max(finite) > min(finite):
            assert pair.row(0, named=True)["score_chosen"] == max(finite)
            assert pair.row(0, named=True)["score_rejected"] == min(finite)
        else:
            assert pair.height == 0


class FixedScorer:
    model_id = "fixed"

    def __init__(self, values):
        self.values = values

    def score(self, prompts, responses):
        return [self.values[i % len(self.values)] for i in range(len(prompts))]

    def shutdown(self):
        pass


scorer_outputs = st.one_of(any_value, st.builds(RewardResult, any_value, st.none() | st.sampled_from(
    ["too_long", "empty_response", ""])))


@SETTINGS
@given(values=st.lists(scorer_outputs, min_size=1, max_size=6), n=st.integers(1, 6))
def test_reward_label_rows_are_finite_and_kept_or_null_with_a_reason(values, n):
    df = pl.DataFrame({"id": [f"c{i}" for i in range(n)], "messages": pl.Series(
        [[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}] for i in range(n)],
        dtype=MESSAGES)})
    out = RewardLabel(scorer=FixedScorer(values))(df)
    assert out.height == n
    for row in out.iter_rows(named=True):
        if row["keep"]:
            assert row["reward"] is not None and math.isfinite(row["reward"]) and row["drop_reason"] is None
        else:
            assert row["reward"] is None and row["drop_reason"]


# ---------------------------------------------------------------- filters: heuristics and MinHash

@SETTINGS
@given(text=st.text(), n=st.integers(1, 8))
def test_repetition_counts_are_proper_fractions(text, n):
    dup, lines = repeated_line_counts(text)
    covered, chars = repeated_ngram_counts(text, n)
    assert 0 <= dup <= lines and 0 <= covered <= chars


@settings(max_examples=60, deadline=None)
@given(pairs=st.lists(st.tuples(st.text(max_size=80), st.text(max_size=200)), min_size=1, max_size=6))
def test_heuristics_keep_or_give_a_reason_for_every_row(pairs):
    df = pl.DataFrame({"id": [str(i) for i in range(len(pairs))], "instruction": [p[0] for p in pairs],
                       "response": [p[1] for p in pairs]})
    out = Heuristics()(df)
    assert out.height == df.height
    assert (out["keep"] == out["drop_reason"].is_null()).all()
    assert out["heur_repeated_line_ratio"].is_between(0.0, 1.0).all()
    assert out["heur_repeated_ngram_ratio"].is_between(0.0, 1.0).all()


no_word_char = st.characters(categories=["P", "S", "Zs", "Cf"], exclude_characters="_")


@settings(max_examples=80, deadline=None)
@given(texts=st.lists(st.text(no_word_char, min_size=1, max_size=5), min_size=2, max_size=8, unique=True))
def test_distinct_short_texts_without_words_never_cluster(texts):
    norm = [" ".join(t.lower().split()) for t in texts]
    assume(all(norm) and len(set(norm)) == len(norm))  # distinct and not blank after normalisation
    df = pl.DataFrame({"id": [f"r{i}" for i in range(len(texts))], "instruction": texts})
    out = MinHashDedup().run(df)
    assert DUPLICATE not in out["drop_reason"].to_list()
    assert out["keep"].all()


# ---------------------------------------------------------------- filters.deita

@SETTINGS
@given(logprobs=st.lists(st.none() | st.floats(max_value=0.0) | st.just(math.inf), min_size=6, max_size=6))
def test_deita_expected_score_is_finite_or_none(logprobs):
    from filters.deita import expected_score

    score = expected_score(logprobs)
    assert score is None or (math.isfinite(score) and 1.0 <= score <= 6.0)


def test_random_model_text_smoke():
    """A fixed-seed batch of junk answers through the tag parser (fast, no hypothesis database)."""
    rng = random.Random(0)
    alphabet = "goodpr {}[]\":.*\n&and🙂"
    for _ in range(500):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(20)))
        label, reason = parse_label(text, INPUT_QUALITY, "input_quality")
        assert (label is None) != (reason is None)
