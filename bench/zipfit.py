"""ZIP-FIT scoring: alignforge vs the `zip-fit` package on the same source/target sets.

    python -m bench.zipfit [--sources 2000] [--targets 100] [--workers 2]

Sources mix four generated domains (python code, cooking recipes, arithmetic word problems,
travel prose); targets are python code. zip-fit is run with gzip level 6 (its default is level
0, which does not compress) and k = all sources, so it returns every score. alignforge runs with
the same container/level ("gzip", 6) for an exact score check, with zlib level 6 (our default;
DEFLATE stream identical, 12 fewer container bytes per compression) and with lz4. Spearman is
each method's ranking of all sources vs zip-fit's.
"""

from __future__ import annotations

import argparse
import io
import os
import time
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


def make_sets(n_sources: int, n_targets: int, seed: int = 0) -> tuple[list[str], list[str], list[str]]:
    rng = np.random.default_rng(seed)
    makers = [("code", _code), ("recipe", _recipe), ("math", _math), ("travel", _travel)]
    sources, domains, seen = [], [], set()
    while len(sources) < n_sources:
        name, make = makers[len(sources) % 4]
        text = make(rng)
        if text not in seen:  # zip-fit keys results by text
            seen.add(text)
            sources.append(text)
            domains.append(name)
    targets = [_code(rng) for _ in range(n_targets)]
    return sources, targets, domains


def run_zip_fit(sources, targets, level):
    from zip_fit import ZIPFIT

    z = ZIPFIT(source_dataset=None, target_dataset=None, k=len(sources), compression_algorithm="gzip",
               compress_level=level, output_file=os.devnull)
    t0 = time.perf_counter()
    with redirect_stdout(io.StringIO()):
        ranked = z.rank_sequences_by_alignment(sources, targets)
    seconds = time.perf_counter() - t0
    by_text = dict(ranked)
    return seconds, np.array([by_text[s] for s in sources], dtype=np.float64)


def run_alignforge(sources, targets, compressor, level, workers):
    from filters.zipfit import ZipFit

    df = pl.DataFrame({"id": [f"{i:07d}" for i in range(len(sources))], "instruction": sources})
    f = ZipFit(target_texts=tuple(targets), on="instruction", compressor=compressor, level=level,
               workers=workers, top_k=len(sources) // 4)
    t0 = time.perf_counter()
    out = f.run(df)
    seconds = time.perf_counter() - t0
    f.close()
    return seconds, out["zipfit_alignment"].to_numpy(), out


def main(argv=None):
    from scipy.stats import spearmanr

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sources", type=int, default=2000)
    ap.add_argument("--targets", type=int, default=100)
    ap.add_argument("--level", type=int, default=6)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args(argv)

    sources, targets, domains = make_sets(args.sources, args.targets)
    pairs = len(sources) * len(targets)
    print(f"{len(sources)} sources x {len(targets)} targets = {pairs:,} pairs, {args.workers} workers")
    base_sec, base = run_zip_fit(sources, targets, args.level)
    rows = [("zip-fit 1.0.9 (gzip)", args.level, base_sec, base, None)]
    for compressor in ("gzip", "zlib", "lz4"):
        sec, scores, out = run_alignforge(sources, targets, compressor, args.level, args.workers)
        rows.append((f"alignforge ({compressor})", args.level if compressor != "lz4" else "-", sec, scores, out))

    is_code = np.array([d == "code" for d in domains])
    lines = ["| method | level | seconds | pairs/s | speed-up vs zip-fit | Spearman vs zip-fit | max abs score diff | code share of top 25% |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, level, sec, scores, _ in rows:
        rho = spearmanr(scores, base).statistic
        diff = np.max(np.abs(scores - base))
        top = np.argsort(-scores, kind="stable")[: len(sources) // 4]
        lines.append(f"| {name} | {level} | {sec:.2f} | {pairs / sec:,.0f} | {base_sec / sec:.1f}x | {rho:.4f} | "
                     f"{diff:.2e} | {is_code[top].mean():.2f} |")
    header = (f"# ZIP-FIT alignment, {len(sources)} sources x {len(targets)} python-code targets, "
              f"{args.workers} worker processes ({os.cpu_count()} cores)\n\n")
    table = "\n".join(lines)
    print("\n" + header + table)
    out = Path(__file__).parent / "results" / "zipfit.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text(header + table + "\n")


if __name__ == "__main__":
    main()
