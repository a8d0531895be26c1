"""Cheap checks on generated rows: Magpie's row checks (per shard) and exact instruction dedup
(global: the first of each group of normalised-equal instructions survives).

Magpie (arXiv 2406.08464) drops empty / truncated queries and answers and any row that leaks the
chat template; its official filter keeps one row per exact duplicate instruction.
"""

from __future__ import annotations

from typing import Any, ClassVar, Sequence

import polars as pl
from pydantic import Field

from alignforge.step import GlobalStep, Step, StepConfig, carry_drops

DUPLICATE_INSTRUCTION = "duplicate_instruction"


class MagpieChecksConfig(StepConfig):
    min_instruction_chars: int = Field(1, ge=0, description="shorter user turns are dropped as empty_instruction")


class MagpieChecks(Step):
    """Finished conversations: last turn is the assistant's, no empty turn, no template tokens.

    Needs the engine's tokenizer only to know the template tokens (no generation)."""

    name = "magpie_checks"
    version = 1
    needs_engine = True
    Config = MagpieChecksConfig
    config: MagpieChecksConfig

    def __init__(self, config: StepConfig | None = None, *, engine: Any = None,
                 template_tokens: Sequence[str] | None = None, **overrides: Any):
        super().__init__(config, **overrides)
        self.engine = engine
        self._tokens = tuple(template_tokens) if template_tokens is not None else None

    def _leak_tokens(self) -> tuple[str, ...]:
        if self._tokens is None:
            from engines.chat_template import template_tokens

            self._tokens = template_tokens(self.engine.tokenizer) if self.engine is not None else ()
        return self._tokens

    def _reason(self, msgs: list[dict] | None, leak: tuple[str, ...]) -> str | None:
        if not msgs or msgs[-1]["role"] != "assistant":
            return "incomplete_conversation"
        if any(m["role"] == "user" and len((m["content"] or "").strip()) < self.config.min_instruction_chars
               for m in msgs):
            return "empty_instruction"
        if any(not (m["content"] or "").strip() and not m.get("tool_calls") for m in msgs):
            return "empty_response"
        if any(tok in (m["content"] or "") for m in msgs for tok in leak):
            return "template_leak"
        return None

    def __call__(self, df: pl.DataFrame) -> pl.DataFrame:
        leak = self._leak_tokens()
        reasons = [self._reason(msgs, leak) for msgs in df["messages"].to_list()]
        self.stats = {"generated_tokens": 0}
        return carry_drops(df, pl.Series("_reason", reasons, dtype=pl.Utf8))


class ExactDedupConfig(StepConfig):
    column: str = Field("instruction", description="text column compared after strip / lowercase / whitespace folding")
    keep: str = Field("lowest id", pattern="^lowest id$", description="which copy survives (content-hash order)")


class ExactDedup(GlobalStep):
    """Global exact dedup: among rows with the same normalised text keep the lowest id; the
    others get `duplicate_instruction`. Nothing to score per shard: select reads the column."""

    name = "exact_dedup"
    version = 1
    Config = ExactDedupConfig
    config: ExactDedupConfig

    def select_columns(self) -> list[str]:
        return [self.config.column]

    def select(self, scores: pl.DataFrame | pl.LazyFrame) -> pl.DataFrame:
        lf = scores.lazy() if isinstance(scores, pl.DataFrame) else scores
        key = pl.col(self.config.column).str.strip_chars().str.to_lowercase().str.replace_all(r"\s+", " ")
        return (lf.select(pl.col("id").cast(pl.Utf8), key.alias("_key"))
                .with_columns((pl.col("id") == pl.col("id").min().over("_key")).alias("_keep"))
                .select("id", pl.when(pl.col("_keep")).then(None).otherwise(pl.lit(DUPLICATE_INSTRUCTION))
                        .cast(pl.Utf8).alias("_reason"))
                .collect())
