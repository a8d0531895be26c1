"""MinHash near-dedup: alignforge vs datasketch (naive) vs rensa, same docs, same num_perm/threshold.

    python -m bench.minhash [--n 100000] [--threshold 0.8] [--num-perm 128]

Data: random word documents; a share of them get a planted near-copy made by controlled word
edits (substitute / insert / delete), spread so the copies' exact Jaccard covers 0.5..1.0.
Quality: a "reported pair" is two docs a method calls duplicates (same cluster for alignforge,
an LSH query hit for the others). Precision = reported pairs whose exact Jaccard >= threshold;
recall = true pairs (planted, or any reported pair, with exact Jaccard >= threshold) reported.
For alignforge the pairs its exact check accepted ("edges") are scored too, and so are its
(kept row, dropped row) pairs, which is what a drop rests on: precision = share of them at or
above the threshold; recall = share of the true pairs (planted or found by any method, exact
Jaccard >= threshold) with at least one row dropped. Pairs within a cluster also count two
dropped rows, which are near the kept row but not always near each other.
Shingles are word 3-grams of the lowercased text for every method. alignforge scores once and
selects twice from the stored scores (verify on, then off): the second row's time is the
shared scoring time plus its own selection.

Anchor: the faster of rensa's two paths that yield pairs, in the same run: the bulk path
(`RMinHash.from_token_sets` for all docs + `RMinHashLSH.insert_many` + `query_all`) and the
per-doc path (`RMinHash.update` + `query` + `insert`). rensa takes token sets, so both times
include building them in Python (the same `shingles()` the quality check uses); the bulk path's
Rust part alone is reported next to it.
"""

from __future__ import annotations

import argparse
import os
import re
import time
from itertools import combinations
from pathlib import Path

import numpy as np
import polars as pl

NGRAM = 3
_WORD = re.compile(r"\w+")


def make_docs(n: int, seed: int = 0, dup_share: float = 0.2) -> tuple[list[str], list[tuple[int, int]]]:
    """n docs; about dup_share * n of them are edited copies of another doc. Returns (docs, planted pairs)."""
    rng = np.random.default_rng(seed)
    vocab = np.array(["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), size=rng.integers(3, 9)))
                      for _ in range(20000)])
    probs = 1.0 / np.arange(1, len(vocab) + 1) ** 0.8  # Zipf-ish word frequencies
    probs /= probs.sum()
    n_orig = int(n * (1 - dup_share))
    docs = [rng.choice(vocab, size=int(rng.integers(40, 120)), p=probs).tolist() for _ in range(n_orig)]
    planted = []
    while len(docs) < n:
        src = int(rng.integers(0, n_orig))
        words = list(docs[src])
        # Edit count spread so exact Jaccard of word 3-grams spans roughly 0.5 .. 1.0.
        edits = int(rng.integers(0, max(2, len(words) // 12)))
        for _ in range(edits):
            op, at = rng.integers(0, 3), int(rng.integers(0, len(words)))
            if op == 0:
                words[at] = str(rng.choice(vocab, p=probs))
            elif op == 1:
                words.insert(at, str(rng.choice(vocab, p=probs)))
            elif len(words) > 5:
                del words[at]
        planted.append((src, len(docs)))
        docs.append(words)
    order = rng.permutation(n)  # duplicates scattered, not at the end
    where = np.empty(n, dtype=np.int64)
    where[order] = np.arange(n)
    texts = [" ".join(docs[i]) for i in order]
    planted = [tuple(sorted((int(where[a]), int(where[b])))) for a, b in planted]
    return texts, planted


def shingles(text: str) -> set[str]:
    words = _WORD.findall(text.lower())
    if len(words) < NGRAM:
        return {" ".join(words)} if words else set()
    return {" ".join(words[i:i + NGRAM]) for i in range(len(words) - NGRAM + 1)}


def exact_jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def run_alignforge(texts, threshold, num_perm):
    """Score once, then select twice (verify on / off) from the stored scores."""
    from filters.minhash import MinHashDedup

    df = pl.DataFrame({"id": [f"{i:08d}" for i in range(len(texts))], "instruction": texts})
    t0, c0 = time.perf_counter(), time.process_time()
    f = MinHashDedup(threshold=threshold, num_perm=num_perm, ngram=NGRAM)
    scored = f(df)
    score_seconds, score_cpu = time.perf_counter() - t0, time.process_time() - c0
    results = []
    for verify in (True, False):
        t1, c1 = time.perf_counter(), time.process_time()
        g = MinHashDedup(f.config.model_copy(update={"verify": verify}))
        out = g.mark(scored, g.select(scored))
        seconds = score_seconds + time.perf_counter() - t1
        cpu = score_cpu + time.process_time() - c1
        rep = out["minhash_cluster"].to_numpy().astype(np.int64)  # ids are the row numbers
        dropped = np.flatnonzero(rep != np.arange(len(rep)))
        kept_dropped = ({(int(rep[i]), int(i)) for i in dropped}, rep == np.arange(len(rep)))
        pairs = set()
        clusters = (out.with_row_index("i").filter(pl.col("minhash_cluster_size") > 1)
                    .group_by("minhash_cluster").agg("i"))
        for members in clusters["i"].to_list():
            pairs.update(combinations(sorted(members), 2))
        results.append((verify, seconds, cpu, pairs, "x".join(map(str, g.config.band_split())), kept_dropped))
    return results


def alignforge_edges(texts, threshold, num_perm):
    """The pairs alignforge's exact check accepts (before clustering), untimed."""
    from filters.minhash import MinHashDedup

    f = MinHashDedup(threshold=threshold, num_perm=num_perm, ngram=NGRAM)
    df = pl.DataFrame({"id": [f"{i:08d}" for i in range(len(texts))], "instruction": texts})
    scored = f(df)
    sig = np.ascontiguousarray(scored["minhash_signature"].to_numpy(), dtype=np.uint32)
    pairs = f.candidate_pairs(sig)
    keep = f.exact_jaccard(scored.lazy(), np.arange(len(texts)), pairs) >= threshold
    return {tuple(map(int, p)) for p in pairs[keep]}


def run_datasketch(texts, threshold, num_perm, params=None):
    from datasketch import MinHash, MinHashLSH

    t0, c0 = time.perf_counter(), time.process_time()
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, params=params)
    hashes, pairs = [], set()
    for i, text in enumerate(texts):
        m = MinHash(num_perm=num_perm, seed=1)
        for s in shingles(text):
            m.update(s.encode("utf-8"))
        for j in lsh.query(m):
            pairs.add((j, i))
        lsh.insert(i, m)
        hashes.append(m)
    seconds = time.perf_counter() - t0
    return seconds, time.process_time() - c0, pairs, "x".join(map(str, (lsh.b, lsh.r)))


def run_rensa(texts, threshold, num_perm, bands):
    from rensa import RMinHash, RMinHashLSH

    t0, c0 = time.perf_counter(), time.process_time()
    lsh = RMinHashLSH(threshold=threshold, num_perm=num_perm, num_bands=bands)
    pairs = set()
    for i, text in enumerate(texts):
        m = RMinHash(num_perm=num_perm, seed=1)
        m.update(list(shingles(text)))
        for j in lsh.query(m):
            pairs.add((j, i))
        lsh.insert(i, m)
    seconds = time.perf_counter() - t0
    return seconds, time.process_time() - c0, pairs, f"{bands}x{num_perm // bands}"


def run_rensa_fast(texts, threshold, num_perm, bands):
    """rensa's bulk path: token sets built in Python, then one Rust call each for sketches, index, queries."""
    from rensa import RMinHash, RMinHashLSH

    t0, c0 = time.perf_counter(), time.process_time()
    token_sets = [list(shingles(text)) for text in texts]
    t1 = time.perf_counter()
    sketches = RMinHash.from_token_sets(token_sets, num_perm, 1)
    lsh = RMinHashLSH(threshold=threshold, num_perm=num_perm, num_bands=bands)
    lsh.insert_many(sketches, 0)
    found = lsh.query_all(sketches)
    pairs = {(j, i) for i, hits in enumerate(found) for j in hits if j < i}
    seconds = time.perf_counter() - t0
    return seconds, time.process_time() - c0, pairs, f"{bands}x{num_perm // bands}", seconds - (t1 - t0)


def quality(pairs, planted, sets, threshold):
    true = {p for p in planted if exact_jaccard(sets[p[0]], sets[p[1]]) >= threshold}
    good = {p for p in pairs if exact_jaccard(sets[p[0]], sets[p[1]]) >= threshold}
    true |= good
    precision = len(good) / len(pairs) if pairs else 1.0
    recall = len(good & true) / len(true) if true else 1.0
    return precision, recall, len(true)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--threshold", type=float, default=0.8)
    ap.add_argument("--num-perm", type=int, default=128)
    ap.add_argument("--skip-datasketch", action="store_true")
    ap.add_argument("--skip-update", action="store_true", help="skip rensa's per-doc update path")
    args = ap.parse_args(argv)

    texts, planted = make_docs(args.n)
    sets = [shingles(t) for t in texts]
    js = np.array([exact_jaccard(sets[a], sets[b]) for a, b in planted])
    print(f"{args.n} docs, {len(planted)} planted near-copies (exact Jaccard: "
          f"{(js >= args.threshold).sum()} >= {args.threshold}, median {np.median(js):.2f})")

    results, extra = [], []
    for verify, sec, cpu, pairs, split, kept_dropped in run_alignforge(texts, args.threshold, args.num_perm):
        label = "LSH + exact-Jaccard check, default" if verify else "LSH only, `verify=false`"
        results.append((f"alignforge ({label})", split, sec, cpu, pairs, ""))
        extra.append((f"alignforge {'default' if verify else '`verify=false`'}: (kept row, dropped row) pairs",
                      *kept_dropped))
    bands = int(split.split("x")[0])
    sec, cpu, pairs, split, rust = run_rensa_fast(texts, args.threshold, args.num_perm, bands)
    results.append(("rensa 0.5 bulk: `from_token_sets` + `insert_many` + `query_all`", split, sec, cpu,
                    pairs, f"Rust part {rust:.2f} s, Python shingling {sec - rust:.2f} s"))
    if not args.skip_update:
        sec, cpu, pairs, split = run_rensa(texts, args.threshold, args.num_perm, bands)
        results.append(("rensa 0.5 (`RMinHash.update` per doc + `RMinHashLSH`)", split, sec, cpu, pairs, ""))
    if not args.skip_datasketch:
        sec, cpu, pairs, split = run_datasketch(texts, args.threshold, args.num_perm)
        results.append(("datasketch 2.0 naive (update per shingle, auto bands)", split, sec, cpu, pairs, ""))

    # The anchor: the faster rensa path of this run (wall and CPU compared separately).
    rensa = [(sec, cpu) for name, _, sec, cpu, _, _ in results if name.startswith("rensa")]
    fastest, fastest_cpu = min(w for w, _ in rensa), min(c for _, c in rensa)
    rows = ["| method | bands x rows | seconds | CPU s | docs/s | speed vs fastest rensa (wall / CPU) | pairs reported "
            "| precision | recall | note |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for name, split, sec, cpu, pairs, note in results:
        p, r, n_true = quality(pairs, planted, sets, args.threshold)
        rows.append(f"| {name} | {split} | {sec:.2f} | {cpu:.2f} | {args.n / sec:,.0f} | {fastest / sec:.2f}x / "
                    f"{fastest_cpu / cpu:.2f}x | {len(pairs)} | {p:.3f} | {r:.3f} | {note} |")
    edges = alignforge_edges(texts, args.threshold, args.num_perm)
    # Every pair any method found (or planted) at or above the threshold: the drops' recall base.
    true_pairs = {p for p in planted if exact_jaccard(sets[p[0]], sets[p[1]]) >= args.threshold}
    for pairs in [r[4] for r in results] + [edges]:
        true_pairs |= {p for p in pairs if exact_jaccard(sets[p[0]], sets[p[1]]) >= args.threshold}
    for name, pairs, kept in extra:
        p, _, _ = quality(pairs, planted, sets, args.threshold)
        resolved = sum(1 for a, b in true_pairs if not (kept[a] and kept[b])) / len(true_pairs)
        rows.append(f"| {name} | | | | | | {len(pairs)} | {p:.3f} | {resolved:.3f} | what the drops rest on; "
                    f"recall = true pairs with a row dropped |")
    p, r, _ = quality(edges, planted, sets, args.threshold)
    rows.append(f"| alignforge default, accepted edges (before clustering) | | | | | | {len(edges)} | {p:.3f} "
                f"| {r:.3f} | untimed |")
    table = "\n".join(rows)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    header = (f"# MinHash near-dedup, {args.n} docs, num_perm={args.num_perm}, threshold={args.threshold}, "
              f"word {NGRAM}-grams; {len(true_pairs)} true pairs (exact Jaccard >= threshold: planted or found "
              f"by any method)\n\n"
              f"{time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} cores, load average at the end {load}\n\n")
    print("\n" + header + table)
    out = Path(__file__).parent / "results" / "minhash.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text(header + table + "\n")


if __name__ == "__main__":
    main()
