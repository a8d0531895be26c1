"""Model profiles: step defaults that belong to a model rather than to a method.

A step config's defaults are the paper's settings (Magpie: queries at T 1.0 / top_p 1.0, greedy
responses, no penalties). Some models need something else to give usable data: the embedded
SmolLM2-135M-Instruct, decoded greedily, loops (one line repeated) until the token cap on 20 of 50
demo instructions (issue 15). Such settings are facts about the model, not about Magpie, so they
live here. The embedded model's, each measured with bench/yield.py (README "Model profiles"):

- responses: repetition_penalty 1.1 (vLLM's multiplicative penalty) stops most loops; sampling at
  T 0.3 / top_p 0.9 (per-request seeds: reruns give the same text) lets a few answers leave a loop
  that greedy decoding cannot; 768 tokens let long lists of second turns finish (a loop still runs
  to the cap and is dropped as `truncated_response`).
- queries (first and follow-up): up to 256 tokens; at T 1.0 the model writes run-on queries whose
  newline comes after 128 tokens.

    PROFILES = {model name: {step name: {field: value}}}

The runner (flows.recipe.build_steps) merges a profile UNDER what the recipe file and `--set` gave
explicitly: a user's value always wins, including an explicit paper value. Profile values are
ordinary config values, so they change the step's fingerprint and show in the dataset card's step
configs; steps that report it also name the profile in their stats (`model_profile`).

`without_neutral_penalties` keeps row ids of runs at the neutral penalties what they were before
the penalty fields existed (ids hash the config).
"""

from __future__ import annotations

from pathlib import PurePath
from typing import Any, Mapping

# vLLM's neutral values: a penalty at these is no penalty.
NEUTRAL_PENALTIES: dict[str, float] = {"repetition_penalty": 1.0, "frequency_penalty": 0.0, "presence_penalty": 0.0}

EMBEDDED = "SmolLM2-135M-Instruct"  # engines.embedded.EMBEDDED_MODEL_NAME (not imported: no I/O module here)

# Measured with bench/yield.py (README "Model profiles"): magpie-sft n=50 on the embedded model.
PROFILES: dict[str, dict[str, dict[str, Any]]] = {
    EMBEDDED: {
        "magpie_instructions": {"max_tokens": 256},
        "magpie_responses": {"repetition_penalty": 1.1, "temperature": 0.3, "top_p": 0.9, "max_tokens": 768,
                             "followup_max_tokens": 256},
    },
}


def profile_name(model: Any) -> str | None:
    """The PROFILES key for a recipe's `model` (None / "embedded" / HF folder or hub id / OpenAI dict)."""
    if model in (None, "", "embedded"):
        return EMBEDDED
    if isinstance(model, Mapping):
        model = model.get("name")
        if not model:
            return None
    name = str(model).rstrip("/")
    if name in PROFILES:
        return name
    # A hub id (org/name) or a local folder of the same model: match the last path part.
    last = PurePath(name).name
    return next((key for key in PROFILES if key.lower() == last.lower()), None)


def profile_for(model: Any) -> dict[str, dict[str, Any]]:
    """{step name: {field: value}} for `model`; {} when the model has no profile (papers' defaults)."""
    name = profile_name(model)
    return {step: dict(fields) for step, fields in PROFILES.get(name, {}).items()} if name else {}


def describe(model: Any, applied: Mapping[str, Any]) -> str:
    """One line for stats / the card: 'SmolLM2-135M-Instruct profile: repetition_penalty=1.1'."""
    values = ", ".join(f"{k}={v}" for k, v in sorted(applied.items()))
    return f"{profile_name(model)} profile: {values}"


def without_neutral_penalties(config: Mapping[str, Any]) -> dict[str, Any]:
    """`config` (a model_dump) without penalty fields (`*repetition_penalty`, `*frequency_penalty`,
    `*presence_penalty`, e.g. `followup_repetition_penalty`) that are at their neutral value, and
    `ngram_penalties` when empty."""
    out = {}
    for key, value in config.items():
        if key == "ngram_penalties" and not value:
            continue
        neutral = next((v for name, v in NEUTRAL_PENALTIES.items() if key == name or key.endswith("_" + name)), None)
        if neutral is not None and value == neutral:
            continue
        out[key] = value
    return out
