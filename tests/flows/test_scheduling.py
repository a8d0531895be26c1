"""Scheduled runs against a real Prefect server (issue 12): every component is a real process that
the tests start and stop (by process group: SIGTERM alone sometimes leaves `serve` running).

- `prefect server start` on SQLite in a temporary PREFECT_HOME, on a free port (one per module);
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
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
pytestmark = [pytest.mark.scheduling, pytest.mark.timeout(300)]


# ---------------------------------------------------------------- processes

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start(cmd: list[str], env: dict, log: Path, cwd: Path = REPO) -> subprocess.Popen:
    """A process in its own process group (so _stop reaches everything it spawned)."""
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)


def _stop(proc: subprocess.Popen, grace: float = 20.0) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    except ProcessLookupError:
        pass
    try:  # children that outlived their parent are still in the group
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _tail(log: Path, n: int = 60) -> str:
    lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    return f"--- {log.name} (last {n} lines)\n" + "\n".join(lines[-n:])


# ---------------------------------------------------------------- the server

class Server:
    def __init__(self, url: str, env: dict, log: Path):
        self.url, self.env, self.log = url, env, log

    def api(self, method: str, path: str, body: dict | None = None):
        import httpx

        response = httpx.request(method, f"{self.url}{path}", json=body, timeout=30)
        response.raise_for_status()
        return response.json()

    def deployment(self, flow: str, name: str) -> dict:
        return self.api("GET", f"/deployments/name/{flow}/{name}")

    def runs(self, deployment_id: str) -> list[dict]:
        return self.api("POST", "/flow_runs/filter", {"flow_runs": {"deployment_id": {"any_": [deployment_id]}}})

    def prefect(self, *args: str, timeout: float = 180) -> str:
        done = subprocess.run([str(BIN / "prefect"), "--no-prompt", *args], cwd=REPO, env=self.env, text=True,
                              capture_output=True, stdin=subprocess.DEVNULL, timeout=timeout)
        assert done.returncode == 0, f"prefect {' '.join(args)} -> {done.returncode}\n{done.stdout}\n{done.stderr}"
        return done.stdout


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect-home")
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update({
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": url,
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home}/prefect.db",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "PREFECT_UI_ENABLED": "false",
        "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "5",  # default 60: a 5 s interval would wait a minute
        "PREFECT_RUNNER_POLL_FREQUENCY": "2",
        "PREFECT_WORKER_QUERY_SECONDS": "2",
        "PREFECT_LOGGING_LEVEL": "INFO",
        "TOKENIZERS_PARALLELISM": "false",
    })
    log = home / "server.log"
    proc = _start([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)], env, log)
    srv = Server(url, env, log)
    try:
        import httpx

        deadline = time.monotonic() + 150
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "prefect server did not start\n" + _tail(log)
            time.sleep(1)
        yield srv
    finally:
        _stop(proc)


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


def _wait_for_run(server: Server, deployment_id: str, logs: list[Path], timeout: float,
                  auto_scheduled: bool | None = None) -> dict:
    """The first COMPLETED run of a deployment; fails early when a run FAILED / CRASHED."""
    deadline = time.monotonic() + timeout
    while True:
        runs = server.runs(deployment_id)
        if auto_scheduled is not None:
            runs = [r for r in runs if bool(r.get("auto_scheduled")) == auto_scheduled]
        states = [(r["name"], r["state_type"]) for r in runs]
        done = [r for r in runs if r["state_type"] == "COMPLETED"]
        if done:
            return done[0]
        bad = [r for r in runs if r["state_type"] in ("FAILED", "CRASHED")]
        detail = "\n".join(_tail(log) for log in logs)
        assert not bad, f"a run ended {bad[0]['state_type']}: {bad[0]['state']}\n{detail}"
        assert time.monotonic() < deadline, f"no COMPLETED run within {timeout:.0f}s; runs: {states}\n{detail}"
        time.sleep(2)


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
