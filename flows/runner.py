"""One runner for every recipe and every step kind. Prefect wiring only: no row logic here.

Layout of a run folder:

    <run>/stages/<step.name>-<fingerprint[:12]>/part-NNNNN.parquet, rejected/, _stats/, _manifest.json
    <run>/publish/                   the published dataset (storage.publish)

Fingerprint rule (one for all steps): hash(step name, version, config, input fingerprint, engine
model id). A source's fingerprint covers its content (seed count, or the input file's bytes), so
an edited input recomputes. A config change gets a new folder; an unchanged one resumes, skipping
committed shards; a committed stage (manifest present) is not touched at all.

Step kinds:
- map steps: each shard -> one output shard. CPU steps map their shards as Prefect tasks on the
  flow's task runner (`workers` threads, or Ray tasks with --executor ray); engine steps send whole
  shards to the engine one after another (the engine batches a shard per call; on Ray, to an actor
  pool of engines: flows.executors). Output is the same whatever `workers` or the executor is.
- global steps: score per shard (a map stage whose fingerprint covers only the score fields) ->
  select over all kept rows (one task) -> mark per shard.
Every shard's stats (rows in / kept / dropped by reason, seconds, ALL of `step.stats`) land in
`_stats/` and are summed into the manifest.
"""

from __future__ import annotations

import copy
import hashlib
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Mapping

import polars as pl

from alignforge.step import GlobalStep, Step, shard_decisions
from schemas import row_id, stable_hash

SEEDS_ORIGIN = "seeds@1"
# Set by the CLI: its SIGINT / SIGTERM handler, re-armed inside the flow (Prefect's flow engine
# swaps in its own SIGTERM bridge while a flow runs).
SIGNAL_HANDLER: Any = None
# Score columns kept in score stages (for re-selection) but never published.
HEAVY_COLUMNS = ("minhash_signature", "semdedup_embedding", "deita_embedding")


# ---------------------------------------------------------------- small helpers

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


def engine_id(engine: Any) -> str | None:
    """What fingerprints record for an engine: model id + the identity of its files (template, weights)."""
    if engine is None:
        return None
    name = engine_name(engine)
    identity = getattr(engine, "identity", None)
    return f"{name}#{identity}" if identity else name


def engine_name(engine: Any) -> str | None:
    return None if engine is None else str(getattr(engine, "model_id", None) or type(engine).__name__)


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
    spans: list[tuple[float, float]] = []
    shard_stats = ds.shard_stats()  # one read of every shard's stats file
    for stats in shard_stats.values():
        stats = stats or {}
        for key in ("rows_in", "rows_out", "generated_tokens"):
            totals[key] += int(stats.get(key, 0) or 0)
        totals["seconds"] += float(stats.get("seconds", 0.0) or 0.0)
        drops.update(stats.get("dropped", {}) or {})
        if stats.get("ended_at") is not None:
            spans.append((float(stats["ended_at"]) - float(stats.get("seconds", 0.0) or 0.0), float(stats["ended_at"])))
    if spans and len(spans) == len(shard_stats):
        totals["seconds"] = _covered(spans)  # shards that ran at once count once
    totals["dropped"] = dict(sorted(drops.items()))
    totals["tokens_per_s"] = totals["generated_tokens"] / totals["seconds"] if totals["seconds"] else 0.0
    return totals


def _covered(spans: list[tuple[float, float]]) -> float:
    """Seconds covered by the union of (start, end) intervals."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(spans):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def summary_line(name: str, summary: Mapping[str, Any], *, cached: bool = False) -> str:
    drops = ", ".join(f"{k} {v}" for k, v in summary["dropped"].items()) or "none"
    line = (f"[{name}] rows in {summary['rows_in']} -> out {summary['rows_out']}; dropped: {drops}; "
            f"{summary['seconds']:.1f}s")
    if summary["generated_tokens"]:
        line += f"; {summary['generated_tokens']} tokens, {summary['tokens_per_s']:.1f} tok/s"
    return line + (" (cached)" if cached else "")


def _shard_stats(rows_in: int, df: pl.DataFrame, seconds: float, step_stats: Mapping[str, Any] | None) -> dict:
    drops = _count_drops(df)
    step_stats = dict(step_stats or {})
    return {"rows_in": rows_in, "rows_out": df.height - sum(drops.values()), "dropped": drops,
            "generated_tokens": int(step_stats.get("generated_tokens", 0) or 0), "seconds": round(seconds, 3),
            "ended_at": round(time.time(), 3), "step": step_stats}


def _commit(out: Any, *, name: str, version: int, config: Any, fingerprint: str, input_fps: list[str],
            engines: list[str], started: float, expected: list[int] | None, label: str,
            extra: Mapping[str, Any] | None = None) -> Any:
    storage = _storage()
    summary = stage_summary(out)
    kwargs = {"expected_shards": expected} if expected is not None else {}
    out.commit(storage.build_manifest(
        step_name=name, step_version=version, config=config, fingerprint=fingerprint,
        input_fingerprints=input_fps, engine_models=engines, dataset=out,
        timings={"seconds": round(time.perf_counter() - started, 3), "step_seconds": round(summary["seconds"], 3)},
        extra={"summary": summary, **(extra or {})}), **kwargs)
    _say(summary_line(label, summary))
    _artifact(label, out)
    return out


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
    expected = []
    for i, start in enumerate(range(0, n, shard_size)):
        expected.append(i)
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
                                     dataset=ds, timings={"seconds": 0.0}), expected_shards=expected)
    return ds


def content_hash(path: str) -> str:
    """Hash of a file's or folder's bytes (names + contents, sorted): an edited row recomputes."""
    h = hashlib.blake2b(digest_size=16)
    p = Path(path)
    files = sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith(".")) if p.is_dir() else [p]
    for f in files:
        h.update(str(f.relative_to(p) if p.is_dir() else f.name).encode())
        with open(f, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _read_input(path: str, mapping: Any, kind: str) -> pl.DataFrame:
    from schemas.mapping import load_rows

    folder = Path(path)
    if folder.is_dir() and (folder / "data").is_dir():  # our published layout: data/{train,test}-*.parquet
        files = sorted((folder / "data").glob("*.parquet"))
        if not files:
            from schemas import SchemaError

            raise SchemaError(f"input {path!r} has a data/ folder without parquet files", dataset=path,
                              fix="point --set input= at a published alignforge folder, a parquet or jsonl file")
        frame = pl.concat([pl.read_parquet(f) for f in files], how="diagonal_relaxed")
        return load_rows(frame, mapping=mapping, kind=kind, dataset=path)
    if folder.is_dir() and (folder / "_manifest.json").exists():  # a committed stage folder
        frame = _storage().ShardedDataset(str(folder)).read()
        return load_rows(frame, mapping=mapping, kind=kind, dataset=path)
    return load_rows(path, mapping=mapping, kind=kind)


def input_stage(spec: Any, shard_size: int, run_url: str) -> Any:
    """The recipe's input rows as a committed sharded stage; fingerprint = content of the input."""
    storage = _storage()
    if not spec.path:
        from flows.recipe import RecipeError

        raise RecipeError("the recipe reads input rows but no input path is set. Fix: --set input=FILE "
                          "(parquet / jsonl / json, or a published alignforge folder)")
    if "://" not in spec.path and not Path(spec.path).exists():
        from schemas import SchemaError

        raise SchemaError(f"input {spec.path!r} does not exist", dataset=spec.path,
                          fix="check the path given to --set input=")
    digest = content_hash(spec.path) if "://" not in spec.path else spec.path
    fingerprint = stable_hash("input", 2, digest, spec.mapping, spec.kind, shard_size)
    ds = storage.ShardedDataset(stage_url(run_url, "input", fingerprint))
    if ds.committed:
        return ds
    rows = _read_input(spec.path, spec.mapping, spec.kind)
    if "keep" not in rows.columns:
        rows = rows.with_columns(pl.lit(True).alias("keep"), pl.lit(None, dtype=pl.Utf8).alias("drop_reason"))
    done = set(ds.shard_indices())
    expected = list(range(max(1, -(-rows.height // shard_size))))
    for i in expected:
        if i in done:
            continue
        part = rows.slice(i * shard_size, shard_size)
        ds.write_shard(i, part, stats=_shard_stats(part.height, part, 0.0, None))
    ds.commit(storage.build_manifest(step_name="input", step_version=2, config=spec.model_dump(mode="json"),
                                     fingerprint=fingerprint, input_fingerprints=[], engine_models=[], dataset=ds,
                                     timings={"seconds": 0.0}, extra={"content_hash": digest}),
              expected_shards=expected)
    _say(summary_line("input", stage_summary(ds)))
    return ds


# ---------------------------------------------------------------- map steps

def _map_shard(step: Step, input_url: str, out_url: str, index: int) -> dict:
    """One shard through one step (a fresh shallow copy: per-shard stats, shared engine)."""
    storage = _storage()
    input_ds, out = storage.ShardedDataset(input_url), storage.ShardedDataset(out_url)
    df_in = input_ds.read_shard(index)
    worker = copy.copy(step)
    worker.stats = {}
    t0, wall0 = time.perf_counter(), time.time()
    df_out = worker(df_in)
    seconds = time.perf_counter() - t0
    span = getattr(getattr(step, "engine", None), "start_span", None)
    if span:  # the lazy engine started during this shard: that is not this step's work
        seconds -= max(0.0, min(span[1], time.time()) - max(span[0], wall0))
    drop = [c for c in getattr(step, "_drop_after", ()) if c in df_out.columns]
    if drop:
        df_out = df_out.drop(drop)
    return out.write_shard(index, df_out, stats=_shard_stats(df_in.height, df_out, max(0.0, seconds), worker.stats))


class ScorePhase(Step):
    """A global step's per-shard scoring as a map step whose fingerprint covers score fields only."""

    def __init__(self, step: GlobalStep):
        self.step = step
        self.config = step.config
        self.name = f"{step.name}_score"  # type: ignore[misc]
        self.version = step.version  # type: ignore[misc]
        self.stats = {}
        self.needs_engine = step.needs_engine  # type: ignore[misc]
        self.parallel_shards = getattr(step, "parallel_shards", True)
        if hasattr(step, "engine"):
            self.engine = step.engine

    def fingerprint(self, *input_fingerprints: str, engine_id: str | None = None) -> str:
        fingerprint = self.step.score_fingerprint(*input_fingerprints)
        return stable_hash(fingerprint, engine_id) if engine_id else fingerprint

    def __call__(self, df: pl.DataFrame) -> pl.DataFrame:
        worker = copy.copy(self.step)
        out = worker(df)
        self.stats = worker.stats
        return out


def run_map(step: Step, input_ds: Any, run_url: str, *, engine: Any = None, workers: int = 1,
            label: str | None = None, shards_in_flight: int = 1) -> Any:
    """Map `step` over every committed shard of `input_ds` into `<run>/stages/<name>-<fp12>`, resumably.

    `shards_in_flight`: shards an engine step runs at once when its engine takes concurrent calls
    (`engine.concurrent_calls`): their requests share the engine's running batch, so the engine is
    not left draining one shard's longest answer while the next shard waits."""
    storage = _storage()
    label = label or step.name
    input_fp = fingerprint_of(input_ds)
    uses_engine = engine is not None and (getattr(step, "needs_engine", False) or getattr(step, "engine", None) is not None)
    eid = engine_id(engine) if uses_engine else None
    fingerprint = step.fingerprint(input_fp, engine_id=eid)
    out = storage.ShardedDataset(stage_url(run_url, step.name, fingerprint))
    if out.committed:
        _say(summary_line(label, stage_summary(out), cached=True))
        return out
    started = time.perf_counter()
    indices = input_ds.shard_indices()
    done = set(out.shard_indices())
    todo = [i for i in indices if i not in done]
    from flows.executors import map_engine_shards, on_ray

    remote = on_ray()  # the flow's task runner is a Ray cluster's
    if uses_engine and remote:
        map_engine_shards(step, input_ds.url, out.url, todo)
    elif (uses_engine and shards_in_flight > 1 and len(todo) > 1 and getattr(engine, "concurrent_calls", False)
          and getattr(step, "parallel_shards", True)):  # False: the step also drives its own model
        _run_shards_in_flight(step, input_ds.url, out.url, todo, label, shards_in_flight)
    else:
        parallel = (workers > 1 or remote) and not uses_engine and getattr(step, "parallel_shards", True)
        _run_shards(step, input_ds.url, out.url, todo, label, parallel=parallel)
    return _commit(out, name=step.name, version=step.version, config=step.config.model_dump(mode="json"),
                   fingerprint=fingerprint, input_fps=[input_fp], engines=[engine_name(engine)] if eid else [], started=started,
                   expected=indices, label=label)


def _run_shards(step: Step, input_url: str, out_url: str, todo: list[int], label: str, *, parallel: bool) -> None:
    """Shards as Prefect tasks: mapped on the flow's task runner (CPU) or one after another (engine)."""
    task = _shard_task(label)
    if task is None:  # outside a Prefect flow (tests, library use): plain loop
        for i in _progress(todo, label):
            _map_shard(step, input_url, out_url, i)
        return
    if parallel and len(todo) > 1:
        futures = task.map(step, input_url, out_url, todo, _unmapped=True)
        for future in futures:
            future.result()
    else:
        for i in _progress(todo, label):
            task(step, input_url, out_url, i)


def _run_shards_in_flight(step: Step, input_url: str, out_url: str, todo: list[int], label: str, width: int) -> None:
    """Up to `width` shards at once in threads (each a Prefect task when in a flow), committed as
    each finishes; the first failure stops new shards and is raised once the running ones end."""
    import contextvars
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    call = _shard_task(label) or _map_shard
    bar = _shard_bar(len(todo), label)
    queue, running, error = list(todo), set(), None
    with ThreadPoolExecutor(max_workers=min(width, len(todo)), thread_name_prefix=f"{label}-shard") as pool:
        while running or (queue and error is None):
            while queue and error is None and len(running) < width:
                # Each thread runs in a copy of this context, so Prefect sees the flow run.
                running.add(pool.submit(contextvars.copy_context().run, call, step, input_url, out_url, queue.pop(0)))
            done, running = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                if future.exception() is not None and error is None:
                    error = future.exception()
                elif bar is not None:
                    bar.update(1)
    if bar is not None:
        bar.close()
    if error is not None:
        raise error


def _shard_task(label: str):
    try:
        from prefect.context import FlowRunContext
    except ImportError:  # pragma: no cover
        return None
    if FlowRunContext.get() is None:
        return None
    from prefect import task, unmapped
    from prefect.cache_policies import NO_CACHE

    fn = task(_map_shard, name=f"{label} shard", cache_policy=NO_CACHE, persist_result=False, log_prints=False)

    class _Mapped:
        def map(self, step, input_url, out_url, indices, _unmapped=True):
            return fn.map(unmapped(step), unmapped(input_url), unmapped(out_url), indices)

        def __call__(self, *args):
            return fn(*args)

    return _Mapped()


def _shard_bar(total: int, label: str):
    """A shards progress bar on stderr to update by hand; None when quiet or for one shard."""
    if _quiet() or total <= 1:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"{label} shards", unit="shard", file=sys.stderr, leave=False)


def _progress(items: list, label: str):
    if _quiet() or len(items) <= 1:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=f"{label} shards", unit="shard", file=sys.stderr, leave=False)


# ---------------------------------------------------------------- global steps

def run_global(step: GlobalStep, input_ds: Any, run_url: str, *, engine: Any = None, workers: int = 1,
               label: str | None = None, shards_in_flight: int = 1) -> Any:
    """Score per shard (own stage, reused when only selection settings change) -> select over all
    rows -> mark per shard into `<run>/stages/<name>-<fp12>`."""
    label = label or step.name
    scored = run_map(ScorePhase(step), input_ds, run_url, engine=engine, workers=workers, label=f"{label} (score)",
                     shards_in_flight=shards_in_flight)
    return select_and_mark(step, scored, run_url, label=label)


def select_and_mark(step: GlobalStep, scored: Any, run_url: str, *, label: str) -> Any:
    storage = _storage()
    input_fp = fingerprint_of(scored)
    fingerprint = step.fingerprint(input_fp)
    out = storage.ShardedDataset(stage_url(run_url, step.name, fingerprint))
    if out.committed:
        _say(summary_line(label, stage_summary(out), cached=True))
        return out
    started = time.perf_counter()
    indices = scored.shard_indices()
    wanted = ["id", *step.select_columns(), *[c for c in [getattr(step.config, "order_by", None)] if c]]
    parts = []
    heights = []
    for i in indices:
        lf = pl.scan_parquet(scored.url + "/" + f"part-{i:05d}.parquet") if scored.is_local else \
            scored.read_shard(i).lazy()
        names = lf.collect_schema().names()
        part = lf.select([c for c in dict.fromkeys(wanted) if c in names]).collect()
        parts.append(part)
        heights.append(part.height)
    all_scores = (pl.concat(parts, how="diagonal_relaxed") if parts
                  else pl.DataFrame({"id": []}, schema={"id": pl.Utf8}))
    decisions = step.select(all_scores)
    select_seconds = time.perf_counter() - started
    done = set(out.shard_indices())
    heavy = set(HEAVY_COLUMNS) | set(getattr(step, "heavy_columns", ()))
    for i, part in zip(indices, shard_decisions(decisions, heights)):
        if i in done:
            continue
        t0 = time.perf_counter()
        shard = scored.read_shard(i)
        marked = step.mark(shard, part)
        marked = marked.drop([c for c in heavy if c in marked.columns])
        out.write_shard(i, marked, stats=_shard_stats(shard.height, marked, time.perf_counter() - t0, None))
    return _commit(out, name=step.name, version=step.version, config=step.config.model_dump(mode="json"),
                   fingerprint=fingerprint, input_fps=[input_fp], engines=[], started=started, expected=indices,
                   label=label, extra={"select_stats": dict(step.stats), "select_seconds": round(select_seconds, 3)})


# ---------------------------------------------------------------- observability

def _artifact(label: str, ds: Any) -> None:
    """A Prefect markdown artifact per stage: kept / dropped by reason, throughput."""
    try:
        from prefect.artifacts import create_markdown_artifact, create_table_artifact
        from prefect.context import FlowRunContext

        if FlowRunContext.get() is None:
            return
        s = stage_summary(ds)
        rows = "\n".join(f"| {k} | {v} |" for k, v in s["dropped"].items()) or "| (none) | 0 |"
        create_markdown_artifact(
            key=_artifact_key(label),
            markdown=(f"### {label}\n\nrows in {s['rows_in']}, kept {s['rows_out']}, "
                      f"{s['generated_tokens']} tokens in {s['seconds']:.1f}s ({s['tokens_per_s']:.1f} tok/s)\n\n"
                      f"| drop reason | rows |\n|---|---|\n{rows}\n"),
            description=f"alignforge stage {label}")
        create_table_artifact(
            key=f"{_artifact_key(label)}-drops",
            table=[{"step": label, "rows_in": s["rows_in"], "kept": s["rows_out"], "reason": reason, "rows": count}
                   for reason, count in s["dropped"].items()] or [{"step": label, "rows_in": s["rows_in"],
                                                                   "kept": s["rows_out"], "reason": None, "rows": 0}],
            description=f"alignforge stage {label}: rows dropped by reason")
    except Exception:  # artifacts are observability only; never fail a stage over them
        pass


def _artifact_key(label: str) -> str:
    import re

    return re.sub(r"[^a-z0-9-]+", "-", label.lower()).strip("-") or "stage"


# ---------------------------------------------------------------- the run

def run_steps(recipe: Any, run_url: str, *, engine: Any, workers: int) -> list[tuple[str, Any]]:
    """Every enabled step of `recipe`, in order; returns [(label, committed stage)] incl. sources."""
    from engines.lifetime import release_for
    from flows.recipe import build_steps

    stages: list[tuple[str, Any]] = []
    current = None
    in_flight = max(1, -(-recipe.rows_in_flight // recipe.shard_size))
    if recipe.input is not None:
        current = input_stage(recipe.input, recipe.shard_size, run_url)
        stages.append(("input", current))
    for step in build_steps(recipe):
        own_model = bool(getattr(step.config, "model", None))
        if getattr(step, "needs_engine", False) or (hasattr(step, "engine") and not own_model):
            step.engine = engine
        release_for(generates=bool(getattr(step, "needs_engine", False)), loads_own_model=own_model, chat=engine)
        if step.source:
            if current is not None:
                from flows.recipe import RecipeError

                raise RecipeError(f"{recipe.source}: step {step.name!r} generates rows from nothing, but it follows "
                                  "other steps / an input. Fix: make it the first step and drop `input:`")
            current = seed_shards(int(step.config.n), recipe.shard_size, run_url)
            stages.append(("seeds", current))
        step_engine = engine if (getattr(step, "needs_engine", False) or hasattr(step, "engine")) else None
        run = run_global if isinstance(step, GlobalStep) else run_map
        current = run(step, current, run_url, engine=step_engine, workers=workers, shards_in_flight=in_flight)
        step.close()
        stages.append((step.name, current))
    return stages


def run_recipe(recipe: Any, *, engine: Any = None, workers: int | None = None, out: str | None = None,
               lock: bool = True, executor: str = "local", ray_address: str | None = "auto") -> dict:
    """Run a recipe as one Prefect flow and publish its dataset. Returns the run summary.

    `engine`: an engines.base.Engine to use instead of starting one on `recipe.model` (tests); the
    caller keeps ownership. `workers`: threads for CPU steps' shards (default: CPU cores).
    `executor`: "local", "process" or "ray" (flows.executors; the last two need PREFECT_API_URL of a
    running Prefect server, ray a cluster at `ray_address`)."""
    from prefect import flow

    from flows.executors import check_prefect_server, no_cluster_error, prefect_api_url, task_runner

    workers = int(workers or os.cpu_count() or 1)
    run_url = out if out is not None else (recipe.out if recipe.out is not None else f"runs/{recipe.name}")
    runner = task_runner(executor, workers=workers, ray_address=ray_address)
    if executor != "local":  # worker processes report to a real server (else each starts a temporary one)
        check_prefect_server(prefect_api_url(), f"--executor {executor}")
        if "://" not in run_url:  # workers do not share our working directory
            run_url = os.path.abspath(os.path.expanduser(run_url))

    @flow(name=recipe.name, task_runner=runner, log_prints=False, validate_parameters=False)
    def alignforge_run() -> dict:
        return execute(recipe, run_url, engine=engine, workers=workers, lock=lock)

    try:
        return alignforge_run()
    except ConnectionError as exc:  # ray.init found no cluster at the address
        if executor == "ray" and "ray" in str(exc).lower():
            raise no_cluster_error(ray_address, exc) from None
        raise


def execute(recipe: Any, run_url: str, *, engine: Any = None, workers: int = 1, lock: bool = True) -> dict:
    """The body of a run (usable inside any flow): steps, then publish. `lock=False`: the caller
    already holds the run folder's lock (the CLI takes it before Prefect starts)."""
    import contextlib

    import storage
    from engines.lifetime import LazyEngine, release_all
    from flows.publishing import publish_run

    _arm_signal_handler()
    run_url = storage.check_run_folder(run_url)
    storage.check_publish_target(f"{run_url}/publish")  # a foreign folder in the way: refuse before any work
    owned = engine is None
    chat = LazyEngine(recipe.model) if owned else engine
    # One run per folder: a second one stops here with the holder's pid.
    with storage.RunLock(run_url) if lock else contextlib.nullcontext():
        try:
            stages = run_steps(recipe, run_url, engine=chat, workers=workers)
        finally:
            release_all(chat if owned else None)  # reward models always; the chat engine only if ours
        return publish_run(recipe, stages, run_url, model_id=engine_name(chat))


def _arm_signal_handler() -> None:
    import signal
    import threading

    if SIGNAL_HANDLER is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, SIGNAL_HANDLER)
        signal.signal(signal.SIGTERM, SIGNAL_HANDLER)


def run(recipe: str | Any, sets: Mapping[str, Any] | list[str] | None = None, *, out: str | None = None,
        engine: Any = None, workers: int | None = None, executor: str = "local",
        ray_address: str | None = "auto") -> dict:
    """Load a recipe (built-in name, file, or a Recipe), apply `sets` ({"n": 8} or ["n=8"]) and run it."""
    from flows.recipe import Recipe, load_recipe

    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, sets=dict(sets) if isinstance(sets, Mapping) else sets, out=out)
    return run_recipe(recipe, engine=engine, workers=workers, out=out, executor=executor, ray_address=ray_address)
