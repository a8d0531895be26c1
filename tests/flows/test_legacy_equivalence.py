"""The built-in recipes, now YAML step lists on the one runner, publish exactly what the
hand-written flows they replaced published (same seed and params, embedded model).

The fixtures in tests/flows/data/legacy/ were written by the previous code (commit 69f0163:
flows/magpie_sft.py, magpie_dpo.py, curate.py) with:
    alignforge run magpie-sft --set n=12 --set turns=1 --set shard_size=5
    alignforge run magpie-dpo --set n=6 --set samples=3 --set shard_size=4 --set max_tokens_response=96
    alignforge run curate --set input=<the magpie-sft publish folder> --set shard_size=4 --set heuristics.enabled=false
"""

from __future__ import annotations

import glob
from pathlib import Path

import polars as pl
import pytest

DATA = Path(__file__).parent / "data" / "legacy"


def published(folder: Path, config: str = "data") -> pl.DataFrame:
    files = sorted(glob.glob(str(folder / "publish" / config / "*.parquet")))
    return pl.concat([pl.read_parquet(f) for f in files], how="diagonal_relaxed").sort("id")


def assert_same(new: pl.DataFrame, fixture: str) -> None:
    old = pl.read_parquet(DATA / fixture).sort("id")
    if "candidates" in new.columns:  # since issue 8 every candidate also carries its unscored `reason`
        new = new.with_columns(pl.col("candidates").list.eval(
            pl.struct([pl.element().struct.field(f) for f in ("content", "score", "index")])))
    assert new.columns == old.columns, (new.columns, old.columns)
    assert new["id"].to_list() == old["id"].to_list()
    assert new.to_dicts() == old.to_dicts()


@pytest.mark.engine
@pytest.mark.timeout(1500)
def test_builtin_recipes_publish_the_same_rows_as_the_flows_they_replaced(engine, tmp_path, monkeypatch):
    from flows.runner import run

    monkeypatch.setenv("ALIGNFORGE_QUIET", "1")
    # The previous code had no model profile (engines/profiles.py: the embedded model's own
    # defaults): the papers' values, given explicitly, sample exactly as it did.
    from engines.profiles import profile_for
    from flows.steps import step_class

    neutral = {f"steps.{step}.{field}": step_class(step).Config.model_fields[field].default
               for step, fields in profile_for(None).items() for field in fields}
    run("magpie-sft", {"n": 12, "turns": 1, "shard_size": 5, **neutral}, out=str(tmp_path / "sft"), engine=engine)
    assert_same(published(tmp_path / "sft"), "magpie_sft.parquet")

    # Heuristics off on both sides: their repetition rules were fixed on purpose since (issue 8 kind 5).
    run("curate", {"input": str(tmp_path / "sft" / "publish"), "shard_size": 4, "heuristics.enabled": False},
        out=str(tmp_path / "cur"))
    assert_same(published(tmp_path / "cur"), "curate.parquet")

    run("magpie-dpo", {"n": 6, "samples": 3, "shard_size": 4, "max_tokens_response": 96,
                       **{k: v for k, v in neutral.items() if k.startswith("steps.magpie_instructions.")}},
        out=str(tmp_path / "dpo"), engine=engine)
    assert_same(published(tmp_path / "dpo"), "magpie_dpo.parquet")
    assert_same(published(tmp_path / "dpo", "candidates"), "magpie_dpo_candidates.parquet")
