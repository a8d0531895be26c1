"""Recipe magpie-sft end to end: scripted engine for wiring; real vLLM for kill/resume."""

from __future__ import annotations

import glob
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


# SIGKILL / resume of this recipe on the real engine: tests/test_kill_resume.py (3 kills at seeded points).
