"""ZIP-FIT scoring: alignforge vs the `zip-fit` package on the same source/target sets.

    python -m bench.zipfit [--sources 2000] [--long-sources 500] [--targets 100] [--workers 2]

Two source sets, one run each: "short" sources are single generated texts (~440 B), "long"
sources join 7 texts of one domain (~3 KB, chat-transcript length), where alignforge's prefix
priming applies. Sources mix four generated domains (python code, cooking recipes, arithmetic
word problems, travel prose); targets are python code (~460 B). zip-fit is run with gzip level 6 (its default is level
0, which does not compress) and k = all sources, so it returns every score. alignforge runs with
the same container/level ("gzip", 6) for an exact score check, with zlib level 6 (our default;
DEFLATE stream identical, 12 fewer container bytes per compression) and with lz4. Spearman is
each method's ranking of all sources vs zip-fit's. Wall seconds decide the speed-up; CPU seconds
(this process + its worker processes, from getrusage) are printed beside them because the
machine is shared: under load, wall time mostly measures the scheduler.
"""

from __future__ import annotations

import argparse
import io
import os
import resource
import time
import zlib
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import polars as pl

_NAMES = ["items", "total", "value", "result", "count", "data", "index", "buffer", "node", "key", "row", "acc"]
_FOODS = ["onions", "garlic", "butter", "flour", "eggs", "tomatoes", "basil", "rice", "lentils", "cream", "lemon"]
_PLACES = ["harbour", "old town", "market", "cathedral", "riverside", "hills", "museum", "bridge", "station"]


def _code(rng) -> str:
    a, b, c = rng.choice(_NAMES, 3, replace=False)
    lines = [f"def {a}_{rng.integers(100)}({b}, {c}=None):"]
    for _ in range(rng.integers(3, 12)):
        kind = rng.integers(4)
        if kind == 0:
            lines.append(f"    for {c} in range(len({b})):\n        {a} += {b}[{c}] * {rng.integers(2, 9)}")
        elif kind == 1:
            lines.append(f"    if {b} is None:\n        raise ValueError('{b} must be set')")
        elif kind == 2:
            lines.append(f"    {a} = [{c} for {c} in {b} if {c} % {rng.integers(2, 5)} == 0]")
        else:
            lines.append(f"    {a}.append({b}.get('{c}', {rng.integers(10)}))")
    lines.append(f"    return {a}")
    return "\n".join(lines)


def _recipe(rng) -> str:
    steps = []
    for _ in range(rng.integers(3, 10)):
        f1, f2 = rng.choice(_FOODS, 2, replace=False)
        steps.append(f"{rng.choice(['Chop', 'Whisk', 'Simmer', 'Fold', 'Roast'])} the {f1} with the {f2} "
                     f"for {rng.integers(2, 40)} minutes, stirring {rng.choice(['gently', 'often', 'once'])}.")
    return " ".join(steps)


def _math(rng) -> str:
    parts = []
    for _ in range(rng.integers(2, 6)):
        x, y = rng.integers(2, 500, 2)
        parts.append(f"A shop sells {x} pencils on Monday and {y} on Tuesday. How many pencils were sold "
                     f"in total? Answer: {x} + {y} = {x + y}.")
    return " ".join(parts)


def _travel(rng) -> str:
    parts = []
    for _ in range(rng.integers(3, 9)):
        p1, p2 = rng.choice(_PLACES, 2, replace=False)
        parts.append(f"We walked from the {p1} to the {p2} in the {rng.choice(['morning', 'rain', 'evening'])}, "
                     f"stopping {rng.integers(1, 6)} times to look at the view.")
    return " ".join(parts)


def make_sets(n_sources: int, n_targets: int, seed: int = 0, pieces: int = 1
              ) -> tuple[list[str], list[str], list[str]]:
    """Sources of `pieces` same-domain texts each (cycling through the domains), code targets."""
    rng = np.random.default_rng(seed)
    makers = [("code", _code), ("recipe", _recipe), ("math", _math), ("travel", _travel)]
    sources, domains, seen = [], [], set()
    while len(sources) < n_sources:
        name, make = makers[len(sources) % 4]
        text = "\n\n".join(make(rng) for _ in range(pieces))
        if text not in seen:  # zip-fit keys results by text
            seen.add(text)
            sources.append(text)
            domains.append(name)
    targets = [_code(rng) for _ in range(n_targets)]
    return sources, targets, domains


def _cpu_seconds() -> float:
    """User + system time of this process and of its children that have exited (pool workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def run_zip_fit(sources, targets, level):
    from zip_fit import ZIPFIT

    z = ZIPFIT(source_dataset=None, target_dataset=None, k=len(sources), compression_algorithm="gzip",
               compress_level=level, output_file=os.devnull)
    c0, t0 = _cpu_seconds(), time.perf_counter()
    with redirect_stdout(io.StringIO()):
        ranked = z.rank_sequences_by_alignment(sources, targets)  # its pools are joined on return
    seconds, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
    by_text = dict(ranked)
    return seconds, cpu, np.array([by_text[s] for s in sources], dtype=np.float64)


def run_alignforge(sources, targets, compressor, level, workers):
    from filters.zipfit import ZipFit

    df = pl.DataFrame({"id": [f"{i:07d}" for i in range(len(sources))], "instruction": sources})
    f = ZipFit(target_texts=tuple(targets), on="instruction", compressor=compressor, level=level,
               workers=workers, top_k=len(sources) // 4)
    c0, t0 = _cpu_seconds(), time.perf_counter()
    out = f.run(df)
    f.close()  # joins the workers, so their CPU time is counted
    seconds, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
    return seconds, cpu, out["zipfit_alignment"].to_numpy()


def compare(label, sources, targets, domains, level, workers) -> list[str]:
    from scipy.stats import spearmanr

    pairs = len(sources) * len(targets)
    mean_len = np.mean([len(t.encode()) for t in sources])
    print(f"{label}: {len(sources)} sources (mean {mean_len:.0f} B) x {len(targets)} targets = {pairs:,} pairs")
    base_sec, base_cpu, base = run_zip_fit(sources, targets, level)
    rows = [("zip-fit 1.0.9 (gzip)", level, base_sec, base_cpu, base)]
    for compressor in ("gzip", "zlib", "lz4"):
        sec, cpu, scores = run_alignforge(sources, targets, compressor, level, workers)
        rows.append((f"alignforge ({compressor})", level if compressor != "lz4" else "-", sec, cpu, scores))
    # Reference floor: one gzip compression of x+y per pair and nothing else, one process. Any
    # exact method that compresses each pair from scratch needs at least this much CPU.
    encoded_sources, encoded_targets = [t.encode() for t in sources], [t.encode() for t in targets]
    c0, t0 = _cpu_seconds(), time.perf_counter()
    for x in encoded_sources:
        for y in encoded_targets:
            zlib.compress(x + y, level, 31)
    rows.append(("floor: zlib.compress(x+y, wbits=31) per pair, 1 process", level,
                 time.perf_counter() - t0, _cpu_seconds() - c0, base))
    is_code = np.array([d == "code" for d in domains])
    lines = []
    for name, lvl, sec, cpu, scores in rows:
        rho = spearmanr(scores, base).statistic
        diff = np.max(np.abs(scores - base))
        if name.startswith("floor"):
            lines.append(f"| {label} ({mean_len:.0f} B) | {name} | {lvl} | {sec:.2f} | - | {cpu:.2f} | "
                         f"{base_cpu / cpu:.1f}x | {pairs / sec:,.0f} | - | - | - |")
            print(lines[-1])
            continue
        top = np.argsort(-scores, kind="stable")[: len(sources) // 4]
        lines.append(f"| {label} ({mean_len:.0f} B) | {name} | {lvl} | {sec:.2f} | {base_sec / sec:.1f}x | {cpu:.2f} | "
                     f"{base_cpu / cpu:.1f}x | {pairs / sec:,.0f} | {rho:.6f} | {diff:.1e} | {is_code[top].mean():.2f} |")
        print(lines[-1])
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sources", type=int, default=2000)
    ap.add_argument("--long-sources", type=int, default=500)
    ap.add_argument("--targets", type=int, default=100)
    ap.add_argument("--level", type=int, default=6)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args(argv)

    load_before = os.getloadavg()
    lines = ["| sources | method | level | wall s | speed-up (wall) | CPU s | speed-up (CPU) | pairs/s | "
             "Spearman vs zip-fit | max abs score diff | code share of top 25% |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for label, n, pieces in (("short", args.sources, 1), ("long", args.long_sources, 7)):
        sources, targets, domains = make_sets(n, args.targets, pieces=pieces)
        lines += compare(label, sources, targets, domains, args.level, args.workers)
    load_after = os.getloadavg()
    header = (f"# ZIP-FIT alignment vs zip-fit, {args.targets} python-code targets, "
              f"{args.workers} worker processes, {os.cpu_count()} cores\n\n"
              f"Load average (1/5/15 min) before: {'/'.join(f'{v:.1f}' for v in load_before)}, "
              f"after: {'/'.join(f'{v:.1f}' for v in load_after)} (machine shared with other jobs).\n\n")
    notes = ("\n\nalignforge (gzip) and zip-fit compute the same lengths (max diff is float rounding). "
             "Sources from 1 KB on are primed (x compressed once per source, each target continues a "
             "copy of that state); shorter ones are compressed as x+y. The floor row is plain "
             "zlib.compress(x+y) over all pairs: zip-fit's CPU over it is the most that any exact "
             "method recompressing every pair can gain; beating it needs priming (long sources).")
    table = "\n".join(lines) + notes
    print("\n" + header + table)
    out = Path(__file__).parent / "results" / "zipfit.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text(header + table + "\n")


if __name__ == "__main__":
    main()
