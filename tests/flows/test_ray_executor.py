"""--executor ray on a real local Ray cluster (2 CPUs, `ray start --head` here, one per module) and a
real Prefect server (tests/conftest.py, one per session): the published rows equal a local run's.

- curate (heuristics + MinHash) through the CLI: every CPU step's shards ran as Ray tasks (the
  cluster's task timeline has one per shard and step);
- magpie-sft n=4: the engine steps ran on a Ray Data actor that started its own vLLM engine on
  the embedded model; the local run used the session engine. Same seeds, same batches, same rows.
Select with `-m ray`; the generation test is also an engine test (run it under the vLLM lock).
"""

from __future__ import annotations

import collections
import glob
import json
import os
import time
from pathlib import Path

import polars as pl
import pytest

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    pytest.importorskip("prefect_ray", reason="the ray extra: pip install -e '.[ray]'")
    from tests.servers import ray_cluster

    with ray_cluster(tmp_path_factory.mktemp("ray") / "ray.log") as address:
        yield address


@pytest.fixture
def api(prefect_server, cluster, monkeypatch, tmp_path):
    """This process talks to the real server (env for the CLI's check, settings for Prefect's client)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    monkeypatch.setenv("PREFECT_API_URL", prefect_server.url)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setenv("ALIGNFORGE_QUIET", "1")
    with temporary_settings({PREFECT_API_URL: prefect_server.url}):
        yield prefect_server


def _task_timeline(address: str) -> collections.Counter:
    """Ray task runs per task name over the cluster's life (from its GCS task events)."""
    import ray

    ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    try:
        return collections.Counter(e["cat"] for e in ray.timeline() if str(e.get("cat", "")).startswith("task::"))
    finally:
        ray.shutdown()


def _published(out: Path) -> pl.DataFrame:
    return pl.read_parquet(sorted(glob.glob(str(out / "publish" / "data" / "*.parquet")))).sort("id")


def _rejected(out: Path) -> pl.DataFrame:
    files = sorted(glob.glob(str(out / "publish" / "rejected" / "**" / "*.parquet"), recursive=True))
    if not files:
        return pl.DataFrame()
    return pl.concat([pl.read_parquet(f) for f in files], how="diagonal_relaxed").sort("id")


def _stage_counts(out: Path) -> dict:
    """Per committed stage folder: fingerprint-named folder -> rows in / out / dropped by reason."""
    counts = {}
    for manifest in sorted((out / "stages").glob("*/_manifest.json")):
        summary = json.loads(manifest.read_text()).get("summary") or {}
        counts[manifest.parent.name] = {k: summary.get(k) for k in ("rows_in", "rows_out", "dropped")}
    return counts


def test_curate_on_ray_publishes_the_local_rows(api, cluster, tmp_path):
    from flows.cli import main

    rows = []
    for i in range(40):  # 4 shards of 10; near copies for MinHash, short and colon rows for heuristics
        instruction = f"Describe how the {i}th lighthouse on the northern coast guided ships through winter storms"
        rows.append({"instruction": instruction, "response": f"Lighthouse {i} used a rotating lens and a fog horn."})
        if i % 5 == 0:
            rows.append({"instruction": instruction + " please", "response": "A near copy of an earlier row."})
    rows += [{"instruction": "Hi", "response": "Too short to keep."}, {"instruction": "Fix this:", "response": "x"}]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))

    outs = {}
    for executor in ("local", "ray"):
        outs[executor] = tmp_path / executor
        rc = main(["run", "curate", "--set", f"input={data}", "--set", "shard_size=12", "--out", str(outs[executor]),
                   "--workers", "2", "--executor", executor, "--ray-address", cluster])
        assert rc == 0, executor
    local, ray = _published(outs["local"]), _published(outs["ray"])
    assert ray.height == local.height > 0
    assert ray.equals(local)
    assert _rejected(outs["ray"]).equals(_rejected(outs["local"]))
    dropped = _rejected(outs["local"])["drop_reason"].value_counts()
    assert set(dropped["drop_reason"]) >= {"minhash_duplicate"}  # the data exercised the filters
    assert _stage_counts(outs["ray"]) == _stage_counts(outs["local"])  # same stage folders and counts

    shards = -(-len(rows) // 12)
    tasks = _task_timeline(cluster)
    assert tasks["task::heuristics shard"] == shards, tasks
    assert tasks["task::minhash (score) shard"] == shards, tasks


@pytest.mark.engine
def test_magpie_sft_on_ray_publishes_the_local_rows(api, cluster, engine, tmp_path):
    from engines.lifetime import LazyEngine
    from flows.runner import run

    # The local run borrows the session engine through the handle a recipe run builds, so both runs
    # record the same model identity (stage fingerprints) and the session engine stays ours.
    handle = LazyEngine("embedded")
    handle._engine = engine
    params = {"n": 4, "shard_size": 2}
    local = run("magpie-sft", params, out=str(tmp_path / "local"), engine=handle, workers=2)
    ray = run("magpie-sft", params, out=str(tmp_path / "ray"), workers=2, executor="ray", ray_address=cluster)
    assert ray["rows_kept"] == local["rows_kept"] and ray["dropped"] == local["dropped"]
    assert _published(tmp_path / "ray").equals(_published(tmp_path / "local"))
    assert _stage_counts(tmp_path / "ray") == _stage_counts(tmp_path / "local")
    actors = [name for name in _task_timeline(cluster) if "EngineShards" in name]
    assert actors, "no engine step ran on a Ray Data actor"


def test_ray_executor_refuses_without_a_prefect_server(monkeypatch, tmp_path, capsys):
    from flows.cli import main
    from tests.servers import free_port

    monkeypatch.setenv("PREFECT_API_URL", f"http://127.0.0.1:{free_port()}/api")
    rc = main(["run", "curate", "--set", "input=nowhere.jsonl", "--out", str(tmp_path / "x"), "--executor", "ray"])
    err = capsys.readouterr().err
    assert rc == 2 and "no Prefect server" in err and "prefect server start" in err, err
    assert not (tmp_path / "x" / "stages").exists()


def test_served_schedule_runs_on_ray(api, cluster, tmp_path):
    """`alignforge serve ... --executor ray`: the scheduled run's recipe is a subflow whose shards are Ray tasks."""
    from tests.servers import BIN, start, stop, tail, wait_for_run

    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Name three uses of a paperclip, variant {i} of a list",
                                        "response": f"Holding paper, resetting a device, and a tiny hook ({i})."})
                            + "\n" for i in range(8)))
    before = _task_timeline(cluster)["task::heuristics shard"]
    out, log = tmp_path / "served", tmp_path / "serve.log"
    env = {**os.environ, "PREFECT_API_URL": api.url, "RAY_AUTH_MODE": "disabled"}
    proc = start([str(BIN / "alignforge"), "serve", "curate", "--set", f"input={data}", "--set", "shard_size=4",
                  "--out", str(out), "--name", "serve-ray", "--interval", "5", "--executor", "ray",
                  "--ray-address", cluster], env, log)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                deployment = api.deployment("alignforge-recipe", "serve-ray")
                break
            except Exception:
                assert proc.poll() is None and time.monotonic() < deadline, "serve registered nothing\n" + tail(log)
                time.sleep(1)
        assert deployment["parameters"]["executor"] == "ray"
        wait_for_run(api, deployment["id"], [log, api.log], timeout=150, auto_scheduled=True)
    finally:
        stop(proc)
    assert _published(out).height == 8
    assert _task_timeline(cluster)["task::heuristics shard"] >= before + 2  # 2 shards ran as Ray tasks
