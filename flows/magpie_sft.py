"""Recipe magpie-sft: Magpie self-synthesis -> checks -> exact dedup -> published TRL SFT dataset.

seeds -> magpie_instructions -> magpie_responses (turns >= 2: Magpie-MT) -> magpie_checks
      -> dedup_instructions (global: first of each exact duplicate) -> <out>/publish
"""

from __future__ import annotations

from typing import Any

from prefect import flow
from pydantic import BaseModel, ConfigDict, Field

from flows.runner import LazyEngine, global_task, seed_shards, stage_summary, step_task
from stages.magpie import (MagpieChecks, MagpieInstructions, MagpieResponses, select_first_of_duplicates,
                           template_tokens)


class MagpieSFTParams(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    n: int = Field(200, ge=1, description="conversations to synthesise (before drops)")
    turns: int = Field(1, ge=1, description="user/assistant rounds; >= 2 = Magpie-MT")
    shard_size: int = Field(64, ge=1, description="rows per shard (unit of resume and of one engine call)")
    seed: int = Field(0, description="same seed + config -> same ids and texts")
    model: str | None = Field(None, description="HF folder or hub id; None = the embedded SmolLM2-135M-Instruct")
    max_tokens_instruction: int = Field(128, ge=1)
    max_tokens_response: int = Field(512, ge=1)
    temperature_instruction: float = Field(1.0, ge=0.0)
    top_p_instruction: float = Field(1.0, gt=0.0, le=1.0)
    temperature_response: float = Field(0.0, ge=0.0, description="0 = greedy; Magpie's option 0.6 / top_p 0.9")
    top_p_response: float = Field(1.0, gt=0.0, le=1.0)
    early_stop: bool = Field(True, description="instructions end at the first newline")
    sanitize: bool = Field(True, description="cut leaked answers and 'Task:' / 'Question 1:' labels")
    suppress_headers: bool = Field(False, description="forbid a markdown header as an instruction's first token")
    system_prompts: tuple[str, ...] = Field((), description="system-prompt variants for instruction sampling")
    test_size: float = Field(0.0, ge=0.0, lt=1.0, description="held-out share (data/test-*.parquet)")
    out: str = Field("runs/magpie-sft", description="run folder; the dataset is published to <out>/publish")


def build_steps(params: MagpieSFTParams, engine: Any) -> tuple[MagpieInstructions, MagpieResponses]:
    instructions = MagpieInstructions(
        engine=engine, seed=params.seed, system_prompts=tuple(params.system_prompts),
        temperature=params.temperature_instruction, top_p=params.top_p_instruction,
        max_tokens=params.max_tokens_instruction, early_stop=params.early_stop, sanitize=params.sanitize,
        suppress_headers=params.suppress_headers)
    responses = MagpieResponses(
        engine=engine, seed=params.seed, turns=params.turns, temperature=params.temperature_response,
        top_p=params.top_p_response, max_tokens=params.max_tokens_response,
        followup_temperature=params.temperature_instruction, followup_top_p=params.top_p_instruction,
        followup_max_tokens=params.max_tokens_instruction, early_stop=params.early_stop, sanitize=params.sanitize)
    return instructions, responses


@flow(name="magpie-sft", log_prints=False)
def magpie_sft(params: MagpieSFTParams | dict | None = None, engine: Any = None) -> dict:
    """Synthesise `n` Magpie conversations and publish them as a TRL SFT dataset (`messages`).

    `engine`: an engines.base.Engine to use instead of starting vLLM on `params.model` (tests)."""
    import polars as pl

    import storage

    params = params if isinstance(params, MagpieSFTParams) else MagpieSFTParams(**(params or {}))
    run = params.out.rstrip("/")
    owned = engine is None
    engine = LazyEngine(params.model) if owned else engine
    try:
        tokenizer = engine.tokenizer
        leak_tokens = template_tokens(tokenizer)  # also fails fast on a model without chat template
        instructions, responses = build_steps(params, engine)

        seeds = seed_shards(params.n, params.shard_size, run)
        instr_ds = step_task(instructions, seeds, run, desc="magpie instructions")
        resp_ds = step_task(responses, instr_ds, run, desc="magpie responses")
        checked = step_task(MagpieChecks(template_tokens=leak_tokens), resp_ds, run, desc="basic checks")
        final = global_task("dedup_instructions", select_first_of_duplicates, checked, run,
                            config={"column": "instruction", "keep": "lowest id"}, desc="exact dedup")
    finally:
        if owned:
            engine.shutdown()

    stages = {"instructions": instr_ds, "responses": resp_ds, "checks": checked, "dedup": final}
    drops: dict[str, int] = {}
    for ds in stages.values():
        for reason, count in stage_summary(ds)["dropped"].items():
            drops[reason] = drops.get(reason, 0) + count
    generated = [stage_summary(ds) for ds in (instr_ds, resp_ds)]
    tokens = sum(s["generated_tokens"] for s in generated)
    seconds = sum(s["seconds"] for s in generated)

    kept = final.read().sort("id")
    published = kept.select("id", "parent_id", "origin", "messages")
    rejected = [ds.read(rejected=True) for ds in stages.values()]
    rejected_rows = pl.concat(
        [df.select("id", "origin", pl.col("instruction") if "instruction" in df.columns else
                   pl.lit(None, dtype=pl.Utf8).alias("instruction"), "drop_reason") for df in rejected if df.height],
        how="vertical_relaxed") if any(df.height for df in rejected) else None
    sampling = {
        "instruction": {"temperature": params.temperature_instruction, "top_p": params.top_p_instruction,
                        "max_tokens": params.max_tokens_instruction, "early_stop": params.early_stop,
                        "sanitize": params.sanitize, "suppress_headers": params.suppress_headers,
                        "system_prompts": list(params.system_prompts)},
        "response": {"temperature": params.temperature_response, "top_p": params.top_p_response,
                     "max_tokens": params.max_tokens_response},
        "turns": params.turns, "seed": params.seed,
    }
    card = {
        "title": "Magpie SFT dataset (alignforge)",
        "recipe": "magpie-sft",
        "method": "Magpie self-synthesis (arXiv 2406.08464)" + (", Magpie-MT" if params.turns > 1 else ""),
        "model": engine.model_id,
        "sampling": sampling,
        "params": params.model_dump(mode="json"),
        "lineage": {name: ds.manifest() for name, ds in {"seeds": seeds, **stages}.items()},
        "drop_stats": drops,
        "generated_tokens": tokens,
        "tokens_per_second": round(tokens / seconds, 2) if seconds else 0.0,
    }
    if published.height == 0:
        from schemas import SchemaError

        raise SchemaError(f"magpie-sft: no conversation survived the run (dropped: {dict(sorted(drops.items()))})",
                          dataset=final.url, fix="raise max_tokens_instruction / max_tokens_response (truncated rows "
                          "are dropped) or n; the rejected rows and reasons are in each stage's rejected/ folder")
    publish_url = f"{run}/publish"
    storage.publish(publish_url, configs={"default": published}, rejected=rejected_rows,
                    test_size=params.test_size, seed=params.seed, card=card)
    return {"dataset": publish_url, "rows_kept": published.height, "rows_requested": params.n,
            "dropped": dict(sorted(drops.items())), "generated_tokens": tokens, "generation_seconds": round(seconds, 2),
            "tokens_per_second": round(tokens / seconds, 1) if seconds else 0.0}
