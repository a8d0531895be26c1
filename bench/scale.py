"""Scaling out: curate (heuristics + MinHash + semantic dedup) on 1 vs 2 workers as threads,
processes and Ray tasks. Wall time, CPU s, peak RSS, speed-up, and where the time went per stage.

    python -m bench.scale [--rows 20000] [--shard-size 2500] [--workers 1 2] [--executors local process ray]
                          [--semdedup on|off]

Data: bench.scale_curate.make_rows (synthetic SFT rows, 10% near copies of earlier rows) over the
whole words of MiniLM's vocabulary (so an instruction is ~8-40 embedder tokens, as real text is). Each
configuration is one `flows.runner.run("curate", ...)` with `semdedup.enabled=true` in a child
process, measured by bench.scale_curate.measure (wall, CPU s of the process tree, peak RSS of the
tree sampled every 0.1 s). All configurations run in one invocation against one real Prefect
server started here (Ray workers need one; threads and processes use it too, so none pays for a
temporary server). Ray runs on `--ray-address local`: a one-machine cluster with `workers` CPUs
started inside the measured child, so its start-up is in the wall time and its processes in the
peak RSS. Speed-up = wall of `local` (threads) with 1 worker / wall. Per-stage seconds are each
stage's wall from its manifest. semdedup's scoring embeds one shard at a time in the driver on
every executor (its step sets parallel_shards = False: torch already uses every core).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

STAGES = ("heuristics", "minhash_score", "minhash", "semdedup_score", "semdedup")


def _child(args) -> None:
    """The measured run (in its own process)."""
    os.environ["ALIGNFORGE_QUIET"] = "1"
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from flows.runner import run

    t0 = time.perf_counter()
    sets = {"input": args.input, "shard_size": args.shard_size, "semdedup.enabled": args.semdedup == "on"}
    summary = run("curate", sets, out=args.out, workers=args.workers, executor=args.executor, ray_address="local")
    seconds = time.perf_counter() - t0
    print("RESULT " + json.dumps({"seconds": seconds, "summary": {k: v for k, v in summary.items()
                                                                   if isinstance(v, (int, float, str))}},
                                 default=str), flush=True)


def embedder_words() -> list[str]:
    """Whole lowercase words of MiniLM's WordPiece vocabulary, in its order: about one token per word.
    (Random letter strings split into ~4 tokens each and made embedding ~10x slower per row.)"""
    from engines.embedder import default_model_dir

    lines = (default_model_dir() / "vocab.txt").read_text().splitlines()
    return [w for w in lines if w.isalpha() and w.islower() and len(w) >= 2]


def stage_seconds(run_dir: Path) -> dict[str, float]:
    """Each committed stage's wall seconds (its manifest's timings), by step name."""
    seconds = {}
    for manifest in (run_dir / "stages").glob("*/_manifest.json"):
        data = json.loads(manifest.read_text())
        seconds[manifest.parent.name.rsplit("-", 1)[0]] = float((data.get("timings") or {}).get("seconds", 0.0))
    return seconds


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=20_000)
    ap.add_argument("--shard-size", type=int, default=2_500)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--executors", nargs="+", default=["local", "process", "ray"], choices=["local", "process", "ray"])
    ap.add_argument("--semdedup", choices=["on", "off"], default="on",
                    help="off: heuristics + MinHash only (the steps whose shards run in parallel)")
    ap.add_argument("--dir", default=None, help="work folder (default: a temporary one, removed after)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--executor", help=argparse.SUPPRESS)
    ap.add_argument("--input", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        args.workers = args.workers[0]
        _child(args)
        return

    from bench.scale_curate import make_rows, measure
    from tests.servers import prefect_server

    work = Path(args.dir or tempfile.mkdtemp(prefix="bench_scale_"))
    work.mkdir(parents=True, exist_ok=True)
    data = work / f"sft-{args.rows}.parquet"
    if not data.exists():
        make_rows(data, args.rows, words=embedder_words())
    results = []
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    try:
        with prefect_server(work) as server:
            env = {**os.environ, "PREFECT_API_URL": server.url, "RAY_AUTH_MODE": "disabled"}
            for executor in args.executors:
                for workers in args.workers:
                    out = work / f"run-{executor}-{workers}"
                    shutil.rmtree(out, ignore_errors=True)  # a kept earlier run would be a cache hit
                    r = measure(data, args.rows, args.shard_size, workers, out, module="bench.scale",
                                extra=("--executor", executor, "--semdedup", args.semdedup), env=env)
                    r.update(executor=executor, workers=workers, stages=stage_seconds(out),
                             load=os.getloadavg()[0], kept=r["summary"].get("rows_kept"))
                    results.append(r)
                    print(f"{executor} x{workers}: {r['wall']:.1f} s wall, {r['cpu']:.1f} CPU s, "
                          f"{r['peak_rss'] / 2**30:.2f} GiB, kept {r['kept']}, stages {r['stages']}", flush=True)
                    shutil.rmtree(out, ignore_errors=True)
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)
    print("\n" + write_table(results, args, started))


def write_table(results: list[dict], args, started: str) -> str:
    base = next((r["wall"] for r in results if r["executor"] == "local" and r["workers"] == 1), None)
    names = {"local": "threads", "process": "processes", "ray": "Ray tasks (local cluster)"}
    steps = "heuristics + MinHash" + (" + semantic dedup" if args.semdedup == "on" else "")
    header = (f"# curate ({steps}), {args.rows:,} rows, shard size {args.shard_size:,}\n\n"
              f"{started}, {os.cpu_count()} cores, {os.uname().machine}; `python -m bench.scale --rows {args.rows} "
              f"--shard-size {args.shard_size} --semdedup {args.semdedup}`\n\n"
              "| executor | workers | wall s | speed-up | CPU s (tree) | peak RSS GiB (tree) | kept | "
              + " | ".join(f"{s} s" for s in STAGES) + " | load (1 min, at end) |\n"
              "|---|---:|---:|---:|---:|---:|---:|" + "---:|" * len(STAGES) + "---:|\n")
    lines = []
    for r in results:
        speed = f"{base / r['wall']:.2f}x" if base else "-"
        stages = " | ".join(f"{r['stages'][s]:.1f}" if s in r["stages"] else "–" for s in STAGES)
        lines.append(f"| {names[r['executor']]} | {r['workers']} | {r['wall']:.1f} | {speed} | {r['cpu']:.1f} | "
                     f"{r['peak_rss'] / 2**30:.2f} | {r['kept']} | {stages} | {r['load']:.1f} |")
    table = header + "\n".join(lines) + "\n"
    out = Path(__file__).parent / "results" / ("scale.md" if args.semdedup == "on" else "scale_no_semdedup.md")
    out.parent.mkdir(exist_ok=True)
    out.write_text(table)
    return table


if __name__ == "__main__":
    sys.exit(main())
