"""Publish datasets in the Hugging Face folder layout, with a dataset card.

    out/
      README.md                                card: YAML (configs, features, row counts) + prose
      _manifest.json                           what was published, from which stages
      data/train-00000-of-00001.parquet        the default config (what trainers load)
      data/test-00000-of-00001.parquet         only when test_size > 0
      <config>/train-00000-of-00001.parquet    every other config (e.g. candidates/)
      rejected/rejected-00000-of-00001.parquet dropped rows with drop_reason (config "rejected")

Why these names: `load_dataset("parquet", data_dir=out)` first looks for
`data/{split}-NNNNN-of-NNNNN.*` and, when it finds them, uses only those; so it returns the
default config alone, whatever else is in the folder. `load_dataset(out, "<config>")` reads the
`configs:` list of the card's YAML header.

The whole tree is written into a hidden sibling folder and renamed into place at the end, so a
killed publish leaves the previous output (or nothing) and a rerun starts clean.

Publishing replaces the output folder only when alignforge recognisably wrote it: its
`_manifest.json` is a publish manifest and every file in the folder is one that manifest lists
(`check_publish_target`). Any other non-empty folder is refused before anything is written.
A run that kept nothing publishes an empty default config (`publish_empty`), so the folder
never shows an earlier run's rows as if they were this run's.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import math
import os
import posixpath
import re
from collections import Counter
from typing import Any, Mapping

import fsspec
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

import alignforge
from schemas import conform
from storage.dataset import INTERNAL_COLUMNS, UNSPECIFIED_REASON, ShardedDataset, StorageError
from storage.owner import tmp_is_stale, tmp_suffix

DEFAULT_CONFIG = "default"
REJECTED_CONFIG = "rejected"
MAX_ROWS_PER_FILE = 100_000
MAX_BYTES_PER_FILE = 256 * 1024 * 1024
PUBLISH_STAGE = "publish@1"
# Files of the HF layout we write (used for publish folders from before manifests listed their files).
_LAYOUT_FILE = re.compile(r"^(README\.md|_manifest\.json|[A-Za-z0-9_-]+/[A-Za-z0-9_]+-\d{5}-of-\d{5}\.parquet)$")


def _split_url(out_url: str | os.PathLike) -> tuple[str, Any, str]:
    out = os.fspath(out_url).strip()
    if not out.split("://", 1)[-1].strip("/"):
        raise StorageError(f"cannot publish to {out_url!r}: that is no folder of its own (an empty path or a "
                           f"filesystem root). Fix: choose an output folder, e.g. --out runs/x")
    out = out.rstrip("/")
    fs, root = fsspec.core.url_to_fs(out)
    root = root.rstrip("/")
    if not root:
        raise StorageError(f"cannot publish to {out!r}: it is the root of its filesystem. Fix: choose an output "
                           f"folder below it, e.g. --out runs/x")
    return out, fs, root


def _read_json(fs, path: str) -> Any:
    try:
        with fs.open(path, "rb") as f:
            return json.loads(f.read())
    except (FileNotFoundError, ValueError, UnicodeDecodeError):
        return None


def foreign_files(out_url: str | os.PathLike) -> list[str]:
    """Files under `out_url` that alignforge's publish did not write (relative paths, sorted).

    Ours = the folder holds a publish `_manifest.json` and the file is listed in it (or, for
    manifests without a file list, matches the layout publish writes). No folder -> []."""
    out, fs, root = _split_url(out_url)
    if not fs.exists(root):
        return []
    if not fs.isdir(root):
        return [posixpath.basename(root)]
    prefix = root + "/"
    files = sorted(p[len(prefix):] if p.startswith(prefix) else posixpath.basename(p)
                   for p in (q.rstrip("/") for q in fs.find(root, withdirs=False)))
    manifest = _read_json(fs, posixpath.join(root, "_manifest.json"))
    if not isinstance(manifest, dict) or not str(manifest.get("stage", "")).startswith("publish@"):
        return files
    listed = manifest.get("files")
    if isinstance(listed, list) and listed:
        known = set(map(str, listed))
        return [f for f in files if f not in known]
    return [f for f in files if not _LAYOUT_FILE.match(f)]


def check_publish_target(out_url: str | os.PathLike) -> None:
    """Raise StorageError unless publishing to `out_url` can only replace what alignforge wrote.

    OK: no folder there, an empty folder, or an earlier publish (its manifest lists every file in
    it). Refused: a file there, or a folder holding anything else (named in the message, which
    also says the fix). Writes nothing: call it before a run starts, publish() calls it too."""
    out, fs, root = _split_url(out_url)
    try:
        if fs.exists(root) and not fs.isdir(root):
            raise StorageError(f"cannot publish to {out}: a file exists there. Fix: remove it or choose "
                               f"another --out")
        foreign = foreign_files(out)
    except StorageError:
        raise
    except OSError as e:
        raise StorageError(f"cannot publish to {out} ({type(e).__name__}: {e}). Fix: choose an output path "
                           f"you can read and write, or fix its permissions") from None
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise StorageError(
            f"cannot publish to {out}: the folder holds {len(foreign)} file(s) alignforge did not write "
            f"({shown}); publishing replaces that folder, so they would be deleted. Nothing was written. "
            f"Fix: move those files out of {out}, or choose another --out")


def _frame(value: Any, what: str) -> pl.DataFrame:
    if isinstance(value, ShardedDataset):
        return value.read()
    if isinstance(value, pl.LazyFrame):
        return value.collect()
    if isinstance(value, pl.DataFrame):
        return value
    if isinstance(value, (list, tuple)):
        frames = [_frame(v, what) for v in value]
        return pl.concat(frames, how="diagonal_relaxed") if frames else pl.DataFrame()
    raise TypeError(f"{what}: expected a polars DataFrame, LazyFrame or ShardedDataset, got {type(value).__name__}")


def _rejected_frame(value: Any) -> pl.DataFrame:
    if isinstance(value, ShardedDataset):
        return value.read(rejected=True)
    if isinstance(value, (list, tuple)):
        frames = [_rejected_frame(v) for v in value]
        frames = [f for f in frames if f.height or f.width > 1]
        return pl.concat(frames, how="diagonal_relaxed") if frames else pl.DataFrame()
    return _frame(value, "rejected")


def in_test_split(ids: list[Any], test_size: float, seed: int) -> list[bool]:
    """Deterministic split: a row is in test when hash(seed, id) falls below test_size.

    Depends only on the id and the seed, so reruns (and row order changes) give the same split."""
    if test_size <= 0:
        return [False] * len(ids)
    threshold = int(test_size * 2**64)
    return [int.from_bytes(hashlib.blake2b(f"{seed}\x00{i}".encode(), digest_size=8).digest(), "big") < threshold
            for i in ids]


def _standard_types(table: pa.Table) -> pa.Table:
    """large_string / large_list -> string / list: the types every datasets/TRL version reads."""
    def fix(t: pa.DataType) -> pa.DataType:
        if pa.types.is_large_string(t) or pa.types.is_string_view(t):
            return pa.string()
        if pa.types.is_large_binary(t) or pa.types.is_binary_view(t):
            return pa.binary()
        if pa.types.is_large_list(t) or pa.types.is_list(t) or pa.types.is_list_view(t):
            return pa.list_(pa.field(t.value_field.name, fix(t.value_type), t.value_field.nullable))
        if pa.types.is_struct(t):
            return pa.struct([pa.field(f.name, fix(f.type), f.nullable) for f in t])
        return t

    schema = pa.schema([pa.field(f.name, fix(f.type), f.nullable) for f in table.schema])
    return table.cast(schema)


def _num_files(df: pl.DataFrame, max_rows: int, max_bytes: int) -> int:
    return max(1, math.ceil(df.height / max_rows), math.ceil(df.estimated_size() / max_bytes))


class _Writer:
    def __init__(self, fs, root: str):
        self.fs, self.root = fs, root
        self.files: list[str] = []

    def parquet(self, folder: str, stem: str, df: pl.DataFrame, max_rows: int, max_bytes: int) -> dict[str, Any]:
        n = _num_files(df, max_rows, max_bytes)
        per_file = math.ceil(df.height / n) if df.height else 0
        nbytes = 0
        schema = None
        for i in range(n):
            part = df.slice(i * per_file, per_file) if df.height else df
            table = _standard_types(part.to_arrow())
            schema = schema or table.schema
            nbytes += table.nbytes
            relative = f"{folder}/{stem}-{i:05d}-of-{n:05d}.parquet"
            buffer = io.BytesIO()
            if table.num_rows:
                pq.write_table(table, buffer, compression="zstd")
            else:  # no row group at all: `datasets` then says "corresponds to no data", not an Arrow error
                pq.ParquetWriter(buffer, table.schema, compression="zstd").close()
            self.write_bytes(relative, buffer.getvalue())
        return {"pattern": f"{folder}/{stem}-*", "num_examples": df.height, "num_bytes": nbytes,
                "num_files": n, "schema": schema}

    def write_bytes(self, relative: str, data: bytes) -> None:
        path = posixpath.join(self.root, relative)
        self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
        with self.fs.open(path, "wb") as f:
            f.write(data)
        self.files.append(relative)


def _features_yaml(schema: pa.Schema) -> list[dict[str, Any]]:
    import datasets  # only here: importing datasets is slow and most callers never publish

    return datasets.Features.from_arrow_schema(schema)._to_yaml_list()


def publish(out_url: str | os.PathLike, configs: Mapping[str, Any], rejected: Any = None, test_size: float = 0.0,
            seed: int = 0, card: Mapping[str, Any] | None = None, *, max_rows_per_file: int = MAX_ROWS_PER_FILE,
            max_bytes_per_file: int = MAX_BYTES_PER_FILE, allow_empty: bool = False) -> dict[str, Any]:
    """Write `configs` ({"default": df, "candidates": df, ...}) to `out_url` in HF layout.

    - rows with keep == False in a config move to rejected/ (with their drop_reason), the rest
      lose the internal `keep` / `drop_reason` columns;
    - test_size > 0 splits every config by hashing ids with `seed` (same split on every rerun);
    - `rejected`: a DataFrame / ShardedDataset / list of them with drop_reason (the run's
      rejected rows); written to rejected/ and exposed as config "rejected". When None, configs
      given as ShardedDataset contribute their own rejected/ rows;
    - `card`: pretty_name/title, description, method, recipe, license, tags, task_categories,
      language, model, sampling (dict), params (dict), lineage (list of stage manifests or
      {stage name: manifest}), drop_stats, generated_tokens, tokens_per_second, n_examples,
      empty_reason (shown when the default config is empty);
    - `allow_empty`: a default config without rows is published as a zero-row
      `data/train-00000-of-00001.parquet` (+ rejected/ + card) instead of raising ValueError, so
      the previous publish is replaced (`load_dataset` on it then fails: "corresponds to no data").
    Refuses (StorageError, nothing written) when `out_url` holds files alignforge did not write
    (see check_publish_target). Returns the publish manifest (also written to `_manifest.json`);
    its "empty" is True when the default config has no rows.
    """
    card = dict(card or {})
    if DEFAULT_CONFIG not in configs:
        raise ValueError(f"publish: configs must contain {DEFAULT_CONFIG!r} (the dataset trainers load); "
                         f"got {list(configs)}. Fix: publish(out, configs={{'default': df, ...}})")
    if not 0.0 <= test_size < 1.0:
        raise ValueError(f"publish: test_size must be in [0, 1), got {test_size}")
    bad_names = [n for n in configs if n in (REJECTED_CONFIG, "data") or not n.replace("_", "").replace("-", "").isalnum()]
    if bad_names:
        raise ValueError(f"publish: config names {bad_names} are reserved or not [A-Za-z0-9_-]; rename them")

    out, fs, root = _split_url(out_url)
    check_publish_target(out)  # before anything is written: never delete files we did not write
    parent, name = posixpath.split(root)
    try:
        fs.makedirs(parent or "/", exist_ok=True)
        for stale in fs.ls(parent or "/", detail=False):  # leftovers of a killed publish (its writer is gone)
            base = posixpath.basename(stale.rstrip("/"))
            if base.startswith((f".{name}.tmp-", f".{name}.old")) and (tmp_is_stale(base) or ".tmp-" not in base):
                fs.rm(stale, recursive=True)
    except OSError as e:
        raise StorageError(f"cannot publish to {out} ({type(e).__name__}: {e}). Fix: choose an output path "
                           f"you can write to, or fix its permissions") from None
    tmp = posixpath.join(parent, f".{name}{tmp_suffix()}")
    writer = _Writer(fs, tmp)

    rejected_parts = [] if rejected is None else [_rejected_frame(rejected)]
    splits_info: dict[str, dict[str, dict[str, Any]]] = {}
    frames: dict[str, pl.DataFrame] = {}
    try:
        for config_name, value in configs.items():
            df = conform(_frame(value, config_name))
            if rejected is None and isinstance(value, ShardedDataset):
                # No explicit rejected rows: publish the stage's own, so drops stay visible.
                own = value.read(rejected=True)
                if own.height:
                    rejected_parts.append(own.with_columns(published_config=pl.lit(config_name)))
            if "keep" in df.columns:
                dropped = df.filter(~pl.col("keep").fill_null(True))
                if dropped.height:
                    rejected_parts.append(dropped.with_columns(published_config=pl.lit(config_name)))
                df = df.filter(pl.col("keep").fill_null(True))
            df = df.drop([c for c in INTERNAL_COLUMNS if c in df.columns])
            frames[config_name] = df
            folder = "data" if config_name == DEFAULT_CONFIG else config_name
            keys = df["id"].cast(pl.Utf8).to_list() if "id" in df.columns else [
                json.dumps(r, sort_keys=True, default=str) for r in df.iter_rows()]
            test_mask = pl.Series(in_test_split(keys, test_size, seed), dtype=pl.Boolean)
            parts = {"train": df.filter(~test_mask)}
            if test_size > 0:
                parts["test"] = df.filter(test_mask)
            # `datasets` cannot load a zero-row split ("corresponds to no data"): leave empty ones out.
            parts = {split: part for split, part in parts.items() if part.height}
            if not parts and config_name == DEFAULT_CONFIG and allow_empty:
                parts = {"train": df.head(0)}  # zero rows: keeps `data/` the default for data_dir loads
            if not parts:
                if config_name == DEFAULT_CONFIG:
                    raise ValueError(
                        f"publish: the default config has no rows to publish ({len(keys)} rows given, "
                        f"{sum(p.height for p in rejected_parts)} rejected). Fix: check the drop reasons "
                        f"in the stage manifests / rejected/ and loosen the filters, or generate more rows "
                        f"(publish_empty / allow_empty=True replaces an earlier publish with this empty result)")
                continue
            splits_info[config_name] = {
                split: writer.parquet(folder, split, part, max_rows_per_file, max_bytes_per_file)
                for split, part in parts.items()}

        rejected_df = _combine_rejected(rejected_parts)
        if rejected_df is not None:
            splits_info[REJECTED_CONFIG] = {"train": writer.parquet(
                "rejected", "rejected", rejected_df, max_rows_per_file, max_bytes_per_file)}
        drop_counts = Counter(rejected_df["drop_reason"].to_list()) if rejected_df is not None else Counter()

        default_rows = sum(info["num_examples"] for info in splits_info[DEFAULT_CONFIG].values())
        manifest = {
            "stage": PUBLISH_STAGE,
            "url": out,
            "empty": default_rows == 0,
            "empty_reason": card.get("empty_reason") if default_rows == 0 else None,
            "configs": {c: {s: {k: v for k, v in info.items() if k != "schema"} for s, info in splits.items()}
                        for c, splits in splits_info.items()},
            "test_size": test_size,
            "seed": seed,
            "dropped_by_reason": dict(drop_counts.most_common()),
            "lineage": _lineage(card.get("lineage")),
            "model": card.get("model"),
            "sampling": card.get("sampling"),
            "alignforge_version": alignforge.__version__,
            "schema_version": alignforge.SCHEMA_VERSION,
            "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            # Every file of this publish: what check_publish_target may replace next time.
            "files": sorted([*writer.files, "README.md", "_manifest.json"]),
        }
        readme = render_card(splits_info, frames, drop_counts, card, manifest)
        writer.write_bytes("README.md", readme.encode("utf-8"))
        writer.write_bytes("_manifest.json", json.dumps(manifest, indent=2, default=str).encode())
        check_publish_target(out)  # again: files may have appeared there while we wrote
        _swap_into_place(fs, tmp, root, parent, name)
    except BaseException:
        try:
            fs.rm(tmp, recursive=True)
        except Exception:  # noqa: BLE001 - cleanup of our own tmp folder only
            pass
        raise
    return manifest


def publish_empty(out_url: str | os.PathLike, columns: Any = None, *, reason: str, rejected: Any = None,
                  card: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Publish a run that kept no rows: zero-row default config, `rejected/` and a card saying why.

    Replaces an earlier publish (only one alignforge wrote, see check_publish_target), so the
    folder always describes the run that just finished. `columns`: a row kind of
    `schemas.KINDS` ("sft", "preference", ...), a (zero-row) DataFrame giving the columns, or None.
    `reason` (e.g. "every pair tied: dropped margin_too_small 12") goes into the card and manifest."""
    if isinstance(columns, str):
        from schemas import empty

        frame = empty(columns)
    elif columns is None:
        frame = pl.DataFrame({"id": pl.Series([], dtype=pl.Utf8)})
    else:
        frame = _frame(columns, DEFAULT_CONFIG).head(0)
    card = {**dict(card or {}), "empty_reason": reason}
    return publish(out_url, {DEFAULT_CONFIG: frame}, rejected=rejected, card=card, allow_empty=True)


def _combine_rejected(parts: list[pl.DataFrame]) -> pl.DataFrame | None:
    parts = [conform(p) for p in parts if p.height]
    if not parts:
        return None
    try:
        df = pl.concat(parts, how="diagonal_relaxed")
    except Exception:  # noqa: BLE001 - same column, incompatible types across stages
        # Keep every row and reason; columns whose types clash are stored as JSON text.
        names = {c for p in parts for c in p.columns}
        clashing = {c for c in names if len({str(p.schema[c]) for p in parts if c in p.columns}) > 1}
        parts = [p.with_columns([pl.col(c).map_elements(lambda v: json.dumps(v, default=str), return_dtype=pl.Utf8)
                                 if not isinstance(p.schema[c], (pl.Utf8, pl.Null)) else pl.col(c).cast(pl.Utf8)
                                 for c in clashing if c in p.columns]) for p in parts]
        df = pl.concat(parts, how="diagonal_relaxed")
    if "drop_reason" not in df.columns:
        df = df.with_columns(drop_reason=pl.lit(None, pl.Utf8))
    df = df.with_columns(pl.col("drop_reason").fill_null(UNSPECIFIED_REASON))
    if "keep" in df.columns:
        df = df.drop("keep")
    return df


def _swap_into_place(fs, tmp: str, root: str, parent: str, name: str) -> None:
    old = posixpath.join(parent, f".{name}.old{tmp_suffix()}")
    if fs.exists(root):
        fs.mv(root, old, recursive=True)
    fs.mv(tmp, root, recursive=True)
    if fs.exists(old):
        fs.rm(old, recursive=True)


def _lineage(lineage: Any) -> list[dict[str, Any]]:
    """Stage manifests as a list, or {name: manifest} (None = stage without manifest, skipped)."""
    if not lineage:
        return []
    items = lineage.items() if isinstance(lineage, Mapping) else ((None, m) for m in lineage)
    return [_lineage_entry(m, name) for name, m in items if m]


def _lineage_entry(manifest: Mapping[str, Any], name: str | None = None) -> dict[str, Any]:
    if isinstance(manifest, ShardedDataset):
        manifest = manifest.manifest() or {}
    rows = manifest.get("rows", {})
    return {"stage": manifest.get("stage") or name or f"{manifest.get('step_name')}@{manifest.get('step_version')}",
            "name": name,
            "fingerprint": manifest.get("fingerprint"), "rows_in": rows.get("in"), "rows_kept": rows.get("kept"),
            "dropped_by_reason": rows.get("dropped_by_reason", {}), "engine_models": manifest.get("engine_models", []),
            "config": manifest.get("config", {})}


# ---------------------------------------------------------------------------------------- card

def _size_category(n: int) -> str:
    for limit, label in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"),
                         (1_000_000, "100K<n<1M"), (10_000_000, "1M<n<10M")):
        if n < limit:
            return label
    return "n>10M"


def _truncate(value: Any, limit: int = 400) -> Any:
    if isinstance(value, str):
        return value if len(value) <= limit else value[:limit] + f"... [{len(value) - limit} more chars]"
    if isinstance(value, list):
        return [_truncate(v, limit) for v in value[:8]] + ([f"... [{len(value) - 8} more]"] if len(value) > 8 else [])
    if isinstance(value, dict):
        return {k: _truncate(v, limit) for k, v in value.items()}
    return value


def render_card(splits_info, frames, drop_counts, card, manifest) -> str:
    total_default = sum(i["num_examples"] for i in splits_info[DEFAULT_CONFIG].values())
    header: dict[str, Any] = {}
    for key in ("pretty_name", "license", "language", "task_categories", "tags"):
        if card.get(key):
            header[key] = card[key]
    header.setdefault("license", "other")
    header["tags"] = sorted(set(header.get("tags", [])) | {"alignforge", "synthetic"})
    header["size_categories"] = [_size_category(total_default)]
    header["configs"] = []
    header["dataset_info"] = []
    for config_name, splits in splits_info.items():
        entry = {"config_name": config_name,
                 "data_files": [{"split": s, "path": info["pattern"]} for s, info in splits.items()]}
        if config_name == DEFAULT_CONFIG:
            entry["default"] = True
        header["configs"].append(entry)
        schema = next(iter(splits.values()))["schema"]
        header["dataset_info"].append({
            "config_name": config_name,
            "features": _features_yaml(schema),
            "splits": [{"name": s, "num_bytes": info["num_bytes"], "num_examples": info["num_examples"]}
                       for s, info in splits.items()],
        })

    title = card.get("pretty_name") or card.get("title") or "alignforge dataset"
    lines = [f"# {title}", ""]
    if total_default == 0:
        lines += [f"**This run kept no rows.** {card.get('empty_reason') or ''}".rstrip(),
                  "", "The default config is empty (loading it fails with \"corresponds to no data\"); "
                  "every generated row is in `rejected/` with its drop reason.", ""]
    lines.append(card.get("description") or "Synthetic alignment data generated and filtered with alignforge.")
    if card.get("method"):
        lines += ["", f"Method: {card['method']}."]
    if card.get("recipe"):
        lines += ["", f"Recipe: `alignforge run {card['recipe']}`."]
    lines += ["", "## Contents", "", "| config | split | rows | files |", "|---|---|---|---|"]
    for config_name, splits in splits_info.items():
        for split, info in splits.items():
            lines.append(f"| {config_name} | {split} | {info['num_examples']} | `{info['pattern']}` |")
    lines += ["", "## Load it", "", "```python", "from datasets import load_dataset", "",
              "# the default config (what trainers use), straight from the parquet files",
              'ds = load_dataset("parquet", data_dir="<this folder>")']
    for config_name in splits_info:
        if config_name != DEFAULT_CONFIG:
            lines.append(f'{config_name} = load_dataset("<this folder>", "{config_name}")')
    lines += ["```", ""]
    columns = frames[DEFAULT_CONFIG].columns
    if "messages" in columns:
        lines.append("`messages` is a list of `{role, content}` turns: TRL's conversational SFT format.")
    if {"prompt", "chosen", "rejected"} <= set(columns):
        lines.append("`prompt` / `chosen` / `rejected` follow TRL's explicit-prompt conversational preference "
                     "format (`chosen` and `rejected` hold the assistant turn).")
    lines.append("")
    empty = [c for c in frames if c not in splits_info]
    if empty:
        lines += [f"Configs with no rows (not published): {', '.join(empty)}.", ""]

    if card.get("model"):
        models = card["model"] if isinstance(card["model"], list) else [card["model"]]
        lines += ["## Model", ""] + [f"- `{m}`" for m in models] + [""]
    if card.get("sampling"):
        lines += ["## Sampling parameters", "", "| parameter | value |", "|---|---|"]
        lines += [f"| {k} | `{v}` |" for k, v in card["sampling"].items()] + [""]
    if manifest["lineage"]:
        lines += ["## Lineage", "", "| stage | fingerprint | rows in | rows out | dropped (by reason) | model |",
                  "|---|---|---|---|---|---|"]
        for entry in manifest["lineage"]:
            reasons = ", ".join(f"{r}: {n}" for r, n in entry["dropped_by_reason"].items()) or "-"
            models = ", ".join(entry["engine_models"]) or "-"
            lines.append(f"| {entry['stage']} | `{(entry['fingerprint'] or '')[:12]}` | {entry['rows_in']} | "
                         f"{entry['rows_kept']} | {reasons} | {models} |")
        lines.append("")
    run_numbers = {k: card[k] for k in ("generated_tokens", "tokens_per_second", "seconds") if k in card}
    if run_numbers:
        lines += ["## Run", "", "| measure | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in run_numbers.items()] + [""]
    if card.get("steps"):
        lines += ["## Steps", "", "| step | version | fingerprint | rows in | kept | dropped by reason |",
                  "|---|---|---|---|---|---|"]
        for step in card["steps"]:
            dropped = ", ".join(f"{r} {n}" for r, n in (step.get("dropped") or {}).items()) or "-"
            lines.append(f"| {step.get('step')} | {step.get('version')} | `{str(step.get('fingerprint'))[:12]}` | "
                         f"{step.get('rows_in')} | {step.get('rows_kept')} | {dropped} |")
        lines += ["", "Full configs and stats of every step:", "", "```json",
                  json.dumps([{k: step.get(k) for k in ("step", "config", "stats")} for step in card["steps"]],
                             indent=1, default=str), "```", ""]
    for title, markdown in (card.get("sections") or {}).items():
        lines += [f"## {title}", "", markdown, ""]
    if card.get("params"):
        lines += ["## Parameters", "", "```json", json.dumps(card["params"], indent=1, default=str), "```", ""]
    if card.get("drop_stats"):
        lines += ["## Drops during the run", "", "| reason | rows |", "|---|---|"]
        lines += [f"| {r} | {n} |" for r, n in sorted(card["drop_stats"].items(), key=lambda kv: -kv[1])] + [""]
    lines += ["## Dropped rows", ""]
    if drop_counts:
        lines += [f"{sum(drop_counts.values())} rows are in `rejected/` (config `rejected`) with their reason:", "",
                  "| drop_reason | rows |", "|---|---|"]
        lines += [f"| {r} | {n} |" for r, n in drop_counts.most_common()]
    else:
        lines.append("No rows were dropped.")
    lines.append("")
    n_examples = int(card.get("n_examples", 3))
    sample = frames[DEFAULT_CONFIG].head(n_examples)
    if n_examples and sample.height:
        lines += ["## Examples", ""]
        for row in sample.to_dicts():
            lines += ["```json", json.dumps(_truncate(row), indent=1, ensure_ascii=False, default=str), "```", ""]
    lines.append(f"Published by alignforge {alignforge.__version__} (schema v{alignforge.SCHEMA_VERSION}) "
                 f"on {manifest['created_at']}.")
    front = yaml.safe_dump(header, sort_keys=False, allow_unicode=True, width=1000)
    return f"---\n{front}---\n\n" + "\n".join(lines) + "\n"
