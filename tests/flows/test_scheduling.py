"""Scheduled runs against a real Prefect server (issue 12): every component is a real process that
the tests start and stop (by process group: SIGTERM alone sometimes leaves `serve` running).

- `prefect server start` on SQLite in a temporary PREFECT_HOME, on a free port (one per test
  session: tests/conftest.py, shared with the Ray executor tests);
- `alignforge serve curate ... --interval 5` -> an auto-scheduled run COMPLETED and published;
- `prefect deploy --all` creates every deployment of prefect.yaml with its schedule, and a process
  worker started from the repository root runs one (curate on a tiny file, parameters given at
  run time) to COMPLETED with prefect.yaml's pull step as shipped.

No vLLM: curate's default steps (heuristics, MinHash) are CPU only. Select with `-m scheduling`.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.servers import BIN, REPO, Server, free_port as _free_port, start as _start, stop as _stop, tail as _tail
from tests.servers import wait_for_run as _wait_for_run

pytestmark = [pytest.mark.scheduling, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def server(prefect_server) -> Server:
    return prefect_server  # one server per test session (tests/conftest.py), shared with the Ray tests


@pytest.fixture
def tiny_jsonl(tmp_path) -> Path:
    topics = ["rivers", "volcanoes", "bread", "chess", "tides", "owls", "glaciers", "violins", "comets", "bees"]
    path = tmp_path / "tiny.jsonl"
    with path.open("w") as out:
        for i, topic in enumerate(topics):
            out.write(json.dumps({"instruction": f"Write two sentences about {topic} for a child (#{i}).",
                                  "response": f"{topic.capitalize()} are wonderful to learn about. "
                                              f"Here is fact number {i} about {topic}, told simply."}) + "\n")
    return path


# ---------------------------------------------------------------- tests

def test_serve_interval_schedule_completes_an_auto_scheduled_run(server, tiny_jsonl, tmp_path):
    out = tmp_path / "served"
    log = tmp_path / "serve.log"
    started = time.monotonic()
    proc = _start([str(BIN / "alignforge"), "serve", "curate", "--set", f"input={tiny_jsonl}", "--out", str(out),
                   "--workers", "1", "--name", "serve-test", "--interval", "5"], server.env, log)
    try:
        deadline = time.monotonic() + 90
        while True:  # the deployment appears once serve has loaded the recipe and registered it
            try:
                deployment = server.deployment("alignforge-recipe", "serve-test")
                break
            except Exception:
                assert proc.poll() is None, "alignforge serve exited\n" + _tail(log)
                assert time.monotonic() < deadline, "serve registered no deployment\n" + _tail(log)
                time.sleep(1)
        assert [s["schedule"].get("interval") for s in deployment["schedules"]] == [5.0]
        assert deployment["parameters"]["recipe"] == "curate"
        assert deployment["parameters"]["out"] == str(out)

        run = _wait_for_run(server, deployment["id"], [log, server.log], timeout=120 - (time.monotonic() - started),
                            auto_scheduled=True)
        assert run["auto_scheduled"] is True
        manifest = json.loads((out / "publish" / "_manifest.json").read_text())
        assert manifest  # the scheduled run published its dataset
        assert len(list((out / "publish").rglob("*.parquet"))) >= 1
    finally:
        _stop(proc)


def test_serve_refuses_without_a_server(tiny_jsonl, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update({"PREFECT_HOME": str(tmp_path / "home"), "PREFECT_API_URL": f"http://127.0.0.1:{_free_port()}/api"})
    done = subprocess.run([str(BIN / "alignforge"), "serve", "curate", "--set", f"input={tiny_jsonl}",
                           "--out", str(tmp_path / "x"), "--interval", "5"], cwd=REPO, env=env, text=True,
                          capture_output=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "no Prefect server" in done.stderr and "prefect server start" in done.stderr


def test_deploy_all_creates_every_deployment_and_a_worker_runs_one(server, tiny_jsonl, tmp_path):
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    pull = spec["pull"][0]["prefect.deployments.steps.set_working_directory"]["directory"]
    assert "|" not in str(pull), "Prefect placeholders are not jinja: a filter stays a literal path"
    pull_as_deployed = [{"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}]

    server.prefect("work-pool", "create", "alignforge", "--type", "process")
    before = set(os.listdir(REPO))
    server.prefect("deploy", "--all", timeout=240)
    assert set(os.listdir(REPO)) <= before | {".prefect"}, "prefect deploy wrote into the repository"

    for dep in spec["deployments"]:
        flow_name = "alignforge-recipe"  # flows/deploy.py:recipe_flow
        got = server.deployment(flow_name, dep["name"])
        assert got["entrypoint"] == dep["entrypoint"]
        assert got["work_pool_name"] == dep["work_pool"]["name"]
        assert got["parameters"] == dep["parameters"]
        assert got["pull_steps"] == pull_as_deployed  # the build step's output, rendered at deploy time
        want = [(s["cron"], s.get("timezone"), s.get("active", True)) for s in dep["schedules"]]
        have = [(s["schedule"]["cron"], s["schedule"].get("timezone"), s["active"]) for s in got["schedules"]]
        assert have == want, dep["name"]

    out = tmp_path / "deployed"
    log = tmp_path / "worker.log"
    worker = _start([str(BIN / "prefect"), "worker", "start", "--pool", "alignforge"], server.env, log)
    try:
        params = {"params": {"input": str(tiny_jsonl)}, "out": str(out), "workers": 1}
        printed = server.prefect("deployment", "run", "alignforge-recipe/curate-daily", "--params", json.dumps(params))
        run_id = re.search(r"UUID:\s*([0-9a-f-]{36})", printed)
        assert run_id, printed
        deployment = server.deployment("alignforge-recipe", "curate-daily")
        run = _wait_for_run(server, deployment["id"], [log, server.log], timeout=180)
        assert run["id"] == run_id.group(1)
        assert (out / "publish" / "_manifest.json").exists()
    finally:
        _stop(worker)
