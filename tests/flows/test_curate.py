"""The curate recipe end to end on a tiny user file (no model needed except for semdedup)."""
import json
import random

import polars as pl
import pytest

from flows.runner import run


@pytest.fixture()
def user_file(tmp_path):
    rng = random.Random(0)
    words = [f"w{i}" for i in range(400)]
    rows = [{"question": "Explain " + " ".join(rng.choices(words, k=15)),
             "answer": " ".join(rng.choices(words, k=20))} for _ in range(120)]
    for i in range(0, 20):  # near duplicates of the first 20 questions
        rows.append({"question": rows[i]["question"] + " please", "answer": "again"})
    rows.append({"question": "List the following:", "answer": "a b"})
    rows.append({"question": "def inc(x):\n    return x + 1", "answer": "print(inc(2))"})
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    target = tmp_path / "target.jsonl"
    target.write_text(json.dumps({"text": "def double(y):\n    return y * 2"}) + "\n")
    return path, target


def test_curate_user_file_then_rethreshold_reuses_scores(user_file, tmp_path):
    path, target = user_file
    out = tmp_path / "run"
    base = dict(input=str(path), mapping={"instruction": "question", "response": "answer"}, shard_size=50,
                out=str(out))
    result = run("curate", {**base, "zipfit": {"enabled": True, "target": str(target), "top_k": 100}})
    assert result["dropped"]["minhash_duplicate"] == 20
    assert result["dropped"]["instruction_ends_with_colon"] == 1
    assert result["dropped"]["zipfit_not_selected"] == 142 - 1 - 20 - 100
    published = pl.read_parquet(out / "publish" / "data" / "*.parquet")
    assert published.height == result["rows_kept"] == 100
    assert "minhash_signature" not in published.columns and "zipfit_alignment" in published.columns
    # The code row is the best match for a code target.
    assert published.sort("zipfit_alignment", descending=True)["messages"][0][0]["content"].startswith("def inc")
    rejected = pl.read_parquet(out / "publish" / "rejected" / "*.parquet")
    assert set(rejected["drop_reason"]) == {"minhash_duplicate", "instruction_ends_with_colon", "zipfit_not_selected"}
    card = (out / "publish" / "README.md").read_text()
    assert "minhash_duplicate" in card and "zipfit_not_selected" in card

    score_dirs = sorted(p.name for p in (out / "stages").glob("minhash_score-*"))
    again = run("curate", {**base, "minhash": {"threshold": 0.95}})
    assert sorted(p.name for p in (out / "stages").glob("minhash_score-*")) == score_dirs  # scores reused
    assert len(list((out / "stages").glob("minhash-*"))) == 2  # a new selection stage
    assert again["dropped"].get("minhash_duplicate", 0) <= 20 and "zipfit_not_selected" not in again["dropped"]


def test_curate_zipfit_without_target_is_a_clear_error(user_file, tmp_path):
    path, _ = user_file
    from flows.recipe import RecipeError

    with pytest.raises(RecipeError, match="target"):  # before any stage runs
        run("curate", {"input": str(path), "mapping": {"instruction": "question", "response": "answer"},
                       "out": str(tmp_path / "r"), "zipfit": {"enabled": True}})
    assert not (tmp_path / "r").exists()


def test_zipfit_target_in_sharegpt_layout_is_imported_and_checked_before_any_step(user_file, tmp_path):
    """Issue 8 kind 9: the target goes through the input import; a bad target fails before any stage runs."""
    import json

    from schemas import SchemaError

    path, _ = user_file
    good = tmp_path / "target_sharegpt.jsonl"
    good.write_text(json.dumps({"conversations": [{"from": "human", "value": "def f(x):"},
                                                  {"from": "gpt", "value": "return x"}]}) + "\n")
    sets = {"input": str(path), "mapping": {"instruction": "question", "response": "answer"}, "shard_size": 50,
            "zipfit": {"enabled": True, "target": str(good), "top_k": 10}}
    result = run("curate", sets, out=str(tmp_path / "ok"))
    assert result["rows_kept"] == 10
    bad = tmp_path / "target_bad.jsonl"
    bad.write_text(json.dumps({"conversations": [{"from": "human", "value": "hi"}, {"from": "wizard", "value": "x"}]})
                   + "\n")
    with pytest.raises(SchemaError, match="target_bad.jsonl"):
        run("curate", {**sets, "zipfit": {"enabled": True, "target": str(bad)}}, out=str(tmp_path / "bad"))
    assert not (tmp_path / "bad").exists()
