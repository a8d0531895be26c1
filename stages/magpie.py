"""Magpie: an aligned model writes its own instructions (arXiv 2406.08464).

Feed the chat template up to where the user's text would start (the "pre-query" prefix); the
model completes it with a plausible user query. Then answer each query with the full template.
Magpie-MT extends each conversation: the follow-up query is sampled from the history rendered
under a system prompt that announces follow-ups, the answer from the history without it.

Pure logic over an engine: every shard is ONE batched engine call per generation phase.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import polars as pl
from pydantic import Field

from engines.base import GenerationResult, Sampling
from engines.ngram_penalty import NGramPenalties
from engines.profiles import describe, without_neutral_penalties
from schemas import MESSAGES, row_id
from alignforge.step import EngineStep, StepConfig, StepError, sample_seed
from engines.chat_template import (header_token_ids, pre_query_prefix, stop_strings, stop_token_ids,
                                   template_tokens)

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


# ---------------------------------------------------------------- chat-template helpers

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
    n: int = Field(200, ge=0, description="queries to sample (one per seed row; rows dropped later still count)")
    seed: int = 0
    system_prompts: tuple[str, ...] = Field(
        default=(), description="optional system-prompt variants placed in the pre-query template; one "
        "chosen per row by seed. Empty: the template's own (default system turn kept).")
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int = Field(128, ge=1)
    early_stop: bool = Field(True, description="stop at the first newline: single-line queries")
    sanitize: bool = Field(True, description="cut leaked answers, strip 'Task:' / 'Question 1:' labels")
    suppress_headers: bool = Field(False, description="forbid a markdown '#' header as the first token")
    repetition_penalty: float = Field(1.0, gt=0.0, description="vLLM repetition_penalty (1.0 = none, > 1 "
                                      "discourages tokens already in the prompt or output)")
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="vLLM frequency_penalty (0 = none)")
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="vLLM presence_penalty (0 = none)")


class MagpieInstructions(EngineStep):
    """Seed rows (`seed` int) -> one sampled user query each."""

    name = "magpie_instructions"
    version = 1
    source = True
    Config = MagpieInstructionsConfig
    config: MagpieInstructionsConfig

    def __call__(self, df: pl.DataFrame) -> pl.DataFrame:
        if "seed" not in df.columns:
            raise StepError(f"{self.name}: input needs an integer `seed` column (one row per conversation); "
                            f"got columns {df.columns}", fix="use it as a recipe's first step (the runner feeds it "
                            "seed rows) or build the input with flows.runner.seed_shards")
        cfg, tok = self.config, self.require_engine().tokenizer
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
                                      first_token_bias=bias, skip_special_tokens=False,
                                      repetition_penalty=cfg.repetition_penalty,
                                      frequency_penalty=cfg.frequency_penalty,
                                      presence_penalty=cfg.presence_penalty))
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
    repetition_penalty: float = Field(1.0, gt=0.0, description="responses: vLLM repetition_penalty (1.0 = none, "
                                      "the paper's; > 1 discourages tokens already in the prompt or answer). "
                                      "A model profile may change it: the embedded model uses 1.1 (engines/profiles.py)")
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="responses: vLLM frequency_penalty (0 = none)")
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="responses: vLLM presence_penalty (0 = none)")
    ngram_penalties: NGramPenalties = Field(
        (), description="responses: (n, penalty) pairs, logit -= penalty x times the n-gram the token would "
                        "complete was already generated (engines/ngram_penalty.py); () = off, the paper's")
    # Follow-up queries (turn >= 2) are sampled like first queries.
    followup_temperature: float = Field(1.0, ge=0.0)
    followup_top_p: float = Field(1.0, gt=0.0, le=1.0)
    followup_max_tokens: int = Field(128, ge=1)
    followup_repetition_penalty: float = Field(1.0, gt=0.0, description="follow-up queries: vLLM repetition_penalty")
    followup_frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="follow-up queries: frequency_penalty")
    followup_presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="follow-up queries: presence_penalty")
    early_stop: bool = True
    sanitize: bool = True
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
                raise StepError(f"{self.name}: input needs column `{col}` (output of magpie_instructions); "
                                 f"got {df.columns}")
        cfg, tok = self.config, self.require_engine().tokenizer
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
                                      stop=q_stops, stop_token_ids=stop_ids, skip_special_tokens=False,
                                      repetition_penalty=cfg.followup_repetition_penalty,
                                      frequency_penalty=cfg.followup_frequency_penalty,
                                      presence_penalty=cfg.followup_presence_penalty) for i in idx]
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
                                  stop_token_ids=stop_ids, repetition_penalty=cfg.repetition_penalty,
                                  frequency_penalty=cfg.frequency_penalty, presence_penalty=cfg.presence_penalty,
                                  ngram_penalties=tuple(cfg.ngram_penalties))
                         for i in idx]
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
        profile = getattr(self, "model_profile", None)  # set by flows.recipe.build_steps
        if profile:
            self.stats["model_profile"] = describe(*profile)
        # Penalties at their neutral values are left out: ids stay those of runs before the fields existed.
        id_config = without_neutral_penalties(cfg.model_dump(mode="json"))
        out = df.drop([c for c in ("id", "parent_id", "origin", "gen_tokens", "keep", "drop_reason", "messages")
                       if c in df.columns])
        return out.with_columns(
            pl.Series("id", [row_id(self.origin, id_config, p) for p in parents], dtype=pl.Utf8),
            pl.Series("parent_id", parents, dtype=pl.Utf8),
            pl.lit(self.origin, dtype=pl.Utf8).alias("origin"),
            pl.Series("messages", histories, dtype=MESSAGES),
            pl.Series("gen_tokens", tokens, dtype=pl.Int64),
            pl.Series("keep", alive, dtype=pl.Boolean),
            pl.Series("drop_reason", reasons, dtype=pl.Utf8),
        ).select(["id", "parent_id", "origin", *[c for c in out.columns], "messages", "gen_tokens", "keep", "drop_reason"])
