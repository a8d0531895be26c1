"""N-gram frequency penalties (`Sampling.ngram_penalties`) as a vLLM logits processor.

vLLM only has token-level repetition / frequency / presence penalties. Self-Align's verbose
cloning (IBM/Dromedary, llama_dromedary/generation.py) penalises repeated n-grams: for each
(n, penalty), a candidate token t gets

    logit[t] -= penalty * count(last n-1 generated tokens + t among the n-grams generated so far)

(reference: trigram 1.0, 4-gram 2.0). As in the reference, only generated tokens count (never the
prompt) and only tokens that START a word are penalised (its `frequency_penalty_starts_only`,
default on): a repeated phrase is discouraged at its next word, while a word's own continuation
pieces are never pushed towards misspellings. Word starts are read from the tokenizer (a "Ġ" or
"▁" piece with more after it); if a tokenizer marks none, every token is eligible.

`NGramCounts` is the pure bookkeeping (no vLLM, unit-tested alone). The processor class needs
vLLM and torch; like engines/vllm_logits.py it is loaded by vLLM by name inside its engine process,
and is built on first access (module `__getattr__`) so importing this module never imports vLLM.
The per-request penalties travel in `SamplingParams.extra_args[NGRAM_PENALTY_KEY]` as
[[n, penalty], ...]. Engines other than vLLM ignore the field.
"""

from __future__ import annotations

from typing import Annotated, Any, Iterable, Sequence

from pydantic import AfterValidator

NGRAM_PENALTY_KEY = "alignforge_ngram_penalty"
PROCESSOR_NAME = "NGramPenaltyLogitsProcessor"
QUALIFIED_NAME = f"{__name__}:{PROCESSOR_NAME}"
_WORD_START_MARKS = ("Ġ", "▁")  # byte-level BPE / SentencePiece marks of a leading space


class NGramCounts:
    """The n-grams one request has generated, and the penalties they put on its next token."""

    def __init__(self, penalties: Iterable[Sequence[float]]):
        self.penalties = tuple((int(n), float(p)) for n, p in penalties if float(p) != 0.0)
        if any(n < 1 for n, _ in self.penalties):
            raise ValueError(f"n-gram penalties need n >= 1, got {self.penalties}")
        # n -> {(n-1 tokens before): {next token: count}}
        self.seen: dict[int, dict[tuple[int, ...], dict[int, int]]] = {n: {} for n, _ in self.penalties}
        self.tokens: list[int] = []

    def extend(self, new_tokens: Iterable[int]) -> None:
        for token in new_tokens:
            self.tokens.append(int(token))
            for n in self.seen:
                if len(self.tokens) >= n:
                    prefix = tuple(self.tokens[len(self.tokens) - n:-1])
                    follow = self.seen[n].setdefault(prefix, {})
                    follow[token] = follow.get(token, 0) + 1

    def bias(self, eligible: Any = None) -> dict[int, float]:
        """{token: negative bias} for the next position (`eligible`: token ids that may be penalised)."""
        out: dict[int, float] = {}
        for n, penalty in self.penalties:
            if len(self.tokens) < n - 1:
                continue
            prefix = tuple(self.tokens[len(self.tokens) - (n - 1):]) if n > 1 else ()
            for token, count in self.seen[n].get(prefix, {}).items():
                if eligible is None or token in eligible:
                    out[token] = out.get(token, 0.0) - penalty * count
        return out


def word_start_ids(tokenizer: Any) -> frozenset[int] | None:
    """Ids of tokens that begin a word (leading-space mark + at least one more character), or None
    (every token eligible) when the tokenizer marks no word starts."""
    vocab = tokenizer.get_vocab()
    ids = frozenset(tid for piece, tid in vocab.items()
                    if len(piece) > 1 and piece[0] in _WORD_START_MARKS and piece[1:].strip("".join(_WORD_START_MARKS)))
    return ids if len(ids) >= 0.01 * max(len(vocab), 1) else None


def parse_penalties(value: Any) -> list[tuple[int, float]]:
    """Validate the [[n, penalty], ...] a request carries (ValueError says what is wrong)."""
    if not isinstance(value, (list, tuple)) or not all(
            isinstance(pair, (list, tuple)) and len(pair) == 2 for pair in value):
        raise ValueError(f"{NGRAM_PENALTY_KEY} must be a list of [n, penalty] pairs, got {value!r}")
    pairs = [(int(n), float(p)) for n, p in value]
    if any(n < 1 or p < 0 for n, p in pairs):
        raise ValueError(f"{NGRAM_PENALTY_KEY}: need n >= 1 and penalty >= 0, got {value!r}")
    return pairs


def _checked(pairs: tuple[tuple[int, float], ...]) -> tuple[tuple[int, float], ...]:
    for n, penalty in pairs:
        if n < 1 or penalty < 0:
            raise ValueError(f"ngram_penalties entry ({n}, {penalty}): need n >= 1 and penalty >= 0")
    return pairs


# A step config field type: (n, penalty) pairs, validated where the config is built.
NGramPenalties = Annotated[tuple[tuple[int, float], ...], AfterValidator(_checked)]


def _build_processor_class() -> type:
    import torch
    from vllm import SamplingParams
    from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
    from vllm.v1.sample.logits_processor.builtin import process_dict_updates

    class NGramPenaltyLogitsProcessor(LogitsProcessor):
        """Subtracts each request's n-gram penalties from its logits at every generated position."""

        def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
            self.device = device
            self.model_config = getattr(vllm_config, "model_config", None)
            self._eligible: Any = False  # not computed yet
            # batch row -> (counts, reference to the request's live output token list)
            self.active: dict[int, tuple[NGramCounts, list[int]]] = {}

        @classmethod
        def validate_params(cls, sampling_params: SamplingParams):
            value = (sampling_params.extra_args or {}).get(NGRAM_PENALTY_KEY)
            if value is not None:
                parse_penalties(value)

        def is_argmax_invariant(self) -> bool:
            return False  # a penalty can change the greedy choice

        def eligible(self) -> Any:
            if self._eligible is False:
                self._eligible = None
                try:
                    from vllm.tokenizers.registry import cached_tokenizer_from_config

                    self._eligible = word_start_ids(cached_tokenizer_from_config(self.model_config))
                except Exception:  # pragma: no cover - no tokenizer: every token eligible
                    self._eligible = None
            return self._eligible

        @staticmethod
        def _new_state(params: SamplingParams, _prompt_ids, output_ids: list[int]):
            value = (params.extra_args or {}).get(NGRAM_PENALTY_KEY)
            if not value:
                return None
            counts = NGramCounts(parse_penalties(value))
            return (counts, output_ids) if counts.penalties else None

        def update_state(self, batch_update: BatchUpdate | None) -> None:
            process_dict_updates(self.active, batch_update, self._new_state)

        def apply(self, logits: torch.Tensor) -> torch.Tensor:
            if not self.active:
                return logits
            eligible = self.eligible()
            rows: list[int] = []
            ids: list[int] = []
            values: list[float] = []
            for row, (counts, output) in self.active.items():
                new = output[len(counts.tokens):]
                if -1 in new:  # async scheduling placeholders not filled in yet: count what is known
                    new = new[:new.index(-1)]
                counts.extend(new)
                for token, value in counts.bias(eligible).items():
                    rows.append(row)
                    ids.append(token)
                    values.append(value)
            if rows:
                index = (torch.tensor(rows, device=logits.device), torch.tensor(ids, device=logits.device))
                logits.index_put_(index, torch.tensor(values, dtype=logits.dtype, device=logits.device),
                                  accumulate=True)
            return logits

    NGramPenaltyLogitsProcessor.__module__ = __name__
    return NGramPenaltyLogitsProcessor


def __getattr__(name: str) -> Any:
    if name == PROCESSOR_NAME:  # vLLM resolves QUALIFIED_NAME here, inside its engine process
        cls = _build_processor_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
