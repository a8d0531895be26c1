"""Where a step's shards run: `local` (threads), `process` (a process pool) or `ray` (a Ray cluster).
Prefect wiring only.

- local: CPU steps map their shards as Prefect tasks on a ThreadPoolTaskRunner (`workers`
  threads); engine steps send whole shards to one engine in this process.
- process: the same on Prefect's ProcessPoolTaskRunner (`workers` processes: shards do not share
  the GIL; each process imports the step's modules once).
- ray: the flow's task runner is prefect-ray's RayTaskRunner, so CPU steps' shard tasks run as
  Ray tasks (one CPU each) anywhere on the cluster; engine steps run as Ray Data `map_batches`
  over an actor pool of engines: one actor per GPU (`num_gpus=1`), or one actor with
  `num_cpus=1` on a cluster without GPUs. A batch is one shard index; the actor reads the whole
  shard, runs the step on its own engine (built from the recipe's model spec, exactly as a local
  run builds it) and writes the output shard itself, so per-request seeds, batches and the
  committed stage folders are those of a local run.

process and ray need two things a local run does not:
- a real Prefect API server (PREFECT_API_URL): each worker process reports its task runs there.
  Without one every worker starts a temporary server of its own (Ray: measured 4x slower;
  process: up to 4 temporary servers seen during a 2-worker run), so we refuse instead
  (`check_prefect_server`);
- storage every worker can reach: local paths are made absolute (one machine); a multi-node
  cluster needs a shared filesystem or an fsspec URL (s3://, gs://) for --out and the input.
"""

from __future__ import annotations

import os
from typing import Any

from alignforge.errors import AlignforgeError

EXECUTORS = ("local", "process", "ray")
RAY_INSTALL = "pip install -e '.[ray]'   (prefect-ray 0.6.0 + ray[data] 2.60.0; or: make setup)"
START_SERVER = ("start one with `prefect server start` and `export PREFECT_API_URL=http://HOST:4200/api` "
                "(a HOST every Ray node can reach; `--host 0.0.0.0` to listen beyond this machine)")
# Environment a Ray worker needs from the driver: the Prefect API, quiet logs, engine settings.
_FORWARD_PREFIXES = ("PREFECT_", "ALIGNFORGE_", "VLLM_", "HF_", "TRANSFORMERS_", "TOKENIZERS_", "TORCH_",
                     "PYTHONWARNINGS")
_NOT_FORWARDED = ("PREFECT_HOME", "PREFECT_MEMO_STORE_PATH")  # paths of this machine's Prefect profile


class ExecutorError(AlignforgeError):
    """The executor can't run here (missing package, no Prefect server, no Ray cluster)."""


def require_ray() -> None:
    """Import check for the `ray` extra; raises ExecutorError with the install command."""
    try:
        import prefect_ray  # noqa: F401
        import ray  # noqa: F401
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise ExecutorError(f"--executor ray needs prefect-ray and ray[data] ({exc.name} is missing). "
                            f"Fix: {RAY_INSTALL}") from None


def check_prefect_server(api: str | None, who: str) -> str:
    """Return `api` (a Prefect API URL, e.g. http://127.0.0.1:4200/api) if a server answers there.

    Raises ExecutorError naming `who` (the command or option that needs it) and how to start one."""
    import urllib.request

    if not api:
        raise ExecutorError(f"{who}: no Prefect server is configured (PREFECT_API_URL is not set). Fix: {START_SERVER}")
    api = api.rstrip("/")
    try:
        with urllib.request.urlopen(f"{api}/health", timeout=10) as response:
            response.read()
    except (OSError, ValueError) as exc:
        raise ExecutorError(f"{who}: no Prefect server answers at {api} ({getattr(exc, 'reason', exc)}). "
                            f"Fix: {START_SERVER}") from None
    return api


def prefect_api_url() -> str | None:
    """The API URL this process's Prefect client talks to (None: the temporary in-process server)."""
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or None


def worker_env() -> dict[str, str]:
    """The driver's environment that Ray workers must see (forwarded through the job's runtime_env)."""
    env = {k: v for k, v in os.environ.items()
           if k.startswith(_FORWARD_PREFIXES) and k not in _NOT_FORWARDED}
    api = prefect_api_url()
    if api:
        env["PREFECT_API_URL"] = api
    return env


def task_runner(executor: str, *, workers: int, ray_address: str | None = "auto") -> Any:
    """The flow's task runner: Thread- / ProcessPoolTaskRunner(workers) or RayTaskRunner on `ray_address`.

    `ray_address`: "auto" (RAY_ADDRESS, else the cluster `ray start` runs on this machine; an error
    if there is none), "ray://HEAD:10001" (Ray Client) or "HOST:PORT" (a GCS address), or "local"
    (a temporary one-machine cluster with `workers` CPUs, for this run only)."""
    if executor == "local":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=workers)
    if executor == "process":  # one box, no GIL between shards; engine steps stay in this process
        from prefect.task_runners import ProcessPoolTaskRunner

        return ProcessPoolTaskRunner(max_workers=workers)
    if executor != "ray":
        raise ExecutorError(f"unknown executor {executor!r}. Fix: --executor {' or '.join(EXECUTORS)}")
    require_ray()
    import logging

    from prefect_ray import RayTaskRunner

    quiet = _quiet()
    if quiet:
        logging.getLogger("ray.data").setLevel(logging.ERROR)
    kwargs: dict[str, Any] = {"runtime_env": {"env_vars": worker_env()}, "log_to_driver": not quiet,
                              "logging_level": logging.ERROR if quiet else logging.INFO}
    address = ray_address or "auto"
    if address == "local":
        kwargs.update(num_cpus=workers, include_dashboard=False)
    if address == "auto":  # prefect-ray turns address "auto" into "start a cluster if none": ask Ray itself
        return RayTaskRunner(init_kwargs={**kwargs, "address": "auto"})
    return RayTaskRunner(address=address, init_kwargs=kwargs)


def _quiet() -> bool:
    """No Ray / Ray Data logs or progress bars: tests (ALIGNFORGE_QUIET=1) and the CLI without --verbose."""
    level = os.environ.get("PREFECT_LOGGING_LEVEL", "INFO").upper()
    return os.environ.get("ALIGNFORGE_QUIET") == "1" or level in ("WARNING", "ERROR", "CRITICAL")


def no_cluster_error(address: str | None, exc: BaseException) -> ExecutorError:
    return ExecutorError(f"--executor ray: no Ray cluster at --ray-address {address or 'auto'} ({exc}). Fix: start "
                         "one with `ray start --head --include-dashboard=false` (RAY_AUTH_MODE=disabled for a local "
                         "test cluster), pass --ray-address ray://HEAD:10001, or --ray-address local for a temporary "
                         "cluster on this machine")


def on_ray() -> bool:
    """True inside a flow whose task runner is prefect-ray's (shards go to the Ray cluster)."""
    import sys

    if "prefect_ray" not in sys.modules:
        return False
    from prefect.context import FlowRunContext
    from prefect_ray import RayTaskRunner

    ctx = FlowRunContext.get()
    return ctx is not None and isinstance(ctx.task_runner, RayTaskRunner)


# ---------------------------------------------------------------- engine steps on Ray Data

class EngineShards:
    """Ray Data UDF (an actor): holds one engine and maps whole shards through one step.

    The step arrives pickled with its LazyEngine handle, which pickles as the model spec only
    (engines.lifetime), so each actor starts its own engine on its first shard and keeps it for
    the rest. Input: a batch {"index": int64[k]} of shard indices; output {"index", "rows"}."""

    def __init__(self, step: Any, input_url: str, out_url: str):
        self.step, self.input_url, self.out_url = step, input_url, out_url

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        from flows.runner import _map_shard

        rows = [_map_shard(self.step, self.input_url, self.out_url, int(i))["rows_written"] for i in batch["index"]]
        return {"index": np.asarray(batch["index"]), "rows": np.asarray(rows, dtype=np.int64)}

    def __del__(self):  # Ray Data calls it when the pool shuts down: free the GPU / engine processes
        engine = getattr(self.step, "engine", None)
        if hasattr(engine, "shutdown"):
            engine.shutdown()


def map_engine_shards(step: Any, input_url: str, out_url: str, indices: list[int]) -> None:
    """Run engine step `step` over shards `indices` of `input_url` into `out_url` on Ray Data.

    One actor per GPU of the cluster (at most one per shard), each `num_gpus=1`; without GPUs one
    actor with `num_cpus=1`. Raises ExecutorError if the step's engine can't travel (an engine
    object handed in by a caller instead of the recipe's model spec)."""
    import warnings

    import ray

    from engines.lifetime import LazyEngine

    engines = {id(e): e for e in (getattr(step, "engine", None), getattr(getattr(step, "step", None), "engine", None))
               if e is not None}
    if not engines or not all(isinstance(e, LazyEngine) for e in engines.values()):
        raise ExecutorError(f"step {step.name!r}: --executor ray starts engines from the recipe's model spec, but "
                            "this run was handed an engine object. Fix: run it with --executor local, or leave the "
                            "engine to the recipe (model: ...)")
    if not indices:
        return
    from ray.data import ActorPoolStrategy, DataContext

    DataContext.get_current().enable_progress_bars = not _quiet()
    gpus = int(ray.cluster_resources().get("GPU", 0))
    resources = {"num_gpus": 1} if gpus else {"num_cpus": 1}
    actors = max(1, min(gpus, len(indices))) if gpus else 1
    shards = ray.data.from_items([{"index": i} for i in indices])
    with warnings.catch_warnings():  # max_restarts via ray_remote_args: deprecated, gone in Ray 2.64 (pinned 2.60)
        warnings.simplefilter("ignore", DeprecationWarning)
        # max_restarts=0: a crashed engine fails the step (a rerun resumes); a restarted actor could not
        # rebuild from its constructor arguments (Ray logs an error line per actor otherwise).
        done = shards.map_batches(EngineShards, fn_constructor_kwargs={"step": step, "input_url": input_url,
                                                                       "out_url": out_url},
                                  batch_size=1, compute=ActorPoolStrategy(size=actors), batch_format="numpy",
                                  max_restarts=0, **resources)
    written = sorted(int(i) for i in done.to_pandas()["index"])
    if written != sorted(indices):  # every shard is written by exactly one actor call
        raise RuntimeError(f"Ray Data returned shards {written} for {sorted(indices)} of {out_url}")
