"""Self-Align stages: parsers and rules with their edge values on a scripted engine; the whole chain
on the real engine (what is published never holds the prompt; same seed -> same rows)."""

from __future__ import annotations

import re

import polars as pl
import pytest

from alignforge.step import StepError
from engines.scripted import ScriptedEngine
from filters.self_align import Blacklist, SelfAlignFilter
from schemas import MESSAGES
from stages.self_align import (PrincipledAnswers, SelfInstruct, TGRTQuestions, TGRTTopics, VerboseAnswers, balance,
                               dedup_topics, first_token_ids, is_tgrt_seed, match_questions, parse_task,
                               principled_prefix, task_reason, topic_reason)
from stages.self_align_data import (DEFAULT_QUESTION_TYPES, DEFAULT_SEED_TASKS, EXEMPLARS, PRINCIPLES,
                                    SELF_INSTRUCT_BLOCKLIST, Exemplar, Principle, QuestionType, SelfAlignPrompt)

P = SelfAlignPrompt()
PAPER_NAMES = ["ethical", "informative", "helpful", "question assessment", "reasoning", "multi-aspect", "candor",
               "knowledge recitation", "static", "clarification", "numerical sensitivity", "dated knowledge",
               "step-by-step", "balanced & informative perspectives", "creative", "operational"]


def seeds(n: int, start: int = 0) -> pl.DataFrame:
    return pl.DataFrame({"id": [f"seed{i}" for i in range(start, start + n)], "parent_id": pl.Series([None] * n,
                         dtype=pl.Utf8), "origin": ["seeds@1"] * n, "seed": list(range(start, start + n))})


# ------------------------------------------------------------------ the default prompt data

def test_default_prompt_has_the_papers_shape():
    assert [p.name for p in P.principles] == PAPER_NAMES and len(PRINCIPLES) == 16
    assert len(P.exemplars) == len(EXEMPLARS) == 5
    assert len(DEFAULT_QUESTION_TYPES) == 20
    assert all(t.label.startswith("Questions that require ") for t in DEFAULT_QUESTION_TYPES)
    assert 35 <= len(DEFAULT_SEED_TASKS) <= 50
    prefix = principled_prefix(P)
    assert all(f"{i} ({name})." in prefix for i, name in enumerate(PAPER_NAMES, 1))
    assert prefix.count(P.thoughts_marker + " " + P.self_identification) == 5
    assert "{assistant}" not in prefix and "{cutoff}" not in prefix


def test_our_seed_tasks_pass_our_own_filters():
    for task in DEFAULT_SEED_TASKS:
        assert task_reason(task.instruction, task.input, min_words=4, max_words=150,
                           blocklist=SELF_INSTRUCT_BLOCKLIST) is None, task.instruction


def test_exemplar_thoughts_must_cite_configured_rules():
    bad = Exemplar(user="Hi", thoughts="I should follow rules 2 (candor).", answer="Hello.")
    with pytest.raises(ValueError, match=r"rule 2 \(candor\), but rule 2 is 'informative'"):
        SelfAlignPrompt(exemplars=(bad,))
    with pytest.raises(ValueError, match="cite no rule"):
        SelfAlignPrompt(exemplars=(Exemplar(user="Hi", thoughts="Just answer.", answer="Hello."),))
    custom = SelfAlignPrompt(principles=(Principle(name="brief", text="{assistant} is brief."),),
                             exemplars=(Exemplar(user="Hi", thoughts="I follow rules 1 (Brief).", answer="Hello."),))
    assert "1 (brief). Dromedary is brief." in principled_prefix(custom)


# ------------------------------------------------------------------ TGRT topics

@pytest.mark.parametrize("line, topic, reason", [
    ("7. Ancient Rome", "Ancient Rome", None),
    ("Three Word Topic", "Three Word Topic", None),
    ("8. Four Word Topic Here", "Four Word Topic Here", "too_long"),
    ("lowercase topic", "lowercase topic", "not_capitalised"),
    ("Éclair shops", "Éclair shops", "not_capitalised"),  # the reference wants an ASCII capital
    ("Tax law.", "Tax law.", "trailing_punctuation"),
    ("9.   ", "", "empty"),
    ("12) Urban Farming", "Urban Farming", None),
])
def test_topic_validity(line, topic, reason):
    assert topic_reason(line) == (topic, reason)


def test_dedup_is_case_insensitive_and_balance_cuts_to_the_smallest():
    assert dedup_topics(["Tea", "tea", "Coffee", "TEA", "Milk"]) == ["Tea", "Coffee", "Milk"]
    assert balance({"a": ["x", "y", "z"], "b": ["u"]}) == {"a": ["x"], "b": ["u"]}


def test_tgrt_share_spreads_seeds_evenly():
    chosen = [s for s in range(200) if is_tgrt_seed(s, 0.27)]
    assert len(chosen) == 54 and chosen[:3] == [3, 7, 11]
    assert all(is_tgrt_seed(s, 1.0) for s in range(10)) and not any(is_tgrt_seed(s, 0.0) for s in range(10))


def brainstorm(prompt, sampling, i):
    """New topics that depend on the request (its seed): 3 valid, 1 duplicate, 2 invalid lines."""
    k = int(re.findall(r"\n(\d+)\.$", prompt)[0])
    tag = sampling.seed % 1000
    return (f" Topic {tag}A\n{k + 1}. Topic {tag}B\n{k + 2}. Topic {tag}a\n{k + 3}. lowercase one\n"
            f"{k + 4}. Far Too Many Words Here\n{k + 5}. Topic {tag}C")


TYPES = (QuestionType(label="Questions that require alpha", seed_topics=("Alpha seed",)),
         QuestionType(label="Questions that require beta", seed_topics=("Beta seed", "beta SEED")))


def test_topics_rounds_balance_and_interleave():
    engine = ScriptedEngine(brainstorm)
    step = TGRTTopics(engine=engine, question_types=TYPES, rounds=3, question_round=1, requests_per_type=2,
                      shown_topics=2, n=20)
    out = step(seeds(20))
    assert len(engine.calls) == 3 and all(len(p) == 4 for _, p in engine.calls)  # one call per round
    first_round = engine.calls[0][1]
    assert first_round[0].split("Topics:")[1] == "\n1. Alpha seed\n2."  # the seed topic, then the next number
    assert "Questions that require beta" in first_round[2]
    history = step.stats["tgrt_pool_per_type_by_round"]
    # round 0: 1 seed + 2 requests x 3 new = 7 per type; later rounds add 6 per type
    assert history == [7, 13, 19]
    assert step.stats["topics_not_capitalised"] == 2 * 2 * 3 and step.stats["topics_too_long"] == 2 * 2 * 3
    assert step.stats["topics_duplicate"] == 12  # "Topic NNNa" repeats "Topic NNNA" in every request
    kept = out.filter(pl.col("keep"))
    # question_round 1: 13 per type x 2 types = 26 pairs >= 20 seeds; types alternate
    assert kept.height == 20 and kept["question_type"].to_list()[:4] == [t.label for t in TYPES] * 2
    assert kept["topic"].to_list()[:2] == ["Alpha seed", "Beta seed"]
    assert kept["prompt_source"].unique().to_list() == ["tgrt"] and kept["parent_id"].null_count() == 20
    # a second shard reuses the pool: no new engine call
    step(seeds(4, start=20))
    assert len(engine.calls) == 3 and "generated_tokens" not in step.stats


def test_topics_pool_exhausted_and_share():
    engine = ScriptedEngine(brainstorm)
    step = TGRTTopics(engine=engine, question_types=TYPES, rounds=1, question_round=0, requests_per_type=1, n=30,
                      share=0.5)
    out = step(seeds(30))
    tgrt = out.filter(pl.col("prompt_source") == "tgrt")
    assert tgrt.height == 15
    # pool after round 0: 4 per type -> 8 pairs; the other 7 TGRT seeds have no pair
    assert tgrt["drop_reason"].to_list().count("tgrt_pool_exhausted") == 7
    passed = out.filter(pl.col("prompt_source").is_null())
    assert passed.height == 15 and passed["id"].to_list() == [f"seed{s}" for s in range(0, 30, 2)]
    assert passed["keep"].all()


def test_topics_same_seed_same_rows_and_config_checks():
    a = TGRTTopics(engine=ScriptedEngine(brainstorm), question_types=TYPES, rounds=2, question_round=1)(seeds(6))
    b = TGRTTopics(engine=ScriptedEngine(brainstorm), question_types=TYPES, rounds=2, question_round=1)(seeds(6))
    assert a.equals(b)
    with pytest.raises(ValueError, match="question_round"):
        TGRTTopics(rounds=5, question_round=5)
    with pytest.raises(StepError, match="seed"):
        TGRTTopics(engine=ScriptedEngine(brainstorm))(pl.DataFrame({"x": [1]}))


def test_topic_sampling_defaults():
    seen = []

    def record(prompt, sampling, i):
        seen.append(sampling)
        return brainstorm(prompt, sampling, i)

    TGRTTopics(engine=ScriptedEngine(record), question_types=TYPES[:1], rounds=1, question_round=0)(seeds(1))
    assert (seen[0].temperature, seen[0].top_p, seen[0].max_tokens) == (1.0, 0.98, 128)


# ------------------------------------------------------------------ TGRT questions

def test_match_questions_edge_cases():
    targets = [(6, "Questions that require law", "Copyright"), (7, "Questions that require law", "Patents")]
    text = ("6. type: Instructions that require law, topic: Copyright, instruction: Who owns a selfie?\n"
            "7.  type: Instructions that require law,  topic: Patents, instruction: \"Can I patent a recipe?\"\n"
            "6. type: Instructions that require law, topic: Copyright, instruction: Second try?")
    assert match_questions(text, targets, truncated=False) == {6: "Who owns a selfie?", 7: "Can I patent a recipe?"}
    # a truncated completion loses its unfinished last line
    assert match_questions(text.rsplit("\n", 1)[0], targets, truncated=True) == {6: "Who owns a selfie?"}
    assert match_questions("6. type: Instructions that require law, topic: Trademarks, instruction: x", targets,
                           truncated=False) == {}


def questions_engine(seen=None):
    def respond(prompt, sampling, i):
        if seen is not None:
            seen.append((prompt, sampling))
        hints = re.findall(r"^(\d+)\. (type: .*)$", prompt.split("Items:")[0], re.M)
        targets = [(int(n), h) for n, h in hints if int(n) > 5]
        lines = [f" Tell me about {targets[0][1].split('topic: ')[1]}?"]
        for n, h in targets[1:]:
            if "Topic 3" in h:
                continue  # the model skipped this hint
            lines.append(f"{n}. {h}, instruction: " + ("Same question?" if "Topic 4" in h or "Topic 6" in h
                                                       else f"What about {h.split('topic: ')[1]}?"))
        return "\n".join(lines)
    return ScriptedEngine(respond)


def tgrt_rows(n: int) -> pl.DataFrame:
    return pl.DataFrame({"id": [f"t{i}" for i in range(n)], "parent_id": pl.Series([None] * n, dtype=pl.Utf8),
                         "origin": ["tgrt_topics@1"] * n, "seed": list(range(n)), "prompt_source": ["tgrt"] * n,
                         "question_type": ["Questions that require law"] * n,
                         "topic": [f"Topic {i}" for i in range(n)], "keep": [True] * n,
                         "drop_reason": pl.Series([None] * n, dtype=pl.Utf8)})


def test_questions_one_prompt_per_five_rows_and_reasons():
    seen: list = []
    engine = questions_engine(seen)
    rows = pl.concat([tgrt_rows(7), seeds(1, start=99).with_columns(
        pl.lit(None, dtype=pl.Utf8).alias("prompt_source"), pl.lit(True).alias("keep"))], how="diagonal_relaxed")
    out = TGRTQuestions(engine=engine)(rows)
    assert len(engine.calls) == 1 and len(engine.calls[0][1]) == 2  # 7 rows -> prompts of 5 + 2
    prompt, sampling = seen[0]
    assert prompt.endswith("6. type: Instructions that require law, topic: Topic 0, instruction:")
    assert prompt.count(", instruction:") == 6  # 5 in-context examples + the pre-filled first target
    assert (sampling.temperature, sampling.top_p, sampling.max_tokens, sampling.stop) == (1.0, 0.95, 384, ("\n11.",))
    assert out["instruction"].to_list()[:3] == ["Tell me about Topic 0?", "What about Topic 1?", "What about Topic 2?"]
    assert out["instruction"].to_list()[4:7] == ["Same question?", "Tell me about Topic 5?", "Same question?"]
    assert out["drop_reason"].to_list()[:7] == [None, None, None, "no_matching_question", None, None,
                                                "duplicate_instruction"]
    assert out["parent_id"].to_list()[:7] == [f"t{i}" for i in range(7)]
    passed = out.filter(pl.col("seed") == 99)
    assert passed["id"].to_list() == ["seed99"] and passed["instruction"].to_list() == [None]


# ------------------------------------------------------------------ plain Self-Instruct

@pytest.mark.parametrize("text, finish, expected", [
    (" Name three rivers in Asia.\n6. Input:\n<noinput>\n", "stop", ("Name three rivers in Asia.", "", None)),
    (" Summarise the text.\n6. Input:\nA long story.\n", "stop", ("Summarise the text.", "A long story.", None)),
    (" Summarise the text.\n6. Input:\nA long story.\n###\n7. Instruction: x", "stop",
     ("Summarise the text.", "A long story.", None)),
    (" Summarise the text.\n6. Input:\nA long st", "length", ("", "", "truncated_task")),
    (" Just an instruction without input", "stop", ("", "", "unparsable_task")),
    ("", "prompt_too_long", ("", "", "prompt_too_long")),
])
def test_parse_task(text, finish, expected):
    assert parse_task(text, 6, finish) == expected


@pytest.mark.parametrize("instruction, task_input, reason", [
    ("Name three big rivers.", "", None),                       # 4 words: kept
    ("Name three rivers.", "", "task_too_short"),               # 3 words: the reference drops <= 3
    (" ".join(["word"] * 150), "", None),
    (" ".join(["word"] * 151), "", "task_too_long"),
    ("Draw a cat on the page.", "", "blocked_keyword"),
    ("Describe this for me please.", "the attached file", "blocked_keyword"),  # the input is checked too
    ("Tell me how to go to the station.", "", "blocked_keyword"),
    ("Explain data mapping in databases.", "", None),           # whole words only: "mapping" is not "map"
    ("- List four prime numbers.", "", "starts_with_punctuation"),
    ("Éxplain four prime numbers now.", "", "starts_non_ascii"),
])
def test_task_filters(instruction, task_input, reason):
    assert task_reason(instruction, task_input, min_words=4, max_words=150, blocklist=SELF_INSTRUCT_BLOCKLIST) == reason


def self_instruct_engine(texts: dict[int, str], seen=None):
    from alignforge.step import sample_seed

    lookup = {sample_seed(0, "self_instruct", s): t for s, t in texts.items()}

    def respond(prompt, sampling, i):
        if seen is not None:
            seen.append((prompt, sampling))
        return lookup[sampling.seed]
    return ScriptedEngine(respond)


def test_self_instruct_source_rows_filters_and_dedup():
    task = " {}\n6. Input:\n<noinput>\n"
    seen: list = []
    engine = self_instruct_engine({0: task.format("Plan a picnic for ten people."),
                                   1: task.format("Plan a picnic for ten people!"),   # same once normalised
                                   2: task.format("Suggest three vegetarian dinners that can be cooked in under "
                                                  "twenty minutes."),                    # a seed task
                                   3: task.format("Draw a map of Spain."),
                                   4: " Explain tides to a child.\n6. Input:\nThe moon and the sea.\n"}, seen)
    step = SelfInstruct(engine=engine, n=5)
    assert step.source
    out = step(seeds(5))
    assert len(engine.calls) == 1
    assert out["drop_reason"].to_list() == [None, "duplicate_instruction", "copies_seed_task", "blocked_keyword", None]
    assert out["instruction"][4] == "Explain tides to a child.\n\nThe moon and the sea."
    assert out["prompt_source"].unique().to_list() == ["self_instruct"] and out["parent_id"].null_count() == 5
    prompt, sampling = seen[0]
    assert prompt.count("###\n") == 6 and prompt.endswith("###\n6. Instruction:")
    assert (sampling.temperature, sampling.top_p, sampling.stop) == (1.0, 0.98, ("###",))


def test_self_instruct_fills_only_rows_without_an_instruction():
    engine = self_instruct_engine({1: " Write a riddle about the sea.\n6. Input:\n<noinput>\n"})
    rows = pl.DataFrame({"id": ["a", "b", "c"], "seed": [0, 1, 2], "prompt_source": ["tgrt", None, "tgrt"],
                         "instruction": ["A TGRT question?", None, None], "keep": [True, True, False],
                         "drop_reason": [None, None, "tgrt_pool_exhausted"]})
    step = SelfInstruct(engine=engine, n=None)
    assert not step.source
    out = step(rows)
    assert len(engine.calls[0][1]) == 1  # only row b is generated
    assert out["instruction"].to_list() == ["A TGRT question?", "Write a riddle about the sea.", None]
    assert out["prompt_source"].to_list() == ["tgrt", "self_instruct", "tgrt"]
    assert out["id"][0] == "a" and out["id"][1] != "b"
    assert out["drop_reason"].to_list() == [None, None, "tgrt_pool_exhausted"]


# ------------------------------------------------------------------ principled answers

class TwoFormTokenizer:
    """"Sorry" and " Sorry" start with different tokens, like byte-level BPE."""

    def encode(self, text, add_special_tokens=False):
        return {"Sorry": [11], " Sorry": [22, 23]}.get(text, [99])


def test_principled_answers_prompt_sampling_and_rows():
    seen: list = []
    engine = ScriptedEngine(lambda p, s, i: seen.append((p, s)) or " I am fine.\n\nDromedary: Hello")
    rows = pl.DataFrame({"id": ["q1", "q2", "q3"], "instruction": ["What is rain?", "  ", "Name a fruit."],
                         "prompt_source": ["tgrt", "self_instruct", "self_instruct"]})
    out = PrincipledAnswers(engine=engine)(rows)
    prompt, sampling = seen[0]
    assert prompt.endswith("User: What is rain?\n\nDromedary (internal thoughts):")
    assert prompt.startswith(principled_prefix(P))
    assert (sampling.temperature, sampling.top_p, sampling.max_tokens, sampling.stop) == (0.5, 0.95, 256, ("\nUser:",))
    assert out["drop_reason"].to_list() == [None, "no_instruction", None]
    assert out["messages"][0].to_list() == [{"role": "user", "content": "What is rain?"},
                                            {"role": "assistant", "content": "I am fine.\n\nDromedary: Hello"}]
    assert out["self_align_raw"][0] == " I am fine.\n\nDromedary: Hello" and out["self_align_raw"][1] is None
    assert out["subset"].unique().to_list() == ["default"] and out["parent_id"].to_list() == ["q1", "q2", "q3"]
    assert out["self_align_prompt"][0] == P.fingerprint()
    for message in out["messages"].explode():  # principles and exemplars stay in the prompt
        assert PRINCIPLES[0][1][:30].replace("{assistant}", "Dromedary") not in message["content"]
        assert EXEMPLARS[0][0] not in message["content"]


def test_sorry_bias_covers_both_bpe_forms():
    assert first_token_ids(TwoFormTokenizer(), ["Sorry"]) == (11, 22)

    class Engine(ScriptedEngine):
        tokenizer = TwoFormTokenizer()

    seen: list = []
    PrincipledAnswers(engine=Engine(lambda p, s, i: seen.append(s) or "x"))(
        pl.DataFrame({"id": ["a"], "instruction": ["Hi there?"]}))
    assert dict(seen[0].logit_bias) == {11: -100.0, 22: -100.0}  # at every position, as the reference
    PrincipledAnswers(engine=Engine(lambda p, s, i: seen.append(s) or "x"), sorry_bias=0.0)(
        pl.DataFrame({"id": ["a"], "instruction": ["Hi there?"]}))
    assert seen[1].logit_bias == ()


def test_prompt_too_long_is_a_reason():
    from engines.base import Completion, GenerationResult

    class Long(ScriptedEngine):
        def complete(self, prompts, sampling, *, desc=None):
            return [GenerationResult(p, [Completion("", finish_reason="prompt_too_long")]) for p in prompts]

    out = PrincipledAnswers(engine=Long(["x"]))(pl.DataFrame({"id": ["a"], "instruction": ["Hi?"]}))
    assert out["drop_reason"].to_list() == ["prompt_too_long"]


# ------------------------------------------------------------------ verbose answers

def test_verbose_rows_are_added_for_kept_plain_rows():
    seen: list = []
    engine = ScriptedEngine(lambda p, s, i: seen.append((p, s)) or "A long answer.")
    plain = pl.DataFrame({
        "id": ["p1", "p2", "p3"], "parent_id": ["q1", "q2", "q3"], "origin": ["principled_answers@1"] * 3,
        "instruction": ["What is rain?", "Why?", "How?"], "prompt_source": ["tgrt"] * 3,
        "messages": pl.Series([[{"role": "user", "content": q}, {"role": "assistant", "content": "a"}]
                               for q in ("What is rain?", "Why?", "How?")], dtype=MESSAGES),
        "self_align_raw": ["r1", "r2", "r3"], "subset": ["default"] * 3, "self_align_checked": [True] * 3,
        "keep": [True, False, True], "drop_reason": [None, "apology", None]})
    out = VerboseAnswers(engine=engine)(plain)
    assert out.height == 5 and out["id"].to_list()[:3] == ["p1", "p2", "p3"]
    verbose = out.filter(pl.col("subset") == "verbose")
    assert verbose["parent_id"].to_list() == ["p1", "p3"]
    assert verbose["self_align_checked"].to_list() == [False, False]  # the next filter pass checks them
    assert verbose["messages"][0].to_list()[1]["content"] == "A long answer."
    prompt, sampling = seen[0]
    assert prompt.endswith("### User\nWhat is rain?\n\n### Dromedary (extensive)\n")
    assert (sampling.temperature, sampling.top_p, sampling.max_tokens) == (0.3, 0.7, 512)
    assert sampling.ngram_penalties == ((3, 1.0), (4, 2.0)) and sampling.stop == ("\n### User",)
    with pytest.raises(ValueError, match="ngram_penalties"):
        VerboseAnswers(ngram_penalties=((0, 1.0),))


# ------------------------------------------------------------------ the whole chain on the embedded model

def chain_steps(engine, seed: int = 0) -> list:
    return [TGRTTopics(engine=engine, n=CHAIN_ROWS, share=0.5, rounds=2, question_round=1, requests_per_type=1,
                       seed=seed),
            TGRTQuestions(engine=engine, seed=seed), SelfInstruct(engine=engine, n=None, seed=seed),
            PrincipledAnswers(engine=engine, seed=seed, max_tokens=160), SelfAlignFilter(),
            VerboseAnswers(engine=engine, seed=seed, max_tokens=160), SelfAlignFilter()]


# The bench keeps ~8-11% of principled answers at 135M (leaks of the prompt, mostly the
# self-identification sentence restated in the answer): 40 seed rows give a kept share above 0.
CHAIN_ROWS = 40


def test_chain_on_the_embedded_model(engine):
    steps = chain_steps(engine)
    df, outputs = seeds(CHAIN_ROWS), []
    for step in steps:
        df = step(df)
        outputs.append(df)
    final = outputs[-1]
    dropped = final.filter(~pl.col("keep"))
    assert dropped["drop_reason"].null_count() == 0  # every drop has a reason
    kept = final.filter(pl.col("keep"))
    blacklist = Blacklist.derive(P)
    forbidden = [p.text.replace("{assistant}", P.assistant_name)[:40] for p in P.principles] + \
        [e.user for e in P.exemplars] + [e.answer[:60] for e in P.exemplars] + \
        ["internal thoughts", P.thoughts_marker, P.answer_marker, P.user_marker, P.verbose_marker, P.self_identification]
    for messages in kept["messages"].to_list():
        for m in messages:
            assert not any(f in m["content"] for f in forbidden), m["content"]
            if m["role"] == "assistant" and m["content"]:
                assert blacklist.find(m["content"], names=False) is None
    plain = final.filter((pl.col("subset") == "default") & pl.col("self_align_raw").is_not_null())
    share = plain["keep"].mean()
    print(f"kept share {share:.3f} of {plain.height}; drops {dropped['drop_reason'].value_counts().rows()}")
    assert 0 < share < 1  # the paper's 70.6% needs a far stronger model (bench/self_align.py reports it)
    # same seed -> same rows: the answer step and its filter again on the same questions
    again = SelfAlignFilter()(PrincipledAnswers(engine=engine, seed=0, max_tokens=160)(outputs[2]))
    assert again.equals(outputs[4])
