"""Small real runs (no model: the curate recipe and the scripted engine) that the notebook and report
tests look at; made once per module."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _quiet_prefect(tmp_path_factory, monkeypatch):
    from flows.cli import configure_environment

    monkeypatch.setenv("PREFECT_HOME", str(tmp_path_factory.getbasetemp() / "prefect-home"))
    monkeypatch.setenv("ALIGNFORGE_QUIET", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    configure_environment(verbose=False)


def _user_file(folder: Path) -> tuple[Path, Path]:
    rng = random.Random(0)
    words = [f"w{i}" for i in range(400)]
    rows = [{"question": "Explain " + " ".join(rng.choices(words, k=rng.randint(5, 25))),
             "answer": " ".join(rng.choices(words, k=rng.randint(5, 40)))} for _ in range(60)]
    for i in range(10):  # near duplicates of the first 10 questions
        rows.append({"question": rows[i]["question"] + " please", "answer": "again"})
    rows.append({"question": "List the following:", "answer": "a b"})
    rows.append({"question": "def inc(x):\n    return x + 1", "answer": "print(inc(2))"})
    path = folder / "in.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    target = folder / "target.jsonl"
    target.write_text(json.dumps({"text": "def double(y):\n    return y * 2"}) + "\n")
    return path, target


@pytest.fixture(scope="session")
def curate_run(tmp_path_factory) -> tuple[Path, dict]:
    """curate: heuristics (1 colon drop) -> minhash (10 near duplicates) -> ZIP-FIT top 40 of 61."""
    import os

    from flows.cli import configure_environment
    from flows.runner import run

    folder = tmp_path_factory.mktemp("curate")
    os.environ.setdefault("PREFECT_HOME", str(tmp_path_factory.getbasetemp() / "prefect-home"))
    configure_environment(verbose=False)
    path, target = _user_file(folder)
    out = folder / "run"
    result = run("curate", {"input": str(path), "mapping": {"instruction": "question", "response": "answer"},
                            "shard_size": 30, "zipfit": {"enabled": True, "target": str(target), "top_k": 40}},
                 out=str(out))
    return out, result


CANDIDATES_RECIPE = """
name: candidates-demo
description: Magpie instructions -> exact dedup -> best-of-N candidates (no reward), rows published
seed: 0
shard_size: 6
steps:
  - magpie_instructions: {n: 12}
  - exact_dedup: {column: instruction}
  - best_of_n: {k: 3}
publish:
  format: rows
"""


@pytest.fixture(scope="session")
def candidates_run(tmp_path_factory) -> tuple[Path, dict]:
    """Scripted engine: 12 Magpie seeds over at most 7 distinct questions -> one set of 3 candidates each."""
    import os

    from engines.scripted import ScriptedEngine
    from flows.cli import configure_environment
    from flows.runner import run

    folder = tmp_path_factory.mktemp("candidates")
    os.environ.setdefault("PREFECT_HOME", str(tmp_path_factory.getbasetemp() / "prefect-home"))
    configure_environment(verbose=False)
    questions = [f"How does thing {k} work?" for k in range(7)]

    def respond(prompt, sampling, index):
        if prompt.endswith("user\n"):
            return questions[(sampling.seed or 0) % len(questions)]
        return "Reply " + " ".join(f"w{(sampling.seed or 0) % 5 + j}" for j in range(3 + index))

    recipe = folder / "candidates.yaml"
    recipe.write_text(CANDIDATES_RECIPE)
    out = folder / "run"
    result = run(str(recipe), {}, out=str(out), engine=ScriptedEngine(respond))
    return out, result
