"""Real services for integration tests, started and stopped by the tests themselves: a Prefect
server (SQLite in a temporary PREFECT_HOME, free port) and a local Ray cluster (`ray start
--head --block`, 2 CPUs, no dashboard, token auth off). Each runs in its own process group, so
stopping reaches everything it spawned (SIGTERM alone sometimes leaves children running)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(cmd: list[str], env: dict, log: Path, cwd: Path = REPO) -> subprocess.Popen:
    """A process in its own process group (so stop() reaches everything it spawned)."""
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)


def stop(proc: subprocess.Popen, grace: float = 20.0) -> None:
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


def tail(log: Path, n: int = 60) -> str:
    lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    return f"--- {log.name} (last {n} lines)\n" + "\n".join(lines[-n:])


def _wait(ready, proc: subprocess.Popen, log: Path, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None and time.monotonic() < deadline, f"{what} did not start\n" + tail(log)
        time.sleep(1)


class Server:
    """A running `prefect server start`: its API URL, the environment its clients use, its log."""

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


def wait_for_run(server: Server, deployment_id: str, logs: list[Path], timeout: float,
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
        detail = "\n".join(tail(log) for log in logs)
        assert not bad, f"a run ended {bad[0]['state_type']}: {bad[0]['state']}\n{detail}"
        assert time.monotonic() < deadline, f"no COMPLETED run within {timeout:.0f}s; runs: {states}\n{detail}"
        time.sleep(2)


@contextlib.contextmanager
def prefect_server(home: Path) -> Iterator[Server]:
    """`prefect server start` on SQLite under `home`, on a free port; stopped on exit."""
    import httpx

    port = free_port()
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
    proc = start([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)], env, log)

    def healthy() -> bool:
        try:
            return httpx.get(f"{url}/health", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        _wait(healthy, proc, log, "prefect server", 150)
        yield Server(url, env, log)
    finally:
        stop(proc)


@contextlib.contextmanager
def ray_cluster(log: Path, cpus: int = 2) -> Iterator[str]:
    """A one-node Ray cluster (`ray start --head --block`), every port free-picked so it can run beside
    other clusters on the box; yields its GCS address HOST:PORT. Token auth off (Ray 2.60 default)."""
    port = free_port()
    temp = Path(f"/tmp/af-ray-{port}")  # short: Ray's socket paths must fit in 107 bytes
    # The raylet registers within 30 s by default: too short when both cores are busy.
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_raylet_start_wait_time_s": "120"}
    cmd = [str(BIN / "ray"), "start", "--head", "--block", f"--num-cpus={cpus}", "--num-gpus=0",
           "--include-dashboard=false", f"--port={port}", f"--temp-dir={temp}",
           f"--ray-client-server-port={free_port()}", f"--dashboard-port={free_port()}",
           f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}"]
    proc = start(cmd, env, log)
    try:
        _wait(lambda: "will now block" in log.read_text(errors="replace"), proc, log, "ray start", 120)
        yield f"127.0.0.1:{port}"
    finally:
        stop(proc, grace=3)  # `ray start --block` lingers ~20 s after SIGTERM; its group is killed after
        subprocess.run(["rm", "-rf", str(temp)], check=False)
