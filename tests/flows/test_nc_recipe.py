"""The nc-candidates recipe end to end on a scripted engine (mechanics; the real model runs in
tests/stages/test_nc_sampling.py and bench/nc.py)."""

from __future__ import annotations

import glob

import polars as pl

from tests.stages.test_nc_sampling import nc_engine


def read(out, config):
    return pl.concat([pl.read_parquet(f) for f in sorted(glob.glob(str(out / "publish" / config / "*.parquet")))])


def test_nc_recipe_publishes_candidate_sets_and_the_iid_baseline(tmp_path, monkeypatch):
    from flows.runner import run

    monkeypatch.setenv("ALIGNFORGE_QUIET", "1")
    out = tmp_path / "nc"
    result = run("nc-candidates", {"n": 6, "k": 4, "turns": 1, "compare_iid": True, "shard_size": 3},
                 out=str(out), engine=nc_engine())
    nc, iid = read(out, "data"), read(out, "iid")
    assert result["configs"]["default"] == nc.height > 0 and iid.height == nc.height
    assert all(len(c) == 4 for c in nc["candidates"].to_list())
    assert nc["diversity_cosine"].is_not_null().all() and nc["diversity_vendi"].min() >= 1.0
    assert set(nc["conversation_id"].to_list()) == set(iid["conversation_id"].to_list())  # paired prompts
    card = (out / "publish" / "README.md").read_text()
    for step in ("nc_candidates", "iid_candidates", "diversity"):
        assert f"| {step} |" in card
    assert "## NC vs i.i.d. candidate sets (paired by prompt)" in card and "95% CI" in card
