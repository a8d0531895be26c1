"""The one step contract that `stages/` (generators) and `filters/` (checks, scores, selections) follow.

A step is a small object with a frozen pydantic config (the ONLY place a field and its default
exist), a `name`, an integer `version`, and a call over one polars DataFrame shard. Its
fingerprint = hash(name, version, config, input fingerprints, engine id): a config change
recomputes, an unchanged one resumes. Three kinds, all run by the one runner (flows/runner.py):

- `Step` ("map"): shard in -> shard out. Generators derive child rows (`derive_ids`), filters
  annotate and AND their verdict into `keep` / `drop_reason` (`carry_drops`).
- `Step` with `source = True`: a generator that starts from nothing; the runner feeds it seed rows
  (`seed` 0..n-1, sharded) built from its config's `n`.
- `GlobalStep`: decisions that need every row (dedup clusters, budgets, top-k): score per shard
  (parallel) -> `select` over all scores (one task, lazy polars) -> `mark` per shard (positional).

`EngineStep` marks a step that is given an engine (stages never load models themselves).
Bookkeeping (rows in/kept/dropped by reason, seconds, `stats`) lives in the runner, not here.
"""

from __future__ import annotations

from typing import Any, ClassVar, Sequence

import polars as pl
from pydantic import BaseModel, ConfigDict

from schemas import SchemaError, row_id, stable_hash

__all__ = ["StepConfig", "Step", "EngineStep", "GlobalStep", "carry_drops", "derive_ids", "shard_decisions",
           "ordered_scores", "require_ids", "require_columns", "StepError", "sample_seed"]


class StepError(SchemaError):
    """A step can't run on what it was given (missing column, no engine...): what, where, fix."""


class StepConfig(BaseModel):
    """Frozen, strict config: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class Step:
    """Base for stages (generate rows) and filters (annotate rows with scores, keep, drop_reason)."""

    name: ClassVar[str] = "step"
    version: ClassVar[int] = 1
    Config: ClassVar[type[StepConfig]] = StepConfig
    # True: a generator that starts from nothing (config has `n`); the runner feeds it seed rows.
    source: ClassVar[bool] = False
    # True: needs an engine (`self.engine`); the runner hands it the recipe's engine.
    needs_engine: ClassVar[bool] = False
    # False: shards run one after another (the step drives a model or its own process pool).
    parallel_shards: ClassVar[bool] = True

    def __init__(self, config: StepConfig | None = None, **overrides: Any):
        if config is None:
            config = self.Config(**overrides)
        elif overrides:
            config = self.Config(**{**config.model_dump(), **overrides})
        self.config = config
        # Counters the runner persists in the manifest (tokens, requests, errors...), reset per call.
        self.stats: dict[str, Any] = {}

    @property
    def origin(self) -> str:
        return f"{self.name}@{self.version}"

    def fingerprint(self, *input_fingerprints: str, engine_id: str | None = None) -> str:
        return stable_hash(self.name, self.version, self.config.model_dump(mode="json"),
                           list(input_fingerprints), engine_id)

    def __call__(self, df: pl.DataFrame) -> pl.DataFrame:  # pragma: no cover - abstract
        raise NotImplementedError

    def preflight(self) -> None:
        """Checks that need no model (files exist and parse); the runner calls it before any step runs.

        The base check: sampling settings that make every sample identical are refused (greedy
        decoding ignores per-request seeds), e.g. Magpie queries or best-of-N candidates at T 0."""
        cfg = self.config
        copies = getattr(cfg, "n", None) if self.source else getattr(cfg, "k", None)
        if getattr(cfg, "temperature", None) == 0 and isinstance(copies, int) and copies > 1:
            field = "n" if self.source else "k"
            raise StepError(f"step {self.name!r}: temperature 0 makes all {field}={copies} samples identical "
                            "(greedy decoding ignores the per-request seeds)",
                            fix=f"sample at a temperature > 0, e.g. --set steps.{self.name}.temperature=1.0, "
                                f"or set {field}=1")

    def close(self) -> None:
        """Free what the step holds between shards (caches, pools). Models belong to engines."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"


class EngineStep(Step):
    """A step that generates or scores with an engine it is given."""

    needs_engine: ClassVar[bool] = True

    def __init__(self, config: StepConfig | None = None, *, engine: Any = None, **overrides: Any):
        super().__init__(config, **overrides)
        self.engine = engine

    def require_engine(self) -> Any:
        if self.engine is None:
            raise StepError(f"{self.name}: no engine was given",
                            fix=f"run it from a recipe (the runner hands it the recipe's model) or build it as "
                                f"{type(self).__name__}(engine=engines.get_engine(...))")
        return self.engine


# ---------------------------------------------------------------- helpers every step shares

def sample_seed(*parts: Any) -> int:
    """A per-request sampling seed from the config seed + row identity + purpose (31-bit, vLLM-safe)."""
    return int(stable_hash("sampling-seed", *parts), 16) % (2**31 - 1)


def carry_drops(df: pl.DataFrame, reasons: pl.Series | pl.Expr | Sequence[str | None]) -> pl.DataFrame:
    """AND-combine this step's verdict into `keep` / `drop_reason`.

    `reasons`: Utf8 series / expression / list, null = keep, a string = drop for that reason. A row
    dropped earlier keeps its earlier reason (the first reason wins)."""
    if not isinstance(reasons, (pl.Series, pl.Expr)):
        reasons = pl.Series("reason", list(reasons), dtype=pl.Utf8)
    reason = reasons if isinstance(reasons, pl.Expr) else pl.lit(reasons)
    old_keep = pl.col("keep") if "keep" in df.columns else pl.lit(True)
    old_reason = pl.col("drop_reason") if "drop_reason" in df.columns else pl.lit(None, dtype=pl.Utf8)
    return df.with_columns(
        (old_keep.fill_null(True) & reason.is_null()).alias("keep"),
        pl.coalesce(old_reason.cast(pl.Utf8), reason.cast(pl.Utf8)).alias("drop_reason"),
    )


def derive_ids(origin: str, parents: Sequence[str | None], *content: Sequence[Any] | Any) -> pl.DataFrame:
    """Lineage columns of child rows: `id` = row_id(origin, *content_i, parent), `parent_id`, `origin`.

    `content` items are per-row sequences (same length as `parents`) or one value shared by all."""
    n = len(parents)
    per_row = [c if isinstance(c, (list, tuple, pl.Series)) and len(c) == n else [c] * n for c in content]
    ids = [row_id(origin, *(c[i] for c in per_row), parents[i]) for i in range(n)]
    return pl.DataFrame({"id": pl.Series(ids, dtype=pl.Utf8), "parent_id": pl.Series(list(parents), dtype=pl.Utf8),
                         "origin": pl.Series([origin] * n, dtype=pl.Utf8)})


def require_columns(df: pl.DataFrame, step: str, columns: Sequence[str], *, fix: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise StepError(f"{step}: input has no column {missing[0]!r} (columns: {df.columns})", column=missing[0],
                        fix=fix)


# ---------------------------------------------------------------- global selections

class GlobalStep(Step):
    """Score per shard (`__call__` adds score columns) -> `select(all scores)` -> `mark(shard, slice)`.

    Decisions are positional (one per input row, in concatenated shard order) because content-hash
    ids can repeat (exact duplicates): the first copy in shard order is the one kept. Only
    `score_fields` of the config change the scores; `score_fingerprint` hashes just those, so a
    threshold change re-runs select / mark over stored scores without recomputing them."""

    score_fields: ClassVar[tuple[str, ...]] = ()
    score_columns: ClassVar[tuple[str, ...]] = ()
    # Score columns kept in the score stage for re-runs but too heavy / internal to publish.
    heavy_columns: ClassVar[tuple[str, ...]] = ()

    def score_config(self) -> dict:
        dumped = self.config.model_dump(mode="json")
        return {k: dumped[k] for k in self.score_fields}

    def score_fingerprint(self, *input_fingerprints: str) -> str:
        return stable_hash(self.name, self.version, "score", self.score_config(), list(input_fingerprints))

    def __call__(self, df: pl.DataFrame) -> pl.DataFrame:
        """Default score phase: nothing to compute per shard (select reads existing columns)."""
        return df

    def select_columns(self) -> list[str]:
        """Columns select() reads from every shard (besides `id`)."""
        return list(self.score_columns)

    def select(self, scores: pl.DataFrame | pl.LazyFrame) -> pl.DataFrame:  # pragma: no cover - abstract
        """One row per input row, in order: `id`, `_reason` (null = keep) and optional decision columns."""
        raise NotImplementedError

    def mark(self, df: pl.DataFrame, decisions: pl.DataFrame) -> pl.DataFrame:
        """AND-combine this shard's decisions (its slice of select()'s output) into keep / drop_reason."""
        require_ids(df, self.name)
        if decisions.height != df.height or not decisions["id"].equals(df["id"].cast(pl.Utf8), check_names=False):
            raise StepError(
                f"{self.name} decisions do not line up with this shard ({decisions.height} decisions "
                f"for {df.height} rows, or ids in another order)", column="id",
                fix="pass select() the scores of all shards concatenated in shard order, then give each "
                    "shard its slice (alignforge.step.shard_decisions)")
        extra = decisions.drop(["id", "_reason"])
        out = df.drop([c for c in extra.columns if c in df.columns]).hstack(extra)
        return carry_drops(out, decisions["_reason"])

    def run(self, df: pl.DataFrame) -> pl.DataFrame:
        """Score, select and mark one in-memory frame (all rows at once)."""
        scored = self(df)
        return self.mark(scored, self.select(scored))


def shard_decisions(decisions: pl.DataFrame, shard_heights: list[int]) -> list[pl.DataFrame]:
    """Cut select()'s output (rows in concatenated shard order) back into per-shard slices."""
    if sum(shard_heights) != decisions.height:
        raise StepError(f"shard heights sum to {sum(shard_heights)} but there are {decisions.height} decisions",
                        fix="select() must return exactly one decision per input row")
    out, offset = [], 0
    for h in shard_heights:
        out.append(decisions.slice(offset, h))
        offset += h
    return out


def require_ids(df: pl.DataFrame | pl.LazyFrame, step_name: str) -> None:
    columns = df.collect_schema().names() if isinstance(df, pl.LazyFrame) else df.columns
    if "id" not in columns:
        raise StepError(f"{step_name} needs a row id to decide across shards, but there is no 'id' column",
                        column="id",
                        fix="load the data with schemas.mapping.load_rows (it assigns ids) or add a unique 'id' column")


def ordered_scores(scores: pl.DataFrame | pl.LazyFrame, columns: list[str], step_name: str) -> pl.DataFrame:
    """All rows' score columns in a canonical order (by id, then appearance) so decisions do not
    depend on how rows were split into shards. `_pos` is the row's input position; return
    decisions in that order."""
    require_ids(scores, step_name)
    lf = scores.lazy() if isinstance(scores, pl.DataFrame) else scores
    names = lf.collect_schema().names()
    missing = [c for c in columns if c not in names]
    if missing:
        raise StepError(f"{step_name}.select needs the score columns {missing}, which are missing",
                        column=missing[0], fix=f"run the {step_name} score phase on every shard before select()")
    return (lf.select(["id", *columns]).with_columns(pl.col("id").cast(pl.Utf8)).with_row_index("_pos")
            .sort(["id", "_pos"]).collect())
