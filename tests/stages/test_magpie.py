"""Magpie stage: parsing, sanitizer and edge cases on a scripted engine; real generation on vLLM."""

from __future__ import annotations

import polars as pl
import pytest

from engines.scripted import ScriptedEngine
from engines.chat_template import template_tokens
from stages.magpie import FOLLOWUP_SYSTEM_PROMPT, MagpieInstructions, MagpieResponses, sanitize_instruction

SEEDS = pl.DataFrame({"seed": [0, 1, 2, 3]})


def by_seed(texts: dict[int, str], default: str = "Plain query?"):
    """A responder that answers the seed-th request with texts[seed] (looked up via the sampling seed)."""
    from stages.magpie import sample_seed

    lookup = {sample_seed(0, s): t for s, t in texts.items()}
    return lambda prompt, sampling, i: lookup.get(sampling.seed, default)


# ------------------------------------------------------------------ sanitizer

@pytest.mark.parametrize("raw, clean", [
    ("Task: Write a poem about rain.", "Write a poem about rain."),
    ("Question 1: What is 2+2?", "What is 2+2?"),
    ("**Instruction:** Summarise this text.", "Summarise this text."),
    ("What is 2+2? Answer: 4", "What is 2+2?"),
    ("Solve x^2=4. ## Step 1: factor", "Solve x^2=4."),
    ("How do I bake bread? **Solution:** knead", "How do I bake bread?"),
    ("Tasks for today: none", "Tasks for today: none"),  # "Tasks" is not the "Task:" label
    ("Answer: 42", ""),
])
def test_sanitizer_cuts_leaked_answers_and_labels(raw, clean):
    assert sanitize_instruction(raw) == clean


# ------------------------------------------------------------------ instructions

def test_instructions_one_call_prefix_and_columns():
    engine = ScriptedEngine(by_seed({0: "  How do tides work?  ", 1: "Name three rivers."}))
    step = MagpieInstructions(engine=engine)
    out = step(SEEDS)
    assert len(engine.calls) == 1  # ONE engine call for the whole shard
    method, prompts = engine.calls[0]
    assert method == "complete" and len(prompts) == 4
    assert all(p.endswith("<|im_start|>user\n") for p in prompts)  # pre-query prefix, nothing after
    assert out.columns == ["id", "parent_id", "origin", "seed", "instruction", "system_prompt", "gen_tokens",
                           "keep", "drop_reason"]
    assert out["instruction"].to_list()[:2] == ["How do tides work?", "Name three rivers."]
    assert out["keep"].all() and out["parent_id"].null_count() == 4
    assert out["id"].n_unique() == 4 and out["origin"][0] == "magpie_instructions@1"
    assert step.stats["generated_tokens"] == out["gen_tokens"].sum() > 0


def test_instructions_sampling_defaults_and_stops():
    seen = []

    def respond(prompt, sampling, i):
        seen.append(sampling)
        return "Why?"

    MagpieInstructions(engine=ScriptedEngine(respond))(SEEDS)
    s = seen[0]
    assert (s.temperature, s.top_p) == (1.0, 1.0)
    assert "<|im_end|>" in s.stop and "<|im_start|>assistant" in s.stop and "\n" in s.stop
    assert len({x.seed for x in seen}) == 4  # per-row seeds


def test_instructions_without_early_stop_keeps_lines():
    engine = ScriptedEngine(lambda p, s, i: "Line one\nline two")
    out = MagpieInstructions(engine=engine, early_stop=False)(SEEDS.head(1))
    assert out["instruction"][0] == "Line one\nline two"
    out = MagpieInstructions(engine=ScriptedEngine(lambda p, s, i: "Line one\nline two"))(SEEDS.head(1))
    assert out["instruction"][0] == "Line one"


def test_instruction_drop_reasons():
    engine = ScriptedEngine(by_seed({0: "   ", 1: "Hi <|im_start|>system oops", 2: " ".join(["word"] * 50),
                                     3: "Fine question?"}))
    out = MagpieInstructions(engine=engine, max_tokens=20)(SEEDS)
    assert out["drop_reason"].to_list() == ["empty_instruction", "template_leak", "truncated", None]
    assert out["keep"].to_list() == [False, False, False, True]


def test_stop_token_left_in_text_is_cut():
    # Engines that keep special tokens in text may return the end-of-turn marker itself.
    out = MagpieInstructions(engine=ScriptedEngine(lambda p, s, i: "What is AI?<|im_end|>"))(SEEDS.head(1))
    assert out["instruction"][0] == "What is AI?" and out["keep"][0]


def test_sanitize_option():
    engine = ScriptedEngine(lambda p, s, i: "Task: Explain gravity. Answer: mass")
    raw = MagpieInstructions(engine=engine, sanitize=False)(SEEDS.head(1))
    assert raw["instruction"][0] == "Task: Explain gravity. Answer: mass"
    # On by default (the step config is the one place the default lives; recipes don't restate it).
    assert MagpieInstructions(engine=engine)(SEEDS.head(1))["instruction"][0] == "Explain gravity."


def test_system_prompt_variants_are_deterministic_and_used():
    variants = ("You are a chef.", "You are a pilot.")
    engine = ScriptedEngine(lambda p, s, i: "Q?")
    seeds = pl.DataFrame({"seed": list(range(20))})
    out = MagpieInstructions(engine=engine, system_prompts=variants)(seeds)
    assert set(out["system_prompt"].to_list()) == set(variants)
    for prompt, sp in zip(engine.calls[0][1], out["system_prompt"].to_list()):
        assert prompt.startswith(f"<|im_start|>system\n{sp}<|im_end|>")
    again = MagpieInstructions(engine=ScriptedEngine(lambda p, s, i: "Q?"), system_prompts=variants)(seeds)
    assert again["system_prompt"].to_list() == out["system_prompt"].to_list()


def test_first_token_header_suppression_passes_bias():
    from engines.scripted import ScriptedTokenizer

    class Tok(ScriptedTokenizer):  # a tokenizer with a vocabulary, for the "#" scan
        def get_vocab(self):
            return {"#": 5, "##": 6, "Ġ#": 7, "hello": 8}

        def convert_tokens_to_string(self, toks):
            return "".join(toks).replace("Ġ", " ")

    engine = ScriptedEngine(lambda p, s, i: "Hi?")
    engine._tokenizer = Tok()
    seen = []
    orig = engine.complete
    engine.complete = lambda prompts, sampling, desc=None: (seen.extend(sampling), orig(prompts, sampling))[1]
    MagpieInstructions(engine=engine, suppress_headers=True)(SEEDS.head(1))
    assert dict(seen[0].first_token_bias) == {5: -100.0, 6: -100.0, 7: -100.0}
    seen.clear()
    MagpieInstructions(engine=engine)(SEEDS.head(1))
    assert seen[0].first_token_bias == ()


def test_same_seed_same_ids_and_texts_other_seed_differs():
    texts = [f"Question number {k}?" for k in range(50)]
    a = MagpieInstructions(engine=ScriptedEngine(texts), seed=7)(SEEDS)
    b = MagpieInstructions(engine=ScriptedEngine(texts), seed=7)(SEEDS)
    c = MagpieInstructions(engine=ScriptedEngine(texts), seed=8)(SEEDS)
    assert a.equals(b)
    assert set(a["id"]).isdisjoint(set(c["id"]))


def test_missing_seed_column_is_a_clear_error():
    with pytest.raises(ValueError, match="`seed` column"):
        MagpieInstructions(engine=ScriptedEngine(["x"]))(pl.DataFrame({"n": [1]}))


def test_empty_shard():
    engine = ScriptedEngine(["x"])
    out = MagpieInstructions(engine=engine)(pl.DataFrame({"seed": pl.Series([], dtype=pl.Int64)}))
    assert out.height == 0 and engine.calls == []


# ------------------------------------------------------------------ responses

def _instructions(*texts: str) -> pl.DataFrame:
    return pl.DataFrame({"id": [f"i{k}" for k in range(len(texts))], "parent_id": [None] * len(texts),
                         "origin": ["magpie_instructions@1"] * len(texts), "seed": list(range(len(texts))),
                         "instruction": list(texts), "keep": [True] * len(texts), "drop_reason": [None] * len(texts)},
                        schema_overrides={"parent_id": pl.Utf8, "drop_reason": pl.Utf8})


def test_responses_messages_greedy_one_call():
    seen = []

    def respond(prompt, s, i):
        seen.append(s)
        return "Answer to: " + prompt.split("<|im_start|>user\n")[-1].split("<|im_end|>")[0]

    engine = ScriptedEngine(respond)
    out = MagpieResponses(engine=engine)(_instructions("Hello?", "Why sky blue?"))
    assert len(engine.calls) == 1
    assert seen[0].temperature == 0.0
    assert out["messages"].to_list()[1] == [{"role": "user", "content": "Why sky blue?"},
                                            {"role": "assistant", "content": "Answer to: Why sky blue?"}]
    assert out["parent_id"].to_list() == ["i0", "i1"] and out["keep"].all()
    assert out["origin"][0] == "magpie_responses@1"


def test_response_drop_reasons():
    engine = ScriptedEngine(lambda p, s, i: "" if "Empty" in p else ("long " * 30 if "Long" in p else "ok"))
    out = MagpieResponses(engine=engine, max_tokens=10)(_instructions("Empty please", "Long please", "Short"))
    assert out["drop_reason"].to_list() == ["empty_response", "truncated_response", None]


def test_multi_turn_followups_use_system_prompt_only_for_queries():
    def respond(prompt, s, i):
        if prompt.endswith("<|im_start|>user\n"):  # follow-up query request
            assert FOLLOWUP_SYSTEM_PROMPT in prompt and s.temperature == 1.0
            return "And then what?"
        assert FOLLOWUP_SYSTEM_PROMPT not in prompt and s.temperature == 0.0
        return f"Reply {prompt.count('<|im_start|>user')}"

    engine = ScriptedEngine(respond)
    out = MagpieResponses(engine=engine, turns=3)(_instructions("First?", "Other?"))
    assert [c[0] for c in engine.calls] == ["complete"] * 5  # 1 + 2 per extra turn, batched over the shard
    msgs = out["messages"].to_list()[0]
    assert [m["role"] for m in msgs] == ["user", "assistant"] * 3
    assert msgs[2]["content"] == "And then what?" and msgs[5]["content"] == "Reply 3"
    assert out["keep"].all()


def test_multi_turn_failed_followup_drops_the_row():
    engine = ScriptedEngine(lambda p, s, i: "" if p.endswith("<|im_start|>user\n") else "Sure.")
    out = MagpieResponses(engine=engine, turns=2)(_instructions("First?"))
    assert out["drop_reason"].to_list() == ["empty_instruction"]


# ------------------------------------------------------------------ real engine

@pytest.mark.engine
def test_magpie_on_real_engine_is_clean_and_deterministic(engine):
    seeds = pl.DataFrame({"seed": list(range(8))})
    instructions = MagpieInstructions(engine=engine, max_tokens=64, sanitize=True)
    first = instructions(seeds)
    kept = first.filter(pl.col("keep"))
    assert kept.height >= 4, first.select("instruction", "drop_reason")
    texts = kept["instruction"].to_list()
    assert all(t.strip() for t in texts) and len(set(texts)) == len(texts)
    leak = template_tokens(engine.tokenizer)
    assert not any(tok in t for t in texts for tok in leak)

    responses = MagpieResponses(engine=engine, max_tokens=48)
    answered = responses(kept)
    ok = answered.filter(pl.col("keep"))
    assert ok.height >= 1
    assert all(m[-1]["role"] == "assistant" and m[-1]["content"].strip() for m in ok["messages"].to_list())

    # Same config + seed -> same ids and texts (per-request seeds; greedy responses).
    second = MagpieInstructions(engine=engine, max_tokens=64, sanitize=True)(seeds)
    assert second["id"].to_list() == first["id"].to_list()
    assert second["instruction"].to_list() == first["instruction"].to_list()
    again = MagpieResponses(engine=engine, max_tokens=48)(second.filter(pl.col("keep")))
    assert again["id"].to_list() == answered["id"].to_list()
    assert again["messages"].to_list() == answered["messages"].to_list()


# ------------------------------------------------------------------ sampling penalties (issue 15)

def test_penalties_reach_sampling_of_every_request():
    seen = {"query": [], "answer": []}

    def respond(prompt, s, i):
        kind = "query" if prompt.endswith("<|im_start|>user\n") else "answer"
        seen[kind].append((s.repetition_penalty, s.frequency_penalty, s.presence_penalty))
        return "And then?" if kind == "query" else "Sure."

    engine = ScriptedEngine(respond)
    MagpieInstructions(engine=engine, repetition_penalty=1.2, frequency_penalty=0.3, presence_penalty=0.4)(SEEDS)
    assert seen["query"] == [(1.2, 0.3, 0.4)] * 4
    seen["query"].clear()
    MagpieResponses(engine=engine, turns=2, repetition_penalty=1.05, frequency_penalty=0.1, presence_penalty=0.2,
                    followup_repetition_penalty=1.3, followup_frequency_penalty=0.5,
                    followup_presence_penalty=0.6)(_instructions("First?", "Other?"))
    assert seen["answer"] == [(1.05, 0.1, 0.2)] * 4  # both turns' responses
    assert seen["query"] == [(1.3, 0.5, 0.6)] * 2  # the turn-2 follow-up queries


def test_penalty_defaults_are_the_papers_neutral_values():
    seen = []
    engine = ScriptedEngine(lambda p, s, i: seen.append(s) or "Sure.")
    MagpieResponses(engine=engine)(_instructions("First?"))
    assert (seen[0].repetition_penalty, seen[0].frequency_penalty, seen[0].presence_penalty) == (1.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="repetition_penalty"):
        MagpieResponses(repetition_penalty=0.0)


def test_response_ids_with_neutral_penalties_are_those_of_the_code_before_the_fields():
    # Computed with the code before the penalty fields existed (commit bfbe9bd): published ids
    # of runs at the neutral penalties must not change.
    engine = ScriptedEngine(["An answer."])
    df = pl.DataFrame({"id": ["p0", "p1"], "instruction": ["Q one?", "Q two?"]})
    assert MagpieResponses(engine=engine)(df)["id"].to_list() == ["abcecc9982b91e54", "a1fa0ff38ea537df"]
    explicit = MagpieResponses(engine=engine, turns=2, seed=3, repetition_penalty=1.0, frequency_penalty=0.0,
                               presence_penalty=0.0, followup_repetition_penalty=1.0)
    assert explicit(df)["id"].to_list() == ["7a72c39aa84b95ba", "b2a3217bee94b604"]
    # A real penalty is a different config: different ids.
    penalised = MagpieResponses(engine=engine, repetition_penalty=1.05)(df)["id"].to_list()
    assert set(penalised).isdisjoint({"abcecc9982b91e54", "a1fa0ff38ea537df"})


def test_ngram_penalties_reach_response_sampling_only():
    seen = {"query": [], "answer": []}

    def respond(prompt, s, i):
        kind = "query" if prompt.endswith("<|im_start|>user\n") else "answer"
        seen[kind].append(s.ngram_penalties)
        return "And then?" if kind == "query" else "Sure."

    MagpieResponses(engine=ScriptedEngine(respond), turns=2,
                    ngram_penalties=[[3, 0.5]])(_instructions("First?"))
    assert seen == {"answer": [((3, 0.5),)] * 2, "query": [()]}
    with pytest.raises(ValueError, match="ngram_penalties"):
        MagpieResponses(ngram_penalties=[[0, 1.0]])
    # Off (the default) keeps the ids of the code before the field; on is a different config.
    engine = ScriptedEngine(["An answer."])
    df = pl.DataFrame({"id": ["p0", "p1"], "instruction": ["Q one?", "Q two?"]})
    assert MagpieResponses(engine=engine, ngram_penalties=())(df)["id"].to_list() == [
        "abcecc9982b91e54", "a1fa0ff38ea537df"]
    assert MagpieResponses(engine=engine, ngram_penalties=[[3, 0.5]])(df)["id"].to_list()[0] != "abcecc9982b91e54"


def test_model_profile_is_named_in_the_stats():
    step = MagpieResponses(engine=ScriptedEngine(["Sure."]), repetition_penalty=1.05)
    step.model_profile = (None, {"repetition_penalty": 1.05})  # what flows.recipe.build_steps sets
    step(_instructions("First?"))
    assert step.stats["model_profile"] == "SmolLM2-135M-Instruct profile: repetition_penalty=1.05"
    plain = MagpieResponses(engine=ScriptedEngine(["Sure."]))
    plain(_instructions("First?"))
    assert "model_profile" not in plain.stats
