"""Model lifetime: lazy chat-engine handles, the process caches of reward scorers, and releasing
models before another model needs the memory. Steps receive engines; they never load models.

Rules the runner follows (one heavy model at a time on a GPU):
- the chat engine starts only when a step generates (`LazyEngine`): fingerprints, template
  checks and fully cached reruns never pay the ~30 s vLLM start;
- before a step that loads its own heavy model (a reward model), the chat engine is released;
  before a step that generates, cached reward models are released (`release_for`).
Small models (the sentence embedder) stay cached: they fit beside anything.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

_SCORERS: dict[tuple, Any] = {}
_LOCK = threading.Lock()


class LazyEngine:
    """An engine handle that starts the real engine (vLLM, ~25 s) only when generation is asked for.

    `model_id` and `tokenizer` work without starting it. `model`: None / "embedded" (SmolLM2-135M),
    an HF folder or hub id, or {"openai": [base_url, ...], "name": served_model_name}."""

    def __init__(self, model: Any = None, **options: Any):
        self.model = model
        self.options = options
        self._engine = None
        self._tokenizer = None
        self.start_span: tuple[float, float] | None = None

    # Both engines it can start (VLLMEngine, OpenAIEngine) take calls from several threads at once.
    concurrent_calls = True

    def __getstate__(self) -> dict:
        # Pickled (to a Ray actor): the spec travels, the receiver starts its own engine on first use.
        return {**self.__dict__, "_engine": None, "_tokenizer": None, "start_span": None}

    @property
    def model_id(self) -> str:
        from engines.embedded import EMBEDDED_MODEL_NAME

        if isinstance(self.model, dict):
            return str(self.model.get("name") or self.model.get("openai"))
        # Stable across machines: the embedded model by name, not by its cache path.
        return EMBEDDED_MODEL_NAME if self.model in (None, "", "embedded") else str(self.model)

    @property
    def started(self) -> bool:
        return self._engine is not None

    def get(self):
        if self._engine is None:
            with _LOCK:  # shards in flight may ask at once: start one engine
                return self._start()
        return self._engine

    def _start(self):
        if self._engine is None:
            started = time.time()
            self._start_engine()
            # Wall-clock (start, end): the runner leaves it out of the seconds of the shards it overlapped.
            self.start_span = (started, time.time())
        return self._engine

    def _start_engine(self) -> None:
        if self._engine is None:
            if isinstance(self.model, dict):
                from engines.openai_client import OpenAIEngine

                self._engine = OpenAIEngine.from_spec(self.model, **self.options)
            else:
                from engines import get_engine

                self._engine = get_engine(None if self.model == "embedded" else self.model, **self.options)

    @property
    def tokenizer(self):
        if self._engine is not None:
            return self._engine.tokenizer
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            from engines.embedded import resolve_model

            model = self.model
            if isinstance(model, dict):
                model = model.get("tokenizer") or model.get("name")
            self._tokenizer = AutoTokenizer.from_pretrained(resolve_model(None if model == "embedded" else model))
        return self._tokenizer

    @property
    def stats(self):
        return getattr(self._engine, "stats", None)

    @property
    def identity(self) -> str:
        """What cache keys record for this model: its id plus its files' identity (template, weights...)."""
        if isinstance(self.model, dict):
            return self.model_id
        if getattr(self, "_identity", None) is None:
            from engines.identity import model_identity

            self._identity = model_identity(None if self.model == "embedded" else self.model)
        return self._identity

    # The engine verbs: the first call starts the engine. Anything else is not forwarded, so a
    # stray attribute lookup can never start vLLM by accident.
    _VERBS = frozenset({"complete", "chat", "next_token_logprobs", "classify", "embed", "generate", "render",
                        "max_model_len", "supports_structured_output", "closed"})

    def __getattr__(self, name: str):
        if name in LazyEngine._VERBS:
            return getattr(self.get(), name)
        raise AttributeError(f"LazyEngine has no attribute {name!r}")

    def shutdown(self) -> None:
        if self._engine is not None:
            from engines import shutdown_engine

            engine, self._engine = self._engine, None
            if hasattr(engine, "closed"):
                shutdown_engine(engine)
            elif hasattr(engine, "shutdown"):
                engine.shutdown()


def cached_scorer(key: tuple, build: Callable[[], Any]) -> Any:
    """The process-cached reward scorer for `key`, built once with `build()`."""
    with _LOCK:
        if key not in _SCORERS:
            _SCORERS[key] = build()
        return _SCORERS[key]


def release_scorers() -> None:
    """Free every cached reward scorer (vLLM pooling engines, transformers models)."""
    with _LOCK:
        scorers = list(_SCORERS.values())
        _SCORERS.clear()
    for scorer in scorers:
        shutdown = getattr(scorer, "shutdown", None)
        if shutdown is not None:
            shutdown()


def release_for(*, generates: bool, loads_own_model: bool, chat: LazyEngine | None) -> None:
    """Free what the next step does not need before it loads what it does."""
    if loads_own_model and chat is not None and isinstance(chat, LazyEngine):
        chat.shutdown()
    if generates:
        release_scorers()


def release_all(chat: Any = None) -> None:
    """End of a run: free the chat engine we own and every cached scorer."""
    if isinstance(chat, LazyEngine):
        chat.shutdown()
    release_scorers()
