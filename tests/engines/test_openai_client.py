"""OpenAIEngine against a tiny local fake of the /v1/completions endpoint (request shape, parsing)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from engines.base import Engine, Sampling
from engines.openai_client import OpenAIEngine
from engines.scripted import ScriptedTokenizer


@pytest.fixture()
def server():
    requests: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            requests.append(body)
            if body["model"] == "missing":
                self.send_response(404)
                self.end_headers()
                self.wfile.write(b'{"error": "model not found"}')
                return
            choices = []
            for i in range(body["n"]):
                text = "A" if body["max_tokens"] == 1 else f"seed{body['seed']}-{i} end"
                choice = {"text": text, "finish_reason": "length" if body["max_tokens"] == 1 else "stop"}
                if body.get("logprobs"):
                    choice["logprobs"] = {"tokens": ["A"], "top_logprobs": [{"A": -0.1, "B": -2.5}]}
                choices.append(choice)
            out = json.dumps({"choices": choices, "usage": {"prompt_tokens": len(body["prompt"].split())}}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(out)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_port}/v1", requests
    httpd.shutdown()


def test_complete_chat_and_request_shape(server):
    url, requests = server
    engine = OpenAIEngine(url, "m", tokenizer=ScriptedTokenizer(), retries=0)
    assert isinstance(engine, Engine)
    results = engine.complete(["p one", "p two"], [Sampling(seed=1, n=2, stop=("\n",)), Sampling(seed=2)])
    assert [c.text for c in results[0].completions] == ["seed1-0 end", "seed1-1 end"]
    assert results[1].completions[0].text == "seed2-0 end" and results[1].prompt_tokens == 2
    sent = sorted(requests, key=lambda r: r["seed"])
    assert sent[0]["stop"] == ["\n"] and sent[0]["n"] == 2 and sent[0]["add_special_tokens"] is False
    engine.chat([[{"role": "user", "content": "hi"}]], Sampling(choice=("x", "y")))
    assert requests[-1]["prompt"] == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert requests[-1]["structured_outputs"] == {"choice": ["x", "y"]}
    assert engine.stats.prompts == 3


def test_first_token_bias_is_two_requests(server):
    url, requests = server
    engine = OpenAIEngine(url, "m", tokenizer=ScriptedTokenizer(), retries=0)
    [result] = engine.complete(["p"], Sampling(seed=5, max_tokens=10, first_token_bias=((7, -100.0),)))
    assert result.completions[0].text == "Aseed5-0 end"
    assert requests[0]["logit_bias"] == {"7": -100.0} and requests[0]["max_tokens"] == 1
    assert requests[1]["prompt"] == "pA" and "logit_bias" not in requests[1] and requests[1]["max_tokens"] == 9


def test_next_token_logprobs_absent_is_none(server):
    url, _ = server
    engine = OpenAIEngine(url, "m", tokenizer=ScriptedTokenizer(), retries=0)
    assert engine.next_token_logprobs(["q"], ["A", "B", "C"]) == [{"A": -0.1, "B": -2.5, "C": None}]


def test_errors_are_clear(server):
    url, _ = server
    with pytest.raises(RuntimeError, match="HTTP 404.*Fix"):
        OpenAIEngine(url, "missing", tokenizer=ScriptedTokenizer(), retries=0).complete(["p"])
    with pytest.raises(RuntimeError, match="can't reach.*Fix"):
        OpenAIEngine("http://127.0.0.1:9/v1", "m", tokenizer=ScriptedTokenizer(), retries=0).complete(["p"])


def test_fleet_spreads_requests_and_fails_over_to_a_live_server(server):
    """A list of base URLs: requests go round-robin; a dead server's share is retried on the others."""
    url, requests = server
    dead = "http://127.0.0.1:9/v1"
    engine = OpenAIEngine([dead, url], "m", tokenizer=ScriptedTokenizer(), retries=0, concurrency=1)
    results = engine.complete([f"p{i}" for i in range(6)], Sampling(seed=3))
    assert [r.completions[0].text for r in results] == ["seed3-0 end"] * 6
    assert len(requests) == 6  # every request answered once, half of them after failing over
    live = OpenAIEngine([url, url], "m", tokenizer=ScriptedTokenizer(), retries=0)
    live.complete(["a", "b"], Sampling(seed=1))
    assert len(requests) == 8


def test_candidate_logprobs_ask_for_every_candidate_token_id(server):
    url, requests = server
    engine = OpenAIEngine(url, "m", tokenizer=ScriptedTokenizer(), retries=0)
    engine.next_token_logprobs(["q"], ["A", "B"])
    ids = sorted(engine.tokenizer.encode(c, add_special_tokens=False)[0] for c in ("A", "B"))
    assert requests[-1]["logprob_token_ids"] == ids and requests[-1]["max_tokens"] == 1
    engine.complete(["p"], Sampling(seed=1, logprobs=2))
    assert "logprob_token_ids" not in requests[-1]  # only for candidate scoring


def test_fleet_spec_from_a_recipe(server):
    url, requests = server
    engine = OpenAIEngine.from_spec({"openai": [url, url], "name": "m", "tokenizer": ScriptedTokenizer(), "retries": 0,
                                     "timeout_s": 5})
    assert engine.base_urls == [url, url] and engine.retries == 0 and engine.timeout_s == 5
    engine.complete(["p"], Sampling(seed=1))
    assert requests[-1]["model"] == "m"
    assert OpenAIEngine.from_spec({"openai": url, "name": "m", "tokenizer": ScriptedTokenizer()}).base_urls == [url]


@pytest.mark.parametrize("spec, match", [
    ({"urls": ["http://h:8000/v1"], "name": "m"}, "unknown key 'urls'.*openai, name"),
    ({"openai": [], "name": "m"}, "at least one server URL"),
    ({"openai": ["h1:8000/v1"], "name": "m"}, "'h1:8000/v1' is not an http"),
    ({"openai": ["http://h:8000/v1"]}, "`name`.*served"),
    ({"openai": ["http://h:8000/v1"], "name": "m", "retries": -1}, "retries"),
])
def test_bad_fleet_spec_is_a_clear_error(spec, match):
    from alignforge.errors import AlignforgeError

    with pytest.raises(AlignforgeError, match=match) as info:
        OpenAIEngine.from_spec({**spec, "tokenizer": ScriptedTokenizer()} if "name" in spec else spec)
    assert "Fix:" in str(info.value)


def test_unreachable_fleet_is_an_error_the_cli_prints():
    from alignforge.errors import AlignforgeError

    engine = OpenAIEngine(["http://127.0.0.1:9/v1"], "m", tokenizer=ScriptedTokenizer(), retries=0)
    with pytest.raises(AlignforgeError, match="can't reach"):
        engine.complete(["p"])


def test_recipe_with_a_bad_fleet_spec_stops_at_load():
    from engines.embedded import ModelError
    from flows.recipe import load_recipe

    with pytest.raises(ModelError, match="magpie_sft.yaml: model: 'h1:8000/v1' is not an http.*Fix"):
        load_recipe("magpie-sft", sets={"model": {"openai": ["h1:8000/v1"], "name": "m"}})
    spec = {"openai": ["http://h1:8000/v1"], "name": "m", "retries": 1}
    assert load_recipe("magpie-sft", sets={"model": spec}).model == spec
