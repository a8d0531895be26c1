"""Map steps over sharded datasets, resumably. Prefect wiring only: no row logic here.

Layout of a run folder:

    <run>/stages/<step.name>-<fingerprint[:12]>/part-NNNNN.parquet, rejected/, _manifest.json
    <run>/.prefect/                  Prefect task results (cache key = stage fingerprint)

The fingerprint hashes the step (name, version, config), the input's fingerprint and the engine's
model id: a config change gets a new folder and recomputes; an unchanged one resumes, skipping
committed shards, and a committed stage (manifest present) is not touched at all.
"""

from __future__ import annotations

import os
import sys
import time
from collections import Counter
from typing import Any, Callable, Mapping

import polars as pl

from schemas import row_id, stable_hash
from alignforge.step import Step

SEEDS_ORIGIN = "seeds@1"


# ---------------------------------------------------------------- engine handle

class LazyEngine:
    """An engine handle that starts the real engine (vLLM, ~25 s) only when generation is asked for.

    `model_id` and `tokenizer` work without starting it, so fingerprints, template checks and
    fully cached reruns never pay the engine start-up."""

    def __init__(self, model: str | None = None, **options: Any):
        self.model = model
        self.options = options
        self._engine = None
        self._tokenizer = None

    @property
    def model_id(self) -> str:
        from engines.embedded import EMBEDDED_MODEL_NAME

        # Stable across machines: the embedded model by name, not by its cache path.
        return EMBEDDED_MODEL_NAME if self.model in (None, "", "embedded") else str(self.model)

    @property
    def started(self) -> bool:
        return self._engine is not None

    def get(self):
        if self._engine is None:
            try:
                from engines import get_engine
            except ImportError:  # older engines package: no process cache, build one directly
                from engines.vllm_engine import VLLMEngine as get_engine
            self._engine = get_engine(self.model, **self.options)
        return self._engine

    @property
    def tokenizer(self):
        if self._engine is not None:
            return self._engine.tokenizer
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            from engines.embedded import resolve_model

            self._tokenizer = AutoTokenizer.from_pretrained(resolve_model(self.model))
        return self._tokenizer

    @property
    def stats(self):
        return getattr(self._engine, "stats", None)

    def complete(self, *args, **kwargs):
        return self.get().complete(*args, **kwargs)

    def chat(self, *args, **kwargs):
        return self.get().chat(*args, **kwargs)

    def next_token_logprobs(self, *args, **kwargs):
        return self.get().next_token_logprobs(*args, **kwargs)

    def shutdown(self) -> None:
        if self._engine is not None:
            self._engine.shutdown()
            self._engine = None


def _engine_id(engine: Any) -> str | None:
    return None if engine is None else str(getattr(engine, "model_id", None) or type(engine).__name__)


# ---------------------------------------------------------------- helpers

def _storage():
    import storage

    return storage


def _join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def stage_url(run_url: str, name: str, fingerprint: str) -> str:
    return _join(run_url, "stages", f"{name}-{fingerprint[:12]}")


def fingerprint_of(ds: Any) -> str:
    manifest = ds.manifest()
    if not manifest:
        raise RuntimeError(f"input dataset {getattr(ds, 'url', ds)} is not committed (no _manifest.json): "
                           "finish the stage that writes it first")
    return str(manifest["fingerprint"])


def _quiet() -> bool:
    return os.environ.get("ALIGNFORGE_QUIET") == "1"


def _say(line: str) -> None:
    if not _quiet():
        print(line, file=sys.stderr, flush=True)


def _count_drops(df: pl.DataFrame) -> dict[str, int]:
    if "keep" not in df.columns:
        return {}
    dropped = df.filter(~pl.col("keep").fill_null(True))
    reasons = dropped["drop_reason"].fill_null("unspecified") if "drop_reason" in dropped.columns else \
        pl.Series(["unspecified"] * dropped.height)
    return dict(Counter(reasons.to_list()))


def stage_summary(ds: Any) -> dict[str, Any]:
    """Totals over a stage's shard stats: rows in/out, drops by reason, tokens, seconds."""
    totals: dict[str, Any] = {"rows_in": 0, "rows_out": 0, "generated_tokens": 0, "seconds": 0.0}
    drops: Counter = Counter()
    for stats in ds.shard_stats().values():
        stats = stats or {}
        for key in ("rows_in", "rows_out", "generated_tokens"):
            totals[key] += int(stats.get(key, 0) or 0)
        totals["seconds"] += float(stats.get("seconds", 0.0) or 0.0)
        drops.update(stats.get("dropped", {}) or {})
    totals["dropped"] = dict(sorted(drops.items()))
    totals["tokens_per_s"] = totals["generated_tokens"] / totals["seconds"] if totals["seconds"] else 0.0
    return totals


def summary_line(name: str, summary: Mapping[str, Any], *, cached: bool = False) -> str:
    drops = ", ".join(f"{k} {v}" for k, v in summary["dropped"].items()) or "none"
    line = (f"[{name}] rows in {summary['rows_in']} -> out {summary['rows_out']}; dropped: {drops}; "
            f"{summary['seconds']:.1f}s")
    if summary["generated_tokens"]:
        line += f"; {summary['generated_tokens']} tokens, {summary['tokens_per_s']:.1f} tok/s"
    return line + (" (cached)" if cached else "")


# ---------------------------------------------------------------- sources

def seed_shards(n: int, shard_size: int, run_url: str) -> Any:
    """The seed dataset: `n` rows with `seed` 0..n-1, `shard_size` per shard; deterministic."""
    storage = _storage()
    if n < 0 or shard_size < 1:
        raise ValueError(f"seed_shards: need n >= 0 and shard_size >= 1 (got n={n}, shard_size={shard_size})")
    fingerprint = stable_hash("seeds", 1, n, shard_size)
    ds = storage.ShardedDataset(stage_url(run_url, "seeds", fingerprint))
    if ds.committed:
        return ds
    done = set(ds.shard_indices())
    for i, start in enumerate(range(0, n, shard_size)):
        if i in done:
            continue
        seeds = list(range(start, min(n, start + shard_size)))
        df = pl.DataFrame({
            "id": [row_id(SEEDS_ORIGIN, s) for s in seeds],
            "parent_id": pl.Series([None] * len(seeds), dtype=pl.Utf8),
            "origin": [SEEDS_ORIGIN] * len(seeds),
            "seed": pl.Series(seeds, dtype=pl.Int64),
        })
        ds.write_shard(i, df, stats={"rows_in": 0, "rows_out": len(seeds), "generated_tokens": 0,
                                     "seconds": 0.0, "dropped": {}})
    ds.commit(storage.build_manifest(step_name="seeds", step_version=1, config={"n": n, "shard_size": shard_size},
                                     fingerprint=fingerprint, input_fingerprints=[], engine_models=[],
                                     dataset=ds, timings={"seconds": 0.0}))
    return ds


# ---------------------------------------------------------------- run one step over all shards

def step_fingerprint(step: Step, input_ds: Any, engine: Any = None) -> str:
    engine = engine if engine is not None else getattr(step, "engine", None)
    return step.fingerprint(fingerprint_of(input_ds), engine_id=_engine_id(engine))


def run_step(step: Step, input_ds: Any, run_url: str, *, desc: str | None = None, engine: Any = None) -> Any:
    """Map `step` over every committed shard of `input_ds` into `<run_url>/stages/<name>-<fp12>`.

    Resumable: shards already written are skipped; the manifest is committed last, and a committed
    output is returned untouched. `engine` (if given) is handed to the step. Prints one summary line."""
    storage = _storage()
    if engine is not None:
        step.engine = engine
    engine = getattr(step, "engine", None)
    input_fp = fingerprint_of(input_ds)
    fingerprint = step.fingerprint(input_fp, engine_id=_engine_id(engine))
    out = storage.ShardedDataset(stage_url(run_url, step.name, fingerprint))
    label = desc or step.name
    if out.committed:
        _say(summary_line(label, stage_summary(out), cached=True))
        return out

    started = time.perf_counter()
    todo = [i for i in input_ds.shard_indices() if i not in set(out.shard_indices())]
    for i in _progress(todo, label):
        df_in = input_ds.read_shard(i)
        t0 = time.perf_counter()
        df_out = step(df_in)
        seconds = time.perf_counter() - t0
        drops = _count_drops(df_out)
        stats = {"rows_in": df_in.height, "rows_out": df_out.height - sum(drops.values()), "dropped": drops,
                 "generated_tokens": int((getattr(step, "stats", None) or {}).get("generated_tokens", 0) or 0),
                 "seconds": round(seconds, 3)}
        out.write_shard(i, df_out, stats=stats)
    summary = stage_summary(out)
    out.commit(storage.build_manifest(
        step_name=step.name, step_version=step.version, config=step.config.model_dump(mode="json"),
        fingerprint=fingerprint, input_fingerprints=[input_fp],
        engine_models=[_engine_id(engine)] if engine is not None else [], dataset=out,
        timings={"seconds": round(time.perf_counter() - started, 3), "step_seconds": round(summary["seconds"], 3)},
        extra={"summary": summary}))
    _say(summary_line(label, summary))
    return out


def _progress(items: list, label: str):
    if _quiet() or len(items) <= 1:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=f"{label} shards", unit="shard", file=sys.stderr, leave=False)


# ---------------------------------------------------------------- global selections

def run_global(name: str, select: Callable[[pl.LazyFrame], pl.DataFrame], input_ds: Any, run_url: str, *,
               config: Mapping[str, Any] | Any = None, version: int = 1, desc: str | None = None) -> Any:
    """A selection over ALL rows (dedup clusters, budgets, top-k), then marked per shard.

    `select(lazy_frame_of_all_kept_rows)` returns a DataFrame with `id`, `keep` (bool) and
    `drop_reason`, plus optional extra columns (e.g. `minhash_cluster`) joined onto the rows.
    Rows absent from the selection keep their state. Output: `<run>/stages/<name>-<fp12>`;
    fingerprint = hash(name, version, config, input fingerprint). Resumable like run_step."""
    storage = _storage()
    if hasattr(config, "model_dump"):
        config = config.model_dump(mode="json")
    config = dict(config or {})
    input_fp = fingerprint_of(input_ds)
    fingerprint = stable_hash(name, version, config, [input_fp], None)
    out = storage.ShardedDataset(stage_url(run_url, name, fingerprint))
    label = desc or name
    if out.committed:
        _say(summary_line(label, stage_summary(out), cached=True))
        return out
    started = time.perf_counter()
    decisions = select(input_ds.scan())
    missing = {"id", "keep", "drop_reason"} - set(decisions.columns)
    if missing:
        raise ValueError(f"run_global {name!r}: the select function must return columns id, keep, drop_reason; "
                         f"missing {sorted(missing)}")
    decisions = decisions.rename({"keep": "_sel_keep", "drop_reason": "_sel_reason"})
    select_seconds = time.perf_counter() - started
    done = set(out.shard_indices())
    for i in input_ds.shard_indices():
        if i in done:
            continue
        t0 = time.perf_counter()
        df_in = input_ds.read_shard(i)
        extra_cols = [c for c in decisions.columns if c not in ("id", "_sel_keep", "_sel_reason") and c in df_in.columns]
        df = df_in.drop(extra_cols).join(decisions, on="id", how="left")
        old_keep = pl.col("keep").fill_null(True) if "keep" in df.columns else pl.lit(True)
        old_reason = pl.col("drop_reason") if "drop_reason" in df.columns else pl.lit(None, dtype=pl.Utf8)
        df = df.with_columns(
            (old_keep & pl.col("_sel_keep").fill_null(True)).alias("keep"),
            pl.when(~old_keep).then(old_reason)
            .when(~pl.col("_sel_keep").fill_null(True)).then(pl.col("_sel_reason").fill_null(name))
            .otherwise(None).cast(pl.Utf8).alias("drop_reason"),
        ).drop("_sel_keep", "_sel_reason")
        write_marked_shard(out, i, df, rows_in=df_in.height, started=t0)
    commit_global(out, name=name, version=version, config=config, fingerprint=fingerprint, input_fp=input_fp,
                  started=started, select_seconds=select_seconds, label=label)
    return out


def write_marked_shard(out: Any, index: int, df: pl.DataFrame, *, rows_in: int, started: float) -> None:
    """Write one shard of a global phase (keep / drop_reason already marked) with its stats."""
    drops = _count_drops(df)
    out.write_shard(index, df, stats={"rows_in": rows_in, "rows_out": df.height - sum(drops.values()),
                                      "dropped": drops, "generated_tokens": 0,
                                      "seconds": round(time.perf_counter() - started, 3)})


def commit_global(out: Any, *, name: str, version: int, config: dict, fingerprint: str, input_fp: str,
                  started: float, select_seconds: float, label: str, extra: dict | None = None) -> dict:
    """Commit a global phase's manifest (select time included) and print its summary line."""
    summary = stage_summary(out)
    summary["seconds"] += select_seconds
    out.commit(_storage().build_manifest(
        step_name=name, step_version=version, config=config, fingerprint=fingerprint,
        input_fingerprints=[input_fp], engine_models=[], dataset=out,
        timings={"seconds": round(time.perf_counter() - started, 3), "select_seconds": round(select_seconds, 3)},
        extra={"summary": summary, **(extra or {})}))
    _say(summary_line(label, summary))
    return summary


# ---------------------------------------------------------------- Prefect tasks (cache key = fingerprint)

def _result_storage(run_url: str):
    if "://" in run_url and not run_url.startswith("file://"):
        return None  # remote run folder: Prefect's default result storage
    from prefect.filesystems import LocalFileSystem

    path = os.path.join(os.path.abspath(run_url.removeprefix("file://")), ".prefect")
    # Prefect 3 wants result storage saved server-side: one block per run folder, named by its path.
    name = f"alignforge-run-{stable_hash(path, length=12)}"
    try:
        LocalFileSystem(basepath=path).save(name, overwrite=True)
    except Exception as exc:  # the run still works, its task results then live in Prefect's default storage
        _say(f"[prefect] could not register result storage at {path} ({type(exc).__name__}); using the default")
        return None
    return f"local-file-system/{name}"


def _step_cache_key(context, parameters: dict) -> str | None:
    """Stage fingerprint, but only while its output is committed: a deleted folder recomputes."""
    storage = _storage()
    step, input_url, run_url = parameters["step"], parameters["input_url"], parameters["run_url"]
    input_ds = storage.ShardedDataset(input_url)
    if not input_ds.committed:
        return None
    fingerprint = step_fingerprint(step, input_ds, parameters.get("engine"))
    return fingerprint if storage.ShardedDataset(stage_url(run_url, step.name, fingerprint)).committed else None


def _global_cache_key(context, parameters: dict) -> str | None:
    storage = _storage()
    input_ds = storage.ShardedDataset(parameters["input_url"])
    if not input_ds.committed:
        return None
    config = parameters.get("config")
    if hasattr(config, "model_dump"):
        config = config.model_dump(mode="json")
    fingerprint = stable_hash(parameters["name"], parameters.get("version", 1), dict(config or {}),
                              [fingerprint_of(input_ds)], None)
    url = stage_url(parameters["run_url"], parameters["name"], fingerprint)
    return fingerprint if storage.ShardedDataset(url).committed else None


def _step_task_fn(step: Step, input_url: str, run_url: str, desc: str | None = None, engine: Any = None) -> dict:
    ds = run_step(step, _storage().ShardedDataset(input_url), run_url, desc=desc, engine=engine)
    _artifact(desc or step.name, ds)
    return {"url": ds.url if hasattr(ds, "url") else str(ds), "manifest": ds.manifest()}


def _global_task_fn(name: str, select: Callable, input_url: str, run_url: str, config: Any = None,
                    version: int = 1, desc: str | None = None) -> dict:
    ds = run_global(name, select, _storage().ShardedDataset(input_url), run_url, config=config, version=version,
                    desc=desc)
    _artifact(desc or name, ds)
    return {"url": ds.url if hasattr(ds, "url") else str(ds), "manifest": ds.manifest()}


def _artifact(label: str, ds: Any) -> None:
    """A Prefect markdown artifact per stage: kept / dropped by reason, throughput."""
    try:
        from prefect.artifacts import create_markdown_artifact
        from prefect.context import TaskRunContext

        if TaskRunContext.get() is None:
            return
        s = stage_summary(ds)
        rows = "\n".join(f"| {k} | {v} |" for k, v in s["dropped"].items()) or "| (none) | 0 |"
        create_markdown_artifact(
            key=_artifact_key(label),
            markdown=(f"### {label}\n\nrows in {s['rows_in']}, kept {s['rows_out']}, "
                      f"{s['generated_tokens']} tokens in {s['seconds']:.1f}s ({s['tokens_per_s']:.1f} tok/s)\n\n"
                      f"| drop reason | rows |\n|---|---|\n{rows}\n"),
            description=f"alignforge stage {label}")
    except Exception:  # artifacts are observability only; never fail a stage over them
        pass


def _artifact_key(label: str) -> str:
    import re

    return re.sub(r"[^a-z0-9-]+", "-", label.lower()).strip("-") or "stage"


def step_task(step: Step, input_ds: Any, run_url: str, *, desc: str | None = None, engine: Any = None) -> Any:
    """run_step as a Prefect task (cache key = stage fingerprint, results in <run>/.prefect)."""
    from prefect import task

    storage = _storage()
    fn = task(_step_task_fn, name=desc or step.name, cache_key_fn=_step_cache_key, persist_result=True,
              result_storage=_result_storage(run_url), log_prints=False)
    result = fn(step, input_ds.url, run_url, desc=desc, engine=engine)
    return storage.ShardedDataset(result["url"])


def global_task(name: str, select: Callable, input_ds: Any, run_url: str, *, config: Any = None, version: int = 1,
                desc: str | None = None) -> Any:
    """run_global as a Prefect task (cache key = its fingerprint)."""
    from prefect import task

    storage = _storage()
    fn = task(_global_task_fn, name=desc or name, cache_key_fn=_global_cache_key, persist_result=True,
              result_storage=_result_storage(run_url), log_prints=False)
    result = fn(name, select, input_ds.url, run_url, config=config, version=version, desc=desc)
    return storage.ShardedDataset(result["url"])
