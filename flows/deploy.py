"""The flow Prefect deployments run: any recipe (built-in name or file) with `--set`-style params.

    prefect deploy --all   # prefect.yaml: entrypoint flows/deploy.py:recipe_flow, one deployment per recipe
"""

from __future__ import annotations

from typing import Any

from prefect import flow


@flow(name="alignforge-recipe", log_prints=False)
def recipe_flow(recipe: str, params: dict[str, Any] | None = None, out: str | None = None,
                workers: int | None = None, executor: str = "local", ray_address: str | None = "auto") -> dict:
    """Run `recipe` (e.g. "magpie-sft" or a path to a recipe .yaml) with `params` ({"n": 2000} or
    {"steps.minhash.threshold": 0.7}) into run folder `out`, then publish it. `executor`: "local"
    (threads here) or "ray" (a subflow on the Ray cluster at `ray_address`; flows.executors)."""
    import os

    from flows.recipe import load_recipe
    from flows.runner import execute, run_recipe

    loaded = load_recipe(recipe, sets=params or {}, out=out)
    run_url = loaded.out if loaded.out is not None else f"runs/{loaded.name}"
    if executor != "local":  # a flow's task runner is fixed when it starts: the cluster's is a subflow's
        return run_recipe(loaded, workers=workers, out=run_url, executor=executor, ray_address=ray_address)
    return execute(loaded, run_url, workers=int(workers or os.cpu_count() or 1))
