"""The recipe table: name -> (flow function, pydantic params model, default YAML file).

Each line imports its flow lazily (Prefect and the stages load only for the recipe that runs).
Add a recipe by adding one line here and one YAML file in flows/recipes/."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

RECIPE_DIR = Path(__file__).parent / "recipes"

# name -> (flow function, ParamsModel, default yaml). Either may be the object itself or a
# "module:attribute" string, imported only when that recipe runs (keeps `--help` fast and one
# broken recipe from breaking the others).
RECIPES: dict[str, tuple[Any, Any, Path]] = {
    "magpie-sft": ("flows.magpie_sft:magpie_sft", "flows.magpie_sft:MagpieSFTParams", RECIPE_DIR / "magpie_sft.yaml"),
    "magpie-dpo": ("flows.magpie_dpo:magpie_dpo", "flows.magpie_dpo:MagpieDPOParams", RECIPE_DIR / "magpie_dpo.yaml"),
    "curate": ("flows.curate:curate", "flows.curate:CurateParams", RECIPE_DIR / "curate.yaml"),
}


def _load(ref: Any) -> Any:
    if not isinstance(ref, str):
        return ref
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


def recipe(name: str) -> tuple[Any, type, Path]:
    """(flow, ParamsModel, default yaml) of a recipe; KeyError lists the known ones."""
    if name not in RECIPES:
        raise KeyError(f"unknown recipe {name!r}; known recipes: {', '.join(sorted(RECIPES))}")
    flow_ref, params_ref, yaml_path = RECIPES[name]
    return _load(flow_ref), _load(params_ref), yaml_path
