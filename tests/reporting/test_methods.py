"""reporting.methods on hand-made stage folders: reward gains of best-of-N sets and of rewrites,
and the card's Plots section placement."""

from __future__ import annotations

import polars as pl
import pytest

from reporting.card import insert_plots_section
from reporting.methods import candidate_sets, reward_gains
from reporting.run import RunView, StageView


def stage(tmp_path, label: str, df: pl.DataFrame) -> StageView:
    from storage import ShardedDataset

    ds = ShardedDataset(str(tmp_path / f"{label}-000000000000"))
    ds.write_shard(0, df)
    manifest = {"step_name": label, "fingerprint": label, "rows": {"in": df.height, "kept": df.height}}
    ds.commit(manifest)
    return StageView(label=label, manifest=ds.manifest() or manifest, path=tmp_path / f"{label}-000000000000")


def msgs(text: str) -> list[dict]:
    return [{"role": "user", "content": "q"}, {"role": "assistant", "content": text}]


def test_best_of_n_and_rewrite_gains(tmp_path):
    best_of_n = pl.DataFrame({"id": ["a0", "a1", "a2", "b0", "b1"], "parent_id": ["a", "a", "a", "b", "b"],
                              "origin": ["best_of_n@1"] * 5, "candidate_index": [0, 1, 2, 0, 1],
                              "messages": [msgs(t) for t in ["x y z", "x y w", "p q r", "one two", "one two"]],
                              "reward": [1.0, 2.0, 3.0, 0.5, 0.5]})
    parents = pl.DataFrame({"id": ["p1", "p2"], "parent_id": [None, None], "origin": ["seed@1"] * 2,
                            "reward": [1.0, 2.0]})
    rewrites = pl.DataFrame({"id": ["r1", "r2"], "parent_id": ["p1", "p2"], "origin": ["mcts_rewrite@1"] * 2,
                             "reward": [1.5, 1.0]})
    run = RunView(path=tmp_path, stages=[stage(tmp_path, "parents", parents), stage(tmp_path, "rewrite", rewrites)])
    gains = {r["kind"]: r for r in reward_gains(run).to_dicts()}
    assert gains["rewrite"]["n"] == 2 and gains["rewrite"]["mean_gain"] == pytest.approx((0.5 - 1.0) / 2)
    assert gains["rewrite"]["share_improved"] == 0.5 and "best_of_n" not in gains

    bon = RunView(path=tmp_path, stages=[stage(tmp_path, "best_of_n", best_of_n)])
    sets = candidate_sets(bon).sort("set_id")
    assert sets["candidates"].to_list() == [3, 2] and sets["best_score"].to_list() == [3.0, 0.5]
    assert sets["distinct2"][1] == 0.5  # the same two words twice: 1 of 2 bigrams is new
    (row,) = reward_gains(bon, sets).to_dicts()
    assert row["kind"] == "best_of_n" and row["mean_gain"] == pytest.approx((3.0 - 2.0 + 0.0) / 2)


def test_plots_section_goes_after_the_steps_section_and_is_replaced_on_rerun():
    card = "# t\n\n## Steps\n\n| step |\n|---|\n| a |\n\n## Parameters\n\nx\n\nPublished by alignforge 0.1\n"
    once = insert_plots_section(card, ["plots/a.png"])
    assert once.index("## Steps") < once.index("## Plots") < once.index("## Parameters")
    assert "![a](plots/a.png)" in once
    twice = insert_plots_section(once, ["plots/b.png"])
    assert twice.count("## Plots") == 1 and "plots/a.png" not in twice and "![b](plots/b.png)" in twice
    assert twice.index("## Plots") < twice.index("## Parameters")
