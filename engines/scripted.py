"""A scripted stand-in engine for unit tests of parsing and edge cases (never proof that generation works).

    engine = ScriptedEngine(["Write a haiku.", "", "Answer: 42"])          # canned outputs
    engine = ScriptedEngine(lambda prompt, sampling, i: prompt[-5:] + "!")  # or a function

Outputs are picked deterministically from (seed, prompt, sample index), so the same request gives
the same text whatever else is in the batch, like vLLM with per-request seeds. `stop`,
`max_tokens` (whitespace "tokens") and `choice` are honoured; `calls` records every batch so a
test can assert a stage made ONE engine call per shard. Chat renders real ChatML.
"""

from __future__ import annotations

import hashlib
import math
import random
from typing import Callable, Sequence

from engines import chat_template
from engines.base import Completion, GenerationResult, Sampling

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

Responder = Callable[[str, Sampling, int], str]


class ScriptedTokenizer:
    """Whitespace tokenizer with a ChatML chat template: enough for rendering and counting."""

    chat_template = CHATML
    name_or_path = "scripted"
    bos_token = None
    eos_token = "<|im_end|>"

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {"<|im_start|>": 0, "<|im_end|>": 1}

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [self.vocab.setdefault(word, len(self.vocab)) for word in text.split()]

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        """What a Hugging Face tokenizer returns when called (the judge and taggers count tokens so)."""
        return {"input_ids": self.encode(text, add_special_tokens=add_special_tokens)}

    def decode(self, ids: Sequence[int]) -> str:
        words = {i: w for w, i in self.vocab.items()}
        return " ".join(words[i] for i in ids)

    def apply_chat_template(self, messages, tokenize: bool = False, add_generation_prompt: bool = False, **_):
        text = chat_template.ChatTemplate.from_string(CHATML).render(messages, add_generation_prompt)
        return self.encode(text) if tokenize else text


class ScriptedEngine:
    """engines.base.Engine whose outputs come from a list or a function."""

    def __init__(self, outputs: Sequence[str] | Responder, *, model_id: str = "scripted",
                 next_token: Callable[[str, Sequence[str]], dict[str, float | None]] | None = None) -> None:
        if callable(outputs):
            self._respond: Responder = outputs
        else:
            canned = list(outputs)
            if not canned:
                raise ValueError("ScriptedEngine needs at least one canned output (or a function)")
            self._respond = lambda prompt, s, i: canned[_rng(s.seed, prompt, i).randrange(len(canned))]
        self._next_token = next_token
        self.model_id = model_id
        self._tokenizer = ScriptedTokenizer()
        self.calls: list[tuple[str, list[str]]] = []  # (method, prompts) per engine call
        self.closed = False

    @property
    def tokenizer(self) -> ScriptedTokenizer:
        return self._tokenizer

    def complete(self, prompts, sampling=Sampling(), *, desc=None) -> list[GenerationResult]:
        prompts = list(prompts)
        samplings = [sampling] * len(prompts) if isinstance(sampling, Sampling) else list(sampling)
        if len(samplings) != len(prompts):
            raise ValueError(f"got {len(samplings)} Sampling objects for {len(prompts)} prompts")
        self.calls.append(("complete", prompts))
        return [GenerationResult(prompt=p, prompt_tokens=len(self._tokenizer.encode(p)),
                                 completions=[self._one(p, s, i) for i in range(s.n)])
                for p, s in zip(prompts, samplings)]

    def chat(self, conversations, sampling=Sampling(), *, desc=None) -> list[GenerationResult]:
        prompts = [chat_template.render(self._tokenizer, conv, add_generation_prompt=True) for conv in conversations]
        return self.complete(prompts, sampling, desc=desc)

    def next_token_logprobs(self, prompts, candidates, *, desc=None) -> list[dict[str, float | None]]:
        self.calls.append(("next_token_logprobs", list(prompts)))
        if self._next_token is not None:
            return [self._next_token(p, candidates) for p in prompts]
        out = []
        for p in prompts:  # a deterministic softmax over hashed scores
            raw = {c: _rng(0, p, c).random() * 4 for c in candidates}
            norm = math.log(sum(math.exp(v) for v in raw.values())) if raw else 0.0
            out.append({c: v - norm for c, v in raw.items()})
        return out

    def shutdown(self) -> None:
        self.closed = True

    def _one(self, prompt: str, s: Sampling, index: int) -> Completion:
        text = self._respond(prompt, s, index)
        finish = "stop"
        if s.choice is not None and text not in s.choice:
            text = s.choice[_rng(s.seed, prompt, index).randrange(len(s.choice))]
        cut = min((text.find(stop) for stop in s.stop if stop and stop in text), default=-1)
        if cut >= 0:
            text = text[:cut]
        words = text.split()
        if len(words) > s.max_tokens:  # whitespace "tokens": keep the first max_tokens words
            text = " ".join(words[: s.max_tokens])
            finish = "length"
        return Completion(text=text, token_ids=self._tokenizer.encode(text), finish_reason=finish)


def _rng(seed, *parts) -> random.Random:
    key = "\x1f".join(str(p) for p in (seed, *parts))
    return random.Random(int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big"))
