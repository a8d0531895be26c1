"""NC vs i.i.d. candidate sets (Community Alignment, arXiv 2507.09650): diversity and throughput.

Same model, same temperature, same prompts (24 value-laden questions written for this bench):
  nc    `stages.nc_sampling.NCCandidates`: ONE request per prompt asks for k differing replies
        (structured output: JSON schema for exactly k strings);
  iid   `IIDCandidates` (pair_with_input): k independent samples per prompt, the baseline;
  nc-headers (optional) the same NC request in free text with "# Response A:" headers, parsed
        tolerantly: what the format guarantee buys.
Then `filters.diversity.Diversity` (all-MiniLM; value-pole judge on the same model with --judge)
and the paired table (mean NC - i.i.d. difference, bootstrap 95% CI). Throughput: candidate sets/s
and generated tokens/s of each step call (one NC call vs k i.i.d. requests per set), one warm-up
set each first. Reports what it measures: at 135M parameters the NC effect is not expected.

    flock /tmp/alignforge-vllm.lock python -m bench.nc [--prompts 24] [--k 4] [--judge] [--headers]
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

QUESTIONS = [
    "My parents are getting old. Should I move back to my hometown to look after them, or stay in the city for my career?",
    "Is it okay to lie to a friend to spare their feelings?",
    "Should children be free to choose their own religion, or follow their family's?",
    "I got a well-paid offer from a company whose products I find harmful. Should I take it?",
    "How much of my salary should I give to charity?",
    "Should I tell my manager that a colleague is cutting corners?",
    "Is it better to save money for the future or enjoy it while I'm young?",
    "My teenage daughter wants a tattoo. Should I allow it?",
    "Should people be allowed to own guns for self-defence?",
    "Is it wrong to eat meat?",
    "My partner wants to move abroad for their job. Should I give up mine to follow?",
    "Should I have children even though the world's future looks uncertain?",
    "Is it acceptable to download films without paying if they aren't sold in my country?",
    "Should my small town let a big factory open if it brings jobs but pollution?",
    "How should I respond when my grandparents make old-fashioned remarks at dinner?",
    "Should I quit a stable job to start my own business?",
    "Is it fair for schools to group pupils by ability?",
    "Should I report a neighbour who I think is working without paying tax?",
    "Is marriage still worth it today?",
    "My friend asked me to lie to the police about where he was last night. What should I do?",
    "Should rich countries accept more refugees?",
    "Is it selfish to put my own mental health before my family's needs?",
    "Should I let my elderly father keep driving?",
    "What matters more in choosing a job: meaning or money?",
    "Should I forgive a sibling who stole from me?",
    "Is it right to break an unjust law?",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=24)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--max-tokens-per-candidate", type=int, default=96)
    parser.add_argument("--judge", action="store_true", help="value-pole labels with the same (small) model")
    parser.add_argument("--headers", action="store_true", help="also run NC in free text with header parsing")
    parser.add_argument("--model", default=None, help="model folder or hub id (default: embedded SmolLM2)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "nc.md"))
    args = parser.parse_args()
    if not 1 <= args.prompts <= len(QUESTIONS):
        parser.error(f"--prompts must be 1..{len(QUESTIONS)}")

    import polars as pl

    from engines import get_engine, shutdown_all
    from filters.diversity import Diversity, comparison_markdown, paired_comparison
    from stages.nc_sampling import IIDCandidates, NCCandidates

    load_before = os.getloadavg()
    started = time.perf_counter()
    engine = get_engine(args.model, progress=False)
    start_seconds = time.perf_counter() - started
    df = pl.DataFrame({"id": [f"q{i:02d}" for i in range(args.prompts)], "instruction": QUESTIONS[: args.prompts]})
    common = dict(k=args.k, temperature=args.temperature, max_tokens_per_candidate=args.max_tokens_per_candidate)
    warm = pl.DataFrame({"id": ["warm"], "instruction": ["Should I learn to cook or keep eating out?"]})

    def timed(step, frame):
        step(warm if not getattr(step.config, "pair_with_input", False) else nc_warm)  # warm-up (grammar compile)
        t0 = time.perf_counter()
        out = step(frame)
        return out, time.perf_counter() - t0, int(step.stats.get("generated_tokens", 0))

    nc_step = NCCandidates(engine=engine, structured="json", **common)
    nc_warm = nc_step(warm)
    nc, nc_s, nc_tok = timed(nc_step, df)
    # Equal budget, equal rule: the NC arm's strings are capped by the JSON schema's maxLength (never
    # flagged as cut), so the i.i.d. arm keeps samples cut by max_tokens too (at 135M nearly every
    # i.i.d. sample runs to the limit: with the step's default every i.i.d. set was dropped).
    iid, iid_s, iid_tok = timed(IIDCandidates(engine=engine, pair_with_input=True, drop_truncated=False, **common), nc)
    iid = iid.filter(pl.col("method") == "iid")
    runs = [("NC (json schema, 1 request/set)", nc, nc_s, nc_tok, args.prompts),
            (f"i.i.d. ({args.k} requests/set)", iid, iid_s, iid_tok, args.prompts * args.k)]
    if args.headers:
        hd, hd_s, hd_tok = timed(NCCandidates(engine=engine, structured="headers", **common), df)
        runs.append(("NC (free text, header parsing)", hd, hd_s, hd_tok, args.prompts))

    both = pl.concat([nc, iid], how="diagonal_relaxed")
    t0 = time.perf_counter()
    scored = Diversity(engine=engine if args.judge else None, judge=args.judge)(both)
    diversity_s = time.perf_counter() - t0
    table = paired_comparison(scored)
    load_after = os.getloadavg()

    lines = [f"# NC vs i.i.d. candidate sets ({args.prompts} prompts, k={args.k})", "",
             f"Model `{engine.model_id}` ({'cpu' if getattr(engine, 'on_cpu', True) else 'gpu'}), "
             f"{os.cpu_count()} cores, {platform.machine()}; T {args.temperature}, top_p 1.0, "
             f"max_tokens_per_candidate {args.max_tokens_per_candidate} (NC request: k x (that + 16) + 16); "
             f"engine start {start_seconds:.1f} s; load average {load_before[0]:.2f} before, "
             f"{load_after[0]:.2f} after (1 min). Embeddings: all-MiniLM-L6-v2; value judge: "
             f"{'the same model, structured choice (weak judge at this size)' if args.judge else 'off'}.", "",
             "## Paired table (NC - i.i.d., same prompts; diversity over pairs where both sets were kept)", "",
             comparison_markdown(table), "",
             "## Throughput (one step call each, after one warm-up set)", "",
             "| run | sets | kept | requests | seconds | sets/s | generated tokens | tokens/s | drop reasons |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for label, frame, seconds, tokens, requests in runs:
        drops = frame.filter(~pl.col("keep"))["drop_reason"].value_counts(sort=True).rows()
        lines.append(f"| {label} | {frame.height} | {int(frame['keep'].sum())} | {requests} | {seconds:.1f} | "
                     f"{frame.height / seconds:.3f} | {tokens} | {tokens / seconds:.1f} | "
                     f"{', '.join(f'{r} {n}' for r, n in drops) or 'none'} |")
    lines += ["", f"Diversity step (embeddings{' + judge' if args.judge else ''}) over {both.height} sets: "
              f"{diversity_s:.1f} s.", ""]
    example = nc.filter(pl.col("keep")).head(1)
    if example.height:
        lines += ["Example NC set (first kept):", "", "```", example["joint"][0][:1500], "```", ""]
    text = "\n".join(lines)
    print(text)
    Path(args.out).write_text(text)
    shutdown_all()


if __name__ == "__main__":
    main()
