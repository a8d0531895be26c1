"""alignforge CLI: every user mistake is one line on stderr and exit code 2 (no traceback)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from flows.cli import main
from flows.recipe import parse_sets


@pytest.fixture(autouse=True)
def _prefect_home(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect-home"))


def run_cli(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code, err, *needles):
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_help_lists_recipes_and_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    assert "magpie-sft" in out and "run" in out and "inspect" in out and "model" in out


def test_recipes_lists_parameters(capsys):
    code, out, _ = run_cli(capsys, "recipes")
    assert code == 0 and "magpie-sft" in out and "--set max_tokens_response=" in out


def test_parse_set_yaml_scalars_and_nesting():
    assert parse_sets(["n=5", "early_stop=false", "model=null", "deita.budget=6000", "name=abc"]) == [
        ("n", 5), ("early_stop", False), ("model", None), ("deita.budget", 6000), ("name", "abc")]


def test_unknown_recipe(capsys):
    code, _, err = run_cli(capsys, "run", "magpie-nope")
    assert_one_line_error(code, err, "unknown recipe 'magpie-nope'", "magpie-sft")


def test_bad_set_key_lists_valid_keys(capsys):
    code, _, err = run_cli(capsys, "run", "magpie-sft", "--set", "turnz=2")
    assert_one_line_error(code, err, "unknown key 'turnz'", "turns", "shard_size")


def test_bad_set_type_says_expected_type(capsys):
    code, _, err = run_cli(capsys, "run", "magpie-sft", "--set", "n=lots")
    assert_one_line_error(code, err, "n='lots'", "expected int")


def test_malformed_set(capsys):
    code, _, err = run_cli(capsys, "run", "magpie-sft", "--set", "n")
    assert_one_line_error(code, err, "expected key=value")


def test_bad_recipe_file_key(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("n: 3\nbogus: 1\n")
    code, _, err = run_cli(capsys, "run", "magpie-sft", "--recipe", str(recipe))
    assert_one_line_error(code, err, "unknown key 'bogus'", str(recipe))


def test_unwritable_out(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = run_cli(capsys, "run", "magpie-sft", "--out", str(blocker / "run"))
    assert_one_line_error(code, err, "output folder", "is a file", "another --out")


def test_corrupt_model_folder(tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{not json")
    code, _, err = run_cli(capsys, "run", "magpie-sft", "--set", f"model={model}", "--out", str(tmp_path / "run"))
    assert_one_line_error(code, err, "config.json is not valid JSON", str(model))


def test_model_without_chat_template(tmp_path, capsys):
    from engines.embedded import resolve_model

    source = Path(resolve_model(None))
    model = tmp_path / "base-model"
    model.mkdir()
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(source / name, model / name)
    config = json.loads((source / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    (model / "model.safetensors").write_bytes(b"")  # never loaded: the check runs before the engine
    code, _, err = run_cli(capsys, "run", "magpie-sft", "--set", f"model={model}", "--out", str(tmp_path / "run"))
    assert_one_line_error(code, err, "no chat template")


def test_inspect_missing_folder(tmp_path, capsys):
    code, _, err = run_cli(capsys, "inspect", str(tmp_path / "nope"))
    assert_one_line_error(code, err, "does not exist")


@pytest.mark.parametrize("out", ["", "/"])
def test_empty_or_root_out_is_refused_before_anything_is_written(tmp_path, capsys, monkeypatch, out):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(capsys, "run", "curate", "--set", "input=x.jsonl", "--out", out)
    assert_one_line_error(code, err, "output folder")
    assert list(tmp_path.iterdir()) == [] and not Path("/stages").exists() and not Path("/publish").exists()


def test_foreign_files_in_publish_are_never_deleted(tmp_path, capsys):
    data = tmp_path / "in.jsonl"
    data.write_text(json.dumps({"instruction": "Name a prime number.", "response": "Seven."}) + "\n")
    publish = tmp_path / "myproject" / "publish"
    publish.mkdir(parents=True)
    (publish / "thesis.docx").write_bytes(b"my thesis")
    (publish / "README.md").write_text("mine")
    code, _, err = run_cli(capsys, "run", "curate", "--set", f"input={data}", "--out", str(tmp_path / "myproject"))
    assert_one_line_error(code, err, "publish", "thesis.docx")
    assert (publish / "thesis.docx").read_bytes() == b"my thesis" and (publish / "README.md").read_text() == "mine"
    assert not (tmp_path / "myproject" / "stages").exists()  # refused before anything was written
