"""Global filters: score per shard -> select over all rows -> mark each shard.

A `GlobalFilter` is a Step whose `__call__(shard)` only adds score columns (signatures,
compressed lengths, embeddings, alignment...). Decisions need every row at once, so they are
an explicit second phase: `select(scores)` reads the score columns of ALL shards (a polars
DataFrame or LazyFrame) and returns one decision row per input row; `mark(shard, decisions)`
takes this shard's slice of them (positional, checked by `id`) and AND-combines `keep` /
`drop_reason`. Decisions are positional because content-hash ids can repeat (exact duplicates):
the first copy in shard order is the one kept.

Only `score_fields` of the config change the scores; `score_fingerprint` hashes just those, so a
flow can store scored shards under it and re-run `select` with a new threshold without
recomputing anything.
"""

from __future__ import annotations

from typing import ClassVar

import polars as pl

from schemas import SchemaError, stable_hash
from stages.base import Step

from .text import mark_drops


class GlobalFilter(Step):
    # Config fields the score columns depend on (everything else only affects select()).
    score_fields: ClassVar[tuple[str, ...]] = ()
    # Score columns __call__ adds; select() needs exactly these plus `id`.
    score_columns: ClassVar[tuple[str, ...]] = ()

    def score_config(self) -> dict:
        dumped = self.config.model_dump(mode="json")
        return {k: dumped[k] for k in self.score_fields}

    def score_fingerprint(self, *input_fingerprints: str) -> str:
        return stable_hash(self.name, self.version, "score", self.score_config(), list(input_fingerprints))

    def select(self, scores: pl.DataFrame | pl.LazyFrame) -> pl.DataFrame:  # pragma: no cover - abstract
        raise NotImplementedError

    def mark(self, df: pl.DataFrame, decisions: pl.DataFrame) -> pl.DataFrame:
        """AND-combine this shard's decisions into keep / drop_reason and add decision columns.

        `decisions` is this shard's slice of select()'s output (same rows, same order; use
        `shard_decisions` to cut the slices). Rows are matched by position and checked by id.
        """
        require_ids(df, self.name)
        if decisions.height != df.height or not decisions["id"].equals(df["id"].cast(pl.Utf8), check_names=False):
            raise SchemaError(
                f"{self.name} decisions do not line up with this shard ({decisions.height} decisions "
                f"for {df.height} rows, or ids in another order)",
                column="id",
                fix="pass select() the scores of all shards concatenated in shard order, then give each "
                    "shard its slice (filters.base.shard_decisions)",
            )
        extra = decisions.drop(["id", "_reason"])
        out = df.drop([c for c in extra.columns if c in df.columns]).hstack(extra)
        return mark_drops(out, decisions["_reason"])

    def run(self, df: pl.DataFrame) -> pl.DataFrame:
        """Score, select and mark one in-memory frame (all rows at once)."""
        scored = self(df)
        return self.mark(scored, self.select(scored))


def shard_decisions(decisions: pl.DataFrame, shard_heights: list[int]) -> list[pl.DataFrame]:
    """Cut select()'s output (rows in concatenated shard order) back into per-shard slices."""
    if sum(shard_heights) != decisions.height:
        raise ValueError(f"shard heights sum to {sum(shard_heights)} but there are {decisions.height} decisions")
    out, offset = [], 0
    for h in shard_heights:
        out.append(decisions.slice(offset, h))
        offset += h
    return out


def require_ids(df: pl.DataFrame | pl.LazyFrame, filter_name: str) -> None:
    columns = df.collect_schema().names() if isinstance(df, pl.LazyFrame) else df.columns
    if "id" not in columns:
        raise SchemaError(
            f"{filter_name} needs a row id to decide across shards, but there is no 'id' column",
            column="id",
            fix="load the data with schemas.mapping.load_rows (it assigns ids) or add a unique 'id' column",
        )


def ordered_scores(scores: pl.DataFrame | pl.LazyFrame, columns: list[str], filter_name: str) -> pl.DataFrame:
    """All rows' score columns in a canonical order (by id, then appearance) so decisions do not
    depend on how rows were split into shards or in which order shards arrive.

    `_pos` is the row's position in the input; decisions are returned in that order."""
    require_ids(scores, filter_name)
    lf = scores.lazy() if isinstance(scores, pl.DataFrame) else scores
    names = lf.collect_schema().names()
    missing = [c for c in columns if c not in names]
    if missing:
        raise SchemaError(
            f"{filter_name}.select needs the score columns {missing}, which are missing",
            column=missing[0],
            fix=f"run the {filter_name} filter on every shard (score phase) before select()",
        )
    return (
        lf.select(["id", *columns])
        .with_columns(pl.col("id").cast(pl.Utf8))
        .with_row_index("_pos")
        .sort(["id", "_pos"])
        .collect()
    )
