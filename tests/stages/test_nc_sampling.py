import json
import re

import polars as pl
import pytest

from alignforge.step import StepError
from engines.scripted import ScriptedEngine
from schemas import MESSAGES, validate
from stages.nc_sampling import (IIDCandidates, NCCandidates, json_schema_for, nc_request, parse_headers, parse_json,
                                parse_set, render_joint, usable_candidates)

QUESTIONS = ["Should I take a job abroad while my parents grow old?", "Is it fine to skip a friend's wedding for work?"]


def prompts(texts=QUESTIONS, ids=None) -> pl.DataFrame:
    return pl.DataFrame({"id": ids or [f"q{n}" for n in range(len(texts))], "instruction": texts})


def reply(seed, j, words=8) -> str:
    return f"Reply {j} under seed {seed} says something " + " ".join(f"w{seed % 97}x{j}y{n}" for n in range(words))


def as_json(texts) -> str:
    return json.dumps({f"response_{'abcdefgh'[j]}": t for j, t in enumerate(texts)})


def nc_engine(make=lambda s: [reply(s.seed, j) for j in range(4)], query="And what about the money side?"):
    """NC requests -> make(sampling) as JSON; follow-up queries (raw pre-query prompts) -> `query`;
    anything else (i.i.d. samples) -> one reply by seed. Records every Sampling."""
    seen = []

    def respond(prompt, s, i):
        seen.append((prompt, s))
        if "different replies" in prompt:
            out = make(s)
            return out if isinstance(out, str) else as_json(out)
        if prompt.rstrip().endswith("<|im_start|>user"):
            return query
        return reply(s.seed, i)

    engine = ScriptedEngine(respond)
    engine.seen = seen
    return engine


# ---------------------------------------------------------------- parsing

def test_headers_are_parsed_tolerantly_and_preamble_ignored():
    text = ("Sure! Here are four replies.\n# Response A:\nGo abroad, the chance is rare.\n"
            "**Response B:** Stay, family matters more.\n## response c -\nAnswer a few questions first: can you "
            "afford it?\nReply 4) Ask your parents.\n")
    assert parse_headers(text) == ["Go abroad, the chance is rare.", "Stay, family matters more.",
                                   "Answer a few questions first: can you afford it?", "Ask your parents."]
    # A sentence that starts like a header but has no mark or punctuation is content, not a header.
    assert parse_headers("Answer a question with a question.") == []


def test_json_object_array_and_cut_off_object():
    assert parse_json('{"response_b": "two", "response_a": "one"}', 2) == ["one", "two"]  # key order, not text order
    assert parse_json('noise ["x", "y"] trailing', 2) == ["x", "y"]
    cut = '{"response_a": "first \\"quoted\\" reply", "response_b": "second reply", "response_c": "cut he'
    assert parse_json(cut, 3) == ['first "quoted" reply', "second reply"]
    assert parse_json("no json here", 2) is None
    # Each format falls back to the other.
    assert parse_set("# Response A:\nfoo\n# Response B:\nbar", 2, "json") == (["foo", "bar"], "headers")
    assert parse_set('{"response_a": "foo"}', 2, "headers") == (["foo"], "json")
    assert parse_set("just prose", 2, "json") == ([], "none")


def test_schema_asks_for_exactly_k_bounded_strings():
    schema = json_schema_for(3, min_chars=10, max_chars=400)
    assert schema["required"] == ["response_a", "response_b", "response_c"]
    assert schema["additionalProperties"] is False
    assert all(p == {"type": "string", "minLength": 10, "maxLength": 400} for p in schema["properties"].values())


def test_request_wraps_the_last_user_turn_and_names_no_value_axis():
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
               {"role": "user", "content": "Should I move?"}]
    msgs = nc_request(history, 4, "headers")
    assert msgs[:2] == history[:2] and msgs[-1]["role"] == "user"
    text = msgs[-1]["content"]
    assert "Should I move?" in text and "4 different replies" in text and "'# Response D:'" in text
    assert not re.search(r"tradition|secular|rational|survival|self-expression|religio|liberal|conservative",
                         text, re.I)
    assert "response_d" in nc_request(history, 4, "json")[-1]["content"]


def test_usable_candidates_reasons():
    texts = ["", "too short", "One two three four five six.", "one two three four five, six!",
             "A different enough answer here.", "Yet another full answer here.", "A fifth long reply here."]
    usable, removed = usable_candidates(texts, 3, min_words=5)
    assert usable == ["One two three four five six.", "A different enough answer here.", "Yet another full answer here."]
    assert removed == {"empty_candidate": 1, "short_candidate": 1, "duplicate_candidate": 1, "extra_candidate": 1}
    # Header labels the model repeats inside a JSON value are stripped.
    assert usable_candidates(["**Response A:** Go for it, you will learn a lot."], 1, min_words=5)[0] == \
        ["Go for it, you will learn a lot."]


# ---------------------------------------------------------------- the NC step

def test_one_call_k_candidates_raw_and_joint_kept():
    engine = nc_engine()
    out = NCCandidates(engine=engine, k=4, repetition_penalty=1.1, presence_penalty=0.2)(prompts())
    assert len(engine.calls) == 1 and len(engine.calls[0][1]) == 2  # ONE request per prompt, one call per shard
    assert out.height == 2 and out["keep"].all() and out["drop_reason"].is_null().all()
    row = out.row(0, named=True)
    assert row["prompt"] == [{"role": "user", "content": QUESTIONS[0]}]
    assert [c["index"] for c in row["candidates"]] == [0, 1, 2, 3]
    assert all(c["score"] is None for c in row["candidates"])
    assert json.loads(row["raw_output"])["response_a"] == row["candidates"][0]["content"]
    assert row["joint"] == render_joint([c["content"] for c in row["candidates"]])
    assert row["joint"].startswith("# Response A:\n") and "\n\n# Response D:\n" in row["joint"]
    assert row["method"] == "nc" and row["turn"] == 1 and row["conversation_id"] == "q0" and row["parent_id"] == "q0"
    _, s = engine.seen[0]
    assert s.json_schema == json_schema_for(4, min_chars=10, max_chars=4 * 256)
    assert s.repetition_penalty == 1.1 and s.presence_penalty == 0.2 and s.frequency_penalty == 0.0
    assert s.max_tokens == 4 * (256 + 16) + 16 and s.temperature == 0.8
    validate(out, "candidates")  # the published candidates layout


def test_headers_mode_sends_no_schema_and_parses_headers():
    make = lambda s: "\n".join(f"# Response {'ABCD'[j]}:\n{reply(s.seed, j)}" for j in range(4))  # noqa: E731
    engine = nc_engine(make)
    out = NCCandidates(engine=engine, structured="headers")(prompts())
    assert out["keep"].all() and engine.seen[0][1].json_schema is None
    assert "'# Response A:'" in engine.calls[0][1][0]


@pytest.mark.parametrize("make, reason", [
    (lambda s: "I would rather not answer that in any format.", "unparsed"),
    (lambda s: [reply(s.seed, 0), reply(s.seed, 1), reply(s.seed, 2)], "too_few_candidates"),
    (lambda s: [reply(s.seed, 0), "Yes.", "No way.", reply(s.seed, 3)], "short_candidate"),
    (lambda s: [reply(s.seed, 0)] * 3 + [reply(s.seed, 3)], "duplicate_candidate"),
    (lambda s: [reply(s.seed, 0), "", "   ", reply(s.seed, 3)], "empty_candidate"),
])
def test_incomplete_sets_are_dropped_with_a_reason_never_padded(make, reason):
    step = NCCandidates(engine=nc_engine(make))
    out = step(prompts())
    assert out["drop_reason"].to_list() == [reason, reason] and not out["keep"].any()
    assert all(len(c) < 4 for c in out["candidates"].to_list())  # never padded to k
    assert out["raw_output"].is_not_null().all()  # the raw text stays for inspection
    assert step.stats["sets"] == 2 and step.stats["sets_kept"] == 0


def test_cut_joint_reply_is_truncated():
    long = lambda s: [reply(s.seed, j, words=200) for j in range(4)]  # noqa: E731
    step = NCCandidates(engine=nc_engine(long), max_tokens_per_candidate=8, structured="headers")
    out = step(prompts(QUESTIONS[:1]))
    assert out["drop_reason"].to_list() == ["truncated"]


def test_extra_candidates_keep_the_first_k():
    step = NCCandidates(engine=nc_engine(lambda s: [reply(s.seed, j) for j in range(6)]), k=4)
    out = step(prompts())
    assert out["keep"].all()
    parsed = list(json.loads(out["raw_output"][0]).values())
    assert len(parsed) == 6 and [c["content"] for c in out["candidates"][0]] == parsed[:4]
    assert step.stats["candidates_removed"] == {"extra_candidate": 4}


def test_deterministic_whatever_the_batch():
    df = prompts(QUESTIONS + ["Should children be allowed to choose their own religion?"])
    a = NCCandidates(engine=nc_engine(), seed=3)(df)
    b = NCCandidates(engine=nc_engine(), seed=3)(df.reverse())
    alone = NCCandidates(engine=nc_engine(), seed=3)(df.slice(1, 1))
    other = NCCandidates(engine=nc_engine(), seed=4)(df)
    key = lambda f: dict(zip(f["id"].to_list(), f["raw_output"].to_list()))  # noqa: E731
    assert key(a) == key(b)
    assert key(alone).items() <= key(a).items()
    assert set(key(other)) != set(key(a)) and list(key(other).values()) != list(key(a).values())


def test_skips_dropped_and_empty_inputs_and_reads_messages():
    df = pl.DataFrame({"id": ["a", "b", "c"], "keep": [True, False, True], "messages": pl.Series([
        [{"role": "user", "content": "Is honesty always right?"}, {"role": "assistant", "content": "old"}],
        [{"role": "user", "content": "dropped upstream"}],
        [{"role": "user", "content": "   "}]], dtype=MESSAGES)})
    step = NCCandidates(engine=nc_engine())
    out = step(df)
    assert out["conversation_id"].to_list() == ["a"]
    assert out["prompt"][0].to_list() == [{"role": "user", "content": "Is honesty always right?"}]
    assert step.stats["skipped_inputs"] == 2


def test_clear_errors():
    with pytest.raises(StepError, match="no engine"):
        NCCandidates()(prompts())
    with pytest.raises(StepError, match="`id`"):
        NCCandidates(engine=nc_engine())(pl.DataFrame({"instruction": ["q"]}))
    with pytest.raises(ValueError):
        NCCandidates(k=9)
    with pytest.raises(ValueError):
        NCCandidates(turns=5)


# ---------------------------------------------------------------- multi-turn

def test_multi_turn_continues_from_the_first_candidate_with_a_followup():
    engine = nc_engine()
    step = NCCandidates(engine=engine, turns=3)
    out = step(prompts(QUESTIONS[:1]))
    assert out["turn"].to_list() == [1, 2, 3] and out["keep"].all()
    assert len(engine.calls) == 5  # per turn: one NC call (+ one follow-up call between turns)
    rows = out.to_dicts()
    assert rows[0]["continued_from"] == 0 and rows[1]["continued_from"] == 0 and rows[2]["continued_from"] is None
    first = rows[0]["candidates"][0]["content"]
    assert rows[1]["prompt"] == [{"role": "user", "content": QUESTIONS[0]}, {"role": "assistant", "content": first},
                                 {"role": "user", "content": "And what about the money side?"}]
    assert rows[2]["prompt"][:3] == rows[1]["prompt"] and len(rows[2]["prompt"]) == 5
    assert [r["parent_id"] for r in rows] == ["q0", rows[0]["id"], rows[1]["id"]]
    assert len(set(out["id"])) == 3 and set(out["conversation_id"]) == {"q0"}
    # The NC request of turn 2 keeps the real history and wraps only the follow-up.
    turn2 = [p for p, s in engine.seen if "different replies" in p][1]
    assert first in turn2 and "And what about the money side?" in turn2
    validate(out, "candidates")


def test_continue_from_best_uses_scores_and_random_is_seeded():
    class Scorer:
        model_id = "fake"

        def __init__(self):
            self.calls = 0

        def score(self, prompts, responses):
            from engines.reward import RewardResult

            self.calls += 1
            return [RewardResult(float(r.split()[1] == "2")) for r in responses]  # "Reply 2 ..." wins

    scorer = Scorer()
    out = NCCandidates(engine=nc_engine(), turns=2, continue_from="best", scorer=scorer)(prompts())
    assert scorer.calls == 2  # one scorer call per turn for the whole shard
    firsts = out.filter(pl.col("turn") == 1)
    assert firsts["continued_from"].to_list() == [2, 2]
    assert [c["score"] for c in firsts["candidates"][0]] == [0.0, 0.0, 1.0, 0.0]
    second = out.filter(pl.col("turn") == 2)["prompt"][0].to_list()
    assert second[1]["content"] == firsts["candidates"][0][2]["content"]

    many = prompts([f"Question number {n}?" for n in range(12)])
    r1 = NCCandidates(engine=nc_engine(), turns=2, continue_from="random", seed=1)(many)
    r2 = NCCandidates(engine=nc_engine(), turns=2, continue_from="random", seed=1)(many)
    picks = r1.filter(pl.col("turn") == 1)["continued_from"].to_list()
    assert picks == r2.filter(pl.col("turn") == 1)["continued_from"].to_list()
    assert len(set(picks)) > 1 and all(0 <= p < 4 for p in picks)


def test_failed_followup_ends_the_conversation_with_a_reason_row():
    step = NCCandidates(engine=nc_engine(query="   "), turns=3)
    out = step(prompts(QUESTIONS[:1]))
    assert out["turn"].to_list() == [1, 2]
    assert out["keep"].to_list() == [True, False]
    assert out["drop_reason"].to_list() == [None, "followup_empty_instruction"]
    assert out["candidates"][1].to_list() == [] and step.stats["followups_failed"] == 1


def test_a_dropped_set_ends_its_conversation():
    make = lambda s: "no format at all" if s.seed % 2 else [reply(s.seed, j) for j in range(4)]  # noqa: E731
    out = NCCandidates(engine=nc_engine(make), turns=2)(prompts([f"Q {n}?" for n in range(8)]))
    for conv, group in out.group_by("conversation_id"):
        turn1 = group.filter(pl.col("turn") == 1)
        assert turn1.height == 1
        if not turn1["keep"][0]:
            assert group.height == 1 and turn1["continued_from"][0] is None


# ---------------------------------------------------------------- i.i.d. baseline

def test_iid_k_independent_samples_same_temperature_one_call():
    engine = nc_engine()
    out = IIDCandidates(engine=engine, k=4, temperature=0.9)(prompts())
    assert len(engine.calls) == 1 and len(engine.calls[0][1]) == 8
    samplings = [s for _, s in engine.seen]
    assert len({s.seed for s in samplings}) == 8 and {s.temperature for s in samplings} == {0.9}
    assert all(s.json_schema is None and s.max_tokens == 256 for s in samplings)
    assert out["keep"].all() and out["method"].unique().to_list() == ["iid"]
    assert out["raw_output"].is_null().all() and all(len(c) == 4 for c in out["candidates"].to_list())
    assert "different replies" not in engine.calls[0][1][0]  # the plain prompt


def test_iid_duplicates_and_truncation_drop_the_set():
    dup = IIDCandidates(engine=ScriptedEngine(["The same sampled answer every single time."]))(prompts())
    assert dup["drop_reason"].to_list() == ["duplicate_candidate"] * 2
    cut = IIDCandidates(engine=ScriptedEngine([" ".join(["word"] * 50)]), max_tokens_per_candidate=10)(prompts())
    assert cut["drop_reason"].to_list() == ["truncated"] * 2


def test_iid_paired_with_nc_sets():
    make = lambda s: "unparseable" if s.seed % 3 == 0 else [reply(s.seed, j) for j in range(4)]  # noqa: E731
    nc = NCCandidates(engine=nc_engine(make, query=""), turns=2)(prompts([f"Q {n}?" for n in range(6)]))
    engine = nc_engine()
    both = IIDCandidates(engine=engine, pair_with_input=True)(nc)
    iid = both.filter(pl.col("method") == "iid")
    assert both.filter(pl.col("method") == "nc").equals(nc.select(both.columns), null_equal=True)
    sets = nc.filter(~pl.col("drop_reason").fill_null("").str.starts_with("followup_"))
    assert iid.height == sets.height and len(engine.calls) == 1  # dropped NC sets get a partner too
    assert iid.select("conversation_id", "turn").equals(sets.select("conversation_id", "turn"))
    assert iid["parent_id"].to_list() == sets["id"].to_list()
    assert iid["prompt"].to_list() == sets["prompt"].to_list()
    assert both["id"].n_unique() == both.height
    # Same seeds as a stand-alone i.i.d. run on the same prompts.
    alone = IIDCandidates(engine=nc_engine())(prompts([f"Q {n}?" for n in range(6)]))
    assert iid["candidates"].to_list() == alone["candidates"].to_list()


def test_pair_mode_needs_nc_rows():
    with pytest.raises(StepError, match="pair_with_input"):
        IIDCandidates(engine=nc_engine(), pair_with_input=True)(prompts())


# ---------------------------------------------------------------- real engine

@pytest.mark.engine
def test_structured_outputs_give_k_candidates_on_the_embedded_model(engine):
    questions = ["Should I lend money to a close friend?", "Is it okay to eat meat?",
                 "Should schools teach religion?", "Is it better to rent or to buy a home?",
                 "Should I tell my boss I am looking for another job?", "How strict should parents be?",
                 "Should I move to a big city?", "Is it wrong to lie to protect someone's feelings?"]
    from stages.nc_sampling import parse_json

    step = NCCandidates(engine=engine, k=4, max_tokens_per_candidate=48, temperature=0.8)
    out = step(prompts(questions))
    # The format is guaranteed: every joint reply holds exactly k non-empty strings (JSON schema).
    formatted = [len([t for t in (parse_json(raw, 4) or []) if t.strip()]) == 4 for raw in out["raw_output"].to_list()]
    assert sum(formatted) / len(formatted) >= 0.95, out.select("drop_reason", "raw_output").to_dicts()
    assert step.stats["parsed_json"] == len(questions)
    # Whether the 135M model's k strings are usable (>= 5 words, not duplicates) is quality, not
    # format: such sets are dropped with a counted reason, never padded (measured in bench/nc.py).
    assert out.filter(~pl.col("keep"))["drop_reason"].null_count() == 0
    for cands in out.filter(pl.col("keep"))["candidates"].to_list():
        assert len(cands) == 4 and all(len(c["content"].split()) >= 5 for c in cands)


def test_candidate_rows_feed_reward_scoring_and_preferences():
    from schemas.preference import build_preferences
    from stages.nc_sampling import candidate_rows

    sets = NCCandidates(engine=nc_engine())(prompts())
    sets = pl.concat([sets, IIDCandidates(engine=nc_engine(), pair_with_input=True)(sets).filter(
        pl.col("method") == "iid")], how="diagonal_relaxed")
    rows = candidate_rows(sets)
    assert rows.height == 8 and rows["parent_id"].to_list() == [sets["id"][0]] * 4 + [sets["id"][1]] * 4
    assert rows["messages"][1].to_list()[-1] == {"role": "assistant", "content": sets["candidates"][0][1]["content"]}
    # A reward per candidate (here: its index) -> one chosen/rejected pair per set.
    built = build_preferences(rows.with_columns(pl.col("candidate_index").cast(pl.Float64).alias("reward")))
    assert built.preferences.height == 2
    chosen = dict(zip(built.preferences["parent_id"], built.preferences["chosen"].to_list()))
    assert chosen[sets["id"][0]][0]["content"] == sets["candidates"][0][3]["content"]
    assert candidate_rows(sets, method=None).height == 16
