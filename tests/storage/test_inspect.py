import polars as pl
import pytest

import schemas
from storage import ShardedDataset, build_manifest, inspect_dataset, publish


def frame(n):
    keep = [i % 3 != 0 for i in range(n)]
    return pl.DataFrame({
        "id": [f"r{i}" for i in range(n)], "parent_id": [None] * n, "origin": ["t@1"] * n,
        "messages": [schemas.to_messages(f"q{i}", f"a{i}") for i in range(n)],
        "keep": keep, "drop_reason": [None if k else "minhash_duplicate" for k in keep],
    }, schema_overrides={"messages": schemas.MESSAGES})


def test_inspect_stage_dataset_and_run_folder(tmp_path):
    ds = ShardedDataset(tmp_path / "run" / "dedup-abc")
    ds.write_shard(0, frame(9))
    text = inspect_dataset(ds.url, n_examples=2)
    assert "NOT committed" in text and "9 rows in, 6 kept, 3 dropped" in text
    assert "minhash_duplicate: 3" in text and "messages: List(Struct" in text and "[1] " in text
    ds.commit(build_manifest(step_name="dedup", step_version=1, fingerprint="abc", dataset=ds))
    assert "committed" in inspect_dataset(ds.url) and "stage dedup@1" in inspect_dataset(ds.url)
    run = inspect_dataset(tmp_path / "run")
    assert run.startswith(f"run folder {tmp_path / 'run'}: 1 datasets")


def test_inspect_published(tmp_path):
    publish("memory://inspect-test/pub", {"default": frame(12)}, test_size=0.3, seed=0)
    text = inspect_dataset("memory://inspect-test/pub")
    assert "config 'default' split 'train'" in text and "config 'rejected' split 'train': 4 rows" in text
    assert "minhash_duplicate: 4" in text and "examples (first 3)" in text


def test_inspect_nothing_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing at"):
        inspect_dataset(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no dataset at"):
        inspect_dataset(tmp_path / "empty")


def test_inspect_an_empty_publish_says_so(tmp_path):
    from storage import publish_empty

    publish_empty(tmp_path / "pub", "sft", reason="every row was a duplicate", rejected=frame(3))
    text = inspect_dataset(tmp_path / "pub")
    assert "EMPTY: this run kept no rows. every row was a duplicate" in text
    assert "config 'default' split 'train': 0 rows" in text and "minhash_duplicate: 1" in text
