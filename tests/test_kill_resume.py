"""Issue 8's kill tests: SIGKILL the real CLI at random (seeded) moments; every rerun continues and
the finished run publishes exactly the rows of an uninterrupted run.

- curate: 10 SIGKILLs across a run on a few thousand synthetic rows with many small shards (input,
  heuristics, MinHash score -> global select -> mark, publish), no model;
- magpie-sft: 3 SIGKILLs across a small generation run on the embedded model (engine test).

Kill moments: a seeded RNG picks 10 (3) distinct points on the run's progress, counted as the
files the uninterrupted run leaves in its run folder (shards, rejected parts, stats, manifests,
published files; each rerun is killed after at least one new file), plus a random delay of up to
0.2 s, so kills land mid-shard, between a global step's score and select phases and inside publish. Each CLI run is its own process group
(start_new_session) killed with os.killpg, so nothing it spawned survives it. The CLI processes
talk to one `prefect server start` for the module (the temporary server would start per process,
~30 s each on a busy box).
"""

from __future__ import annotations

import glob
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest

from tests.servers import free_port

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


# ---------------------------------------------------------------- processes and the server

def _killpg(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


@pytest.fixture(scope="module")
def prefect_env(tmp_path_factory):
    """Environment for CLI subprocesses: one Prefect server for the module, its own PREFECT_HOME."""
    import httpx

    home = tmp_path_factory.mktemp("prefect-server")
    url = f"http://127.0.0.1:{free_port()}/api"
    base = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    server_env = {**base, "PREFECT_HOME": str(home),
                  "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home}/prefect.db",
                  "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "PREFECT_UI_ENABLED": "false",
                  "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false",
                  "PREFECT_SERVER_SERVICES_LATE_RUNS_ENABLED": "false",
                  "PREFECT_SERVER_SERVICES_FOREMAN_ENABLED": "false"}
    log = home / "server.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port",
                                 url.split(":")[-1].split("/")[0]], cwd=REPO, env=server_env, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, \
                "prefect server did not start\n" + log.read_text(errors="replace")[-3000:]
            time.sleep(0.5)
        client_home = tmp_path_factory.mktemp("prefect-client")
        yield {**base, "PREFECT_API_URL": url, "PREFECT_HOME": str(client_home), "ALIGNFORGE_QUIET": "1",
               "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
    finally:
        _killpg(proc)


def cli(recipe: str, out: Path, sets: dict) -> list[str]:
    cmd = [sys.executable, "-m", "flows.cli", "run", recipe, "--out", str(out)]
    for key, value in sets.items():
        cmd += ["--set", f"{key}={value}"]
    return cmd


def run_to_end(cmd: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
                          start_new_session=True)
    # A run that keeps nothing is finished too (exit 2, one line); anything else is a failure.
    assert done.returncode == 0 or (done.returncode == 2 and "no row survived" in done.stderr), \
        f"exit {done.returncode}\n{done.stderr[-3000:]}"
    return done


def progress(out: Path) -> int:
    """Files the run has left in its folder so far (hidden temporaries and the lock not counted)."""
    return sum(1 for _, _, files in os.walk(out) for f in files if not f.startswith("."))


def committed_shards(out: Path) -> dict[str, int]:
    """Kept parts of stage shards (a shard's commit point) -> mtime: a rerun must never rewrite one."""
    return {p: os.stat(p).st_mtime_ns for p in glob.glob(str(out / "stages" / "*" / "part-*.parquet"))}


def kill_at(cmd: list[str], env: dict, out: Path, threshold: int, delay: float, timeout: float) -> str:
    """Start the CLI, SIGKILL its process group once `progress(out) >= threshold` (+ delay).
    Returns where the kill landed ('killed at N files'), or fails if the run ended first."""
    before = committed_shards(out)
    threshold = max(threshold, progress(out) + 1)  # each run is killed after it made some progress
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)  # own process group: Prefect / vLLM children die with it
    try:
        deadline = time.monotonic() + timeout
        while proc.poll() is None and progress(out) < threshold and time.monotonic() < deadline:
            time.sleep(0.01)
        if proc.poll() is None:
            time.sleep(delay)
    finally:
        alive = proc.poll() is None
        _killpg(proc)
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    assert alive, f"the run ended (exit {proc.returncode}) before its kill at {threshold} files\n{err[-3000:]}"
    after = committed_shards(out)
    rewritten = [p for p, mtime in before.items() if after.get(p) != mtime]
    assert not rewritten, f"a rerun rewrote committed shards instead of continuing: {rewritten[:3]}"
    return f"killed at {progress(out)} files (threshold {threshold} + {delay:.2f}s)"


def published(out: Path, what: str) -> pl.DataFrame:
    files = sorted(glob.glob(str(out / "publish" / what / "*.parquet")))
    frames = [pl.read_parquet(f) for f in files]
    frames = [f for f in frames if f.height]
    return pl.concat(frames, how="diagonal_relaxed").sort("id") if frames else pl.DataFrame()


def assert_same_publish(resumed: Path, clean: Path) -> None:
    for what in ("data", "rejected"):
        a, b = published(resumed, what), published(clean, what)
        assert a.columns == b.columns, (what, a.columns, b.columns)
        if a.height:
            assert a["id"].n_unique() == a.height, f"{what}: duplicated ids"
        assert a.equals(b), f"{what}: resumed rows differ from the uninterrupted run's"
    a = json.loads((resumed / "publish" / "_manifest.json").read_text())
    b = json.loads((clean / "publish" / "_manifest.json").read_text())
    assert a.get("rows") == b.get("rows") and a.get("num_rows") == b.get("num_rows")


def kill_plan(seed: int, kills: int, total: int) -> list[tuple[int, float]]:
    rng = random.Random(seed)
    thresholds = sorted(rng.sample(range(0, total), kills))
    return [(t, rng.uniform(0.0, 0.2)) for t in thresholds]


# ---------------------------------------------------------------- curate: 10 kills

@pytest.fixture(scope="module")
def curate_input(tmp_path_factory) -> Path:
    """3,400 rows: near duplicates (MinHash drops) and colon-ended instructions (heuristics drops)."""
    rng = random.Random(0)
    words = [f"w{i}" for i in range(3000)]
    rows = [{"question": "Explain " + " ".join(rng.choices(words, k=12)), "answer": " ".join(rng.choices(words, k=25))}
            for _ in range(3000)]
    rows += [{"question": rows[i]["question"] + " please", "answer": f"again {i}"} for i in range(300)]
    rows += [{"question": f"List the following {i}:", "answer": "a b"} for i in range(100)]
    rng.shuffle(rows)
    path = tmp_path_factory.mktemp("curate-input") / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.timeout(600)
def test_curate_ten_sigkills_publish_the_uninterrupted_rows(prefect_env, curate_input, tmp_path):
    sets = {"input": curate_input, "mapping.instruction": "question", "mapping.response": "answer",
            "shard_size": 100}
    clean_out, killed_out = tmp_path / "clean", tmp_path / "killed"
    clean = run_to_end(cli("curate", clean_out, sets), prefect_env, timeout=300)
    assert "3000 kept of 3400" in clean.stdout, clean.stdout
    total = progress(clean_out)
    assert total > 100  # many shards: room for 10 kills at distinct points

    cmd = cli("curate", killed_out, sets)
    landed = [kill_at(cmd, prefect_env, killed_out, threshold, delay, timeout=120)
              for threshold, delay in kill_plan(8, 10, total)]
    print("curate kills:", "; ".join(landed))  # shown with -s or on failure
    assert len(landed) == 10, landed
    rerun = run_to_end(cmd, prefect_env, timeout=300)
    assert "3000 kept of 3400" in rerun.stdout, (landed, rerun.stdout)
    assert_same_publish(killed_out, clean_out)
    for folder in glob.glob(str(killed_out / "stages" / "*")):  # every stage committed once, no stray shards
        assert os.path.exists(os.path.join(folder, "_manifest.json")), folder
    assert sorted(os.path.basename(f) for f in glob.glob(str(killed_out / "stages" / "*"))) == \
        sorted(os.path.basename(f) for f in glob.glob(str(clean_out / "stages" / "*")))


# ---------------------------------------------------------------- magpie-sft: 3 kills (engine)

def stage_rows(out: Path, name: str) -> pl.DataFrame:
    folders = glob.glob(str(out / "stages" / f"{name}-*"))
    assert len(folders) == 1 and os.path.exists(os.path.join(folders[0], "_manifest.json")), folders
    parts = [pl.read_parquet(p) for p in sorted(glob.glob(os.path.join(folders[0], "**", "part-*.parquet"),
                                                              recursive=True))]
    cols = [c for c in ("id", "instruction", "messages", "drop_reason") if c in parts[0].columns]
    return pl.concat([p.select(cols) for p in parts], how="vertical_relaxed").sort("id")


@pytest.mark.engine
@pytest.mark.timeout(1200)
def test_magpie_sft_three_sigkills_publish_the_uninterrupted_rows(prefect_env, tmp_path):
    """A 135M model may drop every row as truncated: then the run still finishes (exit 2, empty
    publish) and every stage's kept + rejected rows are compared."""
    sets = {"n": 16, "shard_size": 4, "max_tokens_instruction": 48, "max_tokens_response": 96, "seed": 3}
    clean_out, killed_out = tmp_path / "clean", tmp_path / "killed"
    run_to_end(cli("magpie-sft", clean_out, sets), prefect_env, timeout=900)
    total = progress(clean_out)
    generated = sum(1 for p in glob.glob(str(clean_out / "stages" / "magpie_*" / "**" / "*"), recursive=True)
                    if os.path.isfile(p))
    # Kill points among the generation stages' files (where the time goes) and the rest of the run.
    rng_points = kill_plan(11, 3, total)
    cmd = cli("magpie-sft", killed_out, sets)
    landed = [kill_at(cmd, prefect_env, killed_out, max(t, 1), delay, timeout=600) for t, delay in rng_points]
    print("magpie-sft kills:", "; ".join(landed))
    assert len(landed) == 3 and generated > 0, landed
    run_to_end(cmd, prefect_env, timeout=900)
    for name in ("magpie_instructions", "magpie_responses", "magpie_checks", "exact_dedup"):
        resumed, clean = stage_rows(killed_out, name), stage_rows(clean_out, name)
        assert resumed["id"].n_unique() == resumed.height, name
        assert resumed.equals(clean), f"{name}: resumed rows differ ({landed})"
    assert stage_rows(killed_out, "magpie_instructions").height == sets["n"]
    assert_same_publish(killed_out, clean_out)
