import json
import uuid

import polars as pl
import pytest

import schemas
from storage import ShardedDataset, StorageError


def rows(n, start=0, drop_every=0):
    ids = [f"r{i}" for i in range(start, start + n)]
    keep = [not (drop_every and i % drop_every == 0) for i in range(start, start + n)]
    return pl.DataFrame({
        "id": ids, "parent_id": [None] * n, "origin": ["t@1"] * n,
        "messages": [schemas.to_messages(f"q{i}", f"a{i}") for i in range(start, start + n)],
        "keep": keep, "drop_reason": [None if k else "too_short" for k in keep],
    }, schema_overrides={"messages": schemas.MESSAGES})


@pytest.fixture(params=["memory", "local"])
def ds(request, tmp_path):
    if request.param == "memory":
        url = f"memory://test-{uuid.uuid4().hex}/ds"
    else:
        url = str(tmp_path / "ds")
    return ShardedDataset(url)


def test_write_read_route_rejected_and_stats(ds):
    stats = ds.write_shard(0, rows(6, drop_every=3), stats={"generated_tokens": 60, "seconds": 1.5})
    ds.write_shard(1, rows(4, start=6))
    assert stats["rows_written"] == 6 and stats["rows_kept"] == 4 and stats["dropped_by_reason"] == {"too_short": 2}
    assert ds.shard_indices() == [0, 1]
    kept = ds.read()
    assert kept["id"].to_list() == ["r1", "r2", "r4", "r5", "r6", "r7", "r8", "r9"]
    assert "keep" not in kept.columns and "drop_reason" not in kept.columns
    assert kept.schema["messages"] == schemas.MESSAGES and kept.schema["parent_id"] == pl.Utf8
    rejected = ds.read(rejected=True)
    assert rejected["id"].to_list() == ["r0", "r3"] and set(rejected["drop_reason"]) == {"too_short"}
    assert ds.read_shard(1, rejected=True).height == 0
    assert ds.shard_stats()[0]["generated_tokens"] == 60
    assert ds.num_rows() == 8 and ds.num_rows(rejected=True) == 2
    assert ds.scan().select(pl.len()).collect().item() == 8
    assert not ds.committed and ds.manifest() is None
    ds.commit({"stage": "t@1"})
    assert ds.committed and ds.manifest() == {"stage": "t@1"}


def test_missing_reason_is_counted_not_lost(ds):
    df = rows(2).with_columns(keep=pl.Series([False, True]), drop_reason=pl.lit(None, pl.Utf8))
    assert ds.write_shard(0, df)["dropped_by_reason"] == {"unspecified": 1}


def test_zero_row_shard_is_committed_with_schema(ds):
    ds.write_shard(0, rows(0))
    assert ds.shard_indices() == [0]
    empty = ds.read_shard(0)
    assert empty.height == 0 and empty.schema["messages"] == schemas.MESSAGES


def test_crash_leaves_no_visible_half_shard_and_rewrite_works(ds):
    ds.write_shard(0, rows(3))
    # Simulate a run killed mid-shard 1: a tmp kept part and a rejected part, no kept part.
    ds.fs.makedirs(ds._join("rejected"), exist_ok=True)
    with ds.fs.open(ds._join(".part-00001.parquet.tmp-deadbeef"), "wb") as f:
        f.write(b"half-written garbage")
    with ds.fs.open(ds._join("rejected", "part-00001.parquet"), "wb") as f:
        rows(2, start=100).with_columns(keep=pl.lit(False), drop_reason=pl.lit("stale")).write_parquet(f)
    assert ds.fs.exists(ds._join("rejected", "part-00001.parquet"))
    assert ds.shard_indices() == [0]  # shard 1 not committed
    assert ds.read().height == 3 and ds.read(rejected=True).height == 0  # half shard invisible
    # Resume: rewrite shard 1 with no rejected rows; the stale rejected part and tmp go away.
    ds.write_shard(1, rows(2, start=3))
    assert ds.shard_indices() == [0, 1]
    assert ds.read(rejected=True).height == 0
    assert not ds.fs.exists(ds._join("rejected", "part-00001.parquet"))
    assert not any(".tmp-" in name for name in ds._names())
    assert ds.read()["id"].to_list() == ["r0", "r1", "r2", "r3", "r4"]


def test_rewriting_a_shard_uncommits_the_manifest(ds):
    ds.write_shard(0, rows(2))
    ds.commit({"ok": True})
    ds.write_shard(0, rows(1))
    assert not ds.committed and ds.read().height == 1


def test_commit_writes_manifest_atomically_and_cleans_tmp(ds):
    ds.write_shard(0, rows(1))
    with ds.fs.open(ds._join("._manifest.json.tmp-old"), "wb") as f:
        f.write(b"{")
    ds.commit({"n": 1})
    assert json.loads(ds.fs.cat(ds._join("_manifest.json"))) == {"n": 1}
    assert not any(".tmp-" in name for name in ds._names())


def test_reading_missing_dataset_is_empty_not_an_error(tmp_path):
    ds = ShardedDataset(tmp_path / "nothing")
    assert ds.shard_indices() == [] and ds.read().height == 0 and ds.manifest() is None
    with pytest.raises(FileNotFoundError, match="not committed"):
        ds.read_shard(0)


def test_unwritable_output_is_one_clear_error(tmp_path):
    blocker = tmp_path / "out"
    blocker.write_text("a file, not a folder")
    with pytest.raises(StorageError, match=r"cannot write dataset at .*out.*file exists.*Fix"):
        ShardedDataset(blocker).write_shard(0, rows(1))
    with pytest.raises(StorageError, match=r"cannot write dataset at .*a file is in the way.*Fix"):
        ShardedDataset(blocker / "ds").write_shard(0, rows(1))


def test_permission_denied_is_one_clear_error(tmp_path, monkeypatch):
    ds = ShardedDataset(tmp_path / "ds")

    def deny(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / "ds"))

    monkeypatch.setattr(ds.fs, "makedirs", deny)
    with pytest.raises(StorageError, match="permission denied.*Fix: choose an output path"):
        ds.write_shard(0, rows(1))


def test_shards_with_different_columns_union_on_read(ds):
    ds.write_shard(0, rows(1).with_columns(score=pl.lit(0.5)))
    ds.write_shard(1, rows(1, start=1))
    assert ds.read()["score"].to_list() == [0.5, None]


# ---------------------------------------------------------------- two writers, vanished files (issue 16)

def _tmp_of(ds, name, pid, host=None):
    from storage.owner import HOST

    return ds._join(f".{name}.tmp-{host or HOST}~{pid}~{'a' * 32}")


def test_a_live_writers_tmp_file_survives_another_writer_of_the_same_shard(tmp_path):
    import subprocess
    import sys

    ds = ShardedDataset(tmp_path / "ds")
    ds.write_shard(0, rows(1))
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = _tmp_of(ds, "part-00000.parquet", other.pid)
        ds.fs.pipe(live, b"in flight")
        ds.write_shard(0, rows(3))           # the second writer of shard 0
        ds.commit({"n": 3})                  # and its commit
        assert ds.fs.exists(live), "another live process's tmp file was deleted"
    finally:
        other.kill()
        other.wait()
    ds.write_shard(0, rows(2))               # now its writer is dead: the leftover goes
    assert not ds.fs.exists(live)
    assert ds.read().height == 2


def test_two_threads_writing_one_shard_both_finish(tmp_path):
    import threading

    ds = ShardedDataset(tmp_path / "ds")
    errors = []

    def write():
        try:
            for _ in range(10):
                ShardedDataset(tmp_path / "ds").write_shard(0, rows(50))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=write) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert ds.shard_indices() == [0] and ds.read().height == 50


def test_write_recreates_a_folder_another_process_removed(tmp_path):
    import shutil

    ds = ShardedDataset(tmp_path / "ds")
    ds.write_shard(0, rows(2))
    shutil.rmtree(tmp_path / "ds")
    ds.write_shard(1, rows(2, start=2))
    assert ds.shard_indices() == [1]


def test_commit_refuses_when_an_input_shard_has_no_output_shard(ds):
    for i in range(3):
        ds.write_shard(i, rows(2, start=2 * i))
    ds._remove("part-00001.parquet")         # another process removed it
    with pytest.raises(StorageError, match=r"refusing to commit .*input shard\(s\) 1 have no output shard "
                                           r"\(2 of 3 written\).*Fix: make sure no other run"):
        ds.commit({"n": 6}, expected_shards=[0, 1, 2])
    assert not ds.committed
    assert ds.missing_shards(range(3)) == [1]
    with pytest.raises(StorageError, match=r"output shard\(s\) 2 have no input shard"):
        ds.commit({"n": 4}, expected_shards=[0])
    ds.write_shard(1, rows(2, start=2))
    ds.commit({"n": 6}, expected_shards=[2, 1, 0])
    assert ds.committed


def test_clear_removes_only_dataset_files(ds):
    ds.write_shard(0, rows(4, drop_every=2))
    ds.commit({"n": 2})
    ds.fs.pipe(ds._join("notes.txt"), b"mine")
    ds.clear()
    assert ds._names() == ["notes.txt"] and not ds.committed and ds.shard_indices() == []
    ds.fs.rm(ds._join("notes.txt"))
    ds.write_shard(0, rows(1))
    ds.clear()
    assert not ds.exists()


@pytest.mark.parametrize("url", ["", "/", "//", "memory://", "file:///", "/tmp/..", "file:///tmp/../"])
def test_a_dataset_at_an_empty_or_root_path_is_refused(url):
    with pytest.raises(StorageError, match=r"no dataset folder: .*Fix: pass a folder"):
        ShardedDataset(url)


def test_commit_refuses_when_shards_vanished_after_the_manifest_counted_them(tmp_path):
    import shutil

    from storage import build_manifest

    ds = ShardedDataset(tmp_path / "ds")
    ds.write_shard(0, rows(2))
    ds.write_shard(1, rows(2, start=2))
    manifest = build_manifest(step_name="t", step_version=1, dataset=ds)
    shutil.rmtree(tmp_path / "ds")           # another run cleared the folder meanwhile
    with pytest.raises(StorageError, match=r"manifest describes 2 shard\(s\) but 0 are there now"):
        ds.commit(manifest)
    assert not ds.committed
