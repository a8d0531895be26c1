"""flows.runner: resumable shard mapping, global selections, fingerprinted stage folders."""

from __future__ import annotations

import polars as pl
import pytest

from flows.runner import run_global, run_step, seed_shards, stage_summary
from alignforge.step import Step, StepConfig


class AddOneConfig(StepConfig):
    offset: int = 1
    fail_on_seed: int | None = None


class AddOne(Step):
    name = "add_one"
    Config = AddOneConfig

    def __init__(self, config=None, **kw):
        super().__init__(config, **kw)
        self.calls = 0

    def __call__(self, df):
        self.calls += 1
        if self.config.fail_on_seed is not None and self.config.fail_on_seed in df["seed"].to_list():
            raise RuntimeError("killed")
        self.stats = {"generated_tokens": df.height}
        return df.with_columns((pl.col("seed") + self.config.offset).alias("value"),
                               (pl.col("seed") % 5 != 0).alias("keep"),
                               pl.when(pl.col("seed") % 5 == 0).then(pl.lit("multiple_of_5")).alias("drop_reason"))


def test_seed_shards_deterministic(tmp_path):
    a = seed_shards(10, 4, str(tmp_path))
    assert a.shard_indices() == [0, 1, 2] and a.committed
    assert a.read()["seed"].to_list() == list(range(10))
    assert seed_shards(10, 4, str(tmp_path)).url == a.url  # same folder, reused


def test_run_step_resumes_skipping_committed_shards(tmp_path, capsys):
    seeds = seed_shards(12, 4, str(tmp_path))
    # A config with a failure would get its own folder; emulate a crash with the same fingerprint instead.
    step = AddOne()
    original = step.__call__
    step.__class__ = type("Crashing", (AddOne,), {"__call__": lambda self, df: (_ for _ in ()).throw(RuntimeError("kill"))
                          if 8 in df["seed"].to_list() else original(df)})
    with pytest.raises(RuntimeError):
        run_step(step, seeds, str(tmp_path))
    fresh = AddOne()
    out = run_step(fresh, seeds, str(tmp_path))
    assert fresh.calls == 1  # only the shard that was not written
    assert out.committed and out.url.endswith(f"stages/add_one-{out.manifest()['fingerprint'][:12]}")
    kept = out.read()
    assert kept["seed"].to_list() == [s for s in range(12) if s % 5]
    assert out.read(rejected=True)["drop_reason"].to_list() == ["multiple_of_5"] * 3
    summary = stage_summary(out)
    assert summary["rows_in"] == 12 and summary["rows_out"] == 9 and summary["dropped"] == {"multiple_of_5": 3}
    line = capsys.readouterr().err
    assert "[add_one] rows in 12 -> out 9; dropped: multiple_of_5 3" in line

    again = AddOne()
    assert run_step(again, seeds, str(tmp_path)).url == out.url and again.calls == 0  # finished: untouched
    other = run_step(AddOne(offset=2), seeds, str(tmp_path))
    assert other.url != out.url  # config change -> new folder, recomputed


def test_run_global_marks_rows_and_reports_missing_columns(tmp_path):
    seeds = seed_shards(6, 3, str(tmp_path))

    def drop_odd(rows: pl.LazyFrame) -> pl.DataFrame:
        return rows.select("id", (pl.col("seed") % 2 == 0).alias("keep"),
                           pl.lit("odd").alias("drop_reason")).collect()

    out = run_global("even_only", drop_odd, seeds, str(tmp_path), config={"x": 1})
    assert out.read()["seed"].to_list() == [0, 2, 4]
    assert out.read(rejected=True)["drop_reason"].to_list() == ["odd"] * 3
    with pytest.raises(ValueError, match="must return columns id, keep, drop_reason"):
        run_global("bad", lambda rows: rows.select("id").collect(), seeds, str(tmp_path))
