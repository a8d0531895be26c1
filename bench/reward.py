"""Reward labelling throughput: one batched call over the shard vs one call per pair, same model.

    python -m bench.reward [--pairs 64] [--judge-pairs 32] [--model PATH] [--batch-size 16]

Scorers, all in this one process on the same (prompt, response) pairs:
  - reward model, transformers backend: batch_size rows per forward vs one pair per call;
  - reward model, vLLM pooling runner: one `classify` over all pairs vs one call per pair;
  - generative judge on the embedded SmolLM2-135M-Instruct (vLLM): one next_token_logprobs call
    over all pairs vs one per pair.
Default reward model: no real reward model is available offline here, so it is the embedded
SmolLM2-135M backbone with a randomly initialised score head (LlamaForSequenceClassification,
fp32): real 135M-model compute, meaningless scores. Pass --model for a real one.
Each scorer gets one untimed full pass first (warm-up). The transformers runs go first, before any vLLM worker exists, so they don't share cores.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

TOPICS = ["photosynthesis", "binary search", "the French revolution", "compound interest", "black holes",
          "sourdough bread", "recursion", "the water cycle", "supply and demand", "vaccines", "jazz", "tides"]
TASKS = ["Explain {t} in two sentences.", "Write a short poem about {t}.", "What is the most common mistake "
         "people make about {t}?", "Give me a step-by-step plan to learn about {t} in a week."]
ANSWERS = ["{t} is a topic many people find interesting.",
           "Here is a short overview of {t}. First, it has a long history. Second, it matters today because it "
           "shapes how we think and act. Finally, learning about it takes practice and curiosity.",
           "I am not sure.",
           "Sure! " + "Let me explain {t} step by step with examples and details. " * 6]


def make_pairs(n: int) -> tuple[list[list[dict[str, str]]], list[str]]:
    prompts, responses = [], []
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        prompts.append([{"role": "user", "content": TASKS[(i // len(TOPICS)) % len(TASKS)].format(t=topic)}])
        responses.append(ANSWERS[i % len(ANSWERS)].format(t=topic))
    return prompts, responses


def build_small_reward_model(folder: Path) -> Path:
    """SmolLM2-135M-Instruct backbone + random 1-output score head, saved fp32 (vLLM CPU needs fp32)."""
    import shutil

    import torch
    from transformers import AutoModelForSequenceClassification

    from engines.embedded import resolve_model

    source = Path(resolve_model(None))
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = model.config.eos_token_id
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (source / name).exists():
            shutil.copy(source / name, folder / name)
    return folder


def timed(score, prompts, responses, one_by_one: bool) -> tuple[float, list[float | None]]:
    started = time.perf_counter()
    if one_by_one:
        results = [score([p], [r])[0] for p, r in zip(prompts, responses)]
    else:
        results = score(prompts, responses)
    return time.perf_counter() - started, [r.score for r in results]


def max_diff(a: list[float | None], b: list[float | None]) -> float:
    return max(abs(x - y) for x, y in zip(a, b) if x is not None and y is not None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--judge-pairs", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--model", default=None, help="reward model folder (default: SmolLM2-135M + random head)")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

    from engines.reward import JudgeReward, RewardModel

    load_start = os.getloadavg()[0]

    prompts, responses = make_pairs(args.pairs)
    rows: list[tuple[str, str, str, int, float, float | None, float | None]] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.model) if args.model else build_small_reward_model(Path(tmp) / "smol-rm")
        label = args.model or "SmolLM2-135M + random head"

        hf = RewardModel(folder, backend="transformers", batch_size=args.batch_size)
        hf.score(prompts, responses)  # warm-up: kernels for these shapes, caches
        t_batch, s_batch = timed(hf.score, prompts, responses, one_by_one=False)
        t_one, s_one = timed(hf.score, prompts, responses, one_by_one=True)
        rows.append((label, "transformers", f"batched (batch_size {args.batch_size})", args.pairs, t_batch, None, None))
        rows.append((label, "transformers", "one by one", args.pairs, t_one, max_diff(s_batch, s_one), None))
        hf_scores = s_batch
        hf.shutdown()

        vl = RewardModel(folder, backend="vllm")
        vl.score(prompts, responses)  # warm-up
        t_batch, v_batch = timed(vl.score, prompts, responses, one_by_one=False)
        t_one, v_one = timed(vl.score, prompts, responses, one_by_one=True)
        rows.append((label, "vLLM pooling", "batched (one classify call)", args.pairs, t_batch, None,
                     max_diff(v_batch, hf_scores)))
        rows.append((label, "vLLM pooling", "one by one", args.pairs, t_one, max_diff(v_batch, v_one), None))
        vl.shutdown()

    from engines import get_engine, shutdown_all

    engine = get_engine(progress=False)
    try:
        judge = JudgeReward(engine)
        jp, jr = prompts[:args.judge_pairs], responses[:args.judge_pairs]
        judge.score(jp, jr)  # warm-up (the first pass over new prompts was 4x slower: measured)
        t_batch, j_batch = timed(judge.score, jp, jr, one_by_one=False)
        t_one, j_one = timed(judge.score, jp, jr, one_by_one=True)
        rows.append(("judge: SmolLM2-135M-Instruct", "vLLM next-token logprobs", "batched (one call)", len(jp),
                     t_batch, None, None))
        rows.append(("judge: SmolLM2-135M-Instruct", "vLLM next-token logprobs", "one by one", len(jp), t_one,
                     max_diff(j_batch, j_one), None))
        missing = judge.stats["missing_rating_tokens"]
    finally:
        shutdown_all()

    lines = ["| scorer | backend | mode | pairs | seconds | pairs/s | time / batched time | max abs diff vs batched | "
             "max abs diff vs transformers |", "|---|---|---|---:|---:|---:|---|---:|---:|"]
    for i, (scorer, backend, mode, n, seconds, diff, cross) in enumerate(rows):
        batched_seconds = rows[i - 1][4] if mode == "one by one" else seconds
        speed = f"{seconds / batched_seconds:.2f}"
        diff_text = "" if diff is None else f"{diff:.2e}"
        cross_text = "" if cross is None else f"{cross:.2e}"
        lines.append(f"| {scorer} | {backend} | {mode} | {n} | {seconds:.2f} | {n / seconds:.1f} | {speed} | "
                     f"{diff_text} | {cross_text} |")
    notes = (f"\nMachine: {platform.machine()}, {os.cpu_count()} CPU cores, no GPU; fp32. Pairs: {args.pairs} "
             f"synthetic (prompt, response) pairs, 9..100 words. Reward model: {label}"
             f"{' (random score head: no real reward model is available offline)' if not args.model else ''}. "
             f"Judge: expected 1..5 rating from next-token logprobs; rating tokens missing: {missing}. "
             f"Shared machine: 1-min load average {load_start:.1f} at start, {os.getloadavg()[0]:.1f} at end; "
             "expect noise of tens of percent.")
    table = "\n".join(lines) + "\n" + notes + "\n"
    print(table)
    out = Path(__file__).parent / "results" / "reward.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("# Reward labelling: batched vs one by one\n\n" + table)


if __name__ == "__main__":
    main()
