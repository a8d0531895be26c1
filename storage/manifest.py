"""The manifest: what produced a dataset, from what, with which model, and what was dropped."""

from __future__ import annotations

import datetime as _dt
from collections import Counter
from typing import Any, Mapping

import alignforge

from storage.dataset import ShardedDataset

# Per-shard stats written by storage itself (counted separately, not summed as step stats).
_COUNT_KEYS = {"rows_written", "rows_kept", "rows_dropped", "dropped_by_reason"}


def _plain(config: Any) -> Any:
    if hasattr(config, "model_dump"):
        return config.model_dump(mode="json")
    if isinstance(config, Mapping):
        return {str(k): _plain(v) for k, v in config.items()}
    if isinstance(config, (list, tuple)):
        return [_plain(v) for v in config]
    return config


def sum_stats(stats: list[Mapping[str, Any]]) -> dict[str, Any]:
    """Sum numeric values key by key (nested dicts recursively); other values keep the last seen."""
    total: dict[str, Any] = {}
    for entry in stats:
        for key, value in entry.items():
            if isinstance(value, bool) or not isinstance(value, (int, float, Mapping)):
                total[key] = value
            elif isinstance(value, Mapping):
                total[key] = sum_stats([total.get(key, {}) if isinstance(total.get(key), Mapping) else {}, value])
            else:
                previous = total.get(key, 0)
                total[key] = (previous if isinstance(previous, (int, float)) else 0) + value
    return total


def build_manifest(*, step_name: str, step_version: int, config: Any = None, fingerprint: str | None = None,
                   input_fingerprints: list[str] | tuple[str, ...] = (), engine_models: Any = None,
                   dataset: ShardedDataset | None = None, timings: Mapping[str, float] | None = None,
                   extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Describe a finished stage. Row counts come from the dataset's shards:
    rows in = kept + dropped; dropped by reason from the rejected rows' drop_reason.
    Step stats per shard (generated_tokens, seconds, ...) are summed."""
    shard_stats = dataset.shard_stats() if dataset is not None else {}
    kept = dropped = 0
    reasons: Counter[str] = Counter()
    step_stats = []
    for index, stats in shard_stats.items():
        if "rows_kept" not in stats:  # stats file lost: count from the parquet itself
            kept += dataset.read_shard(index).height
            rejected = dataset.read_shard(index, rejected=True)
            dropped += rejected.height
            reasons.update(rejected["drop_reason"].to_list() if "drop_reason" in rejected.columns else [])
            continue
        kept += stats["rows_kept"]
        dropped += stats["rows_dropped"]
        reasons.update(stats.get("dropped_by_reason", {}))
        step_stats.append({k: v for k, v in stats.items() if k not in _COUNT_KEYS})
    if isinstance(engine_models, str):
        engine_models = [engine_models]
    manifest = {
        "stage": f"{step_name}@{step_version}",
        "step_name": step_name,
        "step_version": step_version,
        "config": _plain(config) if config is not None else {},
        "fingerprint": fingerprint,
        "input_fingerprints": list(input_fingerprints),
        "engine_models": list(engine_models or []),
        "url": dataset.url if dataset is not None else None,
        "num_shards": len(shard_stats),
        "rows": {
            "in": kept + dropped,
            "kept": kept,
            "dropped": dropped,
            "dropped_by_reason": dict(sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))),
        },
        "stats": sum_stats(step_stats),
        "timings": dict(timings or {}),
        "alignforge_version": alignforge.__version__,
        "schema_version": alignforge.SCHEMA_VERSION,
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if extra:
        manifest.update(_plain(dict(extra)))
    return manifest
