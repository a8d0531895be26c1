"""prefect.yaml: one deployment per built-in recipe, entrypoints and params that load."""

from __future__ import annotations

import importlib
from pathlib import Path

import yaml

from flows.recipe import builtin_recipes, load_recipe

REPO = Path(__file__).resolve().parents[2]


def test_every_recipe_has_a_deployment_with_a_valid_entrypoint_and_params():
    deployments = yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]
    covered = set()
    for dep in deployments:
        path, _, name = dep["entrypoint"].partition(":")
        assert (REPO / path).exists(), dep["entrypoint"]
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        assert callable(getattr(module, name))
        assert dep["schedules"][0]["cron"]
        params = dep["parameters"]
        load_recipe(params["recipe"], sets=params.get("params") or {}, out=params.get("out"))  # validates
        covered.add(params["recipe"])
    assert {"magpie-sft", "magpie-dpo", "curate"} <= covered
    assert set(builtin_recipes()) >= covered


def test_pull_step_uses_prefect_placeholders_only():
    """Prefect's placeholders are not jinja: `{{ $VAR | default('.') }}` stays a literal path and the
    worker crashes. The pull directory is a build step's output (rendered at `prefect deploy`)."""
    import re

    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    build_ids = {step.get("id") for entry in spec.get("build") or [] for step in entry.values()}
    for entry in spec["pull"]:
        for step in entry.values():
            for value in step.values():
                for placeholder in re.findall(r"{{(.*?)}}", str(value)):
                    name = placeholder.strip()
                    assert re.fullmatch(r"\$?[A-Za-z_][\w.-]*", name), f"not a Prefect placeholder: {{{{{placeholder}}}}}"
                    assert name.startswith("$") or name.split(".")[0] in build_ids, name
