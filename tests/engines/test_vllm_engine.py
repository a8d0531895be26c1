"""Integration tests on the real vLLM engine (embedded SmolLM2); one engine for the session."""

from __future__ import annotations

import math

import pytest

from engines import chat_template, get_engine
from engines.base import Engine, Sampling

pytestmark = pytest.mark.engine


def test_is_an_engine_and_cached(engine):
    assert isinstance(engine, Engine)
    assert get_engine() is engine  # process cache: no second vLLM start
    assert engine.engine_options["dtype"] == "float32" or not engine.on_cpu


def test_raw_completion_non_empty(engine):
    before = engine.stats.generated_tokens
    [result] = engine.complete(["The three primary colours are"], Sampling(temperature=0.0, max_tokens=12))
    completion = result.completions[0]
    assert completion.text.strip()
    assert 0 < completion.num_tokens <= 12
    assert completion.finish_reason in ("stop", "length")
    assert result.prompt_tokens == len(engine.tokenizer.encode("The three primary colours are", add_special_tokens=False))
    assert engine.stats.generated_tokens == before + completion.num_tokens


def test_same_seed_same_text_whatever_the_batch(engine):
    prefix = chat_template.pre_query_prefix(engine.tokenizer)
    sampling = Sampling(temperature=1.0, top_p=1.0, max_tokens=24, seed=1234)
    alone = engine.complete([prefix], sampling)[0].completions[0].text
    batch = engine.complete(["Once upon a time", prefix, "def fib(n):"],
                            [Sampling(max_tokens=24, seed=7), sampling, Sampling(max_tokens=24, seed=8)])
    assert batch[1].completions[0].text == alone
    other_seed = engine.complete([prefix] * 3, [Sampling(max_tokens=24, seed=s) for s in (1, 2, 3)])
    assert len({r.completions[0].text for r in other_seed}) > 1  # seeds do matter


def test_n_samples(engine):
    [result] = engine.complete(["My favourite animal is"], Sampling(n=4, max_tokens=8, seed=3))
    assert len(result.completions) == 4
    assert len({c.text for c in result.completions}) > 1
    again = engine.complete(["My favourite animal is"], Sampling(n=4, max_tokens=8, seed=3))[0]
    assert [c.text for c in again.completions] == [c.text for c in result.completions]


def test_stop_strings_respected(engine):
    prompt = "Count: 1, 2, 3, 4, 5,"
    free = engine.complete([prompt], Sampling(temperature=0.0, max_tokens=20))[0].completions[0].text
    assert "," in free  # greedy continues the list, so the stop below has something to cut
    stopped = engine.complete([prompt], Sampling(temperature=0.0, max_tokens=20, stop=(",",)))[0].completions[0]
    assert "," not in stopped.text
    assert stopped.finish_reason == "stop"
    assert free.startswith(stopped.text)


def test_end_of_turn_special_token_stop(engine):
    # "<|im_end|>" is a special token: the engine turns that stop string into a stop token id.
    prefix = chat_template.pre_query_prefix(engine.tokenizer)
    stops = chat_template.end_of_turn_stops(engine.tokenizer)
    results = engine.complete([prefix] * 4, [Sampling(max_tokens=96, seed=s, stop=stops) for s in range(4)])
    reasons = [r.completions[0].finish_reason for r in results]
    assert "stop" in reasons
    assert all("<|im_end|>" not in r.completions[0].text for r in results)


def test_next_token_logprobs_scores(engine):
    prompt = chat_template.render(engine.tokenizer, [{"role": "user", "content":
        "Rate how difficult this task is from 1 to 6: 'Add 2 and 2.' Reply with one digit."}])
    candidates = [str(i) for i in range(1, 7)]
    [scores] = engine.next_token_logprobs([prompt], candidates)
    assert set(scores) == set(candidates)
    assert all(v is not None and math.isfinite(v) and v <= 0 for v in scores.values())
    assert sum(math.exp(v) for v in scores.values()) <= 1.0 + 1e-4
    # A genuinely different context changes the distribution (values are not made up).
    [other] = engine.next_token_logprobs(["My phone number ends in"], candidates)
    assert other != scores


def test_next_token_logprobs_rejects_multi_token_candidates(engine):
    with pytest.raises(ValueError, match="not one"):
        engine.next_token_logprobs(["x"], ["extraordinarily-long-candidate"])


def test_structured_choice(engine):
    choices = ("positive", "negative", "neutral")
    results = engine.complete(["Sentiment of 'I love this film!':"] * 3,
                              [Sampling(choice=choices, max_tokens=8, seed=s) for s in range(3)])
    assert all(r.completions[0].text in choices for r in results)


def test_structured_json(engine):
    import json

    schema = {"type": "object", "properties": {"score": {"type": "integer"}}, "required": ["score"]}
    [result] = engine.complete(["Give a score as JSON:"], Sampling(json_schema=schema, max_tokens=20, temperature=0.0))
    assert isinstance(json.loads(result.completions[0].text)["score"], int)


def test_first_token_bias_only_touches_the_first_token(engine):
    seven = engine.single_token_id("7")
    first = engine.complete(["The number is"], Sampling(temperature=0.0, max_tokens=4,
                                                        first_token_bias=((seven, 100.0),)))[0].completions[0]
    every = engine.complete(["The number is"], Sampling(temperature=0.0, max_tokens=4,
                                                        logit_bias=((seven, 100.0),)))[0].completions[0]
    assert first.token_ids[0] == seven and any(t != seven for t in first.token_ids[1:])
    assert every.token_ids == [seven] * 4


def test_logprobs_returned_per_position(engine):
    [result] = engine.complete(["Hello"], Sampling(temperature=0.0, max_tokens=3, logprobs=2))
    c = result.completions[0]
    assert c.logprobs is not None and len(c.logprobs) == c.num_tokens
    assert all(tok in position for tok, position in zip(c.token_ids, c.logprobs))


def test_chat_answers(engine):
    [result] = engine.chat([[{"role": "user", "content": "What is the capital of France?"}]],
                           Sampling(temperature=0.0, max_tokens=24))
    assert "paris" in result.completions[0].text.lower()


def test_chat_without_template_clear_error(engine, monkeypatch):
    monkeypatch.setattr(engine.tokenizer, "chat_template", None)
    with pytest.raises(chat_template.ChatTemplateError, match="no chat template.*Fix"):
        engine.chat([[{"role": "user", "content": "hi"}]], Sampling(max_tokens=2))


def test_sampling_count_mismatch(engine):
    with pytest.raises(ValueError, match="2 Sampling objects for 1 prompts"):
        engine.complete(["a"], [Sampling(), Sampling()])


def test_prompt_longer_than_context_does_not_sink_the_batch(engine):
    from engines.vllm_engine import PROMPT_TOO_LONG

    long_prompt = "word " * (engine.max_model_len + 10)
    results = engine.complete([long_prompt, "The sky is"], Sampling(max_tokens=4, n=2, seed=0))
    assert [c.finish_reason for c in results[0].completions] == [PROMPT_TOO_LONG] * 2
    assert results[0].completions[0].text == ""
    assert results[1].completions[0].text.strip()
    with pytest.raises(ValueError, match="longer than max_model_len.*Fix"):
        engine.next_token_logprobs([long_prompt], ["1"])


def test_many_seeded_requests_beyond_one_scheduler_step(engine):
    # Regression: with chunked prefill, vLLM-CPU split a seeded request's prompt across steps and
    # crashed rewinding its CPU generator ("CPU Generator does not use offset") — seen in
    # magpie-dpo (28 instructions x 5 seeded samples). 150 prompts of ~40 tokens exceed one step.
    convs = [[{"role": "user", "content": f"Write a long detailed essay number {i} about the history of "
               f"bread, rivers and {i * 7} cities, with dates and names."}] for i in range(150)]
    results = engine.chat(convs, [Sampling(temperature=0.8, max_tokens=4, seed=i) for i in range(150)])
    assert len(results) == 150
    assert all(r.completions[0].token_ids for r in results)
