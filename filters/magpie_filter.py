"""The official Magpie SFT selection (magpie-align/magpie, arXiv 2406.08464) over tagged rows.

Rules in order: input quality >= `min_quality` (official: average or good), instruction reward
>= `min_reward` (-10) when a `reward` column exists, instruction not ending in ":", the first
(lowest id) of each near-duplicate group (`minhash_cluster`), then the `n` rows with the longest
responses. Needs the tags of stages.tags.MagpieTags. A null tag or reward fails its rule.
"""

from __future__ import annotations

from typing import ClassVar

import polars as pl
from pydantic import Field

from alignforge.step import GlobalStep, StepConfig, StepError
from stages.tags import INPUT_QUALITY


def _response_length(df: pl.DataFrame) -> pl.Expr:
    if "response" in df.columns:
        return pl.col("response").fill_null("").str.len_chars()
    if "messages" in df.columns:
        return (pl.col("messages").list.eval(
            pl.when(pl.element().struct.field("role") == "assistant")
            .then(pl.element().struct.field("content").str.len_chars()).otherwise(0)).list.sum())
    raise StepError(f"magpie_official_filter: need `messages` or `response` to rank by response length; got {df.columns}")


def _instruction(df: pl.DataFrame) -> pl.Expr:
    if "instruction" in df.columns:
        return pl.col("instruction").fill_null("")
    if "messages" in df.columns:
        return (pl.col("messages").list.eval(pl.element().filter(pl.element().struct.field("role") == "user")
                                             .struct.field("content")).list.first().fill_null(""))
    raise StepError(f"magpie_official_filter: need `instruction` or `messages`; got {df.columns}")


def magpie_official_filter(df: pl.DataFrame, n: int, *, min_quality: str = "average", min_reward: float = -10.0
                           ) -> pl.DataFrame:
    """Annotate `df` with the official Magpie SFT selection (keep / drop_reason); see module docstring.

    Drop reasons, in rule order: low_input_quality, low_reward, instruction_ends_with_colon,
    near_duplicate, not_in_top_n. Rows already keep=False stay dropped with their reason. A null
    tag or reward fails its rule (it can't be shown to pass)."""
    if min_quality not in INPUT_QUALITY:
        raise StepError(f"min_quality={min_quality!r}. Fix: use one of {INPUT_QUALITY} (official: 'average' or 'good')")
    if "input_quality" not in df.columns:
        raise StepError("magpie_official_filter needs `input_quality`. Fix: run stages.tags.MagpieTags first")
    if "id" not in df.columns:
        raise StepError("magpie_official_filter needs `id` (ties and near-duplicates resolve to the lowest id)")
    rank = {label: i for i, label in enumerate(INPUT_QUALITY)}
    out = df.with_row_index("_row")
    prior_keep = pl.col("keep").fill_null(True) if "keep" in df.columns else pl.lit(True)
    prior_reason = pl.col("drop_reason") if "drop_reason" in df.columns else pl.lit(None, dtype=pl.Utf8)
    quality_ok = pl.col("input_quality").replace_strict(rank, default=-1, return_dtype=pl.Int64) >= rank[min_quality]
    rules: list[tuple[str, pl.Expr]] = [("low_input_quality", quality_ok)]
    if "reward" in df.columns:
        rules.append(("low_reward", (pl.col("reward").is_finite() & (pl.col("reward") >= min_reward)).fill_null(False)))
    rules.append(("instruction_ends_with_colon", ~_instruction(df).str.strip_chars().str.ends_with(":")))
    reason = pl.when(~prior_keep).then(prior_reason.fill_null("dropped"))
    for name, ok in rules:
        reason = reason.when(~ok).then(pl.lit(name))
    out = out.with_columns(reason.otherwise(None).cast(pl.Utf8).alias("_reason"))
    if "minhash_cluster" in df.columns:
        # Singletons (null cluster) are their own group.
        group = pl.coalesce(pl.col("minhash_cluster").cast(pl.Utf8), pl.lit("row:") + pl.col("_row").cast(pl.Utf8))
        alive = pl.col("_reason").is_null()
        first = pl.col("id").filter(alive).min().over(group)
        out = out.with_columns(pl.when(alive & (pl.col("id") != first)).then(pl.lit("near_duplicate"))
                               .otherwise(pl.col("_reason")).alias("_reason"))
    out = out.with_columns(_response_length(df).alias("_length"))
    survivors = out.filter(pl.col("_reason").is_null()).sort(["_length", "id"], descending=[True, False]).head(max(n, 0))
    chosen = set(survivors["_row"].to_list())
    out = out.with_columns(pl.when(pl.col("_reason").is_null() & ~pl.col("_row").is_in(list(chosen)))
                           .then(pl.lit("not_in_top_n")).otherwise(pl.col("_reason")).alias("_reason"))
    return out.with_columns(pl.col("_reason").is_null().alias("keep"), pl.col("_reason").alias("drop_reason")) \
              .drop("_row", "_reason", "_length")


class MagpieFilterConfig(StepConfig):
    n: int = Field(..., ge=0, description="rows to keep after the rules: the n with the longest responses")
    min_quality: str = Field("average", description=f"lowest input_quality kept, one of {INPUT_QUALITY}")
    min_reward: float = Field(-10.0, description="lowest instruction reward kept (when a `reward` column exists)")


class MagpieFilter(GlobalStep):
    """The official Magpie SFT selection as a global step (needs magpie_tags' columns)."""

    name: ClassVar[str] = "magpie_filter"
    version: ClassVar[int] = 1
    Config = MagpieFilterConfig
    config: MagpieFilterConfig

    def select_columns(self) -> list[str]:
        return ["input_quality", "reward", "minhash_cluster", "instruction", "messages", "response"]

    def select(self, scores: pl.DataFrame | pl.LazyFrame) -> pl.DataFrame:
        table = scores.collect() if isinstance(scores, pl.LazyFrame) else scores
        c = self.config
        marked = magpie_official_filter(table, c.n, min_quality=c.min_quality, min_reward=c.min_reward)
        self.stats = {"kept": int(marked["keep"].sum()), "rows": marked.height}
        return marked.select(pl.col("id").cast(pl.Utf8), pl.col("drop_reason").alias("_reason"))
