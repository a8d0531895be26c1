"""Model profiles: step defaults that belong to a model rather than to a method.

A step config's defaults are the paper's settings (Magpie: greedy responses, no penalties). Some
models need something else to give usable data with them: the embedded SmolLM2-135M-Instruct,
decoded greedily, loops until the token cap on about half of Magpie's instructions (issue 15), and
a mild repetition penalty (1.1, vLLM's multiplicative `repetition_penalty`) stops most loops.
Such a setting is a fact about the model, not about Magpie, so it lives here:

    PROFILES = {model name: {step name: {field: value}}}

The runner (flows.recipe.build_steps) merges a profile UNDER what the recipe file and `--set` gave
explicitly: a user's value always wins, including an explicit 1.0. Profile values are ordinary
config values, so they change the step's fingerprint and show in the dataset card's step configs;
steps that report it also name the profile in their stats (`model_profile`).

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
    EMBEDDED: {"magpie_responses": {"repetition_penalty": 1.1}},
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
