"""The step table: recipe name -> "module:Class". Adding a step = its module, its test, one line here.

Classes import lazily (a recipe loads only the steps it uses; one broken optional dependency
does not break the others). `alignforge steps` prints this table with every config field.
"""

from __future__ import annotations

import importlib
from typing import Any

STEPS: dict[str, str] = {
    # generators (stages/)
    "magpie_instructions": "stages.magpie:MagpieInstructions",
    "magpie_responses": "stages.magpie:MagpieResponses",
    "magpie_tags": "stages.tags:MagpieTags",
    "best_of_n": "stages.best_of_n:BestOfN",
    "tgrt_topics": "stages.self_align:TGRTTopics",
    "tgrt_questions": "stages.self_align:TGRTQuestions",
    "self_instruct": "stages.self_align:SelfInstruct",
    "principled_answers": "stages.self_align:PrincipledAnswers",
    "verbose_answers": "stages.self_align:VerboseAnswers",
    "nc_candidates": "stages.nc_sampling:NCCandidates",
    "iid_candidates": "stages.nc_sampling:IIDCandidates",
    "mcts_category": "stages.ultraprompt:MCTSCategory",
    "mcts_rewrite": "stages.ultraprompt:MCTSRewrite",
    "mcts_pairs": "stages.ultraprompt:MCTSPairs",
    # checks, scores and selections (filters/)
    "magpie_checks": "filters.checks:MagpieChecks",
    "exact_dedup": "filters.checks:ExactDedup",
    "magpie_filter": "filters.magpie_filter:MagpieFilter",
    "heuristics": "filters.heuristics:Heuristics",
    "minhash": "filters.minhash:MinHashDedup",
    "semdedup": "filters.semdedup:SemDedup",
    "zipfit": "filters.zipfit:ZipFit",
    "deita": "filters.deita:DeitaFilter",
    "reward_label": "filters.reward:RewardLabel",
    "diversity": "filters.diversity:Diversity",
    "self_align_filter": "filters.self_align:SelfAlignFilter",
}


def step_class(name: str) -> type:
    """The Step class registered as `name` (KeyError lists the valid names)."""
    if name not in STEPS:
        raise KeyError(name)
    module, _, attr = STEPS[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def build_step(name: str, config: dict[str, Any] | None = None, **kwargs: Any) -> Any:
    """An instance of step `name` with its config validated from a plain dict."""
    cls = step_class(name)
    return cls(cls.Config(**(config or {})), **kwargs)
