"""The small interface every text engine offers. Stages talk to this, never to vLLM directly."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence, runtime_checkable


@dataclass(frozen=True)
class Sampling:
    """Decoding parameters for one request (engine-neutral; maps 1:1 onto vLLM SamplingParams)."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 512
    n: int = 1
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token_id, bias); applies at every position
    first_token_bias: tuple[tuple[int, float], ...] = ()  # applies to the first generated token only
    # (n, penalty): logit -= penalty x (times this n-gram was already generated); engines.ngram_penalty
    ngram_penalties: tuple[tuple[int, float], ...] = ()
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logprobs: int | None = None  # top-k logprobs per generated position
    json_schema: dict[str, Any] | None = None  # structured output (vLLM structured outputs)
    choice: tuple[str, ...] | None = None  # structured output: exactly one of these strings
    skip_special_tokens: bool = True


@dataclass
class Completion:
    text: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | None
    # Per generated position: {token_id: logprob} for the top-k requested (only when logprobs set).
    logprobs: list[dict[int, float]] | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class GenerationResult:
    """All samples of one request."""

    prompt: str
    completions: list[Completion]
    prompt_tokens: int = 0


@runtime_checkable
class Engine(Protocol):
    """What a stage may ask of a model. One call = one batch: stages pass a whole shard."""

    model_id: str

    @property
    def tokenizer(self) -> Any: ...

    def complete(self, prompts: Sequence[str], sampling: Sampling | Sequence[Sampling],
                 *, desc: str | None = None) -> list[GenerationResult]:
        """Raw completion. `sampling` is one for all, or one per prompt (per-request seeds)."""
        ...

    def chat(self, conversations: Sequence[list[dict[str, str]]], sampling: Sampling | Sequence[Sampling],
             *, desc: str | None = None) -> list[GenerationResult]:
        """Render each conversation with the model's chat template (+ generation prompt), then complete."""
        ...

    def next_token_logprobs(self, prompts: Sequence[str], candidates: Sequence[str]) -> list[dict[str, float | None]]:
        """Log-probability of each candidate string's token at the first generated position.

        A candidate absent from the returned top-k is None (callers count and report it)."""
        ...

    def shutdown(self) -> None: ...
