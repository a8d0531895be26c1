"""Deita scoring throughput: alignforge's batched vLLM scorer vs the official per-row approach.

Official approach (hkust-nlp/deita Scorer.infer_score): for every row and every score type, one
transformers `generate(max_new_tokens=2, output_scores=True)` call on the raw prompt, reading the
first step's logits of "1".."6". alignforge: DeitaComplexity + DeitaQuality, each ONE engine
call over all rows. Same model (the embedded scorer unless --scorer), same rows, same process;
the transformers baseline runs first, before vLLM's worker exists, so they don't share cores.

    python -m bench.deita [--rows 200] [--baseline-rows 200] [--scorer PATH]
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np
import polars as pl

TASKS = [
    "Explain {t} to a ten-year-old.",
    "Write a haiku about {t}.",
    "List three common misconceptions about {t} and correct each one.",
    "Compare {t} with a closely related idea, then give a table of the differences.",
    "Draft a short email asking a colleague for feedback on a report about {t}.",
    "What is {t}?",
    "Design a one-week study plan for learning {t}, with daily goals and a final self-test.",
    "Summarise the history of {t} in under 100 words.",
    "Write Python code that simulates a simple model of {t} and explain each function.",
    "Argue for and against investing public money in {t}; end with a balanced recommendation.",
]
TOPICS = ["photosynthesis", "compound interest", "the French Revolution", "black holes", "sourdough baking",
          "public-key cryptography", "plate tectonics", "jazz improvisation", "vaccines", "supply chains",
          "sorting algorithms", "the water cycle", "Roman aqueducts", "game theory", "coral reefs",
          "machine translation", "inflation", "chess openings", "volcanoes", "the immune system"]


def make_rows(n: int) -> pl.DataFrame:
    rows = []
    for k in range(n):
        task, topic = TASKS[k % len(TASKS)], TOPICS[(k // len(TASKS)) % len(TOPICS)]
        instruction = task.format(t=topic)
        response = " ".join([f"Here is an answer about {topic}."] +
                            [f"Point {j + 1}: {topic} matters for reason {j + 1}." for j in range(k % 7)])
        rows.append({"id": f"bench-{k:05d}", "instruction": instruction, "response": response})
    return pl.DataFrame(rows)


def official_scores(model_dir: str, prompts: list[str], threads: int | None) -> tuple[list[float], float]:
    """One generate call per prompt, first-step scores, as the official scorer does."""
    import torch

    if threads:  # 0 / None: torch's default
        torch.set_num_threads(threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from filters.deita import expected_score, score_token_ids

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = score_token_ids(tokenizer)
    scores = []
    started = time.perf_counter()
    with torch.no_grad():
        for prompt in prompts:
            input_ids = tokenizer.encode(prompt, return_tensors="pt")
            out = model.generate(input_ids, max_new_tokens=2, num_return_sequences=1, return_dict_in_generate=True,
                                 output_scores=True, pad_token_id=tokenizer.eos_token_id)
            logits = out.scores[0][0].double()
            scores.append(expected_score(torch.log_softmax(logits, -1)[ids].tolist()))
    return scores, time.perf_counter() - started


def get_scorer_engine(scorer: str | None):
    try:
        from engines import get_engine
    except ImportError:  # older tree: the engine class directly
        from engines.vllm_engine import VLLMEngine

        return VLLMEngine(scorer)
    return get_engine(scorer)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--baseline-rows", type=int, default=100, help="rows for the per-row transformers path")
    # Default 1: on the shared 2-core box, 2 torch threads next to other runs' spinning vLLM workers
    # made each generate call ~10x slower (8.6 s vs 0.5 s measured), an unfairly slow baseline.
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="torch threads for the baseline (0 = torch default)")
    parser.add_argument("--scorer", default=None, help="scorer model (default: the embedded model)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "deita.md"))
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")

    from engines.embedded import resolve_model
    from filters.deita import COMPLEXITY_TEMPLATE, QUALITY_TEMPLATE, DeitaComplexity, DeitaQuality

    model_dir = resolve_model(args.scorer)
    df = make_rows(args.rows)
    nb = min(args.baseline_rows, args.rows)
    base = df.head(nb)
    prompts = ([COMPLEXITY_TEMPLATE.format(instruction=i) for i in base["instruction"]] +
               [QUALITY_TEMPLATE.format(instruction=i, output=r) for i, r in zip(base["instruction"], base["response"])])
    print(f"official approach: {len(prompts)} generate calls ({nb} rows x 2 scores) ...", flush=True)
    load_before = os.getloadavg()[0]
    ref, ref_seconds = official_scores(model_dir, prompts, args.torch_threads)
    load_mid = os.getloadavg()[0]

    started = time.perf_counter()
    engine = get_scorer_engine(args.scorer)
    start_seconds = time.perf_counter() - started
    complexity, quality = DeitaComplexity(engine=engine), DeitaQuality(engine=engine)
    complexity(df.head(4))  # warm-up: first-call compilation is not per-row cost
    started = time.perf_counter()
    scored = quality(complexity(df))
    ours_seconds = time.perf_counter() - started
    load_after = os.getloadavg()[0]
    missing = complexity.stats["rows_missing_tokens"] + quality.stats["rows_missing_tokens"]
    ours = scored["deita_complexity"].to_list()[:nb] + scored["deita_quality"].to_list()[:nb]
    diffs = [abs(a - b) for a, b in zip(ours, ref) if a is not None and b is not None]
    max_diff = max(diffs) if diffs else float("nan")
    ours_rate, ref_rate = args.rows / ours_seconds, nb / ref_seconds
    engine.shutdown()

    c = np.array(scored["deita_complexity"].drop_nulls().to_list())
    table = "\n".join([
        "| approach | rows | seconds | rows/s (complexity + quality) | speedup |",
        "|---|---:|---:|---:|---:|",
        f"| official: transformers `generate` per row (fp32) | {nb} | {ref_seconds:.2f} | {ref_rate:.2f} | 1.0x |",
        f"| alignforge: batched vLLM, one call per score type (fp32) | {args.rows} | {ours_seconds:.2f} | "
        f"{ours_rate:.2f} | {ours_rate / ref_rate:.1f}x |",
    ])
    notes = "\n".join([
        "",
        f"- max |score difference| over {len(diffs)} shared scores: {max_diff:.2e} (target < 1e-3)",
        f"- rows with a missing score token: {missing}; logprob source: {complexity.stats['logprob_source']}",
        f"- complexity scores: mean {c.mean():.3f}, min {c.min():.3f}, max {c.max():.3f}" if c.size else "",
        f"- scorer: {model_dir}; vLLM engine start {start_seconds:.1f}s (excluded, as is a 4-row warm-up)",
        f"- machine: {platform.machine()}, {os.cpu_count()} CPU cores, "
        f"VLLM_CPU_NUM_OF_RESERVED_CPU={os.environ.get('VLLM_CPU_NUM_OF_RESERVED_CPU')}, baseline torch threads "
        f"{args.torch_threads or 'default'}; 1-min load average before / between / after: "
        f"{load_before:.1f} / {load_mid:.1f} / {load_after:.1f} (the box is shared: other runs' spinning "
        "threads slow both paths, the per-row one most)",
    ])
    text = f"# Deita scoring: batched vLLM vs per-row transformers\n\n{table}\n{notes}\n"
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
