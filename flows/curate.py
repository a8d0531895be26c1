"""Recipe curate: filter an existing dataset (ours or a user file) and publish what survives.

    alignforge run curate --set input=runs/x/publish --set zipfit.enabled=true \
        --set zipfit.target=target.parquet --set zipfit.top_k=5000 --set minhash.threshold=0.7

input -> heuristics (per shard) -> minhash -> semdedup -> zipfit -> <out>/publish

`input` is a published alignforge folder (data/*.parquet), a committed stage folder, or a user
parquet / jsonl / json file or folder, read with schemas.mapping.load_rows(input, mapping=...,
kind=...): e.g. `--set mapping.instruction=question --set mapping.response=answer`.

Each global filter runs as two stages: `<name>_score` (per shard; its fingerprint covers only the
parameters the scores depend on) and `<name>` (select over all shards, then mark each shard).
Changing a threshold / top_k / budget re-runs only the second stage; signatures, compressed
lengths and embeddings are read back from the committed score stage. Later filters only see rows
earlier ones kept, so a rejected row can never be the "original" a duplicate is dropped for.

Extension point: FILTERS lists (params section, builder); add one entry (and a section in
CurateParams) to plug in another filter, e.g. Deita scoring as `deita.*` params.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal, NamedTuple

import polars as pl
from prefect import flow
from pydantic import BaseModel, ConfigDict, Field

from alignforge.step import GlobalStep as GlobalFilter, shard_decisions
from filters.deita import DeitaFilter, DeitaFilterConfig
from filters.heuristics import Heuristics, HeuristicsConfig
from filters.minhash import MinHashConfig, MinHashDedup
from filters.semdedup import SemDedup, SemDedupConfig
from filters.zipfit import ZipFit, ZipFitConfig
from schemas import stable_hash
from alignforge.step import Step

# Score columns too heavy or internal to publish (they stay in the score stages for re-runs).
HEAVY_COLUMNS = ("minhash_signature", "semdedup_embedding", "deita_embedding")


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    def filter_config(self, config_type: type) -> Any:
        return config_type(**self.model_dump(exclude={"enabled"}, exclude_none=False))


class HeuristicsParams(HeuristicsConfig):
    enabled: bool = True

    def filter_config(self, config_type: type = HeuristicsConfig) -> Any:
        return config_type(**self.model_dump(exclude={"enabled"}))


class MinHashParams(MinHashConfig):
    enabled: bool = True

    def filter_config(self, config_type: type = MinHashConfig) -> Any:
        return config_type(**self.model_dump(exclude={"enabled"}))


class SemDedupParams(SemDedupConfig):
    enabled: bool = False

    def filter_config(self, config_type: type = SemDedupConfig) -> Any:
        return config_type(**self.model_dump(exclude={"enabled"}))


class ZipFitParams(_Section):
    """ZIP-FIT needs a target set, so it is off unless enabled with a target."""
    enabled: bool = False
    target: str | None = Field(None, description="target texts: parquet / jsonl / json / txt")
    on: Literal["instruction", "conversation"] = "conversation"
    compressor: Literal["zlib", "gzip", "lz4"] = "zlib"
    level: int = 6
    top_k: int | None = None
    token_budget: int | None = None
    min_alignment: float | None = None
    workers: int | None = None

    def filter_config(self, config_type: type = ZipFitConfig) -> Any:
        values = self.model_dump(exclude={"enabled"})
        if values["workers"] is None:
            values.pop("workers")
        return config_type(**values)


class DeitaParams(DeitaFilterConfig):
    """Deita complexity x quality + diversity; needs the scorer LLM (vLLM), so off by default."""
    enabled: bool = False

    def filter_config(self, config_type: type = DeitaFilterConfig) -> Any:
        return config_type(**self.model_dump(exclude={"enabled"}))


class CurateParams(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    input: str = Field(..., description="published folder, stage folder, or parquet/jsonl file(s) to curate")
    mapping: dict[str, str] | None = Field(None, description="{our_column: their_column} for load_rows")
    kind: Literal["sft", "instructions", "preference"] = "sft"
    shard_size: int = Field(5000, ge=1, description="rows per shard (unit of parallel scoring and resume)")
    heuristics: HeuristicsParams = HeuristicsParams()
    minhash: MinHashParams = MinHashParams()
    semdedup: SemDedupParams = SemDedupParams()
    zipfit: ZipFitParams = ZipFitParams()
    deita: DeitaParams = DeitaParams()
    test_size: float = Field(0.0, ge=0.0, lt=1.0)
    seed: int = 0
    out: str = Field("runs/curate", description="run folder; the result is published to <out>/publish")


class FilterSpec(NamedTuple):
    section: str                      # CurateParams field holding its params (with `enabled`)
    build: Callable[[Any], Step]      # section params -> Step (GlobalFilter: score/select/mark)
    label: str


FILTERS: list[FilterSpec] = [
    FilterSpec("heuristics", lambda p: Heuristics(p.filter_config()), "heuristics"),
    FilterSpec("minhash", lambda p: MinHashDedup(p.filter_config()), "minhash near-dedup"),
    FilterSpec("semdedup", lambda p: SemDedup(p.filter_config()), "semantic dedup"),
    FilterSpec("zipfit", lambda p: ZipFit(p.filter_config()), "zip-fit selection"),
    FilterSpec("deita", lambda p: DeitaFilter(p.filter_config()), "deita score-first diverse selection"),
]


# ---------------------------------------------------------------- phases

class ScorePhase(Step):
    """A global filter's per-shard scoring as a Step whose fingerprint covers score fields only."""

    version: ClassVar[int] = 1

    def __init__(self, filt: GlobalFilter):
        self.filter = filt
        self.config = filt.config
        self.name = f"{filt.name}_score"  # type: ignore[misc]
        self.stats = {}

    def fingerprint(self, *input_fingerprints: str, engine_id: str | None = None) -> str:
        return self.filter.score_fingerprint(*input_fingerprints)

    def __call__(self, df: pl.DataFrame) -> pl.DataFrame:
        out = self.filter(df)
        self.stats = self.filter.stats
        return out


def select_and_mark(filt: GlobalFilter, scored: Any, run_url: str, *, desc: str) -> Any:
    """Select over all kept rows of `scored`, mark each shard, commit `<run>/stages/<name>-<fp>`."""
    import storage
    from flows.runner import commit_global, fingerprint_of, stage_summary, stage_url, summary_line, _say, write_marked_shard

    input_fp = fingerprint_of(scored)
    fingerprint = filt.fingerprint(input_fp)
    out = storage.ShardedDataset(stage_url(run_url, filt.name, fingerprint))
    if out.committed:
        _say(summary_line(desc, stage_summary(out), cached=True))
        return out
    started = time.perf_counter()
    indices = scored.shard_indices()
    shards = {i: scored.read_shard(i) for i in indices}
    columns = ["id", *filt.score_columns]
    extra = [getattr(filt.config, "order_by", None)]
    columns += [c for c in extra if c]
    all_scores = (pl.concat([shards[i].select([c for c in columns if c in shards[i].columns]) for i in indices],
                            how="diagonal_relaxed")
                  if indices else pl.DataFrame({"id": []}, schema={"id": pl.Utf8}))
    decisions = filt.select(all_scores)
    select_seconds = time.perf_counter() - started
    slices = shard_decisions(decisions, [shards[i].height for i in indices])
    done = set(out.shard_indices())
    for i, part in zip(indices, slices):
        if i in done:
            continue
        t0 = time.perf_counter()
        marked = filt.mark(shards[i], part).drop([c for c in HEAVY_COLUMNS if c in shards[i].columns])
        write_marked_shard(out, i, marked, rows_in=marked.height, started=t0)
    commit_global(out, name=filt.name, version=filt.version, config=filt.config.model_dump(mode="json"),
                  fingerprint=fingerprint, input_fp=input_fp, started=started, select_seconds=select_seconds,
                  label=desc, extra={"select_stats": filt.stats})
    return out


def _read_input(params: CurateParams) -> pl.DataFrame:
    from schemas.mapping import load_rows

    path = Path(params.input)
    if path.is_dir() and (path / "data").is_dir():  # our published layout: data/{train,test}-*.parquet
        files = sorted((path / "data").glob("*.parquet"))
        if not files:
            raise FileNotFoundError(f"curate input {params.input!r} has a data/ folder without parquet files")
        frame = pl.concat([pl.read_parquet(f) for f in files], how="diagonal_relaxed")
        return load_rows(frame, mapping=params.mapping, kind=params.kind, dataset=params.input)
    if path.is_dir() and (path / "_manifest.json").exists():  # a committed stage folder
        import storage

        frame = storage.ShardedDataset(str(path)).read()
        return load_rows(frame, mapping=params.mapping, kind=params.kind, dataset=params.input)
    return load_rows(params.input, mapping=params.mapping, kind=params.kind)


def input_dataset(params: CurateParams, run_url: str) -> Any:
    """The input rows as a committed sharded stage (resumable; fingerprint = content of the rows)."""
    import storage
    from flows.runner import stage_url

    rows = _read_input(params)
    fingerprint = stable_hash("curate_input", 1, rows["id"].to_list(), sorted(rows.columns), params.shard_size)
    ds = storage.ShardedDataset(stage_url(run_url, "input", fingerprint))
    if ds.committed:
        return ds
    if "keep" not in rows.columns:
        rows = rows.with_columns(pl.lit(True).alias("keep"), pl.lit(None, dtype=pl.Utf8).alias("drop_reason"))
    done = set(ds.shard_indices())
    for i, start in enumerate(range(0, max(rows.height, 1), params.shard_size)):
        if i in done:
            continue
        part = rows.slice(start, params.shard_size)
        drops = part.filter(~pl.col("keep").fill_null(True))["drop_reason"].value_counts()
        ds.write_shard(i, part, stats={"rows_in": part.height, "rows_out": int(part["keep"].fill_null(True).sum()),
                                       "dropped": {r: int(n) for r, n in drops.iter_rows()},
                                       "generated_tokens": 0, "seconds": 0.0})
    ds.commit(storage.build_manifest(step_name="input", step_version=1,
                                     config={"input": params.input, "mapping": params.mapping, "kind": params.kind,
                                             "shard_size": params.shard_size},
                                     fingerprint=fingerprint, input_fingerprints=[], engine_models=[], dataset=ds,
                                     timings={"seconds": 0.0}))
    return ds


@flow(name="curate", log_prints=False)
def curate(params: CurateParams | dict | None = None) -> dict:
    """Score, select and mark with every enabled filter, then publish kept rows with rejected/."""
    import storage
    from flows.runner import run_step, stage_summary

    params = params if isinstance(params, CurateParams) else CurateParams(**(params or {}))
    run = params.out.rstrip("/")
    current = input_dataset(params, run)
    stages: dict[str, Any] = {"input": current}
    for spec in FILTERS:
        section = getattr(params, spec.section)
        if not section.enabled:
            continue
        step = spec.build(section)
        if isinstance(step, GlobalFilter):
            scored = run_step(ScorePhase(step), current, run, desc=f"{spec.label} (score)")
            stages[f"{spec.section}_score"] = scored
            current = select_and_mark(step, scored, run, desc=spec.label)
            if hasattr(step, "close"):
                step.close()
        else:
            current = run_step(step, current, run, desc=spec.label)
        stages[spec.section] = current

    drops_by_stage = {name: stage_summary(ds)["dropped"] for name, ds in stages.items()}
    drops: dict[str, int] = {}
    for per_stage in drops_by_stage.values():
        for reason, count in per_stage.items():
            drops[reason] = drops.get(reason, 0) + count
    kept = current.read()
    kept = kept.drop([c for c in HEAVY_COLUMNS if c in kept.columns]).sort("id")
    rejected = [ds.read(rejected=True) for ds in stages.values()]
    rejected = [r.drop([c for c in HEAVY_COLUMNS if c in r.columns]) for r in rejected if r.height]
    rejected_rows = pl.concat(rejected, how="diagonal_relaxed") if rejected else None
    card = {
        "title": "Curated dataset (alignforge)",
        "recipe": "curate",
        "method": "filters: " + ", ".join(s.label for s in FILTERS if getattr(params, s.section).enabled),
        "params": params.model_dump(mode="json"),
        "lineage": {name: ds.manifest() for name, ds in stages.items()},
        "drop_stats": drops,
    }
    publish_url = f"{run}/publish"
    storage.publish(publish_url, configs={"default": kept}, rejected=rejected_rows, test_size=params.test_size,
                    seed=params.seed, card=card)
    rows_in = stage_summary(stages["input"])["rows_in"]
    return {"dataset": publish_url, "rows_kept": kept.height, "rows_requested": rows_in,
            "dropped": dict(sorted(drops.items())), "dropped_by_filter": drops_by_stage}
