"""HOW models run: vLLM in-process, OpenAI-compatible client, reward models, sentence embedder,
chat-template handling, the embedded default model. Imports nothing of ours but `schemas`."""

from __future__ import annotations

import threading
from typing import Any

from engines.base import Completion, Engine, GenerationResult, Sampling

__all__ = ["Completion", "Engine", "GenerationResult", "Sampling", "get_engine", "shutdown_all"]

_ENGINES: dict[tuple[str, str], Any] = {}
_LOCK = threading.Lock()


def get_engine(model: str | None = None, **opts: Any):
    """A process-cached `VLLMEngine` for `model` (None -> the embedded SmolLM2) and engine options.

    The same (resolved model, options) returns the same running engine; vLLM starts once per process."""
    from engines.embedded import resolve_model

    resolved = resolve_model(model)
    key = (resolved, repr(sorted(opts.items())))
    with _LOCK:
        engine = _ENGINES.get(key)
        if engine is None or engine.closed:
            from engines.vllm_engine import VLLMEngine

            engine = _ENGINES[key] = VLLMEngine(model, **opts)
        return engine


def shutdown_engine(engine: Any) -> None:
    """Free one cached engine (e.g. between GPU stages)."""
    with _LOCK:
        for key, cached in list(_ENGINES.items()):
            if cached is engine:
                del _ENGINES[key]
    engine.shutdown()


def shutdown_all() -> None:
    """Free every cached engine (GPU memory, worker processes). Safe to call repeatedly."""
    with _LOCK:
        engines = list(_ENGINES.values())
        _ENGINES.clear()
    for engine in engines:
        engine.shutdown()
