"""flows.runner: resumable shard mapping, global steps, fingerprints, workers, input content."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import polars as pl
import pytest

from alignforge.step import GlobalStep, Step, StepConfig
from flows.runner import run, run_global, run_map, seed_shards, stage_summary

CALLS: list[int] = []


class AddOneConfig(StepConfig):
    offset: int = 1


class AddOne(Step):
    name = "add_one"
    Config = AddOneConfig

    def __call__(self, df):
        CALLS.append(df.height)
        if getattr(self, "crash_on", None) in df["seed"].to_list():
            raise RuntimeError("killed")
        self.stats = {"generated_tokens": df.height, "my_counter": 2, "nested": {"errors": 1}}
        return df.with_columns((pl.col("seed") + self.config.offset).alias("value"),
                               (pl.col("seed") % 5 != 0).alias("keep"),
                               pl.when(pl.col("seed") % 5 == 0).then(pl.lit("multiple_of_5")).alias("drop_reason"))


class EvenOnly(GlobalStep):
    name = "even_only"
    Config = StepConfig

    def select_columns(self):
        return ["seed"]

    def select(self, scores):
        table = scores.collect() if isinstance(scores, pl.LazyFrame) else scores
        return table.select("id", pl.when(pl.col("seed") % 2 == 1).then(pl.lit("odd")).otherwise(None)
                            .alias("_reason"))


def test_seed_shards_deterministic(tmp_path):
    a = seed_shards(10, 4, str(tmp_path))
    assert a.shard_indices() == [0, 1, 2] and a.committed
    assert a.read()["seed"].to_list() == list(range(10))
    assert seed_shards(10, 4, str(tmp_path)).url == a.url  # same folder, reused


def test_run_map_resumes_skipping_committed_shards_and_keeps_all_stats(tmp_path, capsys):
    seeds = seed_shards(12, 4, str(tmp_path))
    crashing = AddOne()
    crashing.crash_on = 8
    CALLS.clear()
    with pytest.raises(RuntimeError):
        run_map(crashing, seeds, str(tmp_path))
    CALLS.clear()
    out = run_map(AddOne(), seeds, str(tmp_path))
    assert len(CALLS) == 1  # only the shard that was not written
    assert out.committed and out.url.endswith(f"stages/add_one-{out.manifest()['fingerprint'][:12]}")
    assert out.read()["seed"].to_list() == [s for s in range(12) if s % 5]
    assert out.read(rejected=True)["drop_reason"].to_list() == ["multiple_of_5"] * 3
    summary = stage_summary(out)
    assert summary["rows_in"] == 12 and summary["rows_out"] == 9 and summary["dropped"] == {"multiple_of_5": 3}
    assert "[add_one] rows in 12 -> out 9; dropped: multiple_of_5 3" in capsys.readouterr().err
    # Every key of step.stats reaches the manifest (summed over shards), not just tokens.
    step_stats = out.manifest()["stats"]["step"]
    assert step_stats["my_counter"] == 2 * 3 and step_stats["nested"] == {"errors": 3}

    CALLS.clear()
    assert run_map(AddOne(), seeds, str(tmp_path)).url == out.url and CALLS == []  # finished: untouched
    assert run_map(AddOne(offset=2), seeds, str(tmp_path)).url != out.url  # config change -> new folder


def test_run_global_scores_selects_and_marks(tmp_path):
    seeds = seed_shards(6, 4, str(tmp_path))
    out = run_global(EvenOnly(), seeds, str(tmp_path))
    assert out.read()["seed"].to_list() == [0, 2, 4]
    assert out.read(rejected=True)["drop_reason"].to_list() == ["odd"] * 3
    assert out.manifest()["rows"] == {"in": 6, "kept": 3, "dropped": 3, "dropped_by_reason": {"odd": 3}}


def _curate_input(path: Path, rows: int = 90) -> Path:
    lines = [{"instruction": f"Explain topic {i % 70} in simple words please", "response": f"Answer number {i}."}
             for i in range(rows)]
    path.write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    return path


def _tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*.parquet"))}


def test_output_is_byte_identical_for_any_number_of_workers(tmp_path):
    data = _curate_input(tmp_path / "in.jsonl")
    sets = {"input": str(data), "kind": "sft", "shard_size": 10}
    one = run("curate", sets, out=str(tmp_path / "w1"), workers=1)
    four = run("curate", sets, out=str(tmp_path / "w4"), workers=4)
    assert one["rows_kept"] == four["rows_kept"] and one["dropped"] == four["dropped"]
    assert one["dropped"]["minhash_duplicate"] == 20
    digest1 = _tree_digest(tmp_path / "w1" / "stages")
    assert digest1 and digest1 == _tree_digest(tmp_path / "w4" / "stages")
    assert _tree_digest(tmp_path / "w1" / "publish") == _tree_digest(tmp_path / "w4" / "publish")


def test_editing_an_input_row_republishes_the_new_text(tmp_path):
    """Same id, new content: the input stage's fingerprint covers the bytes, so it recomputes."""
    path = tmp_path / "in.jsonl"
    rows = [{"id": f"r{i}", "messages": [{"role": "user", "content": f"Question {i} about cells?"},
                                         {"role": "assistant", "content": f"Original answer {i}."}]}
            for i in range(5)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "run"
    run("curate", {"input": str(path)}, out=str(out))
    rows[2]["messages"][1]["content"] = "An edited answer."
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    run("curate", {"input": str(path)}, out=str(out))
    published = pl.read_parquet(out / "publish" / "data" / "*.parquet").sort("id")
    answers = [m[1]["content"] for m in published["messages"].to_list()]
    assert "An edited answer." in answers and "Original answer 2." not in answers


def test_engine_fingerprint_covers_the_model_files(tmp_path):
    """Issue 16 kind 5: editing the chat template of a --set model= folder changes every engine
    step's fingerprint (so generation recomputes); an untouched folder keeps it."""
    import shutil

    from engines.embedded import resolve_model
    from engines.lifetime import LazyEngine
    from flows.runner import engine_id
    from stages.magpie import MagpieResponses

    source = Path(resolve_model(None))
    model = tmp_path / "model"
    model.mkdir()
    for f in source.iterdir():
        if f.is_file():
            (model / f.name).symlink_to(f) if f.suffix == ".safetensors" else shutil.copy(f, model / f.name)
    step = MagpieResponses()
    before = step.fingerprint("input-fp", engine_id=engine_id(LazyEngine(str(model))))
    assert step.fingerprint("input-fp", engine_id=engine_id(LazyEngine(str(model)))) == before
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["chat_template"] = (config.get("chat_template") or "") + "{# edited #}"
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    assert step.fingerprint("input-fp", engine_id=engine_id(LazyEngine(str(model)))) != before


class ConcurrentEngine:
    """Takes calls from several threads (like VLLMEngine); records how many overlap. A call waits
    (up to 10 s) until `expect` calls are in at once, so the overlap does not depend on timing."""

    concurrent_calls = True
    model_id = "concurrent-fake"

    def __init__(self, *, expect: int = 1):
        import threading

        self.expect, self.turn, self.active, self.peak = expect, threading.Condition(), 0, 0

    def call(self, n: int) -> None:
        with self.turn:
            self.active += 1
            self.peak = max(self.peak, self.active)
            self.turn.notify_all()
            self.turn.wait_for(lambda: self.peak >= self.expect, timeout=10)
            self.active -= 1


class EngineAddOne(AddOne):
    name = "engine_add_one"
    needs_engine = True

    def __call__(self, df):
        self.engine.call(df.height)
        return super().__call__(df)


def _engine_run(tmp_path, name, engine, in_flight, crash_on=None):
    seeds = seed_shards(24, 4, str(tmp_path / name))
    step = EngineAddOne()
    step.engine, step.crash_on = engine, crash_on
    return run_map(step, seeds, str(tmp_path / name), engine=engine, shards_in_flight=in_flight)


def test_engine_shards_in_flight_share_the_engine_and_publish_the_same_rows(tmp_path):
    one, four = ConcurrentEngine(), ConcurrentEngine(expect=4)
    a = _engine_run(tmp_path, "one", one, 1)
    b = _engine_run(tmp_path, "four", four, 4)
    assert one.peak == 1 and four.peak == 4  # 6 shards, at most 4 at once
    assert b.shard_indices() == list(range(6)) and b.committed
    assert b.read().equals(a.read())
    assert stage_summary(b)["rows_in"] == stage_summary(a)["rows_in"] == 24


def test_engine_without_concurrent_calls_runs_one_shard_at_a_time(tmp_path):
    engine = ConcurrentEngine()
    engine.concurrent_calls = False
    _engine_run(tmp_path, "serial", engine, 4)
    assert engine.peak == 1


def test_a_failing_shard_in_flight_stops_new_shards_and_the_rerun_resumes(tmp_path):
    engine = ConcurrentEngine(expect=2)
    with pytest.raises(RuntimeError, match="killed"):
        _engine_run(tmp_path, "crash", engine, 2, crash_on=9)  # seed 9 is in shard 2
    from storage import ShardedDataset

    partial = [p for p in (tmp_path / "crash" / "stages").iterdir() if p.name.startswith("engine_add_one")]
    done = ShardedDataset(str(partial[0])).shard_indices()
    assert 2 not in done and len(done) < 6  # shards after the failure were never started
    CALLS.clear()
    resumed = _engine_run(tmp_path, "crash", ConcurrentEngine(), 2)
    assert resumed.committed and len(CALLS) == 6 - len(done)  # only the missing shards ran again


class SlowStartEngine(ConcurrentEngine):
    """Like LazyEngine: its first call "starts" it (here 0.5 s) and records the start's wall span."""

    start_span = None

    def call(self, n: int) -> None:
        import time

        if self.start_span is None:
            started = time.time()
            time.sleep(0.5)
            self.start_span = (started, time.time())


def test_engine_start_is_not_counted_in_the_stage_seconds(tmp_path):
    engine = SlowStartEngine()
    out = _engine_run(tmp_path, "start", engine, 1)
    first = out.shard_stats()[0]
    assert engine.start_span is not None and first["seconds"] < 0.4  # the 0.5 s start left out
    assert stage_summary(out)["seconds"] < 0.4
