"""vLLM logits processor for `Sampling.first_token_bias` (bias on the FIRST generated token only).

vLLM's own `logit_bias` applies at every position; Magpie's header suppression must only touch
the first token. vLLM v1 loads custom processors by name inside its engine process, so this
module imports vllm at top level and is only imported once the engine's environment is set.
The per-request bias travels in `SamplingParams.extra_args[FIRST_TOKEN_BIAS_KEY]` as
[[token_id, bias], ...] pairs (plain lists survive the trip to the engine process).
"""

from __future__ import annotations

import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

FIRST_TOKEN_BIAS_KEY = "alignforge_first_token_bias"
QUALIFIED_NAME = f"{__name__}:FirstTokenBiasLogitsProcessor"


class FirstTokenBiasLogitsProcessor(LogitsProcessor):
    """Adds {token_id: bias} to a request's logits while it has generated no token yet."""

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        self.device = device
        # batch row -> (token ids, biases, reference to the request's live output token list)
        self.pending: dict[int, tuple[list[int], list[float], list[int]]] = {}

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams):
        bias = (sampling_params.extra_args or {}).get(FIRST_TOKEN_BIAS_KEY)
        if bias is not None and not all(isinstance(pair, (list, tuple)) and len(pair) == 2 for pair in bias):
            raise ValueError(f"{FIRST_TOKEN_BIAS_KEY} must be a list of [token_id, bias] pairs, got {bias!r}")

    def is_argmax_invariant(self) -> bool:
        return False  # a bias can change the greedy choice

    @staticmethod
    def _new_state(params: SamplingParams, _prompt_ids, output_ids: list[int]):
        bias = (params.extra_args or {}).get(FIRST_TOKEN_BIAS_KEY)
        if not bias or output_ids:
            return None
        return [int(t) for t, _ in bias], [float(b) for _, b in bias], output_ids

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        process_dict_updates(self.pending, batch_update, self._new_state)
        # Once a request has its first token, it is done with this processor.
        for row in [row for row, (_, _, out) in self.pending.items() if out]:
            del self.pending[row]

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.pending:
            return logits
        rows: list[int] = []
        ids: list[int] = []
        biases: list[float] = []
        for row, (tok_ids, tok_biases, _) in self.pending.items():
            rows += [row] * len(tok_ids)
            ids += tok_ids
            biases += tok_biases
        index = (torch.tensor(rows, device=logits.device), torch.tensor(ids, device=logits.device))
        logits.index_put_(index, torch.tensor(biases, dtype=logits.dtype, device=logits.device), accumulate=True)
        return logits
