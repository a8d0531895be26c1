"""Recipe files: a user's YAML runs end to end from the CLI; mistakes are one line before any model starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from flows.cli import main

REPO = Path(__file__).resolve().parents[2]

EXAMPLE = """\
# my_recipe.yaml
name: my-sft
model: embedded            # or an HF folder / hub id, or an OpenAI-compatible server (see engines)
steps:
  - magpie_instructions: {n: 32, temperature: 1.0}
  - magpie_responses: {max_tokens: 256}
  - heuristics: {}
  - minhash: {threshold: 0.8}
  - deita: {budget: 16}
publish: {format: sft, test_size: 0.0}
"""


@pytest.fixture(autouse=True)
def _prefect_home(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect-home"))


def one_line_error(capsys, *argv) -> str:
    code = main(list(argv))
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("body, needles", [
    ("name: x\nsteps:\n  - magpie_instructionz: {n: 3}\n", ["unknown step 'magpie_instructionz'",
                                                           "did you mean 'magpie_instructions'", "minhash"]),
    ("name: x\nsteps:\n  - magpie_instructions: {n: 3, temprature: 1.0}\n",
     ["step 'magpie_instructions' has no field 'temprature'", "did you mean 'temperature'", "top_p"]),
    ("name: x\nsteps:\n  - magpie_instructions: {n: many}\n", ["step 'magpie_instructions' field n='many'",
                                                              "expected int"]),
    ("name: x\nsteps:\n  - minhash: {threshold: 0.8}\n", ["first step 'minhash' needs input rows", "--set input="]),
    ("name: x\nmodle: embedded\nsteps:\n  - magpie_instructions: {}\n", ["unknown top-level key 'modle'"]),
])
def test_recipe_file_mistakes_are_one_line_naming_file_step_field(tmp_path, capsys, body, needles):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(body)
    line = one_line_error(capsys, "run", str(recipe), "--out", str(tmp_path / "run"))
    assert str(recipe) in line
    for needle in needles:
        assert needle in line, line
    assert not (tmp_path / "run").exists()  # nothing written, no model started


def test_set_reaches_any_step_field_and_reports_unknown_steps(tmp_path, capsys):
    from flows.recipe import build_steps, load_recipe

    recipe_file = tmp_path / "my_recipe.yaml"
    recipe_file.write_text(EXAMPLE)
    recipe = load_recipe(str(recipe_file), sets=["steps.minhash.threshold=0.7", "deita.budget=8", "seed=4"])
    steps = {s.name: s.config for s in build_steps(recipe)}
    assert steps["minhash"].threshold == 0.7 and steps["deita"].budget == 8
    assert steps["magpie_instructions"].seed == 4 and steps["magpie_responses"].seed == 4  # run-level seed
    assert steps["magpie_responses"].max_tokens == 256  # the file's
    assert steps["magpie_responses"].temperature == 0.3  # the embedded model's profile (engines/profiles.py)
    line = one_line_error(capsys, "run", str(recipe_file), "--set", "steps.zipfit.top_k=3")
    assert "no step 'zipfit'" in line and "magpie_instructions" in line


def test_steps_command_lists_fields_from_the_configs(capsys):
    assert main(["steps"]) == 0
    out = capsys.readouterr().out
    assert "minhash  [global]" in out and "threshold: float = 0.8" in out
    assert "magpie_instructions  [source, engine]" in out and "n: int = 200" in out


@pytest.mark.engine
@pytest.mark.timeout(1200)
def test_example_recipe_runs_end_to_end_from_the_cli(tmp_path):
    """The issue's recipe file, verbatim, through `alignforge run` (own process, own vLLM)."""
    from datasets import load_dataset

    recipe = tmp_path / "my_recipe.yaml"
    recipe.write_text(EXAMPLE)
    out = tmp_path / "x"
    env = {**os.environ, "ALIGNFORGE_QUIET": "1", "PREFECT_HOME": str(tmp_path / "ph")}
    done = subprocess.run([sys.executable, "-m", "flows.cli", "run", str(recipe), "--out", str(out)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=1100)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "my-sft: done" in done.stdout
    ds = load_dataset("parquet", data_dir=str(out / "publish"), split="train")
    assert "messages" in ds.column_names and 1 <= len(ds) <= 16  # deita budget 16
    for row in ds:
        assert [m["role"] for m in row["messages"]] == ["user", "assistant"]
    card = (out / "publish" / "README.md").read_text()
    manifest = json.loads((out / "publish" / "_manifest.json").read_text())
    steps = [s["step"] for s in manifest["card"]["steps"]] if "card" in manifest else None
    assert "## Steps" in card
    table = card.split("## Steps")[1].split("Full configs")[0]
    for name in ("magpie_instructions", "magpie_responses", "heuristics", "minhash", "deita"):
        assert f"| {name} |" in table, name
    if steps is not None:
        assert [s for s in steps if s != "seeds"] == ["magpie_instructions", "magpie_responses", "heuristics",
                                                      "minhash", "deita"]
    rejected = pl.read_parquet(out / "publish" / "rejected" / "*.parquet")
    assert len(ds) + rejected.height == 32  # every generated row is published or rejected with a reason
    assert rejected["drop_reason"].null_count() == 0


@pytest.mark.parametrize("sets, needle", [
    (["steps.magpie_instructions.temperature=0", "n=4"], "temperature 0 makes all n=4 samples identical"),
])
def test_settings_that_make_every_sample_identical_are_refused(tmp_path, capsys, sets, needle):
    argv = ["run", "magpie-sft", "--out", str(tmp_path / "run")]
    for item in sets:
        argv += ["--set", item]
    line = one_line_error(capsys, *argv)
    assert needle in line and "temperature=1.0" in line


def test_best_of_n_at_temperature_zero_is_refused(tmp_path, capsys):
    line = one_line_error(capsys, "run", "magpie-dpo", "--set", "temperature=0", "--out", str(tmp_path / "run"))
    assert "step 'best_of_n': temperature 0 makes all k=5 samples identical" in line


def test_yaml_mistakes_in_recipe_files(tmp_path, capsys):
    """Issue 16 kind 8: `on:` stays a key, duplicated keys and a stray `recipe:` are one line each."""
    from flows.recipe import build_steps, load_recipe

    ok = tmp_path / "on.yaml"
    ok.write_text("name: x\ninput: {path: in.jsonl}\nsteps:\n  - minhash:\n      on: conversation\n")
    assert build_steps(load_recipe(str(ok)))[0].config.on == "conversation"
    dup = tmp_path / "dup.yaml"
    dup.write_text("name: x\nseed: 1\nseed: 2\nsteps:\n  - magpie_instructions: {}\n")
    line = one_line_error(capsys, "run", str(dup), "--out", str(tmp_path / "r"))
    assert "seed" in line and "dup" in line.lower()
    other = tmp_path / "other.yaml"
    other.write_text("recipe: magpie-dpo\nn: 3\n")
    line = one_line_error(capsys, "run", "magpie-sft", "--recipe", str(other), "--out", str(tmp_path / "r"))
    assert "unknown key 'recipe'" in line
