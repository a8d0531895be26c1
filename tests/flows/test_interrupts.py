"""Ctrl-C (SIGINT to the process group) and SIGTERM during a real run: exit 130 within seconds with
the resume hint last, nothing the run started left alive, and the rerun resumes (issue 16 kind 6)."""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.engine
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_stops_everything_and_the_rerun_resumes(tmp_path, signum):
    import psutil

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "alignforge", "run", "magpie-sft", "--out", str(out), "--set", "n=12",
           "--set", "shard_size=4", "--set", "max_tokens_instruction=32", "--set", "max_tokens_response=48"]
    env = {**os.environ, "ALIGNFORGE_QUIET": "1", "PREFECT_HOME": str(tmp_path / "ph")}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    stage = str(out / "stages" / "magpie_instructions-*" / "part-*.parquet")
    deadline = time.time() + 900
    while time.time() < deadline and proc.poll() is None and not glob.glob(stage):
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    started = psutil.Process(proc.pid).children(recursive=True)  # vLLM engine core, Prefect server, ...
    assert started, "the run should have started child processes"
    if signum == signal.SIGINT:
        os.killpg(proc.pid, signum)  # what Ctrl-C does: the whole foreground group
    else:
        os.kill(proc.pid, signum)  # a supervisor stopping the CLI
    t0 = time.time()
    _, err = proc.communicate(timeout=60)
    assert time.time() - t0 < 15
    assert proc.returncode == 130, err[-2000:]
    assert err.strip().splitlines()[-1] == "alignforge: interrupted; rerun the same command to resume", err[-2000:]
    time.sleep(10)
    alive = [p for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, [(p.pid, p.name()) for p in alive]

    committed = {p: os.stat(p).st_mtime_ns for p in glob.glob(stage)}
    rerun = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert rerun.returncode in (0, 2), rerun.stderr[-2000:]
    assert rerun.returncode == 0 or "no row survived" in rerun.stderr
    assert all(os.stat(p).st_mtime_ns == m for p, m in committed.items())  # committed shards reused as they were
    folder = glob.glob(str(out / "stages" / "magpie_instructions-*"))
    assert len(folder) == 1 and os.path.exists(os.path.join(folder[0], "_manifest.json"))
