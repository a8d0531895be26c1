"""Reward scoring of (prompt messages, response) pairs.

Two scorers share one interface, `score(prompts, responses) -> list[RewardResult]`:

- `RewardModel`: a sequence-classification reward model (Skywork-Reward, ArmoRM, any
  `*ForSequenceClassification` with one output). Each pair is rendered as
  [*prompt, {"role": "assistant", "content": response}] with the REWARD model's own chat template
  (no generation prompt), tokenized once here, and scored by vLLM's pooling runner or by
  transformers. Both return the raw logit (vLLM with `use_activation=False`; without it vLLM
  applies a sigmoid).
- `JudgeReward`: the fallback when no reward model is given. The chat model itself is asked to
  rate the response 1..5; the score is the expected rating under the next-token distribution
  over the rating digits (`engine.next_token_logprobs`).

A pair that can't be scored is never silently truncated or guessed: it comes back as
`RewardResult(None, reason)` with reason "empty_response", "too_long", "no_rating_token" or
"non_finite_score" (the model returned NaN / inf); a score is always a finite float.
Problems with the model itself (missing chat template, unknown backend) raise `RewardModelError`
at load, with a `reason` a flow turns into counted drops.

Multi-head reward models: when the classifier has several outputs, the score is output
`score_head` (default 0). Models whose forward returns a `.score` field (ArmoRM's custom code,
`trust_remote_code=True`) use that field: it is ArmoRM's documented preference score.
"""

from __future__ import annotations

import gc
import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, Sequence
from schemas import SchemaError

# Reasons a single pair gets a null score.
EMPTY_RESPONSE = "empty_response"
TOO_LONG = "too_long"
NO_RATING_TOKEN = "no_rating_token"
NON_FINITE_SCORE = "non_finite_score"  # same spelling as schemas.preference

# Used only with template="plain" (reward models trained without a chat template).
PLAIN_TEMPLATE_DOC = 'turns joined by "\\n": "System: ...", "User: ...", "Assistant: <response>"'

Backend = Literal["auto", "vllm", "transformers"]


@dataclass(frozen=True)
class RewardResult:
    score: float | None
    reason: str | None = None


class RewardModelError(SchemaError):
    """The reward model can't be used at all. `reason` is the drop reason a flow records per row."""

    def __init__(self, message: str, *, reason: str = "reward_model_error"):
        super().__init__(message)
        self.reason = reason


class RewardScorer(Protocol):
    model_id: str

    def score(self, prompts: Sequence[list[dict[str, str]]], responses: Sequence[str | None]) -> list[RewardResult]: ...

    def shutdown(self) -> None: ...


def _check_lengths(prompts: Sequence[Any], responses: Sequence[Any]) -> None:
    if len(prompts) != len(responses):
        raise ValueError(f"score(): got {len(prompts)} prompts but {len(responses)} responses; "
                         "pass one response per prompt (repeat the prompt for several responses)")


def _is_empty(response: str | None) -> bool:
    return response is None or not str(response).strip()


def render_plain(prompt: list[dict[str, str]], response: str) -> str:
    """The documented plain format for reward models without a chat template."""
    names = {"system": "System", "user": "User", "assistant": "Assistant"}
    turns = [f"{names.get(m['role'], m['role'].capitalize())}: {m['content']}" for m in prompt]
    return "\n".join([*turns, f"Assistant: {response}"])


def _resolve_folder(model: str | os.PathLike) -> str:
    """A local folder as is; a hub id through the local HF cache only (this tool runs offline)."""
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise RewardModelError(f"reward model folder {path} has no config.json. Fix: point "
                                   "reward.model at a saved *ForSequenceClassification folder or a hub id")
        return str(path)
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(str(model))
    except Exception as error:  # offline, unknown id, gated repo...
        raise RewardModelError(
            f"reward model {model!r} is neither a local folder nor downloadable ({type(error).__name__}: {error}). "
            "Fix: download it once with `huggingface-cli download <id>` or pass a local folder") from error


class RewardModel:
    """Sequence-classification reward model; see the module docstring for the scoring rules.

    backend: "vllm" (pooling runner), "transformers", or "auto" = vLLM when installed and the
    model needs no remote code (ArmoRM does -> transformers).
    template: "chat" (the reward model's own chat template; an error at load if it has none) or
    "plain" (`render_plain`).
    max_length: context limit in tokens; longer pairs are reported "too_long", never truncated.
    Default: the model's `max_position_embeddings`.
    batch_size: rows per forward pass (transformers). vLLM gets the whole list and schedules it.
    """

    def __init__(self, model: str | os.PathLike, *, backend: Backend = "auto", template: Literal["chat", "plain"] = "chat",
                 max_length: int | None = None, batch_size: int = 16, score_head: int = 0,
                 dtype: str | None = None, trust_remote_code: bool = False):
        if backend not in ("auto", "vllm", "transformers"):
            raise RewardModelError(f"unknown reward backend {backend!r}. Fix: use 'auto', 'vllm' or 'transformers'")
        if template not in ("chat", "plain"):
            raise RewardModelError(f"unknown reward template {template!r}. Fix: use 'chat' or 'plain'")
        try:
            from transformers import AutoConfig, AutoTokenizer
        except ImportError as error:  # pragma: no cover - environment
            raise RewardModelError("transformers is not installed. Fix: pip install 'alignforge[cpu]'") from error

        self.model_id = str(model)
        self._lock = threading.Lock()  # shards in flight share this model; one forward pass at a time
        self.folder = _resolve_folder(model)
        self.template = template
        self.batch_size = max(1, int(batch_size))
        self.score_head = score_head
        self.trust_remote_code = trust_remote_code
        self.tokenizer = AutoTokenizer.from_pretrained(self.folder, trust_remote_code=trust_remote_code)
        if template == "chat" and not getattr(self.tokenizer, "chat_template", None):
            raise RewardModelError(
                f"reward model {self.model_id} has no chat template, so (prompt, response) pairs can't be rendered "
                "the way it was trained. Fix: use a reward model that ships one, or pass template='plain' "
                f"(--set reward.template=plain) to score {PLAIN_TEMPLATE_DOC}", reason="reward_no_chat_template")
        config = AutoConfig.from_pretrained(self.folder, trust_remote_code=trust_remote_code)
        self.config = config
        context = getattr(config.get_text_config(), "max_position_embeddings", None) or getattr(
            config, "max_position_embeddings", None)
        self.max_length = int(max_length or context or 4096)
        remote_code = bool(getattr(config, "auto_map", None))
        if backend == "auto":
            import importlib.util

            backend = "vllm" if importlib.util.find_spec("vllm") and not remote_code else "transformers"
        self.backend = backend
        self.dtype = dtype
        self.stats: dict[str, Any] = {"rows": 0, "scored": 0, "seconds": 0.0, "tokens": 0}
        self._llm: Any = None
        self._hf: Any = None
        if backend == "vllm":
            self._load_vllm()
        else:
            self._load_transformers()

    # -- loading -------------------------------------------------------------------------------
    def _load_vllm(self) -> None:
        # Must be set before vllm is imported; a small KV cache is plenty for scoring.
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
        try:
            import torch
            from vllm import LLM
            from vllm.config import PoolerConfig
        except ImportError as error:
            raise RewardModelError("vLLM is not installed. Fix: pip install 'alignforge[cpu]' (or [gpu]), "
                                   "or use backend='transformers'") from error
        # bf16 gives garbage on CPU; fp32 there, the model's own dtype on GPU.
        dtype = self.dtype or ("auto" if torch.cuda.is_available() else "float32")
        self._llm = LLM(model=self.folder, runner="pooling", pooler_config=PoolerConfig(use_activation=False),
                        dtype=dtype, enforce_eager=True, max_model_len=self.max_length,
                        trust_remote_code=self.trust_remote_code, seed=0)

    def _load_transformers(self) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification

        dtype = getattr(torch, self.dtype) if self.dtype and self.dtype != "auto" else torch.float32
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self._hf = AutoModelForSequenceClassification.from_pretrained(
            self.folder, dtype=dtype, trust_remote_code=self.trust_remote_code).to(device).eval()
        self._device = device
        text_config = self._hf.config.get_text_config()
        if getattr(text_config, "pad_token_id", None) is None:
            # Batched forward refuses to run without one; we pool at the last position ourselves
            # (left padding + inputs_embeds), so its value never matters.
            text_config.pad_token_id = self.tokenizer.pad_token_id or self.tokenizer.eos_token_id or 0
        # Custom-code models (ArmoRM) may not accept inputs_embeds: score them one at a time (exact).
        self._batched_hf = not bool(getattr(self.config, "auto_map", None))
        # Its "won't detect padding in inputs_embeds" warning is about the very pooling we rely on
        # (last column under left padding); it would only confuse users.
        import logging

        logging.getLogger("transformers.modeling_layers").setLevel(logging.ERROR)

    # -- rendering -----------------------------------------------------------------------------
    def render(self, prompt: list[dict[str, str]], response: str) -> str:
        if self.template == "plain":
            return render_plain(prompt, response)
        conversation = [{"role": m["role"], "content": m["content"]} for m in prompt]
        conversation.append({"role": "assistant", "content": response})
        return self.tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=False)

    def encode(self, prompt: list[dict[str, str]], response: str) -> list[int]:
        # A chat template writes its own BOS; adding special tokens again would double it.
        return self.tokenizer(self.render(prompt, response), add_special_tokens=self.template == "plain")["input_ids"]

    # -- scoring -------------------------------------------------------------------------------
    def score(self, prompts: Sequence[list[dict[str, str]]], responses: Sequence[str | None]) -> list[RewardResult]:
        with self._lock:
            return self._score(prompts, responses)

    def _score(self, prompts: Sequence[list[dict[str, str]]], responses: Sequence[str | None]) -> list[RewardResult]:
        _check_lengths(prompts, responses)
        started = time.perf_counter()
        results: list[RewardResult | None] = [None] * len(prompts)
        todo: list[tuple[int, list[int]]] = []
        for i, (prompt, response) in enumerate(zip(prompts, responses)):
            if _is_empty(response):
                results[i] = RewardResult(None, EMPTY_RESPONSE)
                continue
            ids = self.encode(list(prompt), str(response))
            if len(ids) > self.max_length:
                results[i] = RewardResult(None, TOO_LONG)
                continue
            todo.append((i, ids))
        if todo:
            scores = self._score_vllm([ids for _, ids in todo]) if self.backend == "vllm" else \
                self._score_transformers([ids for _, ids in todo])
            for (i, _), value in zip(todo, scores):
                value = float(value)
                # A NaN / inf logit (broken weights, fp16 overflow) is not a score.
                results[i] = RewardResult(value) if math.isfinite(value) else RewardResult(None, NON_FINITE_SCORE)
        self.stats["rows"] += len(prompts)
        self.stats["scored"] += sum(1 for i, _ in todo if results[i].score is not None)  # type: ignore[union-attr]
        self.stats["tokens"] += sum(len(ids) for _, ids in todo)
        self.stats["seconds"] += time.perf_counter() - started
        return results  # type: ignore[return-value]

    def _score_vllm(self, token_ids: list[list[int]]) -> list[float]:
        from vllm.inputs import TokensPrompt

        outputs = self._llm.classify([TokensPrompt(prompt_token_ids=ids) for ids in token_ids], use_tqdm=False)
        return [float(out.outputs.probs[self.score_head]) for out in outputs]

    def _score_transformers(self, token_ids: list[list[int]]) -> list[float]:
        import torch

        scores = [0.0] * len(token_ids)
        # Length-sorted batches waste little on padding; results go back to input order.
        order = sorted(range(len(token_ids)), key=lambda i: len(token_ids[i]))
        batch_size = self.batch_size if self._batched_hf else 1
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                chunk = order[start:start + batch_size]
                width = max(len(token_ids[i]) for i in chunk)
                ids = torch.zeros((len(chunk), width), dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for row, i in enumerate(chunk):  # left padding: every row ends at the last column
                    ids[row, width - len(token_ids[i]):] = torch.tensor(token_ids[i])
                    mask[row, width - len(token_ids[i]):] = 1
                ids, mask = ids.to(self._device), mask.to(self._device)
                if self._batched_hf:
                    # Positions count real tokens only, so a row's result doesn't depend on its
                    # batch-mates; inputs_embeds makes the model pool at the last column (the real
                    # sequence end) instead of guessing it from pad ids (pad == eos in many models).
                    positions = (mask.cumsum(-1) - 1).clamp(min=0)
                    embeds = self._hf.get_input_embeddings()(ids)
                    output = self._hf(inputs_embeds=embeds, attention_mask=mask, position_ids=positions)
                else:
                    output = self._hf(input_ids=ids, attention_mask=mask)
                values = self._pick_scores(output)
                for row, i in enumerate(chunk):
                    scores[i] = float(values[row])
        return scores

    def _pick_scores(self, output: Any) -> list[float]:
        special = getattr(output, "score", None)  # ArmoRM: the documented preference score
        if special is not None:
            return special.float().reshape(-1).tolist()
        logits = output.logits if hasattr(output, "logits") else output[0]
        logits = logits.float()
        if logits.dim() == 1:
            return logits.tolist()
        return logits[:, self.score_head].tolist()

    def shutdown(self) -> None:
        if self._llm is not None:
            core = getattr(getattr(self._llm, "llm_engine", None), "engine_core", None)
            if core is not None and hasattr(core, "shutdown"):
                core.shutdown()
            self._llm = None
        self._hf = None
        gc.collect()

    def __repr__(self) -> str:
        return f"RewardModel({self.model_id!r}, backend={self.backend!r}, template={self.template!r}, max_length={self.max_length})"


# --------------------------------------------------------------------------------------------
# Generative judge fallback
# --------------------------------------------------------------------------------------------

JUDGE_SYSTEM = ("You grade how well an AI assistant answered a user. Judge helpfulness, correctness and "
                "clarity. Reply with a single digit from 1 (useless or wrong) to {top} (excellent), nothing else.")
JUDGE_USER = ("Here is the user's request:\n<request>\n{instruction}\n</request>\n\n"
              "Here is the assistant's answer:\n<answer>\n{response}\n</answer>\n\n"
              "Grade the answer from 1 to {top}. Reply with the digit only.")


class JudgeReward:
    """Score = expected rating (1..scale) under the chat model's next-token distribution.

    The judge prompt is rendered with the engine's chat template plus the generation prompt and
    a short "Rating: " prefill so the very next token is the digit. Probabilities are renormalised
    over the rating digits found in the engine's top-k; digits outside the top-k count as 0 and
    are tallied in `stats["missing_rating_tokens"]`. If none is present the result is null with
    reason "no_rating_token". Prompts over `max_prompt_tokens` are reported "too_long".
    """

    def __init__(self, engine: Any, *, scale: int = 5, max_prompt_tokens: int | None = None, prefill: str = "Rating: "):
        if not 2 <= scale <= 9:
            raise RewardModelError(f"judge scale {scale} must be 2..9 (single-digit ratings). Fix: use 5 (default) or 9")
        if not hasattr(engine, "next_token_logprobs"):
            raise RewardModelError(f"engine {type(engine).__name__} has no next_token_logprobs; the judge needs it. "
                                   "Fix: use engines.get_engine() (vLLM) or pass a reward model")
        self.engine = engine
        self.scale = scale
        self.prefill = prefill
        self.model_id = f"judge:{getattr(engine, 'model_id', type(engine).__name__)}"
        options = getattr(engine, "engine_options", None) or {}
        self.max_prompt_tokens = int(max_prompt_tokens or getattr(engine, "max_model_len", None)
                                     or options.get("max_model_len") or 2048)
        self.ratings = [str(i) for i in range(1, scale + 1)]
        self.stats: dict[str, Any] = {"rows": 0, "scored": 0, "seconds": 0.0, "missing_rating_tokens": 0}

    def render(self, prompt: list[dict[str, str]], response: str) -> str:
        instruction = "\n\n".join(f"[{m['role']}] {m['content']}" if m["role"] != "user" else m["content"]
                                  for m in prompt)
        messages = [{"role": "system", "content": JUDGE_SYSTEM.format(top=self.scale)},
                    {"role": "user", "content": JUDGE_USER.format(instruction=instruction, response=response, top=self.scale)}]
        from engines import chat_template

        return chat_template.render(self.engine.tokenizer, messages, add_generation_prompt=True) + self.prefill

    def score(self, prompts: Sequence[list[dict[str, str]]], responses: Sequence[str | None]) -> list[RewardResult]:
        _check_lengths(prompts, responses)
        started = time.perf_counter()
        results: list[RewardResult | None] = [None] * len(prompts)
        todo: list[tuple[int, str]] = []
        for i, (prompt, response) in enumerate(zip(prompts, responses)):
            if _is_empty(response):
                results[i] = RewardResult(None, EMPTY_RESPONSE)
                continue
            text = self.render(list(prompt), str(response))
            # +1: the rating token itself must fit too.
            if len(self.engine.tokenizer(text, add_special_tokens=False)["input_ids"]) + 1 > self.max_prompt_tokens:
                results[i] = RewardResult(None, TOO_LONG)
                continue
            todo.append((i, text))
        if todo:
            logprobs = self.engine.next_token_logprobs([text for _, text in todo], self.ratings)
            for (i, _), by_rating in zip(todo, logprobs):
                results[i] = self._expected_rating(by_rating)
        self.stats["rows"] += len(prompts)
        self.stats["scored"] += sum(1 for r in results if r is not None and r.score is not None)
        self.stats["seconds"] += time.perf_counter() - started
        return results  # type: ignore[return-value]

    def _expected_rating(self, by_rating: Any) -> RewardResult:
        result, missing = expected_rating(by_rating, self.ratings)
        self.stats["missing_rating_tokens"] += missing
        return result

    def shutdown(self) -> None:
        """The engine belongs to the caller (process-cached); nothing to free here."""


def _logprob(value: Any) -> float | None:
    """A usable log-probability: a real number that is finite or -inf (probability 0)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            import numpy as np

            if not isinstance(value, np.floating | np.integer):
                return None
        except ImportError:  # pragma: no cover - numpy is a dependency
            return None
    try:
        number = float(value)
    except (OverflowError, ValueError):  # an int beyond float range
        return None
    return number if math.isfinite(number) or number == -math.inf else None


def expected_rating(by_rating: Any, ratings: Sequence[str]) -> tuple[RewardResult, int]:
    """(expected rating, rating tokens missing) from one next-token logprob table {digit: logprob}.

    The digits' probabilities are renormalised over those present; a digit missing from the table
    or with an unusable value (None, NaN, +inf, a bool, text) counts as missing. -inf is a present
    digit of probability 0. Without any positive-probability digit the result is null with reason
    "no_rating_token". Never raises: the score is always a finite number in [1, len(ratings)]."""
    table = by_rating if isinstance(by_rating, dict) else {}
    present: dict[int, float] = {}
    for position, rating in enumerate(ratings, start=1):
        value = _logprob(table.get(rating))
        if value is not None:
            present[position] = value
    missing = len(ratings) - len(present)
    finite = {k: v for k, v in present.items() if v != -math.inf}
    if not finite:
        return RewardResult(None, NO_RATING_TOKEN), missing
    top = max(finite.values())
    weights = {k: math.exp(v - top) for k, v in finite.items()}
    total = sum(weights.values())
    mean = sum(k * w for k, w in weights.items()) / total
    return RewardResult(min(max(mean, 1.0), float(len(ratings)))), missing  # clamp float rounding only


def make_scorer(model: str | None = None, *, engine: Any = None, **options: Any) -> RewardScorer:
    """A RewardModel when `model` is given, else the generative judge on `engine`."""
    if model:
        return RewardModel(model, **options)
    if engine is None:
        raise RewardModelError("no reward model and no engine for the judge. Fix: pass reward.model=<folder or hub id> "
                               "or an engine (engines.get_engine())")
    judge_options = {k: v for k, v in options.items() if k in ("scale", "max_prompt_tokens", "prefill")}
    return JudgeReward(engine, **judge_options)


def build_random_reward_model(folder: str | os.PathLike, *, max_length: int = 256, seed: int = 0,
                              chat_template: bool = True, num_labels: int = 1) -> Path:
    """A tiny randomly initialised LlamaForSequenceClassification (tests, benchmarks; scores mean nothing).

    It reuses the embedded model's tokenizer (so vocab_size matches) and keeps head_dim 64, which
    vLLM's CPU attention supports (16 is rejected)."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from engines.embedded import resolve_model

    source = Path(resolve_model(None))
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (source / name).exists() and (chat_template or name != "chat_template.jinja"):
            shutil.copy(source / name, out / name)
    if not chat_template:  # the template may also live inside tokenizer_config.json
        import json

        config_path = out / "tokenizer_config.json"
        data = json.loads(config_path.read_text())
        data.pop("chat_template", None)
        config_path.write_text(json.dumps(data, indent=2))
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=49152, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=max_length,
                         num_labels=num_labels, pad_token_id=2, bos_token_id=1, eos_token_id=2,
                         tie_word_embeddings=False, initializer_range=0.2)
    LlamaForSequenceClassification(config).save_pretrained(out)
    return out
