import polars as pl
from pydantic import BaseModel

import alignforge
from storage import ShardedDataset, build_manifest


class Cfg(BaseModel):
    temperature: float = 0.7
    n: int = 4


def test_manifest_counts_rows_reasons_and_sums_stats():
    ds = ShardedDataset("memory://manifest-test/ds")
    ds.write_shard(0, pl.DataFrame({"id": ["a", "b", "c"], "keep": [True, False, False],
                                    "drop_reason": [None, "dup", "short"]}),
                   stats={"generated_tokens": 100, "seconds": 2.0, "engine": {"requests": 3}, "rows_in": 1})
    ds.write_shard(1, pl.DataFrame({"id": ["d", "e"], "keep": [False, True], "drop_reason": ["dup", None]}),
                   stats={"generated_tokens": 50, "seconds": 1.0, "engine": {"requests": 2}, "rows_in": 1,
                          "rows_kept": 999})  # reserved name: storage's count wins
    m = build_manifest(step_name="magpie", step_version=2, config=Cfg(), fingerprint="fp1",
                       input_fingerprints=["in1"], engine_models="SmolLM2", dataset=ds,
                       timings={"total_s": 3.5}, extra={"seed": 0})
    assert m["stage"] == "magpie@2" and m["config"] == {"temperature": 0.7, "n": 4}
    assert m["rows"] == {"in": 5, "kept": 2, "dropped": 3, "dropped_by_reason": {"dup": 2, "short": 1}}
    assert m["stats"] == {"generated_tokens": 150, "seconds": 3.0, "engine": {"requests": 5}, "rows_in": 2}
    assert m["engine_models"] == ["SmolLM2"] and m["input_fingerprints"] == ["in1"]
    assert m["alignforge_version"] == alignforge.__version__ and m["schema_version"] == alignforge.SCHEMA_VERSION
    assert m["num_shards"] == 2 and m["seed"] == 0 and m["created_at"].endswith("+00:00")
    ds.commit(m)
    assert ds.manifest()["rows"]["kept"] == 2
