"""Best-of-N candidates: k sampled responses per instruction (Magpie DPO recipe: k=5, T 0.8, top_p 1.0).

One output row per candidate: `parent_id` = the instruction row's id, `candidate_index` 0..k-1,
`messages` = prompt + the assistant candidate. Reward labelling and `schemas.preference`
turn these into chosen/rejected pairs.

Determinism: each candidate is its own request with seed = hash(config seed, parent id, index),
all k*rows requests in ONE engine.chat call. vLLM's per-request seed makes a candidate's text
independent of whatever else is in the batch, and raising k keeps the first candidates unchanged
(n=k in one request would tie every candidate to the request's single seed and to k).
"""

from __future__ import annotations

from typing import Any

import polars as pl
from pydantic import Field

from engines.base import Sampling
from engines.profiles import describe, without_neutral_penalties
from schemas import MESSAGES, row_id
from alignforge.step import EngineStep, Step, StepConfig, StepError
from stages.magpie import check_response, sample_seed, stop_token_ids, template_tokens


class BestOfNConfig(StepConfig):
    k: int = Field(5, ge=1, description="candidates per instruction (Magpie DPO: 5)")
    temperature: float = Field(0.8, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int = Field(512, ge=1)
    repetition_penalty: float = Field(1.0, gt=0.0, description="vLLM repetition_penalty (1.0 = none, > 1 "
                                      "discourages tokens already in the prompt or answer)")
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="vLLM frequency_penalty (0 = none)")
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="vLLM presence_penalty (0 = none)")
    seed: int = 0
    system_prompt: str | None = Field(None, description="system turn put before the instruction (None: none)")
    drop_truncated: bool = Field(True, description="mark candidates cut by max_tokens keep=False ('truncated_response')")


def prompts_of(df: pl.DataFrame, system_prompt: str | None = None, where: str = "best_of_n") -> list[list[dict[str, str]]]:
    """The conversation to answer per row: `messages` without a trailing assistant turn, else
    [system?, user: `instruction`]."""
    if "messages" in df.columns:
        prompts = []
        for messages in df["messages"].to_list():
            messages = [dict(m) for m in (messages or [])]
            while messages and messages[-1]["role"] == "assistant":
                messages.pop()
            prompts.append(messages)
        return prompts
    if "instruction" in df.columns:
        head = [{"role": "system", "content": system_prompt}] if system_prompt else []
        return [[*head, {"role": "user", "content": text or ""}] for text in df["instruction"].to_list()]
    raise StepError(f"{where}: input needs an `instruction` (string) or `messages` column; got {df.columns}",
                    column="instruction",
                    fix="run magpie_instructions first or load rows with schemas.mapping.load_rows")


class BestOfN(EngineStep):
    """Instruction rows -> k candidate rows each (parent_id, candidate_index, messages)."""

    name = "best_of_n"
    version = 1
    Config = BestOfNConfig
    config: BestOfNConfig

    def __call__(self, df: pl.DataFrame) -> pl.DataFrame:
        if "id" not in df.columns:
            raise StepError(f"{self.name}: input needs an `id` column (the parent of each candidate); got {df.columns}",
                            column="id", fix="load rows with schemas.mapping.load_rows (it assigns ids)")
        cfg, tok = self.config, self.require_engine().tokenizer
        live = df["keep"].fill_null(True).to_list() if "keep" in df.columns else [True] * df.height
        parents = df["id"].to_list()
        prompts = prompts_of(df, cfg.system_prompt, self.name)
        rows = [i for i in range(df.height) if live[i] and prompts[i] and (prompts[i][-1]["content"] or "").strip()]
        skipped = df.height - len(rows)
        stop_ids = stop_token_ids(tok)
        leak = template_tokens(tok)
        requests = [(i, j) for i in rows for j in range(cfg.k)]
        samplings = [Sampling(temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens,
                              seed=sample_seed(cfg.seed, parents[i], j, "best_of_n"), stop_token_ids=stop_ids,
                              repetition_penalty=cfg.repetition_penalty, frequency_penalty=cfg.frequency_penalty,
                              presence_penalty=cfg.presence_penalty)
                     for i, j in requests]
        results = self.engine.chat([prompts[i] for i, _ in requests], samplings, desc=self.name) if requests else []
        # Penalties at their neutral values are left out: ids stay those of runs before the fields existed.
        id_config = without_neutral_penalties(cfg.model_dump(mode="json"))

        out: dict[str, list] = {k: [] for k in ("id", "parent_id", "candidate_index", "messages", "finish_reason",
                                                "gen_tokens", "keep", "drop_reason")}
        for (i, j), result in zip(requests, results):
            completion = result.completions[0]
            text, reason = check_response(completion.text, completion.finish_reason, leak)
            if reason == "truncated_response" and not cfg.drop_truncated:
                reason = None
            out["id"].append(row_id(self.origin, id_config, parents[i], j))
            out["parent_id"].append(parents[i])
            out["candidate_index"].append(j)
            out["messages"].append([*prompts[i], {"role": "assistant", "content": text}])
            out["finish_reason"].append(completion.finish_reason)
            out["gen_tokens"].append(completion.num_tokens)
            out["keep"].append(reason is None)
            out["drop_reason"].append(reason)
        self.stats = {"rows_in": df.height, "requests": len(requests), "skipped_inputs": skipped,
                      "generated_tokens": sum(out["gen_tokens"])}
        profile = getattr(self, "model_profile", None)  # set by flows.recipe.build_steps
        if profile:
            self.stats["model_profile"] = describe(*profile)
        return pl.DataFrame({
            "id": pl.Series(out["id"], dtype=pl.Utf8),
            "parent_id": pl.Series(out["parent_id"], dtype=pl.Utf8),
            "origin": pl.Series([self.origin] * len(requests), dtype=pl.Utf8),
            "candidate_index": pl.Series(out["candidate_index"], dtype=pl.Int64),
            "messages": pl.Series(out["messages"], dtype=MESSAGES),
            "finish_reason": pl.Series(out["finish_reason"], dtype=pl.Utf8),
            "gen_tokens": pl.Series(out["gen_tokens"], dtype=pl.Int64),
            "keep": pl.Series(out["keep"], dtype=pl.Boolean),
            "drop_reason": pl.Series(out["drop_reason"], dtype=pl.Utf8),
        })
