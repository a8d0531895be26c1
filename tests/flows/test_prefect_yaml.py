"""prefect.yaml: one deployment per recipe, entrypoints that resolve to the recipe's flow."""

from __future__ import annotations

import importlib
from pathlib import Path

import yaml

from flows.recipes import RECIPES, recipe

REPO = Path(__file__).resolve().parents[2]


def test_every_recipe_has_a_deployment_with_a_valid_entrypoint_and_params():
    deployments = yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]
    by_flow = {}
    for dep in deployments:
        path, _, name = dep["entrypoint"].partition(":")
        assert (REPO / path).exists(), dep["entrypoint"]
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        by_flow[getattr(module, name)] = dep
        assert dep["schedules"][0]["cron"]
    for name in RECIPES:
        flow_fn, params_model, _ = recipe(name)
        assert flow_fn in by_flow, f"recipe {name} has no deployment in prefect.yaml"
        params_model(**by_flow[flow_fn]["parameters"]["params"])  # the example params validate
