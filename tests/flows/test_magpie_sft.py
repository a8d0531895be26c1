"""Recipe magpie-sft end to end: scripted engine for wiring; real vLLM for kill/resume."""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest

from engines.scripted import ScriptedEngine

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _quiet_prefect(tmp_path_factory, monkeypatch):
    from flows.cli import configure_environment

    monkeypatch.setenv("PREFECT_HOME", str(tmp_path_factory.getbasetemp() / "prefect-home"))
    configure_environment(verbose=False)


def scripted():
    questions = [f"How does thing {k} work?" for k in range(12)] + ["", "Task: Explain X. Answer: Y"]
    return ScriptedEngine(lambda p, s, i: (questions[s.seed % len(questions)] if p.endswith("user\n")
                                           else "A short helpful reply."))


def published(out: Path) -> pl.DataFrame:
    return pl.read_parquet(sorted(glob.glob(str(out / "publish" / "data" / "train-*.parquet")))).sort("id")


def test_flow_publishes_trl_sft_and_resumes_from_cache(tmp_path):
    from datasets import load_dataset

    from flows.runner import run

    out = tmp_path / "run"
    params = {"n": 30, "shard_size": 8, "out": str(out)}
    engine = scripted()
    result = run("magpie-sft", params, engine=engine)
    rows = published(out)
    assert result["rows_kept"] == rows.height > 0
    assert rows["id"].n_unique() == rows.height
    assert set(result["dropped"]) <= {"empty_instruction", "duplicate_instruction", "template_leak", "truncated"}
    assert result["dropped"].get("duplicate_instruction", 0) > 0  # 12 distinct questions for 30 seeds
    assert result["rows_kept"] + sum(result["dropped"].values()) == 30  # nothing lost without a reason
    instructions = [m[0]["content"] for m in rows["messages"].to_list()]
    assert "Explain X." in instructions  # sanitizer on by default
    ds = load_dataset("parquet", data_dir=str(out / "publish"), split="train")
    assert "messages" in ds.column_names and len(ds) == rows.height
    card = (out / "publish" / "README.md").read_text()
    assert "magpie-sft" in card and "duplicate_instruction" in card

    calls = len(engine.calls)
    again = run("magpie-sft", params, engine=engine)  # finished stages: nothing regenerated
    assert len(engine.calls) == calls and again["rows_kept"] == result["rows_kept"]
    assert published(out).equals(rows)


def test_multi_turn_flow(tmp_path):
    from flows.runner import run

    out = tmp_path / "mt"
    run("magpie-sft", {"n": 8, "shard_size": 8, "turns": 2, "out": str(out)}, engine=scripted())
    rows = published(out)
    assert rows.height > 0
    assert all([m["role"] for m in msgs] == ["user", "assistant"] * 2 for msgs in rows["messages"].to_list())


@pytest.mark.engine
@pytest.mark.timeout(900)
def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path, engine):
    """Kill the CLI mid-stage (after >= 1 committed shard), rerun it, compare with a clean run."""
    from flows.runner import run

    # Small: the CPU box is shared. 2 shards of 8; responses long enough that some finish.
    sets = {"n": 16, "shard_size": 8, "max_tokens_instruction": 48, "max_tokens_response": 96, "seed": 3}
    killed_out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "flows.cli", "run", "magpie-sft", "--out", str(killed_out)]
    for key, value in sets.items():
        cmd += ["--set", f"{key}={value}"]
    env = {**os.environ, "ALIGNFORGE_QUIET": "1"}

    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # own process group: vLLM / Prefect children die with it
    stage_glob = str(killed_out / "stages" / "magpie_instructions-*")
    killed_with = None
    try:
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None:
            for folder in glob.glob(stage_glob):
                shards = glob.glob(os.path.join(folder, "part-*.parquet"))
                if shards and not os.path.exists(os.path.join(folder, "_manifest.json")):
                    os.killpg(proc.pid, signal.SIGKILL)
                    killed_with = len(shards)
                    break
            if killed_with:
                break
            time.sleep(0.05)
    finally:
        if proc.poll() is None and not killed_with:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert killed_with, "the run finished or failed before a shard was committed; nothing was interrupted"
    stage = glob.glob(stage_glob)[0]
    assert not os.path.exists(os.path.join(stage, "_manifest.json"))

    rerun = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    # A 135M model often rambles past max_tokens: all rows may end up dropped ("truncated_response").
    # That is a finished run too (exit 2 with the one-line reason); resume is checked on every stage.
    all_dropped = "no row survived" in rerun.stderr
    assert rerun.returncode == 0 or (rerun.returncode == 2 and all_dropped), rerun.stderr[-2000:]

    from flows.publishing import NothingSurvived

    clean_out = tmp_path / "clean"
    try:
        run("magpie-sft", {**sets, "out": str(clean_out)}, engine=engine)  # same seed, never interrupted
    except NothingSurvived:
        assert all_dropped

    def stage_rows(out: Path, name: str) -> pl.DataFrame:
        folder = glob.glob(str(out / "stages" / f"{name}-*"))
        assert len(folder) == 1 and os.path.exists(os.path.join(folder[0], "_manifest.json"))
        parts = [pl.read_parquet(p) for p in sorted(glob.glob(os.path.join(folder[0], "**", "part-*.parquet"),
                                                                  recursive=True))]
        cols = [c for c in ("id", "instruction", "messages", "drop_reason") if c in parts[0].columns]
        return pl.concat([p.select(cols) for p in parts], how="vertical_relaxed").sort("id")

    for name in ("magpie_instructions", "magpie_responses", "exact_dedup"):
        resumed, clean = stage_rows(killed_out, name), stage_rows(clean_out, name)
        assert resumed["id"].n_unique() == resumed.height  # no duplicated ids
        assert resumed.equals(clean), name  # none missing, same texts and drop reasons
    assert stage_rows(killed_out, "magpie_instructions").height == sets["n"]  # every seed exactly once
    if not all_dropped:
        assert "rows:" in rerun.stdout and "kept" in rerun.stdout
        resumed, clean = published(killed_out), published(clean_out)
        assert resumed["id"].to_list() == clean["id"].to_list()
        assert resumed["messages"].to_list() == clean["messages"].to_list()
