"""Engine over an OpenAI-compatible server (e.g. `vllm serve`): raw `/v1/completions`, chat
templates rendered client-side (same prompts as the in-process engine, Magpie prefixes included).

One request per prompt (each has its own seed), sent concurrently; `complete` still takes the whole
batch at once. Standard library only (urllib + threads).

    engine = OpenAIEngine("http://gpu-box:8000/v1", model="Qwen/Qwen2.5-7B-Instruct", tokenizer=folder)
"""

from __future__ import annotations

import itertools
import json
import math
import os
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

from engines import chat_template
from engines.base import Completion, GenerationResult, Sampling
from alignforge.errors import AlignforgeError
from engines.embedded import ModelError
from engines.vllm_engine import EngineStats

TOP_LOGPROBS = 20  # servers cap this (OpenAI: 5, vLLM: max_logprobs, default 20)
# A recipe's `model: {openai: [...], ...}`: key -> what it is (also the error's list of keys).
SPEC_KEYS = {"openai": "server base URLs", "name": "served model name", "tokenizer": "tokenizer folder or hub id",
             "retries": "rounds over the fleet after the first", "timeout_s": "seconds per request",
             "concurrency": "requests in flight"}
SPEC_EXAMPLE = "model: {openai: [http://h1:8000/v1, http://h2:8000/v1], name: Qwen/Qwen2.5-7B-Instruct}"


class ServerError(AlignforgeError, RuntimeError):
    """No server of the fleet answered, or one refused a request (the message has the fix)."""


def check_spec(spec: dict[str, Any], *, source: str = "model") -> dict[str, Any]:
    """A recipe's OpenAI server spec, checked before anything connects -> OpenAIEngine's arguments."""
    unknown = sorted(set(spec) - set(SPEC_KEYS))
    if unknown:
        raise ModelError(f"{source}: unknown key {unknown[0]!r} in an OpenAI server spec",
                         fix=f"use {', '.join(SPEC_KEYS)}; e.g. {SPEC_EXAMPLE}")
    urls = spec.get("openai")
    urls = [urls] if isinstance(urls, str) else list(urls or [])
    if not urls:
        raise ModelError(f"{source}: `openai` lists no server", fix=f"give at least one server URL: {SPEC_EXAMPLE}")
    for url in urls:
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ModelError(f"{source}: {url!r} is not an http(s) URL", fix="write each server as http://host:port/v1")
    if not spec.get("name"):
        raise ModelError(f"{source}: an OpenAI server spec needs `name`, the model name the servers serve "
                         "(`--served-model-name`, else the path given to `--model`)", fix=SPEC_EXAMPLE)
    options = {}
    for key in ("retries", "timeout_s", "concurrency"):
        value = spec.get(key)
        if value is None:
            continue
        least = 0 if key == "retries" else 1
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < least:
            raise ModelError(f"{source}: {key}={value!r} must be a number >= {least}",
                             fix=f"set {key} ({SPEC_KEYS[key]}) or leave it out")
        options[key] = int(value) if key != "timeout_s" else float(value)
    return {"base_url": urls, "model": str(spec["name"]), "tokenizer": spec.get("tokenizer"), **options}


class OpenAIEngine:
    """engines.base.Engine over HTTP. `tokenizer`: a HF tokenizer or a folder/hub id to load one from
    (needed for chat templates and token ids; defaults to `model`). Thread-safe: concurrent calls
    (shards in flight) each send their requests; the servers batch them."""

    concurrent_calls = True

    def __init__(self, base_url: str | Sequence[str], model: str, *, tokenizer: Any = None, api_key: str | None = None,
                 concurrency: int = 32, timeout_s: float = 600.0, retries: int = 2) -> None:
        # A fleet: requests go round-robin over the servers; a failing server is retried on the next
        # one (each request tries every server at most `retries + 1` times in all).
        urls = [base_url] if isinstance(base_url, str) else list(base_url)
        if not urls:
            raise ValueError("OpenAIEngine needs at least one base URL. Fix: model: {openai: [http://host:8000/v1]}")
        self.base_urls = [u.rstrip("/") for u in urls]
        self.base_url = self.base_urls[0]
        self._next = itertools.count()
        self.model_id = model
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY", "")
        self.concurrency, self.timeout_s, self.retries = concurrency, timeout_s, retries
        self.stats = EngineStats()
        self._stats_lock = threading.Lock()
        if tokenizer is None or isinstance(tokenizer, str):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(tokenizer or model)
        self._tokenizer = tokenizer

    @classmethod
    def from_spec(cls, spec: dict[str, Any], **options: Any) -> "OpenAIEngine":
        """The engine for a recipe's `model: {openai: [url, ...], name: ..., tokenizer: ...}`."""
        return cls(**{**check_spec(spec), **options})

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    def complete(self, prompts: Sequence[str], sampling: Sampling | Sequence[Sampling] = Sampling(),
                 *, desc: str | None = None) -> list[GenerationResult]:
        prompts = list(prompts)
        samplings = [sampling] * len(prompts) if isinstance(sampling, Sampling) else list(sampling)
        if len(samplings) != len(prompts):
            raise ValueError(f"got {len(samplings)} Sampling objects for {len(prompts)} prompts. Fix: pass one "
                             "Sampling for all prompts or exactly one per prompt")
        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=max(1, min(self.concurrency, len(prompts)))) as pool:
            results = list(pool.map(self._complete_one, prompts, samplings))
        with self._stats_lock:
            self.stats.generate_seconds += time.perf_counter() - started
            self.stats.calls += 1
            self.stats.prompts += len(prompts)
            for r in results:
                self.stats.prompt_tokens += r.prompt_tokens
                self.stats.completions += len(r.completions)
                self.stats.generated_tokens += sum(c.num_tokens for c in r.completions)
        return results

    def chat(self, conversations, sampling: Sampling | Sequence[Sampling] = Sampling(),
             *, desc: str | None = None) -> list[GenerationResult]:
        prompts = [chat_template.render(self._tokenizer, conv, add_generation_prompt=True) for conv in conversations]
        return self.complete(prompts, sampling, desc=desc)

    def next_token_logprobs(self, prompts: Sequence[str], candidates: Sequence[str], *,
                            desc: str | None = None) -> list[dict[str, float | None]]:
        """Logprob of each candidate as the first generated token. vLLM servers get the candidates'
        token ids in `logprob_token_ids`, so every candidate comes back, not just those in the top-k;
        other servers answer from their top-k (a candidate outside it is None)."""
        ids = {c: self._tokenizer.encode(c, add_special_tokens=False) for c in candidates}
        single = {c: i[0] for c, i in ids.items() if len(i) == 1}
        sampling = Sampling(temperature=0.0, max_tokens=1, logprobs=TOP_LOGPROBS, skip_special_tokens=False)
        self._logprob_token_ids = sorted(set(single.values())) or None
        try:
            results = self.complete(prompts, sampling, desc=desc)
        finally:
            self._logprob_token_ids = None
        out = []
        for result in results:
            top = (result.completions[0].logprobs or [{}])[0]
            by_text = {self._tokenizer.decode([t]): lp for t, lp in top.items()}
            out.append({c: top.get(single[c], by_text.get(c)) if c in single else by_text.get(c) for c in candidates})
        return out

    def shutdown(self) -> None:  # nothing held locally
        return None

    # ------------------------------------------------------------------ requests
    def _complete_one(self, prompt: str, s: Sampling) -> GenerationResult:
        if s.first_token_bias:
            # No server-side first-token-only bias: sample one token with the bias, then continue.
            head = self._request(prompt, s, n=s.n, max_tokens=1, extra_bias=s.first_token_bias)
            completions = []
            for i, first in enumerate(head["choices"]):
                rest = s.max_tokens - 1
                if first.get("finish_reason") == "stop" or rest <= 0:
                    completions.append(self._completion(first))
                    continue
                seed = None if s.seed is None else s.seed + i
                tail = self._request(prompt + first["text"], s, n=1, max_tokens=rest, seed=seed)["choices"][0]
                merged = self._completion(tail)
                head_c = self._completion(first)
                completions.append(Completion(text=head_c.text + merged.text, token_ids=head_c.token_ids + merged.token_ids,
                                              finish_reason=merged.finish_reason,
                                              logprobs=(head_c.logprobs or []) + (merged.logprobs or []) if s.logprobs else None))
            return GenerationResult(prompt, completions, head.get("usage", {}).get("prompt_tokens", 0))
        body = self._request(prompt, s, n=s.n, max_tokens=s.max_tokens)
        return GenerationResult(prompt, [self._completion(c) for c in body["choices"]],
                                body.get("usage", {}).get("prompt_tokens", 0))

    def _completion(self, choice: dict) -> Completion:
        lp = choice.get("logprobs") or None
        token_ids: list[int] = []
        positions = None
        if lp:
            tokens = lp.get("tokens") or []
            token_ids = [self._token_id(t) for t in tokens]
            if lp.get("top_logprobs") is not None:
                positions = [{self._token_id(t): float(v) for t, v in (pos or {}).items() if v is not None
                              and math.isfinite(float(v))} for pos in lp["top_logprobs"]]
        if not token_ids and choice.get("text"):
            token_ids = self._tokenizer.encode(choice["text"], add_special_tokens=False)
        return Completion(text=choice.get("text", ""), token_ids=token_ids,
                          finish_reason=choice.get("finish_reason"), logprobs=positions)

    def _token_id(self, token: str) -> int:
        # vLLM returns "token_id:123" with return_tokens_as_token_ids; else the token's text.
        if token.startswith("token_id:"):
            return int(token.split(":", 1)[1])
        ids = self._tokenizer.encode(token, add_special_tokens=False)
        return ids[0] if len(ids) == 1 else -1

    def _payload(self, prompt: str, s: Sampling, *, n: int, max_tokens: int, seed: int | None = None,
                 extra_bias: tuple = ()) -> dict:
        body: dict[str, Any] = {
            "model": self.model_id, "prompt": prompt, "n": n, "max_tokens": max_tokens,
            "temperature": s.temperature, "top_p": s.top_p, "seed": s.seed if seed is None else seed,
            "frequency_penalty": s.frequency_penalty, "presence_penalty": s.presence_penalty,
            "skip_special_tokens": s.skip_special_tokens, "add_special_tokens": False,
        }
        if s.repetition_penalty != 1.0:
            body["repetition_penalty"] = s.repetition_penalty
        if s.stop:
            body["stop"] = list(s.stop)
        if s.stop_token_ids:
            body["stop_token_ids"] = list(s.stop_token_ids)
        bias = {str(t): b for t, b in (*s.logit_bias, *extra_bias)}
        if bias:
            body["logit_bias"] = bias
        if s.logprobs is not None:
            body["logprobs"] = s.logprobs
            if getattr(self, "_logprob_token_ids", None):
                body["logprob_token_ids"] = list(self._logprob_token_ids)
        if s.json_schema is not None and s.choice is not None:
            raise ValueError("Sampling sets both json_schema and choice; structured output takes one. Fix: keep one")
        if s.json_schema is not None:
            body["structured_outputs"] = {"json": s.json_schema}
        elif s.choice is not None:
            body["structured_outputs"] = {"choice": list(s.choice)}
        return body

    def _request(self, prompt: str, s: Sampling, **kw: Any) -> dict:
        data = json.dumps(self._payload(prompt, s, **kw)).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        first = next(self._next)
        attempts = (self.retries + 1) * len(self.base_urls)
        for attempt in range(attempts):
            url = f"{self.base_urls[(first + attempt) % len(self.base_urls)]}/completions"
            try:
                req = urllib.request.Request(url, data=data, headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                    return json.loads(resp.read())
            except urllib.error.HTTPError as exc:
                detail = exc.read().decode(errors="replace")[:500]
                if exc.code < 500 or attempt == attempts - 1:
                    hint = " and that the URL ends with the API prefix (http://host:8000/v1)" if exc.code == 404 else ""
                    raise ServerError(f"{url} answered HTTP {exc.code}: {detail}. Fix: check the model name "
                                      f"({self.model_id!r}){hint} and the sampling options the server supports") from exc
            except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
                if attempt == attempts - 1:
                    raise ServerError(f"can't reach {url} ({exc}) nor any other of {len(self.base_urls)} server(s) "
                                      f"after {self.retries + 1} round(s). Fix: start the servers (vllm serve MODEL) "
                                      "or correct the URLs") from exc
            if (attempt + 1) % len(self.base_urls) == 0:  # every server tried once more: back off
                time.sleep(0.5 * 2 ** (attempt // len(self.base_urls)))
        raise AssertionError("unreachable")
