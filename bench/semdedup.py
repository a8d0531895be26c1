"""Semantic dedup throughput: embedding (all-MiniLM-L6-v2, CPU) and the blocked greedy search.

    python -m bench.semdedup [--embed-n 10000] [--search-n 10000 100000]

Embedding is measured on --embed-n generated short instructions (paraphrase families) with the
real model. The search is measured at each --search-n: at the embedded size on the real
embeddings, and above it on SYNTHETIC unit vectors (384-d, clusters of near-duplicates) because
embedding 100k rows on 2 shared CPU cores takes too long for a benchmark run. A naive reference
(full N x N similarity matrix, then the same greedy rule) runs where N x N float32 fits in 2 GiB.
Peak memory: tracemalloc peak of the search call (numpy buffers included) and process max RSS.
"""

from __future__ import annotations

import argparse
import resource
import time
import tracemalloc
from pathlib import Path

import numpy as np

from filters.semdedup import greedy_dedup

_TOPICS = ["bake bread", "train a puppy", "learn python", "fix a bike tyre", "write a cover letter",
           "plant tomatoes", "save money", "start running", "clean an oven", "brew coffee"]
_FRAMES = ["How do I {t}?", "What is the best way to {t}?", "Give me tips to {t}.", "Explain how to {t} step by step.",
           "Can you help me {t}?", "I want to {t}; where do I start?"]


def make_texts(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        t = f"{_TOPICS[rng.integers(len(_TOPICS))]} {['', 'at home', 'quickly', 'for beginners', 'cheaply'][rng.integers(5)]}"
        out.append(_FRAMES[rng.integers(len(_FRAMES))].format(t=t.strip()) + f" (case {rng.integers(n // 3 + 1)})")
    return out


def synthetic(n: int, dim: int = 384, dup_share: float = 0.3, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n_base = int(n * (1 - dup_share))
    base = rng.normal(size=(n_base, dim)).astype(np.float32)
    parents = rng.integers(0, n_base, size=n - n_base)
    dups = base[parents] + 0.1 * rng.normal(size=(n - n_base, dim)).astype(np.float32)
    emb = np.concatenate([base, dups])[rng.permutation(n)]
    return emb / np.linalg.norm(emb, axis=1, keepdims=True)


def naive(emb: np.ndarray, threshold: float) -> np.ndarray:
    sims = emb @ emb.T
    keep = np.zeros(len(emb), dtype=bool)
    kept: list[int] = []
    for i in range(len(emb)):
        if not kept or sims[i, kept].max() < threshold:
            kept.append(i)
            keep[i] = True
    return keep


def measure(fn, *args):
    tracemalloc.start()
    t0 = time.perf_counter()
    out = fn(*args)
    seconds = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return out, seconds, peak


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--embed-n", type=int, default=10_000)
    ap.add_argument("--search-n", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--threshold", type=float, default=0.95)
    args = ap.parse_args(argv)

    from engines.embedder import get_embedder

    rows = ["| phase | rows | data | seconds | rows/s | kept | peak traced MiB |", "|---|---:|---|---:|---:|---:|---:|"]
    texts = make_texts(args.embed_n)
    embedder = get_embedder()
    embedder.embed(texts[:64])  # model load + warm-up outside the timing
    real, sec, peak = measure(embedder.embed, texts)
    rows.append(f"| embed (MiniLM-L6, CPU) | {args.embed_n:,} | generated instructions | {sec:.1f} | "
                f"{args.embed_n / sec:,.0f} | - | {peak / 2**20:.0f} |")
    for n in args.search_n:
        emb = real if n == args.embed_n else synthetic(n)
        label = "real embeddings" if n == args.embed_n else "synthetic 384-d"
        (keep, _, _), sec, peak = measure(greedy_dedup, emb, args.threshold)
        rows.append(f"| search: alignforge blocked greedy | {n:,} | {label} | {sec:.2f} | {n / sec:,.0f} | "
                    f"{int(keep.sum()):,} | {peak / 2**20:.0f} |")
        if n * n * 4 <= 2 << 30:
            ref, sec, peak = measure(naive, emb, args.threshold)
            same = "same rows" if np.array_equal(ref, keep) else "DIFFERENT rows"
            rows.append(f"| search: naive full N x N matrix ({same}) | {n:,} | {label} | {sec:.2f} | {n / sec:,.0f} | "
                        f"{int(ref.sum()):,} | {peak / 2**20:.0f} |")
        else:
            rows.append(f"| search: naive full N x N matrix | {n:,} | {label} | - | - | - | "
                        f"needs {n * n * 4 / 2**30:.0f} GiB: not run |")
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    header = (f"# Semantic dedup (threshold {args.threshold}), CPU; process max RSS {max_rss:,.0f} MiB\n\n")
    table = "\n".join(rows)
    print("\n" + header + table)
    out = Path(__file__).parent / "results" / "semdedup.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text(header + table + "\n")


if __name__ == "__main__":
    main()
