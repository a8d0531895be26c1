"""RewardLabel: score each (prompt, response) row of a shard with a reward model or the judge.

Adds a `reward` Float64 column. A row that can't be scored keeps reward = null and is marked
keep=False with the scorer's reason ("empty_response", "too_long", "no_rating_token"). A score
that is not a finite number (NaN / inf from a broken model, a bool or text from a custom
scorer) is never published: reward = null, reason "non_finite_score" / "non_numeric_score". If the
reward model can't be loaded at all (e.g. no chat template), every row of the shard is marked
with that error's reason and the message lands in `stats["reward_error"]`: the run goes on,
and the drop is counted and reported instead of crashing the flow.

Input rows: `messages` ending with the assistant response (prompt = the turns before it), or
`prompt` (messages) + `response` (string) columns. The whole shard is scored in one call.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any, Literal

import polars as pl
from pydantic import Field

from engines.reward import RewardModelError, RewardScorer, make_scorer
from schemas import SchemaError
from schemas.preference import score_value
from alignforge.step import Step, StepConfig

from alignforge.step import carry_drops as mark_drops

log = logging.getLogger(__name__)



class RewardLabelConfig(StepConfig):
    model: str | None = Field(None, description="reward model folder or hub id; None = generative judge on the engine")
    backend: Literal["auto", "vllm", "transformers"] = "auto"
    template: Literal["chat", "plain"] = Field("chat", description="'plain' for reward models without a chat template")
    max_length: int | None = Field(None, ge=8, description="context limit; None = the model's own")
    batch_size: int = Field(16, ge=1, description="rows per forward pass (transformers backend)")
    score_head: int = Field(0, ge=0, description="output index of multi-head reward models")
    trust_remote_code: bool = False
    judge_scale: int = Field(5, ge=2, le=9, description="judge rates 1..judge_scale")


class RewardLabel(Step):
    """Shard -> shard + `reward` (float, null when unscorable) + keep / drop_reason."""

    name = "reward_label"
    version = 2  # 2: non-finite / non-numeric scores are unscored with a reason (were published as NaN)
    Config = RewardLabelConfig
    config: RewardLabelConfig

    def __init__(self, config: StepConfig | None = None, *, engine: Any = None, scorer: RewardScorer | None = None,
                 **overrides: Any):
        super().__init__(config, **overrides)
        self.engine = engine
        self._scorer = scorer

    @property
    def scorer_id(self) -> str:
        """What the fingerprint and manifest record as the scoring model."""
        if self._scorer is not None:
            return str(self._scorer.model_id)
        if self.config.model:
            return str(self.config.model)
        return f"judge:{getattr(self.engine, 'model_id', None)}"

    def scorer(self) -> RewardScorer:
        if self._scorer is None:
            cfg = self.config
            if cfg.model:
                key = (cfg.model, cfg.backend, cfg.template, cfg.max_length, cfg.batch_size, cfg.score_head,
                       cfg.trust_remote_code)
                from engines.lifetime import cached_scorer  # engines own model lifetime (one per process)

                self._scorer = cached_scorer(key, lambda: make_scorer(
                    cfg.model, backend=cfg.backend, template=cfg.template, max_length=cfg.max_length,
                    batch_size=cfg.batch_size, score_head=cfg.score_head, trust_remote_code=cfg.trust_remote_code))
            else:
                self._scorer = make_scorer(None, engine=self.engine, scale=cfg.judge_scale)
        return self._scorer

    def __call__(self, df: pl.DataFrame) -> pl.DataFrame:
        prompts, responses = pairs_of(df, self.name)
        live = df["keep"].fill_null(True).to_list() if "keep" in df.columns else [True] * df.height
        todo = [i for i in range(df.height) if live[i]]
        rewards: list[float | None] = [None] * df.height
        reasons: list[str | None] = [None] * df.height
        self.stats = {"rows_in": df.height, "scored": 0, "generated_tokens": 0}
        try:
            scorer = self.scorer()
            before = dict(getattr(scorer, "stats", {}) or {})
            results = list(scorer.score([prompts[i] for i in todo], [responses[i] for i in todo])) if todo else []
            if len(results) != len(todo):
                raise RewardModelError(f"scorer {self.scorer_id} returned {len(results)} results for {len(todo)} "
                                       "rows; every row needs one", reason="reward_scorer_error")
            for i, result in zip(todo, results):
                rewards[i], reasons[i] = reward_of(result)
            after = getattr(scorer, "stats", {}) or {}
            self.stats["seconds_scoring"] = round(float(after.get("seconds", 0.0)) - float(before.get("seconds", 0.0)), 4)
            if "missing_rating_tokens" in after:
                self.stats["missing_rating_tokens"] = int(after["missing_rating_tokens"]) - int(
                    before.get("missing_rating_tokens", 0))
        except RewardModelError as error:
            log.warning("%s: %s (all %d rows of this shard dropped as %r)", self.name, error, len(todo), error.reason)
            self.stats["reward_error"] = str(error)
            for i in todo:
                reasons[i] = error.reason
        self.stats["scored"] = sum(1 for r in rewards if r is not None)
        self.stats["dropped"] = dict(Counter(r for r in reasons if r is not None))
        out = df.with_columns(pl.Series("reward", rewards, dtype=pl.Float64))
        return mark_drops(out, pl.Series("_reason", reasons, dtype=pl.Utf8))


def reward_of(result: Any) -> tuple[float | None, str | None]:
    """(reward, None) or (None, reason) from one scorer result (a RewardResult, or a bare value)."""
    raw = getattr(result, "score", result)
    score, reason = score_value(raw)
    if score is not None:
        return score, None
    given = getattr(result, "reason", None)
    if raw is None and isinstance(given, str) and given:
        return None, given
    return None, reason


def pairs_of(df: pl.DataFrame, where: str = "reward") -> tuple[list[list[dict[str, str]]], list[str | None]]:
    """(prompt messages, response text) per row, from `messages` or from `prompt` + `response`."""
    if "messages" in df.columns:
        prompts, responses = [], []
        for i, messages in enumerate(df["messages"].to_list()):
            messages = list(messages or [])
            if messages and messages[-1]["role"] == "assistant":
                prompts.append(messages[:-1])
                responses.append(messages[-1]["content"])
            else:  # no answer to score: reported as an empty response, not a crash
                prompts.append(messages)
                responses.append(None)
        return prompts, responses
    if "prompt" in df.columns and "response" in df.columns:
        prompts = [list(p or []) for p in df["prompt"].to_list()]
        return prompts, df["response"].to_list()
    raise SchemaError(f"{where}: need a `messages` column ending with the assistant response, or `prompt` "
                      f"(messages) + `response` (string) columns; got {df.columns}", column="messages",
                      fix="run best_of_n / magpie_responses first, or rename your columns")
