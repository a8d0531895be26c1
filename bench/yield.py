"""Yield of the demo recipe vs the response repetition penalty (issue 15, README "Model profiles").

The demo recipe (`magpie-sft`, the runner, checks, dedup, publish) runs end to end on ONE engine for
each (turns, repetition_penalty): the kept share of the requested conversations, why the others
were dropped, and the mean words of the kept assistant turns. Every run sets
`steps.magpie_responses.repetition_penalty` explicitly, so the model profile never decides it; the
instructions are the same for every penalty (same seeds, cached stage). One run folder per turns
setting: instruction stages are reused; each run's publish is read right after it.

    python -m bench.yield [--n 50] [--turns 1 2] [--penalties 1.0 1.05 1.1] [--model PATH]
    python -m bench.yield --runs 1:1.05 2:1.05 1:1.0     # explicit (turns:penalty) runs, in this order
    python -m bench.yield --runs 1:1.05:max_tokens=1024,frequency_penalty=0.1   # + other magpie_responses fields
    python -m bench.yield --runs "1:1.1:ngram_penalties=[[3, 1.0]]"
    python -m bench.yield --runs 1:1.1:temperature=0.3,magpie_instructions.top_p=0.9  # step.field: other steps
    python -m bench.yield --append --runs 2:1.1      # add this invocation's table below the file's (split long benches)

Run it under `flock /tmp/alignforge-vllm.lock` on a shared machine (it starts vLLM).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path


def mean_words(messages_rows: list) -> tuple[float, int]:
    words = [len((m["content"] or "").split()) for msgs in messages_rows for m in msgs if m["role"] == "assistant"]
    return (sum(words) / len(words) if words else 0.0), len(words)


def parse_run(text: str) -> tuple[int, float, tuple]:
    """"2:1.05" or "1:1.05:max_tokens=1024,ngram_penalties=[[3, 1.0]]" -> (turns, penalty, ((field, value), ...))."""
    import yaml

    turns, penalty, *rest = text.split(":", 2)
    fields, depth, part = [], 0, ""
    for ch in rest[0] if rest else "":  # split at commas outside brackets: ngram_penalties=[[3, 1.0]]
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            fields.append(part)
            part = ""
        else:
            part += ch
    fields += [part] if part.strip() else []
    other = tuple((k.strip(), _frozen(yaml.safe_load(v))) for k, v in (f.split("=", 1) for f in fields))
    return int(turns), float(penalty), other


def _frozen(value):
    """Lists -> tuples, so a run's settings can key the table."""
    return tuple(_frozen(v) for v in value) if isinstance(value, list) else value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0, help="the recipe's seed: other instructions "
                        "(a held-out check of settings chosen at seed 0)")
    parser.add_argument("--turns", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--penalties", type=float, nargs="+", default=[1.0, 1.05, 1.1])
    parser.add_argument("--runs", nargs="+", default=None, help="turns:penalty[:field=value,...] runs in this "
                        "order (instead of every --turns x --penalties; fields of magpie_responses, or step.field for "
                        "another step); the table is sorted")
    parser.add_argument("--model", default=None, help="model folder or hub id (default: embedded SmolLM2)")
    parser.add_argument("--work", default=None, help="run folders (default: a temporary folder)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "yield.md"))
    parser.add_argument("--append", action="store_true", help="keep what --out holds and add this invocation's "
                        "table below it (one bench split over several invocations, e.g. on a shared vLLM lock)")
    args = parser.parse_args()
    os.environ.setdefault("ALIGNFORGE_QUIET", "1")

    import polars as pl

    from engines import get_engine, shutdown_all
    from flows.runner import run

    engine = get_engine(args.model, progress=False)
    work = Path(args.work or tempfile.mkdtemp(prefix="alignforge-yield-"))
    header = ("| turns | repetition_penalty | other settings | kept | kept share | dropped (by reason) "
              "| mean words / response | tokens | seconds | load (1 min) |\n"
              "|---:|---:|---|---:|---:|---|---:|---:|---:|---:|")
    rows: dict[tuple, str] = {}
    runs = [parse_run(r) for r in args.runs] if args.runs else \
        [(t, p, ()) for t in args.turns for p in args.penalties]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    before = out.read_text().rstrip() + "\n\n" if args.append and out.exists() else ""
    title = "## Invocation" if before else "# Demo yield vs repetition penalty (`python -m bench.yield`)"
    started_at = time.strftime("%Y-%m-%d %H:%M")

    def write() -> None:
        out.write_text(
            f"{before}{title} (`{' '.join(sys.argv[1:])}`)\n\n"
            f"{started_at} to {time.strftime('%H:%M')}, {platform.machine()}, {os.cpu_count()} cores, "
            f"model {engine.model_id}, magpie-sft n={args.n} seed={args.seed}, "
            f"any setting not in the table is the recipe's with the model's profile under it (engines/profiles.py; "
            f"the papers' greedy responses, max 512 tokens, where the profile is silent). Mean words: kept "
            f"assistant turns. Load: 1-minute load average (start + end of the run) / 2.\n\n"
            + "\n".join([header, *(rows[k] for k in sorted(rows))]) + "\n")

    try:
        for turns, penalty, other in runs:
            sets = {"n": args.n, "seed": args.seed, "turns": turns,
                    "steps.magpie_responses.repetition_penalty": penalty,
                    **{f"steps.{k if '.' in k else 'magpie_responses.' + k}": v for k, v in other}}
            load0 = os.getloadavg()[0]
            started = time.perf_counter()
            folder = work / (f"turns{turns}" if not args.seed else f"seed{args.seed}-turns{turns}")
            result = run("magpie-sft", sets, out=str(folder), engine=engine, workers=1)
            seconds = time.perf_counter() - started
            load = (load0 + os.getloadavg()[0]) / 2
            data = pl.read_parquet(f"{result['dataset']}/data/*.parquet")
            words, _ = mean_words(data["messages"].to_list())
            drops = ", ".join(f"{k} {v}" for k, v in result["dropped"].items()) or "none"
            kept = result["rows_kept"]
            key = (turns, penalty, other)
            settings = ", ".join(f"{k}={v}" for k, v in other) or "-"
            rows[key] = (f"| {turns} | {penalty:g} | {settings} | {kept} / {args.n} | {kept / args.n:.0%} | {drops} | "
                         f"{words:.0f} | {result['generated_tokens']} | {seconds:.0f} | {load:.1f} |")
            print(rows[key], flush=True)
            write()
    finally:
        shutdown_all()
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
