"""Deita (arXiv 2312.15685): complexity and quality scorers, and the score-first diversity filter.

Scoring: an LLM scorer reads a fixed prompt and the expected score is
    sum_{k=1..6} k * softmax(logit("1"), ..., logit("6"))_k
at the FIRST generated position. The softmax over the six log-probabilities equals the softmax
over the six raw logits (logprob = logit - logsumexp over the vocabulary, a shared shift), so we
read log-probabilities from the engine.

How the official scorers are fed (checked in hkust-nlp/deita, src/deita/selection/scorer/base.py
and llama_scorer.py): the template string is formatted and passed RAW to `tokenizer.encode`
(default special tokens, so Llama's BOS is prepended) and `generate(..., output_scores=True)`;
there is no chat template at inference. (train_scorers.py wraps samples in the vicuna-1.1
conversation template, but the released inference code does not; we match inference.) vLLM
tokenises raw text prompts with the same default special tokens, so the token ids are identical;
tests/filters/test_deita.py checks this against a transformers forward pass. To wrap the prompt
in some other format, put it in `template`.

The official code returns 3.0 whenever a score token is missing from the returned logprobs (users
then see all-3.0 outputs). Here a missing token gives a null score, a per-row count in
`deita_missing_tokens` and `rows_missing_tokens` in the step stats. When the engine offers
`token_logprobs(prompts, token_ids)` (vLLM `SamplingParams(logprob_token_ids=...)`: exactly the
requested ids, whatever their rank) or the protocol's `next_token_logprobs` (VLLMEngine implements
it with `logprob_token_ids`) absence is impossible; otherwise we ask for the top-k.

Diversity (`deita_select`): sort by evol score desc (ties: id asc), greedily keep a row unless its
cosine similarity to an already kept row exceeds the threshold, stop at the budget. Memory is
O(block * budget), never N x N.
"""

from __future__ import annotations

import functools
import math
import time
from typing import Any, Callable, ClassVar, Sequence

import numpy as np
import polars as pl
from pydantic import Field

from engines.base import Sampling
from alignforge.step import GlobalStep
from alignforge.step import Step, StepConfig
from schemas import SchemaError

# Released scorer input formats (hkust-nlp/deita-complexity-scorer, -quality-scorer), verbatim.
COMPLEXITY_TEMPLATE = ("You are a helpful assistant. Please identify the complexity score of the following "
                       "user query. \n##Query: {instruction}  \n##Complexity: ")
QUALITY_TEMPLATE = ("You are a helpful assistant. Please identify the quality score of the Response "
                    "corresponding to the Question. \n #Question#:\n{instruction}\n#Response#:\n{output} \n##Quality: ")
SCORE_TOKENS = ("1", "2", "3", "4", "5", "6")
SCORE_VALUES = np.arange(1, 7, dtype=np.float64)

DROP_REDUNDANT = "deita_redundant"
DROP_OVER_BUDGET = "deita_over_budget"
DROP_UNSCORED = "deita_unscored"


class DeitaError(SchemaError):
    """A Deita input or model that can't be scored; the message says what, where and how to fix it."""


# ---------------------------------------------------------------------------------------------
# Score tokens and the expected score
# ---------------------------------------------------------------------------------------------

def score_token_ids(tokenizer: Any, tokens: Sequence[str] = SCORE_TOKENS) -> list[int]:
    """Token id of each score string in the scorer's own vocabulary; error unless each is ONE token.

    The vocabulary piece is looked up first: Llama's sentencepiece encodes "1" as ["▁", "1"] but the
    scorer emits the bare piece "1" (id 29896 in the official id2score) after the prompt's
    trailing space. Otherwise the plain encoding must be a single token."""
    ids: list[int] = []
    unk = getattr(tokenizer, "unk_token_id", None)
    for text in tokens:
        piece = tokenizer.convert_tokens_to_ids(text) if hasattr(tokenizer, "convert_tokens_to_ids") else None
        if isinstance(piece, int) and piece != unk and piece >= 0 and tokenizer.decode([piece]).strip() == text:
            ids.append(piece)
            continue
        encoded = tokenizer.encode(text, add_special_tokens=False)
        if len(encoded) != 1:
            raise DeitaError(
                f"score token {text!r} is not a single token in the scorer's tokenizer "
                f"({type(tokenizer).__name__} encodes it as {encoded}); Deita reads one logit per score 1..6. "
                "Fix: use a scorer whose vocabulary has the digits 1-6 as single tokens "
                "(e.g. hkust-nlp/deita-complexity-scorer) or pass score tokens that are")
        ids.append(encoded[0])
    if len(set(ids)) != len(ids):
        raise DeitaError(f"score tokens {list(tokens)} map to repeated token ids {ids}. Fix: use distinct score tokens")
    return ids


def expected_score(logprobs: Sequence[float | None]) -> float | None:
    """sum_k k * softmax(logprobs)_k over the six score tokens; None if any token is missing."""
    if any(lp is None for lp in logprobs):
        return None
    values = np.asarray(logprobs, dtype=np.float64)
    # A log-probability is <= 0: NaN / +inf are not probabilities (a broken engine), -inf is p = 0.
    if np.isnan(values).any() or np.isposinf(values).any() or not np.isfinite(values).any():
        return None
    weights = np.exp(values - values.max())
    return float((weights / weights.sum()) @ SCORE_VALUES[: len(values)])


def read_first_token_logprobs(engine: Any, prompts: Sequence[str], token_ids: Sequence[int], *,
                              top_logprobs: int = 20, desc: str | None = None) -> tuple[list[list[float | None]], str]:
    """Log-probabilities of `token_ids` at the first generated position of each prompt, in ONE call.

    Returns (rows, source). The source is the first of:
    - "token_logprobs": the engine returns the requested ids themselves (vLLM `logprob_token_ids`);
    - "next_token_logprobs": the Engine protocol's candidate-string method, used only when every
      id round-trips as a one-token string (decode -> encode gives the same single id), so the
      engine's string -> id mapping can't pick another token (Llama's "1" encodes as "▁","1");
    - "top_k": `complete(max_tokens=1, logprobs=top_logprobs)`; an id outside the top-k is None.
    A None is a missing score token: callers flag it, never guess."""
    if not prompts:
        return [], "none"
    by_id = getattr(engine, "token_logprobs", None)
    if callable(by_id):
        got = by_id(list(prompts), list(token_ids))
        return [[_as_float(row.get(t)) for t in token_ids] for row in got], "token_logprobs"
    by_text = getattr(engine, "next_token_logprobs", None)
    texts = _round_trip_texts(engine.tokenizer, token_ids)
    if callable(by_text) and texts is not None:
        got = by_text(list(prompts), texts)
        return [[_as_float(row.get(t)) for t in texts] for row in got], "next_token_logprobs"
    results = engine.complete(list(prompts), Sampling(temperature=0.0, max_tokens=1, logprobs=top_logprobs),
                              desc=desc)
    rows: list[list[float | None]] = []
    for result in results:
        completion = result.completions[0]
        first = completion.logprobs[0] if completion.logprobs else {}
        rows.append([_as_float(first.get(t)) for t in token_ids])
    return rows, "top_k"


def _round_trip_texts(tokenizer: Any, token_ids: Sequence[int]) -> list[str] | None:
    texts = [tokenizer.decode([t]) for t in token_ids]
    if all(tokenizer.encode(x, add_special_tokens=False) == [t] for x, t in zip(texts, token_ids)):
        return texts
    return None


def _as_float(value: Any) -> float | None:
    if value is None:
        return None
    try:
        value = float(getattr(value, "logprob", value))  # vLLM Logprob objects or plain floats
    except (TypeError, ValueError):
        return None  # not a number: the token counts as missing
    return None if math.isnan(value) or value == math.inf else value


# ---------------------------------------------------------------------------------------------
# Turns: (instruction, response) pairs of a row
# ---------------------------------------------------------------------------------------------

RESPONSE_COLUMNS = ("response", "output")


def _turns_of_messages(messages: Sequence[dict] | None, row: int) -> list[tuple[str, str]]:
    """Each user turn with the assistant turn right after it ("" if none, as the official code)."""
    turns: list[tuple[str, str]] = []
    for i, message in enumerate(messages):
        if message.get("role") != "user":
            continue
        nxt = messages[i + 1] if i + 1 < len(messages) else None
        response = (nxt.get("content") or "") if nxt is not None and nxt.get("role") == "assistant" else ""
        turns.append((message.get("content") or "", response))
    if not turns:
        raise DeitaError(f"row {row}: `messages` has no user turn; Deita scores user turns. "
                         "Fix: give each conversation at least one {'role': 'user', ...} message")
    return turns


def conversation_turns(df: pl.DataFrame, *, need_response: bool) -> list[list[tuple[str, str]]]:
    """Per row, its (instruction, response) turns from `messages`, or `instruction` + `response`/`output`."""
    if "messages" in df.columns:
        out = []
        for row, messages in enumerate(df["messages"].to_list()):
            if messages is None or len(messages) == 0:
                raise DeitaError(f"row {row} (id {_row_label(df, row)}): `messages` is empty or null. "
                                 "Fix: remove the row or fill its conversation before Deita scoring")
            out.append(_turns_of_messages(messages, row))
        return out
    if "instruction" in df.columns:
        response_col = next((c for c in RESPONSE_COLUMNS if c in df.columns), None)
        if need_response and response_col is None:
            raise DeitaError(f"Deita quality needs a response: found columns {df.columns}. "
                             "Fix: add a `response` (or `output`) column, or use `messages`")
        instructions = df["instruction"].to_list()
        responses = df[response_col].to_list() if response_col else [""] * df.height
        for row, text in enumerate(instructions):
            if text is None:
                raise DeitaError(f"row {row} (id {_row_label(df, row)}): `instruction` is null. "
                                 "Fix: remove the row or fill the instruction before Deita scoring")
        return [[(ins, resp or "")] for ins, resp in zip(instructions, responses)]
    raise DeitaError(f"Deita needs `messages` or `instruction` (+ `response`) columns; found {df.columns}. "
                     "Fix: map your data with schemas.mapping.load_rows first")


def _row_label(df: pl.DataFrame, row: int) -> Any:
    return df["id"][row] if "id" in df.columns else row


def conversation_text(turns: Sequence[tuple[str, str]]) -> str:
    """Plain text of a conversation, for embeddings."""
    return "\n\n".join(f"{ins}\n\n{resp}".strip() for ins, resp in turns)


# ---------------------------------------------------------------------------------------------
# The scoring steps
# ---------------------------------------------------------------------------------------------

class DeitaScoreConfig(StepConfig):
    # None = the embedded model. The released scorers can't be downloaded here; with them pass
    # scorer="hkust-nlp/deita-complexity-scorer" (or -quality-scorer) or a local folder.
    scorer: str | None = None
    template: str = ""  # set per subclass; must contain {instruction} (and {output} for quality)
    top_logprobs: int = Field(20, ge=6, description="top-k when the engine can't return chosen ids")
    # Prompts longer than this are cut inside the user text (response first), never in the
    # template tail the score is read after. Default fits max_model_len=2048 with 1 new token.
    max_prompt_tokens: int = Field(2000, ge=64)
    aggregate: str = Field("mean", pattern="^(mean|first)$")  # per-row value of a multi-turn row


class _DeitaScorer(Step):
    """Shared machinery: one engine call per shard over every turn of every row."""

    kind: ClassVar[str] = ""
    Config: ClassVar[type[StepConfig]] = DeitaScoreConfig

    def __init__(self, config: StepConfig | None = None, *, engine: Any = None, **overrides: Any):
        super().__init__(config, **overrides)
        self._engine = engine
        if "{instruction}" not in self.config.template:
            raise DeitaError(f"{self.name}: template must contain {{instruction}}; got {self.config.template!r}")

    @property
    def engine(self) -> Any:
        if self._engine is None:  # lazily: building a step must not start a model
            from engines import get_engine
            self._engine = get_engine(self.config.scorer)
        return self._engine

    @engine.setter
    def engine(self, engine: Any) -> None:  # flows.runner.run_step(engine=...) hands one in
        self._engine = engine

    def fingerprint(self, *input_fingerprints: str, engine_id: str | None = None) -> str:
        if engine_id is None and self._engine is not None:
            engine_id = getattr(self._engine, "model_id", None)
        return super().fingerprint(*input_fingerprints, engine_id=engine_id)

    def _format(self, instruction: str, response: str) -> str:
        raise NotImplementedError

    def _fit(self, tokenizer: Any, instruction: str, response: str) -> tuple[str, str, bool]:
        """Cut the response, then the instruction, so the formatted prompt fits max_prompt_tokens."""
        limit = self.config.max_prompt_tokens
        prompt = self._format(instruction, response)
        if len(prompt) + 2 < limit:  # a token is >= 1 character (+ BOS/EOS specials): surely fits
            return instruction, response, False
        n = len(tokenizer.encode(prompt))
        if n <= limit:
            return instruction, response, False
        margin = 8  # BPE merges across the cut can shift counts by a few tokens
        for _ in range(4):
            excess = n - limit + margin
            if response:
                r_ids = tokenizer.encode(response, add_special_tokens=False)
                cut = max(0, len(r_ids) - excess)
                response = tokenizer.decode(r_ids[:cut]) if cut else ""
                excess -= len(r_ids) - cut
            if excess > 0:
                i_ids = tokenizer.encode(instruction, add_special_tokens=False)
                instruction = tokenizer.decode(i_ids[: max(0, len(i_ids) - excess)])
            n = len(tokenizer.encode(self._format(instruction, response)))
            if n <= limit:
                return instruction, response, True
        raise DeitaError(f"{self.name}: the template alone is {n} tokens, over max_prompt_tokens={limit}. "
                         "Fix: raise max_prompt_tokens (and the engine's max_model_len) or shorten the template")

    def __call__(self, df: pl.DataFrame) -> pl.DataFrame:
        started = time.perf_counter()
        turns = conversation_turns(df, need_response=self.kind == "quality")
        engine = self.engine
        tokenizer = engine.tokenizer
        token_ids = score_token_ids(tokenizer)
        prompts: list[str] = []
        owner: list[int] = []
        truncated = 0
        for row, row_turns in enumerate(turns):
            for instruction, response in row_turns:
                instruction, response, cut = self._fit(tokenizer, instruction, response)
                truncated += cut
                prompts.append(self._format(instruction, response))
                owner.append(row)
        logprobs, source = read_first_token_logprobs(engine, prompts, token_ids,
                                                    top_logprobs=self.config.top_logprobs,
                                                    desc=f"deita {self.kind}")
        per_turn: list[list[float | None]] = [[] for _ in range(df.height)]
        missing = [0] * df.height
        for row, lps in zip(owner, logprobs):
            per_turn[row].append(expected_score(lps))
            missing[row] += sum(lp is None for lp in lps)
        column = f"deita_{self.kind}"
        out = df.with_columns(
            pl.Series(f"{column}_turns", per_turn, dtype=pl.List(pl.Float64)),
            pl.Series(column, [_aggregate(s, self.config.aggregate) for s in per_turn], dtype=pl.Float64),
        )
        previous = out["deita_missing_tokens"] if "deita_missing_tokens" in out.columns else None
        missing_series = pl.Series("deita_missing_tokens", missing, dtype=pl.Int64)
        out = out.with_columns(missing_series + previous.fill_null(0).cast(pl.Int64) if previous is not None
                               else missing_series)
        out = with_evol_score(out)
        if "keep" not in out.columns:
            out = out.with_columns(pl.lit(True).alias("keep"), pl.lit(None, dtype=pl.Utf8).alias("drop_reason"))
        self.stats = {
            "rows": df.height,
            "prompts": len(prompts),
            "rows_missing_tokens": int(sum(m > 0 for m in missing)),
            "missing_tokens": int(sum(missing)),
            "truncated_prompts": int(truncated),
            "logprob_source": source,
            "seconds": round(time.perf_counter() - started, 3),
        }
        return out


def _aggregate(scores: list[float | None], how: str) -> float | None:
    if not scores or any(s is None for s in scores):
        return None  # a missing turn makes the row's value unknown, not smaller
    return scores[0] if how == "first" else float(sum(scores) / len(scores))


def evol_score(complexity: Sequence[float | None] | None, quality: Sequence[float | None] | None) -> float | None:
    """Deita's evol score: sum over turns of complexity * quality (None if any factor is missing)."""
    if complexity is None or quality is None or len(complexity) != len(quality) or not complexity:
        return None
    if any(c is None for c in complexity) or any(q is None for q in quality):
        return None
    return float(sum(c * q for c, q in zip(complexity, quality)))


def with_evol_score(df: pl.DataFrame) -> pl.DataFrame:
    """Add `deita_evol_score` once both per-turn score lists are present."""
    if "deita_complexity_turns" not in df.columns or "deita_quality_turns" not in df.columns:
        return df
    values = [evol_score(c, q) for c, q in zip(df["deita_complexity_turns"].to_list(),
                                                 df["deita_quality_turns"].to_list())]
    return df.with_columns(pl.Series("deita_evol_score", values, dtype=pl.Float64))


class DeitaComplexityConfig(DeitaScoreConfig):
    template: str = COMPLEXITY_TEMPLATE


class DeitaQualityConfig(DeitaScoreConfig):
    template: str = QUALITY_TEMPLATE


class DeitaComplexity(_DeitaScorer):
    """Complexity of each user turn -> `deita_complexity_turns`, `deita_complexity` (mean or first)."""

    name: ClassVar[str] = "deita_complexity"
    version: ClassVar[int] = 1
    kind: ClassVar[str] = "complexity"
    Config: ClassVar[type[StepConfig]] = DeitaComplexityConfig

    def _format(self, instruction: str, response: str) -> str:
        return self.config.template.format(instruction=instruction)


class DeitaQuality(_DeitaScorer):
    """Quality of each (user turn, response) -> `deita_quality_turns`, `deita_quality` (mean or first)."""

    name: ClassVar[str] = "deita_quality"
    version: ClassVar[int] = 1
    kind: ClassVar[str] = "quality"
    Config: ClassVar[type[StepConfig]] = DeitaQualityConfig

    def __init__(self, config: StepConfig | None = None, *, engine: Any = None, **overrides: Any):
        super().__init__(config, engine=engine, **overrides)
        if "{output}" not in self.config.template:
            raise DeitaError(f"{self.name}: template must contain {{output}}; got {self.config.template!r}")

    def _format(self, instruction: str, response: str) -> str:
        return self.config.template.format(instruction=instruction, output=response)


# ---------------------------------------------------------------------------------------------
# Diversity-aware selection (global)
# ---------------------------------------------------------------------------------------------

EmbeddingsArg = Any  # np.ndarray (N x d, aligned with rows) | column name | callable(texts) -> array | None


def deita_select(scores_df: pl.DataFrame, budget: int | None, threshold: float = 0.9, embeddings: EmbeddingsArg = None,
                 *, score_col: str = "deita_evol_score", id_col: str = "id", block_size: int = 256) -> pl.DataFrame:
    """Score-first greedy diversity selection over ALL rows (one global task).

    Rows sorted by `score_col` desc (ties: `id_col` asc). A row is kept unless its cosine similarity
    to a row kept before it exceeds `threshold`; selection stops after `budget` kept rows.
    Returns one row per input row (input order): id, keep, drop_reason (deita_redundant /
    deita_over_budget / deita_unscored for null scores), deita_max_sim (max similarity to the rows
    kept before it; null for the first and for rows never compared) and deita_rank (position in
    the score order).

    `embeddings`: an N x d array aligned with `scores_df` rows, the name of a list/array column,
    a callable texts -> array, or None for the default sentence embedder (engines.embedder) over
    the conversation text. Memory stays O(block_size * budget + block_size^2), never N x N."""
    if budget is not None and budget < 0:
        raise DeitaError(f"deita_select: budget must be >= 0 or None, got {budget}")
    for col in (score_col, id_col):
        if col not in scores_df.columns:
            raise DeitaError(f"deita_select: column {col!r} missing (columns: {scores_df.columns}). "
                             "Fix: run DeitaComplexity and DeitaQuality first, or pass score_col=/id_col=")
    n = scores_df.height
    vectors = _resolve_embeddings(scores_df, embeddings)
    if vectors.shape[0] != n:
        raise DeitaError(f"deita_select: {vectors.shape[0]} embeddings for {n} rows. Fix: one embedding per row, in row order")
    ids = scores_df[id_col].to_list()
    scores = scores_df[score_col].to_list()
    scored = [i for i in range(n) if scores[i] is not None and not math.isnan(scores[i])]
    order = sorted(scored, key=lambda i: (-scores[i], ids[i]))
    keep, reason, max_sim, rank = greedy_diverse(vectors, order, budget, threshold, block_size=block_size)
    for i in range(n):
        if reason[i] is None and not keep[i]:
            reason[i] = DROP_UNSCORED
    return pl.DataFrame({
        id_col: scores_df[id_col],
        "keep": pl.Series(keep, dtype=pl.Boolean),
        "drop_reason": pl.Series(reason, dtype=pl.Utf8),
        "deita_max_sim": pl.Series(max_sim, dtype=pl.Float64),
        "deita_rank": pl.Series(rank, dtype=pl.Int64),
    })


def greedy_diverse(vectors: np.ndarray, order: Sequence[int], budget: int | None, threshold: float, *,
                   block_size: int = 256) -> tuple[list[bool], list[str | None], list[float | None], list[int | None]]:
    """The sequential greedy rule, computed block by block.

    Each block of candidates is compared at once with the kept matrix (<= budget x d); inside a
    block a candidate is also compared with candidates accepted EARLIER in the same block, so the
    result equals the one-at-a-time loop exactly."""
    n = vectors.shape[0]
    unit = _normalise(vectors)
    keep = [False] * n
    reason: list[str | None] = [None] * n
    max_sim: list[float | None] = [None] * n
    rank: list[int | None] = [None] * n
    for r, i in enumerate(order):
        rank[i] = r
    limit = len(order) if budget is None else budget
    kept = np.empty((min(limit, len(order)), unit.shape[1]), dtype=np.float32)
    n_kept = 0
    pos = 0
    while pos < len(order) and n_kept < limit:
        block = list(order[pos: pos + block_size])
        pos += len(block)
        cand = unit[block]
        prev = (cand @ kept[:n_kept].T).max(axis=1) if n_kept else np.full(len(block), -np.inf, dtype=np.float32)
        inner = cand @ cand.T
        accepted: list[int] = []  # positions within the block
        for j, i in enumerate(block):
            if n_kept >= limit:
                reason[i] = DROP_OVER_BUDGET
                continue
            best = float(prev[j])
            if accepted:
                best = max(best, float(inner[j, accepted].max()))
            max_sim[i] = None if best == -np.inf else best
            if best > threshold:
                reason[i] = DROP_REDUNDANT
                continue
            keep[i] = True
            accepted.append(j)
            kept[n_kept] = cand[j]
            n_kept += 1
    for i in order[pos:]:
        reason[i] = DROP_OVER_BUDGET
    return keep, reason, max_sim, rank


def _normalise(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2:
        raise DeitaError(f"embeddings must be a 2-D array (rows x dim), got shape {vectors.shape}")
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    bad = np.flatnonzero((norms[:, 0] == 0) | ~np.isfinite(norms[:, 0]))
    if bad.size:
        raise DeitaError(f"embeddings of rows {bad[:5].tolist()} are zero or not finite; cosine similarity is undefined. "
                         "Fix: embed non-empty text, or drop those rows before deita_select")
    return vectors / norms


def _resolve_embeddings(df: pl.DataFrame, embeddings: EmbeddingsArg) -> np.ndarray:
    if isinstance(embeddings, np.ndarray):
        return embeddings
    if isinstance(embeddings, str):
        if embeddings not in df.columns:
            raise DeitaError(f"deita_select: embedding column {embeddings!r} missing (columns: {df.columns})")
        return np.asarray(df[embeddings].to_list(), dtype=np.float32)
    texts = [conversation_text(t) for t in conversation_turns(df, need_response=False)]
    if callable(embeddings):
        return np.asarray(embeddings(texts), dtype=np.float32)
    if embeddings is None:
        try:
            from engines.embedder import get_embedder  # lazy: sentence-transformers is an extra
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise DeitaError("deita_select needs embeddings: pass an array / column / callable, or install the "
                             f"sentence embedder: pip install -e '.[curate]' ({exc})") from exc
        return np.asarray(get_embedder().embed(texts), dtype=np.float32)
    raise DeitaError(f"deita_select: embeddings must be an array, a column name, a callable or None; got {type(embeddings)}")


def lm_embeddings(texts: Sequence[str], model: str | None = None, *, pooling: str = "last", batch_size: int = 8,
                  max_length: int = 512) -> np.ndarray:
    """The official Deita embedding: a causal LM's last hidden state (last token; or mean-pooled).

    transformers on CPU in float32 (a second vLLM engine in pooling mode would double memory on a
    small box); `model` None = the embedded model. Right padding, so "last" = last real token."""
    if pooling not in ("last", "mean"):
        raise DeitaError(f"lm_embeddings: pooling must be 'last' or 'mean', got {pooling!r}")
    import torch

    from engines.embedded import resolve_model

    tokenizer, net = _hidden_state_model(resolve_model(model))
    chunks = []
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            enc = tokenizer(list(texts[start:start + batch_size]), return_tensors="pt", padding=True,
                            truncation=True, max_length=max_length)
            hidden = net(**enc).last_hidden_state
            mask = enc["attention_mask"]
            if pooling == "last":
                last = mask.sum(1) - 1
                chunks.append(hidden[torch.arange(hidden.shape[0]), last].numpy())
            else:
                m = mask.unsqueeze(-1).to(hidden.dtype)
                chunks.append(((hidden * m).sum(1) / m.sum(1)).numpy())
    return np.concatenate(chunks) if chunks else np.zeros((0, net.config.hidden_size), dtype=np.float32)


# ---------------------------------------------------------------------------------------------
# The whole Deita filter as a GlobalStep (score per shard -> select over all -> mark per shard)
# ---------------------------------------------------------------------------------------------

EMBEDDING = "deita_embedding"


class DeitaFilterConfig(StepConfig):
    scorer: str | None = None  # None = embedded model; hkust-nlp/deita-*-scorer when available
    complexity_template: str = COMPLEXITY_TEMPLATE
    quality_template: str = QUALITY_TEMPLATE
    top_logprobs: int = Field(20, ge=6)
    max_prompt_tokens: int = Field(2000, ge=64)
    aggregate: str = Field("mean", pattern="^(mean|first)$")
    # "sentence": all-MiniLM-L6-v2 (engines.embedder); "lm": the scorer's last hidden state
    # (official Deita, transformers on CPU; slower). Both are cosine-compared after L2 norm.
    embedder: str = Field("sentence", pattern="^(sentence|lm)$")
    budget: int | None = Field(None, ge=0, description="rows to keep (paper: 6K / 10K); None = no cap")
    threshold: float = Field(0.9, gt=-1.0, le=1.0, description="reject when cosine similarity > threshold")
    block_size: int = Field(256, ge=1)


class DeitaFilter(GlobalStep):
    """Deita end to end: complexity + quality + embedding per shard; score-first diverse selection."""

    parallel_shards = False  # drives a model / its own worker pool: one shard at a time
    name: ClassVar[str] = "deita"
    version: ClassVar[int] = 1
    Config: ClassVar[type[StepConfig]] = DeitaFilterConfig
    score_fields: ClassVar[tuple[str, ...]] = ("scorer", "complexity_template", "quality_template", "top_logprobs",
                                               "max_prompt_tokens", "aggregate", "embedder")
    score_columns: ClassVar[tuple[str, ...]] = ("deita_evol_score", EMBEDDING)

    def __init__(self, config: StepConfig | None = None, *, engine: Any = None, **overrides: Any):
        super().__init__(config, **overrides)
        self._engine = engine

    def _scorers(self) -> tuple[DeitaComplexity, DeitaQuality]:
        c = self.config
        common = dict(scorer=c.scorer, top_logprobs=c.top_logprobs, max_prompt_tokens=c.max_prompt_tokens,
                      aggregate=c.aggregate)
        complexity = DeitaComplexity(engine=self._engine, template=c.complexity_template, **common)
        if self._engine is None:
            self._engine = complexity.engine
            complexity._engine = self._engine
        return complexity, DeitaQuality(engine=self._engine, template=c.quality_template, **common)

    def __call__(self, df: pl.DataFrame) -> pl.DataFrame:
        complexity, quality = self._scorers()
        out = quality(complexity(df))
        texts = [conversation_text(t) for t in conversation_turns(df, need_response=False)]
        started = time.perf_counter()
        if self.config.embedder == "lm":
            vectors = lm_embeddings(texts, self.config.scorer)
        else:
            from engines.embedder import get_embedder

            vectors = get_embedder().embed(texts)
        out = out.with_columns(pl.Series(EMBEDDING, _normalise(vectors).tolist(), dtype=pl.List(pl.Float32)))
        self.stats = {
            "rows": df.height,
            "rows_missing_tokens": int((out["deita_missing_tokens"] > 0).sum()),
            "complexity": complexity.stats,
            "quality": quality.stats,
            "embed_seconds": round(time.perf_counter() - started, 3),
        }
        return out

    def select(self, scores: pl.DataFrame | pl.LazyFrame) -> pl.DataFrame:
        """Decisions in input order: id, deita_max_sim, deita_rank, _reason (null = kept)."""
        table = scores.collect() if isinstance(scores, pl.LazyFrame) else scores
        for col in ("id", *self.score_columns):
            if col not in table.columns:
                raise DeitaError(f"deita.select needs column {col!r} (columns: {table.columns}). "
                                 "Fix: run the deita score phase (DeitaFilter.__call__) on every shard first")
        table = table.select("id", *self.score_columns).with_columns(pl.col("id").cast(pl.Utf8))
        has = table[EMBEDDING].is_not_null().to_numpy()
        dim = next((len(v) for v in table[EMBEDDING].to_list() if v is not None), 1)
        vectors = np.zeros((table.height, dim), dtype=np.float32)
        if has.any():
            vectors[has] = np.asarray(table[EMBEDDING].filter(pl.Series(has)).to_list(), dtype=np.float32)
        vectors[~has, 0] = 1.0  # unembedded rows can't be scored either (evol score null -> unscored)
        scores_only = table.with_columns(
            pl.when(pl.Series(has)).then(pl.col("deita_evol_score")).otherwise(None).alias("deita_evol_score"))
        c = self.config
        decisions = deita_select(scores_only, c.budget, c.threshold, embeddings=vectors, block_size=c.block_size)
        self.stats = {"rows": table.height, "kept": int(decisions["keep"].sum()),
                      **{str(r): int(n) for r, n in decisions["drop_reason"].drop_nulls().value_counts().iter_rows()}}
        return decisions.select("id", "deita_max_sim", "deita_rank", pl.col("drop_reason").alias("_reason"))


@functools.lru_cache(maxsize=2)
def _hidden_state_model(path: str) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, AutoModel.from_pretrained(path, dtype=torch.float32).eval()


__all__ = [
    "COMPLEXITY_TEMPLATE", "QUALITY_TEMPLATE", "SCORE_TOKENS", "DeitaComplexity", "DeitaQuality", "DeitaError",
    "DeitaFilter", "DeitaFilterConfig",
    "conversation_turns", "deita_select", "evol_score", "expected_score", "greedy_diverse", "lm_embeddings",
    "read_first_token_logprobs", "score_token_ids", "with_evol_score",
]
