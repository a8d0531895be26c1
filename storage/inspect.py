"""`alignforge inspect URL`: a plain-text look at a published dataset, a stage dataset, or a run
folder holding several stage datasets."""

from __future__ import annotations

import json
import os
import posixpath
from collections import Counter
from typing import Any

import fsspec
import polars as pl
import pyarrow.parquet as pq
import yaml

from storage.dataset import REJECTED_DIR, ShardedDataset


def _read_parquet(fs, path: str, columns: list[str] | None = None) -> pl.DataFrame:
    with fs.open(path, "rb") as f:
        return pl.read_parquet(f, columns=columns)


def _count_rows(fs, path: str) -> int:
    with fs.open(path, "rb") as f:
        return pq.ParquetFile(f).metadata.num_rows


def _short(value: Any, limit: int = 160) -> Any:
    if isinstance(value, str):
        return value if len(value) <= limit else value[:limit] + "..."
    if isinstance(value, list):
        return [_short(v, limit) for v in value[:6]] + (["..."] if len(value) > 6 else [])
    if isinstance(value, dict):
        return {k: _short(v, limit) for k, v in value.items()}
    return value


def _schema_lines(schema: pl.Schema) -> list[str]:
    return [f"  {name}: {dtype}" for name, dtype in schema.items()]


def _example_lines(df: pl.DataFrame, n: int) -> list[str]:
    lines = []
    for i, row in enumerate(df.head(n).to_dicts()):
        lines.append(f"  [{i}] " + json.dumps(_short(row), ensure_ascii=False, default=str))
    return lines


def _reasons(counts: Counter) -> list[str]:
    return [f"  {reason}: {n}" for reason, n in counts.most_common()] or ["  (none)"]


def inspect_dataset(url: str | os.PathLike, n_examples: int = 3) -> str:
    """Schema, row counts per config/split (or shard), rejected counts by reason, a few examples."""
    url = os.fspath(url).rstrip("/")
    fs, root = fsspec.core.url_to_fs(url)
    root = root.rstrip("/")
    if not fs.exists(root):
        raise FileNotFoundError(f"nothing at {url}. Fix: pass a dataset folder (e.g. the --out of a run)")
    if fs.exists(posixpath.join(root, "README.md")) and fs.exists(posixpath.join(root, "data")):
        return _inspect_published(fs, root, url, n_examples)
    ds = ShardedDataset(url)
    if ds.shard_indices() or ds.manifest() is not None:
        return _inspect_sharded(ds, n_examples)
    # A run folder: summarise each dataset below it.
    children = sorted(p for p in fs.ls(root, detail=False) if fs.isdir(p)
                      and not posixpath.basename(p.rstrip("/")).startswith((".", "_")))
    parts = []
    for child in children:
        child_url = fs.unstrip_protocol(child) if "://" in url else child
        try:
            parts.append(inspect_dataset(child_url, n_examples=min(n_examples, 1)))
        except FileNotFoundError:
            continue
    if not parts:
        raise FileNotFoundError(f"no dataset at {url}: no part-*.parquet shards, no published README.md + data/. "
                                f"Fix: pass a dataset folder (e.g. the --out of a run)")
    return f"run folder {url}: {len(parts)} datasets\n\n" + "\n\n".join(parts)


def _inspect_published(fs, root: str, url: str, n_examples: int) -> str:
    with fs.open(posixpath.join(root, "README.md"), "rb") as f:
        text = f.read().decode("utf-8")
    header = yaml.safe_load(text.split("---", 2)[1]) if text.startswith("---") else {}
    configs = (header or {}).get("configs") or [
        {"config_name": "default", "data_files": [{"split": "train", "path": "data/train-*"}]}]
    lines = [f"published dataset {url}"]
    try:
        with fs.open(posixpath.join(root, "_manifest.json"), "rb") as f:
            published = json.loads(f.read())
    except (FileNotFoundError, ValueError):
        published = {}
    if published.get("empty"):
        lines.append(f"  EMPTY: this run kept no rows. {published.get('empty_reason') or ''}".rstrip())
    default_df = None
    for config in configs:
        name = config["config_name"]
        for entry in config["data_files"]:
            files = sorted(fs.glob(posixpath.join(root, entry["path"])))
            rows = sum(_count_rows(fs, f) for f in files)
            lines.append(f"  config {name!r} split {entry['split']!r}: {rows} rows in {len(files)} files")
            if config.get("default") and entry["split"] == "train" and files:
                default_df = _read_parquet(fs, files[0])
    rejected_files = sorted(fs.glob(posixpath.join(root, REJECTED_DIR, "*.parquet")))
    if rejected_files:
        counts: Counter = Counter()
        for f in rejected_files:
            counts.update(_read_parquet(fs, f, columns=["drop_reason"])["drop_reason"].to_list())
        lines += ["rejected rows by reason:"] + _reasons(counts)
    if default_df is not None:
        lines += ["schema (default config):"] + _schema_lines(default_df.schema)
        lines += [f"examples (first {min(n_examples, default_df.height)}):"] + _example_lines(default_df, n_examples)
    return "\n".join(lines)


def _inspect_sharded(ds: ShardedDataset, n_examples: int) -> str:
    manifest = ds.manifest()
    stats = ds.shard_stats()
    kept = sum(s.get("rows_kept", 0) for s in stats.values())
    dropped = sum(s.get("rows_dropped", 0) for s in stats.values())
    reasons: Counter = Counter()
    for s in stats.values():
        reasons.update(s.get("dropped_by_reason", {}))
    state = "committed" if manifest is not None else "NOT committed (no _manifest.json: incomplete or running)"
    lines = [f"dataset {ds.url}: {state}"]
    if manifest:
        lines.append(f"  stage {manifest.get('stage')}  fingerprint {manifest.get('fingerprint')}  "
                     f"models {', '.join(manifest.get('engine_models') or []) or '-'}")
    lines.append(f"  {len(stats)} shards, {kept + dropped} rows in, {kept} kept, {dropped} dropped")
    if dropped:
        lines += ["rejected rows by reason:"] + _reasons(reasons)
    first = next((i for i in ds.shard_indices() if stats.get(i, {}).get("rows_kept", 1)), None)
    if first is not None:
        df = ds.read_shard(first)
        lines += ["schema:"] + _schema_lines(df.schema)
        lines += [f"examples (first {min(n_examples, df.height)}):"] + _example_lines(df, n_examples)
    return "\n".join(lines)
