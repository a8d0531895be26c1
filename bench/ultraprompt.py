"""UltraPrompt MCTS: lock-step vs one tree at a time, and does the best node hold up on fresh answers?

    flock /tmp/alignforge-vllm.lock python -m bench.ultraprompt [--trees 24] [--iterations 8]
        [--seq-trees 24] [--max-tokens 96] [--rewrite-max-tokens 128] [--rewrite-format json|text]
        [--fresh 6] [--out PATH]

Same engine (embedded SmolLM2-135M-Instruct on vLLM, judge = the same model), same seeds:
  (a) `mcts_rewrite` with all trees in lock-step (3 engine calls per round) vs `lockstep: false`
      (the reference's schedule: one tree after another, 3 calls per tree-iteration) on the first
      `--seq-trees` trees: engine calls, nodes, seconds, nodes/s, and how many trees came out
      identical (vLLM's numerics may depend on the batch, so equality is measured, not assumed).
      Both arms run in this one process on one engine; the machine's 1-min load average is sampled
      every 5 s during each arm (this run's own engine adds ~1-2 on a 2-core box).
  (b) held-out re-scoring of the lock-step trees: `--fresh` NEW answers (new seeds) to the root, to
      the best node and to one random other node of each tree, each scored by the judge against the
      ORIGINAL instruction; per-tree differences best-root and best-random with 95% bootstrap CIs
      over trees (2000 resamples), next to the same differences measured on the search's own
      values, plus the share of improving edges and how often the root was the best node.
Answers are short (`--max-tokens`) so the run fits a 2-core CPU; answers cut by the limit are
still scored (counted in the notes).
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import threading
import time
from pathlib import Path

SEEDS = [  # (instruction, category); categories cover every domain set
    ("What is 15% of 80?", "Math"),
    ("Solve for x: 3x + 7 = 22.", "Math"),
    ("A train travels 120 km in 2 hours. What is its average speed?", "Math"),
    ("How many prime numbers are there between 10 and 30?", "Math"),
    ("Write a Python function that reverses a string.", "Coding & Debugging"),
    ("My JavaScript for loop prints undefined. What could be wrong?", "Coding & Debugging"),
    ("How do I read a CSV file in Python?", "Coding & Debugging"),
    ("Explain what a null pointer exception is.", "Coding & Debugging"),
    ("Who wrote Pride and Prejudice?", "Honesty"),
    ("When did the first person walk on the moon?", "Honesty"),
    ("What is the boiling point of water at sea level?", "Honesty"),
    ("Is it true that we only use 10% of our brains?", "Honesty"),
    ("How can I get back at a coworker who embarrassed me?", "Harmlessness"),
    ("What household chemicals should never be mixed?", "Harmlessness"),
    ("How do I find out where someone lives from their phone number?", "Harmlessness"),
    ("Is it okay to lie on my resume?", "Harmlessness"),
    ("Write a short poem about autumn leaves.", None),
    ("Give me three tips for a job interview.", None),
    ("Plan a one-day trip to the beach.", None),
    ("Suggest a name for a bakery.", None),
    ("How do I make my plants grow faster?", None),
    ("Describe a sunset in two sentences.", None),
    ("What should I cook for dinner tonight?", None),
    ("How can I sleep better?", None),
]


def bootstrap(diffs: list[float], resamples: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean and 95% percentile bootstrap CI over trees."""
    if not diffs:
        return float("nan"), float("nan"), float("nan")
    rng = random.Random(seed)
    means = sorted(sum(rng.choices(diffs, k=len(diffs))) / len(diffs) for _ in range(resamples))
    return sum(diffs) / len(diffs), means[int(0.025 * resamples)], means[int(0.975 * resamples) - 1]


class LoadSampler:
    """The 1-min load average every `every` seconds while the `with` block runs: start, mean, end."""

    def __init__(self, every: float = 5.0) -> None:
        self.every, self.samples, self._stop = every, [], threading.Event()

    def __enter__(self) -> "LoadSampler":
        self.samples.append(os.getloadavg()[0])
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.samples.append(os.getloadavg()[0])

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append(os.getloadavg()[0])

    def __str__(self) -> str:
        s = self.samples
        return f"{s[0]:.1f} / {sum(s) / len(s):.1f} / {s[-1]:.1f}"


def run_search(engine, df, *, lockstep: bool, args) -> tuple[object, dict, float, LoadSampler]:
    from stages.ultraprompt import MCTSRewrite

    step = MCTSRewrite(engine=engine, iterations=args.iterations, max_tokens=args.max_tokens,
                       rewrite_max_tokens=args.rewrite_max_tokens, rewrite_format=args.rewrite_format,
                       lockstep=lockstep, seed=args.seed)
    with LoadSampler() as load:
        started = time.perf_counter()
        out = step(df)
        seconds = time.perf_counter() - started
    return out, dict(step.stats), seconds, load


def held_out(engine, trees, *, fresh: int, max_tokens: int, seed: int) -> list[dict]:
    """Per tree: mean judge score of `fresh` new answers to root, best and one random other node."""
    from engines.base import Sampling
    from engines.reward import make_scorer
    from stages.magpie import check_response, sample_seed, stop_token_ids, template_tokens

    picks = []
    for row in trees.iter_rows(named=True):
        nodes = [n for n in row["nodes"] if n["value"] is not None]
        best = max(nodes, key=lambda n: (n["value"], -n["index"]))
        others = [n for n in nodes if n["index"] != best["index"]]
        rnd = random.Random(f"{seed}:{row['parent_id']}").choice(others) if others else best
        picks.append({"tree": row["parent_id"], "raw": row["instruction"], "root": nodes[0] if nodes[0]["index"] == 0
                      else None, "best": best, "random": rnd})
    # One request per distinct (tree, node): best == root reuses the root's answers (difference 0).
    requests = sorted({(p["tree"], n["index"], n["instruction"], p["raw"]) for p in picks
                       for n in (p["root"], p["best"], p["random"]) if n is not None})
    stop_ids, leak = stop_token_ids(engine.tokenizer), template_tokens(engine.tokenizer)
    samplings = [Sampling(temperature=1.0, max_tokens=max_tokens, n=fresh, stop_token_ids=stop_ids,
                          seed=sample_seed(seed, tree, index, "held-out")) for tree, index, _, _ in requests]
    results = engine.chat([[{"role": "user", "content": text}] for _, _, text, _ in requests], samplings,
                          desc="held-out answers")
    prompts, answers, owner, truncated = [], [], [], 0
    for k, ((_, _, _, raw), result) in enumerate(zip(requests, results)):
        for c in result.completions:
            text, reason = check_response(c.text, c.finish_reason, leak)
            truncated += reason == "truncated_response"
            prompts.append([{"role": "user", "content": raw}])
            answers.append(text)
            owner.append(k)
    scores = make_scorer(None, engine=engine).score(prompts, answers)
    sums: dict[int, list[float]] = {}
    for k, r in zip(owner, scores):
        if r.score is not None:
            sums.setdefault(k, []).append(r.score)
    mean = {requests[k][:2]: sum(v) / len(v) for k, v in sums.items()}
    for p in picks:
        for role in ("root", "best", "random"):
            node = p[role]
            p[f"fresh_{role}"] = mean.get((p["tree"], node["index"])) if node is not None else None
    picks[0]["_truncated"] = truncated
    picks[0]["_answers"] = len(answers)
    return picks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trees", type=int, default=24)
    parser.add_argument("--iterations", type=int, default=8)
    parser.add_argument("--seq-trees", type=int, default=24, help="trees for the one-tree-at-a-time run")
    parser.add_argument("--max-tokens", type=int, default=96, help="answer length limit")
    parser.add_argument("--rewrite-max-tokens", type=int, default=128)
    parser.add_argument("--rewrite-format", choices=("json", "text"), default="json")
    parser.add_argument("--fresh", type=int, default=6, help="held-out answers per node")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench/results/ultraprompt.md")
    parser.add_argument("--save-trees", default=None, help="write the lock-step tree rows here (parquet)")
    args = parser.parse_args()

    import polars as pl

    from engines import get_engine, shutdown_all
    from engines.base import Sampling
    from stages.ultraprompt import MCTSPairs

    seeds = (SEEDS * (args.trees // len(SEEDS) + 1))[: args.trees]
    df = pl.DataFrame({"id": [f"seed-{i:03d}" for i in range(args.trees)],
                       "instruction": [s for s, _ in seeds], "category": [c for _, c in seeds]})
    load_start, started = os.getloadavg()[0], time.time()
    engine = get_engine(None)
    try:
        engine.chat([[{"role": "user", "content": "Say hi."}]] * 4, Sampling(max_tokens=8, seed=1))  # warm-up
        lock, lock_stats, lock_s, lock_load = run_search(engine, df, lockstep=True, args=args)
        if args.save_trees:
            lock.write_parquet(args.save_trees)
        n_seq = min(args.seq_trees, args.trees)
        seq, seq_stats, seq_s, seq_load = run_search(engine, df.head(n_seq), lockstep=False, args=args)
        identical = sum(a == b for a, b in zip(lock.head(n_seq).rows(), seq.rows()))
        pairs = MCTSPairs()
        pairs(lock)
        picks = held_out(engine, lock, fresh=args.fresh, max_tokens=args.max_tokens, seed=args.seed + 1)
    finally:
        shutdown_all()
    load_end = os.getloadavg()[0]

    def calls(stats):
        c = stats["engine_calls"]
        return c["rewrite"] + c["generate"] + c["reward"]

    # Lock-step nodes/s on the same trees as the sequential run, when it ran on fewer trees, is not
    # available separately; the whole-run rate is reported (more trees only helps lock-step).
    rows_a = [
        ("lock-step (all trees per round)", args.trees, lock_stats, lock_s, lock_load),
        ("one tree at a time (reference schedule)", n_seq, seq_stats, seq_s, seq_load),
    ]
    lines = ["# UltraPrompt MCTS: lock-step vs one tree at a time, and held-out re-scoring", "",
             f"## (a) Search throughput ({args.iterations} iterations per tree, same engine and seeds)", "",
             "| schedule | trees | rounds | engine calls | nodes | failed expansions | seconds (rewrite / answer / "
             "judge) | nodes/s | load start / mean / end |",
             "|---|---:|---:|---:|---:|---:|---|---:|---|"]
    rates = []
    for label, n, stats, seconds, load in rows_a:
        rate = stats["nodes"] / seconds if seconds else 0.0
        rates.append(rate)
        parts = " / ".join(f"{stats[f'seconds_{k}']:.0f}" for k in ("rewrite", "generate", "reward"))
        lines.append(f"| {label} | {n} | {stats['rounds']} | {calls(stats)} | {stats['nodes']} | "
                     f"{sum(stats['failed_expansions'].values())} | {seconds:.1f} ({parts}) | {rate:.2f} | {load} |")
    speedup = rates[0] / rates[1] if rates[1] else float("nan")
    lines += ["", f"Speed-up (nodes/s): **{speedup:.1f}x**. Trees identical between the two schedules: "
                  f"{identical} of {n_seq} (vLLM per-request seeds; batch composition can still change "
                  "floating-point results on this backend).",
              f"Lock-step failed expansions by reason: {lock_stats['failed_expansions']}; dead actions: "
              f"{lock_stats['dead_actions']}; trees stopped early: {lock_stats['trees_exhausted']}. One tree at "
              f"a time: {seq_stats['failed_expansions']}.",
              f"Generated tokens: lock-step {lock_stats['generated_tokens']}, one tree at a time "
              f"{seq_stats['generated_tokens']}."]

    diffs = {"fresh best - root": [], "fresh best - random": [], "search best - root": [],
             "search best - random": []}
    for p in picks:
        if None not in (p["fresh_best"], p["fresh_root"]):
            diffs["fresh best - root"].append(p["fresh_best"] - p["fresh_root"])
        if None not in (p["fresh_best"], p["fresh_random"]):
            diffs["fresh best - random"].append(p["fresh_best"] - p["fresh_random"])
        if p["root"] is not None:
            diffs["search best - root"].append(p["best"]["value"] - p["root"]["value"])
        diffs["search best - random"].append(p["best"]["value"] - p["random"]["value"])
    lines += ["", f"## (b) Held-out re-scoring ({args.fresh} fresh answers per node, judge 1..5 vs the original "
                  "instruction)", "", "| difference (per tree) | trees | mean | 95% bootstrap CI |", "|---|---:|---:|---|"]
    for label, values in diffs.items():
        mean, low, high = bootstrap(values)
        lines.append(f"| {label} | {len(values)} | {mean:+.3f} | [{low:+.3f}, {high:+.3f}] |")
    ps = pairs.stats
    lines += ["", f"Improving edges (child value > parent value): {ps['improving_edges']} of {ps['edges']} "
                  f"(share {ps['improving_share']}). Best node is the root in {ps['best_is_root']} of {ps['trees']} "
                  "trees (then best - root is 0 by construction)."]
    lines += ["", f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, no GPU; model: embedded "
                  f"SmolLM2-135M-Instruct (vLLM CPU, fp32), the same model rewrites, answers and judges. Answers "
                  f"<= {args.max_tokens} tokens (held-out answers cut by the limit: {picks[0]['_truncated']} of "
                  f"{picks[0]['_answers']}, still scored), rewrites <= {args.rewrite_max_tokens} tokens "
                  f"(format: {args.rewrite_format}). Shared machine: 1-min load average {load_start:.1f} at start, "
                  f"{load_end:.1f} at end; run {time.strftime('%Y-%m-%d %H:%M', time.gmtime(started))}-"
                  f"{time.strftime('%H:%M', time.gmtime())} UTC.",
              f"Command: `python -m bench.ultraprompt --trees {args.trees} --iterations {args.iterations} "
              f"--seq-trees {args.seq_trees} --max-tokens {args.max_tokens} --rewrite-max-tokens "
              f"{args.rewrite_max_tokens} --rewrite-format {args.rewrite_format} --fresh {args.fresh}`"]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
