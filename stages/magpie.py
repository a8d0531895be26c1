"""Magpie: an aligned model writes its own instructions (arXiv 2406.08464).

Feed the chat template up to where the user's text would start (the "pre-query" prefix); the
model completes it with a plausible user query. Then answer each query with the full template.
Magpie-MT extends each conversation: the follow-up query is sampled from the history rendered
under a system prompt that announces follow-ups, the answer from the history without it.

Pure logic over an engine: every shard is ONE batched engine call per generation phase.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any, Sequence

import polars as pl
from pydantic import Field

from engines.base import Engine, GenerationResult, Sampling
from schemas import MESSAGES, row_id, stable_hash
from alignforge.step import EngineStep, Step, StepConfig

# Our wording of Magpie-MT's follow-up system prompt (used only while sampling follow-up queries).
FOLLOWUP_SYSTEM_PROMPT = (
    "You are a helpful AI assistant. In this conversation the user first asks a question, and then "
    "keeps asking follow-up questions that build on your previous answers."
)

# A leaked answer starts here: cut it off (sanitizer).
_LEAKED_ANSWER = re.compile(r"(?:\*\*|##\s*)?\b(?:Answer|Solution)\s*:|#+\s*Step\s*1\b", re.IGNORECASE)
# Labels a small model puts before the query: "Task:", "Question 1:", "**Instruction:**", "Q:".
_QUERY_LABEL = re.compile(
    r"^\s*(?:[#*>\s]*)(?:Task|Question|Instruction|Query|Problem|Prompt|User|Q)(?:\s*#?\d+)?\s*[:.)\-]\s*(?:\*\*)?\s*",
    re.IGNORECASE,
)


_TEMPLATE_MARKER = re.compile(r"<\|[^|<>\s]+\|>|<｜[^｜<>]+｜>|</?[a-z_]+_of_turn>|\[/?INST\]")


def sanitize_instruction(text: str) -> str:
    """Cut a leaked answer, then strip leading query labels (repeatedly: "Task: Question 1: ...")."""
    match = _LEAKED_ANSWER.search(text)
    if match:
        text = text[: match.start()]
    for _ in range(3):
        stripped = _QUERY_LABEL.sub("", text, count=1)
        if stripped == text:
            break
        text = stripped
    return text.strip()


def sample_seed(*parts: Any) -> int:
    """A per-request sampling seed derived from config seed + row identity (31-bit, vLLM-safe)."""
    return int(stable_hash("sampling-seed", *parts), 16) % (2**31 - 1)


# ---------------------------------------------------------------- chat-template helpers

def _template_api():
    from engines import chat_template

    return chat_template


def pre_query_prefix(tokenizer: Any, system: str | None = None,
                     history: Sequence[dict[str, str]] = ()) -> str:
    return _template_api().pre_query_prefix(tokenizer, system=system, history=history)


def assistant_header(tokenizer: Any) -> str:
    """What the template adds for the assistant's turn ("<|im_start|>assistant" for ChatML)."""
    return _template_api().assistant_header(tokenizer).strip()


def stop_strings(tokenizer: Any, *, early_stop: bool) -> tuple[str, ...]:
    """End-of-turn stops + the assistant header (+ newline for single-line queries)."""
    stops = [s for s in _template_api().end_of_turn_stops(tokenizer) if isinstance(s, str) and s]
    header = assistant_header(tokenizer)
    if header:
        stops.append(header)
    if early_stop:
        stops.append("\n")
    return tuple(dict.fromkeys(stops))


def stop_token_ids(tokenizer: Any) -> tuple[int, ...]:
    ids: list[int] = []
    eos = getattr(tokenizer, "eos_token_id", None)
    if isinstance(eos, int):
        ids.append(eos)
    for stop in _template_api().end_of_turn_stops(tokenizer):
        if isinstance(stop, int):
            ids.append(stop)
        elif isinstance(stop, str):
            tid = tokenizer.convert_tokens_to_ids(stop) if hasattr(tokenizer, "convert_tokens_to_ids") else None
            unk = getattr(tokenizer, "unk_token_id", None)
            if isinstance(tid, int) and tid != unk:
                ids.append(tid)
    return tuple(dict.fromkeys(ids))


def template_tokens(tokenizer: Any) -> tuple[str, ...]:
    """Strings that must never appear in a query or answer: the tokenizer's special tokens and
    the template's own markers (end-of-turn stops, assistant header)."""
    found = set(getattr(tokenizer, "all_special_tokens", None) or [])
    found.update(s for s in _template_api().end_of_turn_stops(tokenizer) if isinstance(s, str))
    # Markers the template itself writes ("<|im_start|>", "<start_of_turn>", "[INST]"), found by rendering.
    sample = _template_api().render(tokenizer, [{"role": "user", "content": "a"},
                                                {"role": "assistant", "content": "b"}], add_generation_prompt=False)
    found.update(_TEMPLATE_MARKER.findall(sample))
    header = assistant_header(tokenizer)
    if header:
        found.add(header)
    return tuple(sorted(t for t in found if t and len(t) > 1 and not t.isspace()))


@lru_cache(maxsize=8)
def _header_token_ids(tokenizer: Any) -> tuple[int, ...]:
    """Ids of tokens whose text starts with "#" (markdown headers), to bias at the first position."""
    vocab = tokenizer.get_vocab()
    ids = []
    for token, tid in vocab.items():
        text = tokenizer.convert_tokens_to_string([token])
        if text.lstrip().startswith("#"):
            ids.append(tid)
    return tuple(sorted(ids))


def header_token_ids(tokenizer: Any) -> tuple[int, ...]:
    try:
        return _header_token_ids(tokenizer)
    except TypeError:  # unhashable tokenizer object: compute without the cache
        return _header_token_ids.__wrapped__(tokenizer)


def check_query(text: str, completion_finish: str | None, leak_tokens: Sequence[str], *, sanitize: bool,
                stops: Sequence[str]) -> tuple[str, str | None]:
    """Clean one sampled query; return (text, drop_reason or None)."""
    # Engines that keep special tokens in the text may return the stop token itself: cut there.
    for stop in stops:
        if stop and stop != "\n" and stop in text:
            text = text[: text.index(stop)]
    if sanitize:
        text = sanitize_instruction(text)
    text = text.strip()
    if completion_finish == "length":
        return text, "truncated"
    if not text:
        return text, "empty_instruction"
    if any(tok in text for tok in leak_tokens):
        return text, "template_leak"
    return text, None


def check_response(text: str, completion_finish: str | None, leak_tokens: Sequence[str]) -> tuple[str, str | None]:
    for tok in leak_tokens:
        if tok in text:
            text = text[: text.index(tok)]
    text = text.strip()
    if completion_finish == "length":
        return text, "truncated_response"
    if not text:
        return text, "empty_response"
    return text, None


def _first(result: GenerationResult):
    return result.completions[0]


# ---------------------------------------------------------------- instructions

class MagpieInstructionsConfig(StepConfig):
    seed: int = 0
    system_prompts: tuple[str, ...] = Field(
        default=(), description="optional system-prompt variants placed in the pre-query template; one "
        "chosen per row by seed. Empty: the template's own (default system turn kept).")
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int = Field(128, ge=1)
    early_stop: bool = Field(True, description="stop at the first newline: single-line queries")
    sanitize: bool = Field(False, description="cut leaked answers, strip 'Task:' / 'Question 1:' labels")
    suppress_headers: bool = Field(False, description="forbid a markdown '#' header as the first token")


class MagpieInstructions(EngineStep):
    """Seed rows (`seed` int) -> one sampled user query each."""

    name = "magpie_instructions"
    version = 1
    Config = MagpieInstructionsConfig
    config: MagpieInstructionsConfig

    def __call__(self, df: pl.DataFrame) -> pl.DataFrame:
        if "seed" not in df.columns:
            raise ValueError(f"{self.name}: input needs an integer `seed` column (one row per conversation); "
                             f"got columns {df.columns}. Fix: build the input with flows.runner.seed_shards")
        if self.engine is None:
            raise ValueError(f"{self.name}: no engine. Fix: MagpieInstructions(engine=get_engine(...))")
        cfg, tok = self.config, self.engine.tokenizer
        seeds = [int(s) for s in df["seed"].to_list()]
        variants: list[str | None] = list(cfg.system_prompts) or [None]
        prefixes = {sp: pre_query_prefix(tok, system=sp) for sp in variants}
        stops = stop_strings(tok, early_stop=cfg.early_stop)
        stop_ids = stop_token_ids(tok)
        bias = tuple((tid, -100.0) for tid in header_token_ids(tok)) if cfg.suppress_headers else ()
        leak = template_tokens(tok)

        chosen: list[str | None] = []
        samplings: list[Sampling] = []
        for s in seeds:
            sp = variants[sample_seed(cfg.seed, s, "system") % len(variants)] if len(variants) > 1 else variants[0]
            chosen.append(sp)
            samplings.append(Sampling(temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens,
                                      seed=sample_seed(cfg.seed, s), stop=stops, stop_token_ids=stop_ids,
                                      first_token_bias=bias, skip_special_tokens=False))
        results = self.engine.complete([prefixes[sp] for sp in chosen], samplings, desc=self.name) if seeds else []

        rows: dict[str, list] = {k: [] for k in ("instruction", "gen_tokens", "keep", "drop_reason")}
        for result in results:
            c = _first(result)
            text, reason = check_query(c.text, c.finish_reason, leak, sanitize=cfg.sanitize, stops=stops)
            rows["instruction"].append(text)
            rows["gen_tokens"].append(c.num_tokens)
            rows["keep"].append(reason is None)
            rows["drop_reason"].append(reason)
        self.stats = {"generated_tokens": sum(rows["gen_tokens"]), "requests": len(seeds)}
        return pl.DataFrame({
            "id": [row_id(self.origin, cfg.seed, s) for s in seeds],
            "parent_id": pl.Series([None] * len(seeds), dtype=pl.Utf8),
            "origin": [self.origin] * len(seeds),
            "seed": pl.Series(seeds, dtype=pl.Int64),
            "instruction": pl.Series(rows["instruction"], dtype=pl.Utf8),
            "system_prompt": pl.Series(chosen, dtype=pl.Utf8),
            "gen_tokens": pl.Series(rows["gen_tokens"], dtype=pl.Int64),
            "keep": pl.Series(rows["keep"], dtype=pl.Boolean),
            "drop_reason": pl.Series(rows["drop_reason"], dtype=pl.Utf8),
        })


# ---------------------------------------------------------------- responses (+ Magpie-MT turns)

class MagpieResponsesConfig(StepConfig):
    seed: int = 0
    turns: int = Field(1, ge=1, description="conversation turns; >= 2 runs Magpie-MT follow-ups")
    temperature: float = Field(0.0, ge=0.0, description="0 = greedy (default); Magpie's option: 0.6 / top_p 0.9")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int = Field(512, ge=1)
    # Follow-up queries (turn >= 2) are sampled like first queries.
    followup_temperature: float = Field(1.0, ge=0.0)
    followup_top_p: float = Field(1.0, gt=0.0, le=1.0)
    followup_max_tokens: int = Field(128, ge=1)
    early_stop: bool = True
    sanitize: bool = False
    followup_system_prompt: str = FOLLOWUP_SYSTEM_PROMPT


class MagpieResponses(EngineStep):
    """Instruction rows -> `messages` conversations (user/assistant, `turns` rounds)."""

    name = "magpie_responses"
    version = 1
    Config = MagpieResponsesConfig
    config: MagpieResponsesConfig

    def __call__(self, df: pl.DataFrame) -> pl.DataFrame:
        for col in ("id", "instruction"):
            if col not in df.columns:
                raise ValueError(f"{self.name}: input needs column `{col}` (output of magpie_instructions); "
                                 f"got {df.columns}")
        if self.engine is None:
            raise ValueError(f"{self.name}: no engine. Fix: MagpieResponses(engine=get_engine(...))")
        cfg, tok = self.config, self.engine.tokenizer
        n = df.height
        parents = df["id"].to_list()
        keep_in = df["keep"].to_list() if "keep" in df.columns else [True] * n
        reason_in = df["drop_reason"].to_list() if "drop_reason" in df.columns else [None] * n
        histories: list[list[dict[str, str]]] = [[{"role": "user", "content": q or ""}] for q in df["instruction"].to_list()]
        alive = [bool(k) for k in keep_in]
        reasons: list[str | None] = [None if k else r for k, r in zip(keep_in, reason_in)]
        tokens = [0] * n
        leak = template_tokens(tok)
        q_stops = stop_strings(tok, early_stop=cfg.early_stop)
        stop_ids = stop_token_ids(tok)

        for turn in range(1, cfg.turns + 1):
            if turn > 1:  # sample the follow-up query under the follow-up system prompt
                idx = [i for i in range(n) if alive[i]]
                prompts = [pre_query_prefix(tok, system=cfg.followup_system_prompt, history=histories[i])
                           for i in idx]
                samplings = [Sampling(temperature=cfg.followup_temperature, top_p=cfg.followup_top_p,
                                      max_tokens=cfg.followup_max_tokens, seed=sample_seed(cfg.seed, parents[i], turn, "q"),
                                      stop=q_stops, stop_token_ids=stop_ids, skip_special_tokens=False) for i in idx]
                results = self.engine.complete(prompts, samplings, desc=f"{self.name} turn {turn} queries") if idx else []
                for i, result in zip(idx, results):
                    c = _first(result)
                    tokens[i] += c.num_tokens
                    text, reason = check_query(c.text, c.finish_reason, leak, sanitize=cfg.sanitize, stops=q_stops)
                    if reason:
                        alive[i], reasons[i] = False, reason
                    else:
                        histories[i].append({"role": "user", "content": text})
            idx = [i for i in range(n) if alive[i]]
            samplings = [Sampling(temperature=cfg.temperature, top_p=cfg.top_p if cfg.temperature > 0 else 1.0,
                                  max_tokens=cfg.max_tokens, seed=sample_seed(cfg.seed, parents[i], turn, "a"),
                                  stop_token_ids=stop_ids) for i in idx]
            # The answer sees the plain history (no follow-up system prompt).
            results = self.engine.chat([histories[i] for i in idx], samplings,
                                       desc=f"{self.name} turn {turn} responses") if idx else []
            for i, result in zip(idx, results):
                c = _first(result)
                tokens[i] += c.num_tokens
                text, reason = check_response(c.text, c.finish_reason, leak)
                if reason:
                    alive[i], reasons[i] = False, reason
                else:
                    histories[i].append({"role": "assistant", "content": text})

        self.stats = {"generated_tokens": sum(tokens), "requests": n}
        out = df.drop([c for c in ("id", "parent_id", "origin", "gen_tokens", "keep", "drop_reason", "messages")
                       if c in df.columns])
        return out.with_columns(
            pl.Series("id", [row_id(self.origin, cfg.model_dump(mode="json"), p) for p in parents], dtype=pl.Utf8),
            pl.Series("parent_id", parents, dtype=pl.Utf8),
            pl.lit(self.origin, dtype=pl.Utf8).alias("origin"),
            pl.Series("messages", histories, dtype=MESSAGES),
            pl.Series("gen_tokens", tokens, dtype=pl.Int64),
            pl.Series("keep", alive, dtype=pl.Boolean),
            pl.Series("drop_reason", reasons, dtype=pl.Utf8),
        ).select(["id", "parent_id", "origin", *[c for c in out.columns], "messages", "gen_tokens", "keep", "drop_reason"])


# ---------------------------------------------------------------- basic checks (per shard)

class MagpieChecksConfig(StepConfig):
    min_instruction_chars: int = Field(1, ge=0)


class MagpieChecks(Step):
    """Cheap row checks on finished conversations: every turn non-empty, no template tokens.

    Needs the engine's tokenizer only to know the template tokens (no generation)."""

    name = "magpie_checks"
    version = 1
    Config = MagpieChecksConfig
    config: MagpieChecksConfig

    def __init__(self, config: StepConfig | None = None, *, engine: Engine | None = None,
                 template_tokens: Sequence[str] | None = None, **overrides: Any):
        super().__init__(config, **overrides)
        self.engine = engine
        self._tokens = tuple(template_tokens) if template_tokens is not None else None

    def _leak_tokens(self) -> tuple[str, ...]:
        if self._tokens is None:
            self._tokens = template_tokens(self.engine.tokenizer) if self.engine is not None else ()
        return self._tokens

    def __call__(self, df: pl.DataFrame) -> pl.DataFrame:
        leak = self._leak_tokens()
        keep_in = df["keep"].to_list() if "keep" in df.columns else [True] * df.height
        reason_in = df["drop_reason"].to_list() if "drop_reason" in df.columns else [None] * df.height
        keeps, reasons = [], []
        for msgs, k, r in zip(df["messages"].to_list(), keep_in, reason_in):
            reason = None if k else (r or "dropped")
            if reason is None:
                if not msgs or msgs[-1]["role"] != "assistant":
                    reason = "incomplete_conversation"
                elif any(m["role"] == "user" and len((m["content"] or "").strip()) < self.config.min_instruction_chars
                         for m in msgs):
                    reason = "empty_instruction"
                elif any(not (m["content"] or "").strip() for m in msgs):
                    reason = "empty_response"
                elif any(tok in (m["content"] or "") for m in msgs for tok in leak):
                    reason = "template_leak"
            keeps.append(reason is None)
            reasons.append(reason)
        self.stats = {"generated_tokens": 0}
        return df.with_columns(pl.Series("keep", keeps, dtype=pl.Boolean),
                               pl.Series("drop_reason", reasons, dtype=pl.Utf8))


def select_first_of_duplicates(rows: pl.LazyFrame, *, column: str = "instruction") -> pl.DataFrame:
    """Global exact dedup: among rows with the same (whitespace/case-normalised) text keep the
    lowest id; the others get drop_reason "duplicate_instruction". Returns id, keep, drop_reason."""
    key = pl.col(column).str.strip_chars().str.to_lowercase().str.replace_all(r"\s+", " ")
    return (
        rows.select("id", key.alias("_key"))
        .with_columns((pl.col("id") == pl.col("id").min().over("_key")).alias("keep"))
        .with_columns(pl.when(pl.col("keep")).then(None).otherwise(pl.lit("duplicate_instruction"))
                      .cast(pl.Utf8).alias("drop_reason"))
        .select("id", "keep", "drop_reason")
        .collect()
    )
