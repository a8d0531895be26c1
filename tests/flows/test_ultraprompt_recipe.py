"""The ultraprompt recipe end to end on the scripted rewriter/answerer/judge (mechanics; the real
model runs in tests/stages/test_ultraprompt.py and bench/ultraprompt.py)."""

from __future__ import annotations

import glob
import json

import polars as pl

from tests.stages.test_ultraprompt import CATS, SEEDS, World


def test_ultraprompt_recipe_publishes_pairs_sft_steps_and_trees(tmp_path, monkeypatch):
    from flows.runner import run

    monkeypatch.setenv("ALIGNFORGE_QUIET", "1")
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text("\n".join(json.dumps({"instruction": s, **({"category": c} if c else {})})
                               for s, c in zip(SEEDS, CATS)) + "\n")
    out = tmp_path / "up"
    result = run("ultraprompt", {"input": str(seeds), "iterations": 3, "shard_size": 5}, out=str(out), engine=World())
    configs = result["configs"]
    assert set(configs) >= {"default", "sft", "steps", "trees"}

    def read(config):
        return pl.concat([pl.read_parquet(f) for f in sorted(glob.glob(str(out / "publish" / config / "*.parquet")))])

    pairs, sft, trees = read("data"), read("sft"), read("trees")
    assert pairs.columns == ["id", "parent_id", "origin", "prompt", "chosen", "rejected", "score_chosen",
                             "score_rejected", "best_is_root"]
    assert (pairs["score_chosen"] > pairs["score_rejected"]).all()
    assert sft.height == len(SEEDS) and trees.height == len(SEEDS) * 4  # root + 3 iterations per tree
    assert set(trees["parent_id"].to_list()) == set(sft["parent_id"].to_list())  # one tree per seed
    card = (out / "publish" / "README.md").read_text()
    for step in ("mcts_category", "mcts_rewrite", "mcts_pairs"):
        assert f"| {step} |" in card
