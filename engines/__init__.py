"""HOW models run: vLLM in-process, OpenAI-compatible client, reward models, sentence embedder,
chat-template handling, the embedded default model. Imports nothing of ours but `schemas`."""

from engines.base import Completion, Engine, GenerationResult, Sampling

__all__ = ["Completion", "Engine", "GenerationResult", "Sampling"]
