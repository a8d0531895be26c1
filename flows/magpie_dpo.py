"""Recipe magpie-dpo: Magpie instructions -> best-of-N -> reward labels -> TRL preference dataset.

seeds -> magpie_instructions -> dedup_instructions (global) -> best_of_n (k samples, T 0.8)
      -> reward_label (reward model, or the judge on the chat model) -> build_preferences
      -> <out>/publish: default config (prompt / chosen / rejected / score_chosen / score_rejected)
         + `candidates` config (all scored responses per prompt) + rejected/ with reasons.

Margin: a pair is kept when score_chosen - score_rejected > margin; the default 0.0 drops only
exact ties (all candidates scored alike, chosen == rejected). A reward model that can't be used
(e.g. no chat template) drops every candidate with a counted reason; the run still finishes and
reports it instead of crashing.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from prefect import flow
from pydantic import BaseModel, ConfigDict, Field

from flows.runner import LazyEngine, global_task, seed_shards, stage_summary, step_task

log = logging.getLogger(__name__)


class RewardParams(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str | None = Field(None, description="sequence-classification reward model (folder or hub id); "
                                                "None = generative judge on the chat model")
    backend: Literal["auto", "vllm", "transformers"] = "auto"
    template: Literal["chat", "plain"] = Field("chat", description="'plain' for reward models without a chat template")
    max_length: int | None = Field(None, ge=8, description="context limit; longer pairs are dropped 'too_long'")
    batch_size: int = Field(16, ge=1)
    score_head: int = Field(0, ge=0, description="output index of multi-head reward models")
    trust_remote_code: bool = False
    judge_scale: int = Field(5, ge=2, le=9, description="the judge rates 1..judge_scale")


class MagpieDPOParams(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    n: int = Field(200, ge=1, description="instructions to synthesise (before drops)")
    samples: int = Field(5, ge=2, description="responses per instruction (Magpie DPO: 5)")
    shard_size: int = Field(64, ge=1, description="instructions per shard (unit of resume and of one engine call)")
    seed: int = 0
    model: str | None = Field(None, description="chat model; None = the embedded SmolLM2-135M-Instruct")
    max_tokens_instruction: int = Field(128, ge=1)
    max_tokens_response: int = Field(512, ge=1)
    temperature_instruction: float = Field(1.0, ge=0.0)
    top_p_instruction: float = Field(1.0, gt=0.0, le=1.0)
    temperature: float = Field(0.8, ge=0.0, description="candidate sampling temperature (Magpie DPO: 0.8)")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    drop_truncated: bool = Field(True, description="candidates cut by max_tokens_response are not scored")
    early_stop: bool = True
    sanitize: bool = True
    reward: RewardParams = Field(default_factory=RewardParams)
    margin: float = Field(0.0, ge=0.0, description="keep pairs with score_chosen - score_rejected > margin")
    test_size: float = Field(0.02, ge=0.0, lt=1.0, description="held-out share (Magpie: 2%)")
    out: str = Field("runs/magpie-dpo", description="run folder; the dataset is published to <out>/publish")


def build_steps(params: MagpieDPOParams, engine: Any):
    from filters.reward import RewardLabel
    from stages.best_of_n import BestOfN
    from stages.magpie import MagpieInstructions

    instructions = MagpieInstructions(
        engine=engine, seed=params.seed, temperature=params.temperature_instruction, top_p=params.top_p_instruction,
        max_tokens=params.max_tokens_instruction, early_stop=params.early_stop, sanitize=params.sanitize)
    best_of_n = BestOfN(engine=engine, k=params.samples, temperature=params.temperature, top_p=params.top_p,
                        max_tokens=params.max_tokens_response, seed=params.seed, drop_truncated=params.drop_truncated)
    r = params.reward
    reward = RewardLabel(engine=None if r.model else engine, model=r.model, backend=r.backend, template=r.template,
                         max_length=r.max_length, batch_size=r.batch_size, score_head=r.score_head,
                         trust_remote_code=r.trust_remote_code, judge_scale=r.judge_scale)
    return instructions, best_of_n, reward


def _reward_model_errors(reward: Any, input_ds: Any, run: str) -> list[str]:
    """Load the reward model up front (cached per process, so the stage reuses it) to report WHY it
    can't be used; the stage itself turns that into counted drops. Skipped when the stage is done."""
    import storage
    from engines.reward import RewardModelError
    from flows.runner import stage_url, step_fingerprint

    if not reward.config.model:
        return []
    if storage.ShardedDataset(stage_url(run, reward.name, step_fingerprint(reward, input_ds))).committed:
        return []
    try:
        reward.scorer()
    except RewardModelError as error:
        return [str(error)]
    return []


@flow(name="magpie-dpo", log_prints=False)
def magpie_dpo(params: MagpieDPOParams | dict | None = None, engine: Any = None) -> dict:
    """Synthesise `n` instructions, sample `samples` answers each, score them and publish preference pairs.

    `engine`: an engines.base.Engine to use instead of starting vLLM on `params.model` (tests);
    the caller keeps ownership (it is not shut down here)."""
    import polars as pl

    import storage
    from filters.reward import _SCORERS
    from schemas.preference import build_preferences
    from stages.magpie import select_first_of_duplicates, template_tokens

    params = params if isinstance(params, MagpieDPOParams) else MagpieDPOParams(**(params or {}))
    run = params.out.rstrip("/")
    owned = engine is None
    engine = LazyEngine(params.model) if owned else engine
    try:
        template_tokens(engine.tokenizer)  # fails fast on a chat model without a chat template
        instructions, best_of_n, reward = build_steps(params, engine)
        seeds = seed_shards(params.n, params.shard_size, run)
        instr_ds = step_task(instructions, seeds, run, desc="magpie instructions")
        unique = global_task("dedup_instructions", select_first_of_duplicates, instr_ds, run,
                             config={"column": "instruction", "keep": "lowest id"}, desc="exact dedup")
        cand_ds = step_task(best_of_n, unique, run, desc=f"best-of-{params.samples}")
        if params.reward.model and owned:
            engine.shutdown()  # free the chat model before the reward model loads (one model at a time)
        errors = _reward_model_errors(reward, cand_ds, run)
        scored_ds = step_task(reward, cand_ds, run, desc="reward labels")
    finally:
        if owned:
            engine.shutdown()
        for scorer in list(_SCORERS.values()):
            scorer.shutdown()
        _SCORERS.clear()

    stages = {"instructions": instr_ds, "dedup": unique, "candidates": cand_ds, "reward": scored_ds}
    drops: dict[str, int] = {}
    for ds in stages.values():
        for reason, count in stage_summary(ds)["dropped"].items():
            drops[reason] = drops.get(reason, 0) + count

    built = build_preferences(scored_ds.read(), margin=params.margin)
    for reason, count in built.rejected["drop_reason"].value_counts().iter_rows():
        drops[f"pair:{reason}"] = count
    generated = [stage_summary(ds) for ds in (instr_ds, cand_ds)]
    tokens = sum(s["generated_tokens"] for s in generated)
    seconds = sum(s["seconds"] for s in generated)
    result = {"dataset": None, "rows_kept": built.preferences.height, "rows_requested": params.n,
              "candidate_groups": built.candidates.height, "dropped": dict(sorted(drops.items())),
              "generated_tokens": tokens, "generation_seconds": round(seconds, 2),
              "tokens_per_second": round(tokens / seconds, 1) if seconds else 0.0,
              "reward_seconds": round(stage_summary(scored_ds)["seconds"], 2)}
    if errors:
        result["reward_errors"] = errors
    if built.preferences.height == 0:
        # Nothing to train on: report why instead of publishing an empty dataset.
        log.warning("magpie-dpo: no preference pair survived (drops: %s)%s", result["dropped"],
                    f"; reward model error: {errors[0]}" if errors else "")
        result["error"] = "no preference pair survived; see dropped" + (f" and reward_errors" if errors else "")
        return result

    preferences = built.preferences.select("id", "parent_id", "origin", "prompt", "chosen", "rejected",
                                           "score_chosen", "score_rejected")
    rejected_rows = [df.select("id", "origin", "drop_reason") for df in
                     (ds.read(rejected=True) for ds in stages.values()) if df.height]
    if built.rejected.height:
        rejected_rows.append(built.rejected.select("id", "origin", "drop_reason"))
    reward_desc = (f"reward model {params.reward.model} ({params.reward.template} template)" if params.reward.model
                   else f"generative judge on {engine.model_id}: expected 1..{params.reward.judge_scale} rating "
                        "from next-token probabilities")
    card = {
        "title": "Magpie DPO preference dataset (alignforge)",
        "recipe": "magpie-dpo",
        "method": "Magpie self-synthesis (arXiv 2406.08464) + best-of-N reward ranking: chosen = max, "
                  "rejected = min reward (ties -> first candidate)",
        "model": engine.model_id,
        "sampling": {"instruction": {"temperature": params.temperature_instruction, "top_p": params.top_p_instruction,
                                     "max_tokens": params.max_tokens_instruction, "early_stop": params.early_stop},
                     "candidates": {"k": params.samples, "temperature": params.temperature, "top_p": params.top_p,
                                    "max_tokens": params.max_tokens_response},
                     "reward": reward_desc, "margin": params.margin, "seed": params.seed},
        "params": params.model_dump(mode="json"),
        "lineage": {name: ds.manifest() for name, ds in {"seeds": seeds, **stages}.items()},
        "drop_stats": result["dropped"],
        "generated_tokens": tokens,
        "tokens_per_second": result["tokens_per_second"],
    }
    publish_url = f"{run}/publish"
    storage.publish(publish_url, configs={"default": preferences, "candidates": built.candidates},
                    rejected=pl.concat(rejected_rows, how="vertical_relaxed") if rejected_rows else None,
                    test_size=params.test_size, seed=params.seed, card=card)
    result["dataset"] = publish_url
    return result
