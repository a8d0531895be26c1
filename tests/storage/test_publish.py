import json
import os

import fsspec
import polars as pl
import pytest

import schemas
from storage import (ShardedDataset, StorageError, build_manifest, check_publish_target, foreign_files, publish,
                     publish_empty)
from storage.publish import in_test_split

datasets = pytest.importorskip("datasets")


def sft_rows(n, drop_every=0):
    keep = [not (drop_every and i % drop_every == 0) for i in range(n)]
    return pl.DataFrame({
        "id": [f"r{i}" for i in range(n)], "parent_id": [None] * n, "origin": ["magpie@1"] * n,
        "messages": [schemas.to_messages(f"question {i}", f"answer {i}") for i in range(n)],
        "deita_quality": [i / 10 for i in range(n)],
        "keep": keep, "drop_reason": [None if k else "deita_quality" for k in keep],
    }, schema_overrides={"messages": schemas.MESSAGES})


def candidate_rows(n):
    return pl.DataFrame({
        "id": [f"c{i}" for i in range(n)], "parent_id": [f"r{i}" for i in range(n)], "origin": ["nc@1"] * n,
        "prompt": [schemas.to_messages(f"question {i}") for i in range(n)],
        "candidates": [[schemas.candidate(f"a{i}", 0.5), schemas.candidate(f"b{i}", None)] for i in range(n)],
    }, schema_overrides={"prompt": schemas.MESSAGES})


def load(*args, tmp_path, **kwargs):
    return datasets.load_dataset(*args, cache_dir=str(tmp_path / "hf-cache"), **kwargs)


@pytest.fixture
def published(tmp_path):
    out = tmp_path / "pub"
    stage = ShardedDataset(tmp_path / "stage")
    stage.write_shard(0, sft_rows(40, drop_every=4))
    manifest = build_manifest(step_name="deita", step_version=1, config={"threshold": 0.3}, fingerprint="abc123",
                              dataset=stage, engine_models=["SmolLM2-135M-Instruct"])
    result = publish(out, {"default": stage, "candidates": candidate_rows(8)}, rejected=stage.read(rejected=True),
                     test_size=0.2, seed=7,
                     card={"model": "SmolLM2-135M-Instruct", "sampling": {"temperature": 0.8, "top_p": 0.95},
                           "lineage": [manifest], "license": "apache-2.0", "task_categories": ["text-generation"]})
    return out, result


def test_parquet_data_dir_loads_only_the_default_config(published, tmp_path):
    out, result = published
    names = sorted(os.listdir(out))
    assert names == ["README.md", "_manifest.json", "candidates", "data", "rejected"]
    loaded = load("parquet", data_dir=str(out), tmp_path=tmp_path)
    assert set(loaded) == {"train", "test"}
    assert loaded["train"].num_rows + loaded["test"].num_rows == 30  # 40 - 10 rejected
    assert set(loaded["train"].column_names) == {"id", "parent_id", "origin", "messages", "deita_quality"}
    row = loaded["train"][0]
    assert row["messages"] == [{"role": "user", "content": row["messages"][0]["content"]},
                               {"role": "assistant", "content": row["messages"][1]["content"]}]
    assert result["configs"]["default"]["train"]["num_examples"] == loaded["train"].num_rows


def test_named_configs_load_from_the_card(published, tmp_path):
    out, _ = published
    candidates = load(str(out), "candidates", tmp_path=tmp_path)
    total = sum(split.num_rows for split in candidates.values())
    assert total == 8
    first = next(iter(candidates.values()))[0]
    assert first["candidates"][0].keys() == {"content", "score"}
    rejected = load(str(out), "rejected", tmp_path=tmp_path)["train"]
    assert rejected.num_rows == 10 and set(rejected["drop_reason"]) == {"deita_quality"}
    default = load(str(out), tmp_path=tmp_path)
    assert set(default) == {"train", "test"}


def test_card_yaml_and_prose(published):
    out, _ = published
    text = (out / "README.md").read_text()
    import yaml

    header = yaml.safe_load(text.split("---")[1])
    configs = {c["config_name"]: c for c in header["configs"]}
    assert configs["default"]["default"] is True
    assert configs["default"]["data_files"] == [{"split": "train", "path": "data/train-*"},
                                                {"split": "test", "path": "data/test-*"}]
    assert header["license"] == "apache-2.0" and "alignforge" in header["tags"]
    info = {i["config_name"]: i for i in header["dataset_info"]}
    assert sum(s["num_examples"] for s in info["default"]["splits"]) == 30
    assert {"name": "messages", "list": [{"name": "role", "dtype": "string"},
                                         {"name": "content", "dtype": "string"}]} in info["default"]["features"]
    for needle in ['load_dataset("parquet", data_dir=', 'load_dataset("<this folder>", "candidates")',
                   "SmolLM2-135M-Instruct", "| temperature | `0.8` |", "deita@1", "`abc123`",
                   "| deita_quality | 10 |", "## Examples"]:
        assert needle in text, needle
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["lineage"][0]["rows_in"] == 40 and manifest["lineage"][0]["rows_kept"] == 30
    assert manifest["dropped_by_reason"] == {"deita_quality": 10} and manifest["lineage"][0]["stage"] == "deita@1"


def test_internal_columns_are_stripped_and_keep_false_rows_move_to_rejected(tmp_path):
    out = tmp_path / "pub"
    publish(out, {"default": sft_rows(10, drop_every=5)})
    train = pl.read_parquet(out / "data" / "train-00000-of-00001.parquet")
    assert "keep" not in train.columns and "drop_reason" not in train.columns and train.height == 8
    rejected = pl.read_parquet(out / "rejected" / "rejected-00000-of-00001.parquet")
    assert rejected["id"].to_list() == ["r0", "r5"] and rejected["published_config"].to_list() == ["default"] * 2


def test_split_is_deterministic_across_reruns_and_row_order(tmp_path):
    rows = sft_rows(200)
    publish(tmp_path / "a", {"default": rows}, test_size=0.25, seed=3)
    publish(tmp_path / "b", {"default": rows.reverse()}, test_size=0.25, seed=3)
    publish(tmp_path / "c", {"default": rows}, test_size=0.25, seed=4)
    test_ids = {k: set(pl.read_parquet(tmp_path / k / "data" / "test-00000-of-00001.parquet")["id"]) for k in "abc"}
    assert test_ids["a"] == test_ids["b"]
    assert test_ids["a"] != test_ids["c"]
    assert 30 <= len(test_ids["a"]) <= 70  # ~25% of 200
    assert in_test_split(["x"], 0.0, 0) == [False]


def test_files_are_sharded_by_rows(tmp_path):
    out = tmp_path / "pub"
    publish(out, {"default": sft_rows(25)}, max_rows_per_file=10)
    files = sorted(os.listdir(out / "data"))
    assert files == [f"train-0000{i}-of-00003.parquet" for i in range(3)]
    loaded = load("parquet", data_dir=str(out), tmp_path=tmp_path)
    assert loaded["train"].num_rows == 25


def test_republish_replaces_stale_files_and_killed_publish_leftovers(tmp_path):
    out = tmp_path / "pub"
    publish(out, {"default": sft_rows(25), "candidates": candidate_rows(3)}, max_rows_per_file=10)
    (tmp_path / ".pub.tmp-deadbeef").mkdir()  # a killed publish's tmp folder
    publish(out, {"default": sft_rows(5)})
    assert sorted(os.listdir(out / "data")) == ["train-00000-of-00001.parquet"]
    assert not (out / "candidates").exists()
    assert [p for p in os.listdir(tmp_path) if p.startswith(".pub.")] == []


def test_publish_to_fsspec_memory():
    url = "memory://publish-test/out"
    publish(url, {"default": sft_rows(6)}, test_size=0.5, seed=1)
    fs = fsspec.filesystem("memory")
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.find("/publish-test/out"))
    assert "README.md" in names and "train-00000-of-00001.parquet" in names


def test_publish_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="must contain 'default'"):
        publish(tmp_path / "x", {"sft": sft_rows(2)})
    with pytest.raises(ValueError, match="default config has no rows"):
        publish(tmp_path / "x", {"default": sft_rows(2).with_columns(keep=pl.lit(False))})
    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError, match="cannot publish"):
        publish(tmp_path / "file", {"default": sft_rows(2)})


def test_card_accepts_lineage_by_name_and_run_numbers(tmp_path):
    stage = ShardedDataset(tmp_path / "stage")
    stage.write_shard(0, sft_rows(4))
    stage.commit(build_manifest(step_name="magpie_responses", step_version=1, fingerprint="f00", dataset=stage))
    publish(tmp_path / "pub", {"default": sft_rows(4)},
            card={"title": "Magpie SFT", "method": "Magpie", "lineage": {"responses": stage.manifest(), "x": None},
                  "generated_tokens": 123, "params": {"n": 4}, "drop_stats": {"empty": 2}})
    text = (tmp_path / "pub" / "README.md").read_text()
    for needle in ["# Magpie SFT", "Method: Magpie.", "| magpie_responses@1 | `f00` | 4 | 4 |",
                   "| generated_tokens | 123 |", '"n": 4', "| empty | 2 |"]:
        assert needle in text, needle


def test_sharded_dataset_config_brings_its_rejected_rows_when_none_given(tmp_path):
    stage = ShardedDataset(tmp_path / "stage")
    stage.write_shard(0, sft_rows(6, drop_every=3))
    result = publish(tmp_path / "pub", {"default": stage})
    assert result["dropped_by_reason"] == {"deita_quality": 2}
    assert result["configs"]["default"]["train"]["num_examples"] == 4


# ---------------------------------------------------------------- never delete what we did not write (issue 16)

def test_publish_refuses_a_folder_of_user_files_and_writes_nothing(tmp_path):
    out = tmp_path / "myproject" / "publish"
    out.mkdir(parents=True)
    (out / "thesis.docx").write_bytes(b"years of work")
    (out / "README.md").write_text("my notes")
    before = sorted(os.listdir(tmp_path / "myproject"))
    for call in (lambda: check_publish_target(out), lambda: publish(out, {"default": sft_rows(3)})):
        with pytest.raises(StorageError, match=r"cannot publish to .*publish: the folder holds 2 file\(s\) alignforge "
                                               r"did not write \(README.md, thesis.docx\).*Fix: move those files"):
            call()
    assert (out / "thesis.docx").read_bytes() == b"years of work" and (out / "README.md").read_text() == "my notes"
    assert sorted(os.listdir(tmp_path / "myproject")) == before  # no tmp folder either


def test_publish_replaces_its_own_folder_but_not_files_added_to_it(tmp_path):
    out = tmp_path / "pub"
    check_publish_target(out)                      # nothing there: fine
    out.mkdir()
    check_publish_target(out)                      # empty folder: fine
    first = publish(out, {"default": sft_rows(4)})
    assert "data/train-00000-of-00001.parquet" in first["files"] and "_manifest.json" in first["files"]
    check_publish_target(out)                      # our own publish: fine
    publish(out, {"default": sft_rows(2)})         # replaced
    (out / "data" / "my-notes.txt").write_text("keep me")
    with pytest.raises(StorageError, match=r"data/my-notes.txt"):
        publish(out, {"default": sft_rows(3)})
    assert (out / "data" / "my-notes.txt").read_text() == "keep me"
    assert pl.read_parquet(out / "data" / "train-00000-of-00001.parquet").height == 2


def test_a_dataset_manifest_is_not_a_publish_manifest(tmp_path):
    stage = ShardedDataset(tmp_path / "stage")
    stage.write_shard(0, sft_rows(2))
    stage.commit(build_manifest(step_name="magpie", step_version=1, dataset=stage))
    with pytest.raises(StorageError, match="did not write"):
        publish(tmp_path / "stage", {"default": sft_rows(2)})
    assert stage.read().height == 2


def test_publish_manifest_without_file_list_is_recognised_by_layout(tmp_path):
    out = tmp_path / "pub"
    publish(out, {"default": sft_rows(3)})
    manifest = json.loads((out / "_manifest.json").read_text())
    del manifest["files"]                          # a publish by an older alignforge
    (out / "_manifest.json").write_text(json.dumps(manifest))
    assert foreign_files(out) == []
    (out / "thesis.docx").write_text("x")
    assert foreign_files(out) == ["thesis.docx"]


def test_a_killed_publish_of_a_live_process_is_not_cleaned_up_by_another(tmp_path):
    import subprocess
    import sys

    from storage.owner import HOST

    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = tmp_path / f".pub.tmp-{HOST}~{other.pid}~{'b' * 32}"
        live.mkdir()
        publish(tmp_path / "pub", {"default": sft_rows(2)})
        assert live.exists()
    finally:
        other.kill()
        other.wait()
    publish(tmp_path / "pub", {"default": sft_rows(2)})
    assert not live.exists()


def test_empty_publish_replaces_the_previous_run(tmp_path):
    out = tmp_path / "pub"
    publish(out, {"default": sft_rows(30)}, card={"sampling": {"temperature": 0.8}})
    rejected = sft_rows(4).with_columns(keep=pl.lit(False), drop_reason=pl.lit("margin_too_small"))
    manifest = publish_empty(out, "preference", reason="every pair tied (margin_too_small 4)", rejected=rejected,
                             card={"sampling": {"temperature": 0.0}})
    assert manifest["empty"] is True and manifest["empty_reason"].startswith("every pair tied")
    assert manifest["sampling"] == {"temperature": 0.0}
    on_disk = json.loads((out / "_manifest.json").read_text())
    assert on_disk["empty"] and on_disk["configs"]["default"]["train"]["num_examples"] == 0
    data = pl.read_parquet(out / "data" / "train-00000-of-00001.parquet")
    assert data.height == 0 and {"prompt", "chosen", "rejected"} <= set(data.columns)
    assert pl.read_parquet(out / "rejected" / "rejected-00000-of-00001.parquet")["drop_reason"].to_list() == [
        "margin_too_small"] * 4
    card = (out / "README.md").read_text()
    assert "**This run kept no rows.** every pair tied (margin_too_small 4)" in card
    # A trainer gets an error, never the previous run's rows and never the rejected ones.
    with pytest.raises(ValueError, match="corresponds to no data"):
        load("parquet", data_dir=str(out), tmp_path=tmp_path)
    publish(out, {"default": sft_rows(3)})        # an empty publish is ours: replaced next time
    assert json.loads((out / "_manifest.json").read_text())["empty"] is False


def test_empty_default_without_allow_empty_still_raises_and_keeps_the_folder(tmp_path):
    out = tmp_path / "pub"
    publish(out, {"default": sft_rows(3)})
    with pytest.raises(ValueError, match="no rows to publish.*publish_empty"):
        publish(out, {"default": sft_rows(2).with_columns(keep=pl.lit(False))})
    manifest = publish(out, {"default": sft_rows(2).with_columns(keep=pl.lit(False))}, allow_empty=True)
    assert manifest["empty"] and manifest["dropped_by_reason"] == {"unspecified": 2}


@pytest.mark.parametrize("bad", ["", "/", "memory://"])
def test_publish_to_no_folder_is_refused(bad):
    with pytest.raises(StorageError, match="cannot publish to"):
        check_publish_target(bad)
