from __future__ import annotations

import math

import pytest

from engines import chat_template
from engines.base import Engine, Sampling
from engines.scripted import ScriptedEngine


def test_is_an_engine_with_chatml():
    engine = ScriptedEngine(["x"])
    assert isinstance(engine, Engine)
    assert chat_template.pre_query_prefix(engine.tokenizer) == "<|im_start|>user\n"
    assert chat_template.end_of_turn_stops(engine.tokenizer) == ("<|im_end|>",)


def test_seeded_outputs_independent_of_batch_and_n():
    engine = ScriptedEngine([f"answer {i}" for i in range(50)])
    alone = engine.complete(["p"], Sampling(seed=5, n=3))[0]
    batch = engine.complete(["q", "p"], [Sampling(seed=1), Sampling(seed=5, n=3)])[1]
    assert [c.text for c in alone.completions] == [c.text for c in batch.completions]
    assert len({c.text for c in alone.completions}) > 1  # n samples differ
    assert engine.calls == [("complete", ["p"]), ("complete", ["q", "p"])]


def test_stop_max_tokens_and_choice():
    engine = ScriptedEngine(lambda prompt, s, i: "one two three<|im_end|>four")
    c = engine.complete(["p"], Sampling(stop=("<|im_end|>",)))[0].completions[0]
    assert (c.text, c.finish_reason) == ("one two three", "stop")
    c = engine.complete(["p"], Sampling(max_tokens=2))[0].completions[0]
    assert (c.text, c.finish_reason, c.num_tokens) == ("one two", "length", 2)
    c = engine.complete(["p"], Sampling(choice=("yes", "no"), seed=1))[0].completions[0]
    assert c.text in ("yes", "no")


def test_chat_renders_chatml_and_logprobs():
    seen = []
    engine = ScriptedEngine(lambda prompt, s, i: seen.append(prompt) or "ok")
    assert engine.chat([[{"role": "user", "content": "hi"}]])[0].completions[0].text == "ok"
    assert seen == ["<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"]
    [scores] = engine.next_token_logprobs(["p"], ["1", "2", "3"])
    assert math.isclose(sum(math.exp(v) for v in scores.values()), 1.0)
    fixed = ScriptedEngine(["x"], next_token=lambda p, cands: {c: (None if c == "3" else -1.0) for c in cands})
    assert fixed.next_token_logprobs(["p"], ["1", "3"]) == [{"1": -1.0, "3": None}]


def test_bad_arguments():
    with pytest.raises(ValueError, match="at least one"):
        ScriptedEngine([])
    with pytest.raises(ValueError, match="2 Sampling objects for 1 prompts"):
        ScriptedEngine(["x"]).complete(["a"], [Sampling(), Sampling()])
