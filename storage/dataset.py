"""Sharded parquet datasets on a local path or any fsspec URL.

Layout of a dataset folder:

    part-00000.parquet            kept rows of shard 0 (its presence = shard committed)
    rejected/part-00000.parquet   rows with keep == False, with drop_reason (only if any)
    _stats/part-00000.json        rows_written / rows_kept / rows_dropped / dropped_by_reason,
                                  plus the stats the step passed (tokens, seconds...)
    _manifest.json                written last by `commit`: no manifest = dataset not committed

A shard is written rejected part -> stats -> kept part, each to a hidden
`.<name>.tmp-<host>~<pid>~<uuid>` name and renamed into place, so a run killed at any point leaves
either a committed shard or one that `shard_indices()` does not list (and that a rerun
overwrites). Temporary files are never read, and are removed only when their writer is gone
(`storage.owner`): two writers of one shard both finish, the last rename wins.

`commit(manifest, expected_shards=...)` refuses to mark a dataset complete while a shard of its
input has no output shard (e.g. another process removed it), so a partial stage is never
cached as done. `clear()` removes only the files a dataset writes, never a stranger's.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from typing import Any, Iterable

import fsspec
import polars as pl

from alignforge.errors import AlignforgeError
from schemas import conform
from storage.owner import tmp_is_stale, tmp_suffix

SHARD_RE = re.compile(r"^part-(\d{5})\.parquet$")
MANIFEST = "_manifest.json"
REJECTED_DIR = "rejected"
STATS_DIR = "_stats"
# Filter columns: meaningful in rejected/ (why a row was dropped), noise in kept rows.
INTERNAL_COLUMNS = ("keep", "drop_reason")
UNSPECIFIED_REASON = "unspecified"
STATS_RE = re.compile(r"^part-(\d{5})\.json$")


class StorageError(AlignforgeError, OSError):
    """A dataset location cannot be read or written; says which path and how to fix it."""


def shard_name(index: int) -> str:
    if not 0 <= index <= 99999:
        raise ValueError(f"shard index {index} out of range 0..99999")
    return f"part-{index:05d}.parquet"


def split_kept(df: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(kept rows without keep/drop_reason, rejected rows with a drop_reason). Null keep = kept."""
    if "keep" not in df.columns:
        return df.drop([c for c in INTERNAL_COLUMNS if c in df.columns]), df.clear().with_columns(
            keep=pl.lit(False), drop_reason=pl.lit(None, pl.Utf8))
    keep = pl.col("keep").fill_null(True)
    kept = df.filter(keep).drop([c for c in INTERNAL_COLUMNS if c in df.columns])
    rejected = df.filter(~keep)
    if "drop_reason" not in rejected.columns:
        rejected = rejected.with_columns(drop_reason=pl.lit(None, pl.Utf8))
    # Nothing is dropped without a reason: a filter that forgot one is still counted.
    rejected = rejected.with_columns(pl.col("drop_reason").cast(pl.Utf8).fill_null(UNSPECIFIED_REASON))
    return kept, rejected


class ShardedDataset:
    """A folder of `part-NNNNN.parquet` shards (see module docstring).

    >>> ds = ShardedDataset("memory://runs/x")        # or "runs/x", "s3://bucket/runs/x"
    >>> ds.write_shard(0, df, stats={"generated_tokens": 120})
    >>> ds.read().height, ds.shard_indices()
    """

    def __init__(self, url: str | os.PathLike, *, storage_options: dict | None = None):
        text = os.fspath(url).strip()
        if not text.split("://", 1)[-1].strip("/"):
            raise StorageError(f"{text!r} is no dataset folder: an empty path or a filesystem root. Fix: pass a "
                               f"folder of its own (e.g. --out runs/x)")
        self.url = text.rstrip("/")
        self.fs, self.path = fsspec.core.url_to_fs(self.url, **(storage_options or {}))
        self.path = self.path.rstrip("/")
        if not self.path or (self.is_local and os.path.normpath(os.path.abspath(self.path)) == os.path.abspath(os.sep)):
            raise StorageError(f"{text!r} is no dataset folder: it is the root of its filesystem. Fix: pass a "
                               f"folder of its own (e.g. --out runs/x)")
        self._checked_writable = False

    def __repr__(self) -> str:
        return f"ShardedDataset({self.url!r})"

    def _join(self, *parts: str) -> str:
        return "/".join([self.path, *parts])

    @property
    def is_local(self) -> bool:
        return "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))

    # ------------------------------------------------------------------------------- listing

    def _names(self, *sub: str) -> list[str]:
        folder = self._join(*sub)
        try:
            return [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(folder, detail=False)]
        except (FileNotFoundError, NotADirectoryError):
            return []

    def shard_indices(self) -> list[int]:
        """Committed shards: those whose kept part exists (tmp files and half shards are ignored)."""
        return sorted(int(m.group(1)) for name in self._names() if (m := SHARD_RE.match(name)))

    def has_shard(self, index: int) -> bool:
        return self.fs.exists(self._join(shard_name(index)))

    @property
    def committed(self) -> bool:
        return self.fs.exists(self._join(MANIFEST))

    def exists(self) -> bool:
        return self.fs.exists(self.path)

    # ------------------------------------------------------------------------------- writing

    def _ensure_writable(self) -> None:
        if self._checked_writable:
            return
        try:
            if self.fs.exists(self.path) and not self.fs.isdir(self.path):
                raise StorageError(f"cannot write dataset at {self.url}: a file exists where the dataset "
                                   f"folder should be. Fix: remove that file or choose another output path")
            self.fs.makedirs(self.path, exist_ok=True)
            for sub in (REJECTED_DIR, STATS_DIR):
                self.fs.makedirs(self._join(sub), exist_ok=True)
            if self.is_local and not os.access(self.path, os.W_OK):
                raise PermissionError(13, "Permission denied", self.path)
        except StorageError:
            raise
        except OSError as e:
            raise self._write_error(e) from None
        self._checked_writable = True

    def _write_error(self, error: OSError) -> StorageError:
        what = {PermissionError: "permission denied", FileExistsError: "a file is in the way",
                NotADirectoryError: "a file is in the way", IsADirectoryError: "a folder is in the way"}
        reason = next((text for kind, text in what.items() if isinstance(error, kind)), str(error))
        where = getattr(error, "filename", None) or self.url
        return StorageError(f"cannot write dataset at {self.url} ({reason}: {where}). Fix: choose an output "
                            f"path you can write to (--out DIR), or fix its permissions / remove the file in the way")

    def _atomic_write(self, relative: str, write) -> None:
        """Write via a hidden tmp name (owned by this process) in the same folder, then rename."""
        folder, _, name = relative.rpartition("/")
        final = self._join(relative)
        tmp = self._join(*([folder] if folder else []), f".{name}{tmp_suffix()}")
        for attempt in (1, 2):
            try:
                with self.fs.open(tmp, "wb") as f:
                    write(f)
                self.fs.mv(tmp, final)
                return
            except FileNotFoundError as e:
                # The folder vanished under us (another process cleared it): recreate it once.
                self._remove_path(tmp)
                if attempt == 2:
                    raise self._write_error(e) from None
                try:
                    self.fs.makedirs(self._join(folder) if folder else self.path, exist_ok=True)
                except OSError as e2:
                    raise self._write_error(e2) from None
            except OSError as e:
                self._remove_path(tmp)
                raise self._write_error(e) from None

    def _remove_path(self, path: str) -> None:
        try:
            self.fs.rm(path)
        except Exception:  # noqa: BLE001 - best effort cleanup of our own tmp file
            pass

    def _remove_stale_tmp(self, name: str | None, *sub: str) -> None:
        """Remove tmp files (of `name`, or all when None) whose writer is gone; live writers' stay."""
        prefix = f".{name}.tmp-" if name else "."
        for stale in self._names(*sub):
            if stale.startswith(prefix) and ".tmp-" in stale and tmp_is_stale(stale):
                try:
                    self.fs.rm(self._join(*sub, stale))
                except FileNotFoundError:
                    pass

    def _remove(self, relative: str) -> None:
        try:
            self.fs.rm(self._join(relative))
        except FileNotFoundError:
            pass

    def write_shard(self, index: int, df: pl.DataFrame, stats: dict[str, Any] | None = None) -> dict[str, Any]:
        """Write shard `index` atomically; rows with keep == False go to rejected/ with their reason.

        Order: rejected part, stats, kept part (the commit point). Returns the shard's stats.
        Writing a shard un-commits a committed dataset (its manifest no longer describes it).
        """
        self._ensure_writable()
        name = shard_name(index)
        if self.committed:
            self._remove(MANIFEST)
        for sub in ((), (REJECTED_DIR,), (STATS_DIR,)):  # leftovers of killed writers only
            self._remove_stale_tmp(name if sub != (STATS_DIR,) else name.replace(".parquet", ".json"), *sub)
        df = conform(df)
        kept, rejected = split_kept(df)
        reasons = Counter(rejected["drop_reason"].to_list()) if rejected.height else Counter()
        # The step's own stats (tokens, seconds, its notion of rows_in...) are kept verbatim; the
        # counts storage is sure of use reserved names and win on a clash.
        shard_stats = {
            **(stats or {}),
            "rows_written": df.height, "rows_kept": kept.height, "rows_dropped": rejected.height,
            "dropped_by_reason": dict(sorted(reasons.items())),
        }
        if self.has_shard(index):  # rewriting a committed shard: un-commit it first
            self._remove(name)
        if rejected.height:
            self._atomic_write(f"{REJECTED_DIR}/{name}", lambda f: rejected.write_parquet(f))
        else:
            self._remove(f"{REJECTED_DIR}/{name}")  # stale rejects of a killed earlier attempt
        payload = json.dumps(shard_stats, indent=1, sort_keys=True, default=str).encode()
        self._atomic_write(f"{STATS_DIR}/{name.replace('.parquet', '.json')}", lambda f: f.write(payload))
        self._atomic_write(name, lambda f: kept.write_parquet(f))
        return shard_stats

    def missing_shards(self, expected_shards: Iterable[int]) -> list[int]:
        """Indices in `expected_shards` that have no committed shard here."""
        have = set(self.shard_indices())
        return sorted(set(int(i) for i in expected_shards) - have)

    def commit(self, manifest: dict[str, Any], *, expected_shards: Iterable[int] | None = None) -> None:
        """Write `_manifest.json` atomically: the dataset is complete.

        `expected_shards` (e.g. `input_ds.shard_indices()`): refuse with a StorageError, and write
        nothing, unless exactly these shards are committed here (a missing one: another process
        removed it or is writing this folder too; an extra one: it belongs to other input)."""
        self._ensure_writable()
        if expected_shards is not None:
            expected = sorted(set(int(i) for i in expected_shards))
            have = self.shard_indices()
            missing = sorted(set(expected) - set(have))
            extra = sorted(set(have) - set(expected))
            if missing or extra:
                what = []
                if missing:
                    what.append(f"input shard(s) {_short(missing)} have no output shard "
                                f"({len(expected) - len(missing)} of {len(expected)} written)")
                if extra:
                    what.append(f"output shard(s) {_short(extra)} have no input shard")
                raise StorageError(
                    f"refusing to commit dataset {self.url}: {'; '.join(what)}. Another process may have "
                    f"removed files or be writing this folder at the same time. Fix: make sure no other run "
                    f"uses this run folder, then rerun the same command (missing shards are recomputed)")
        described = manifest.get("num_shards")
        if isinstance(described, int) and not isinstance(described, bool):
            have = len(self.shard_indices())
            if have != described:  # shards vanished (or appeared) after build_manifest counted them
                raise StorageError(
                    f"refusing to commit dataset {self.url}: its manifest describes {described} shard(s) but "
                    f"{have} are there now. Another process may have removed files or be writing this folder. "
                    f"Fix: make sure no other run uses this run folder, then rerun the same command")
        self._remove_stale_tmp(None)
        for sub in ((REJECTED_DIR,), (STATS_DIR,)):
            self._remove_stale_tmp(None, *sub)
        payload = json.dumps(manifest, indent=2, sort_keys=False, default=str).encode()
        self._atomic_write(MANIFEST, lambda f: f.write(payload))

    def clear(self) -> None:
        """Delete the dataset's own files (shards, rejected/, _stats/, manifest, tmp files).

        Files a dataset never writes are left where they are (and so is the folder holding them)."""
        try:
            self._remove(MANIFEST)
            for sub, pattern in (((), SHARD_RE), ((REJECTED_DIR,), SHARD_RE), ((STATS_DIR,), STATS_RE)):
                for name in self._names(*sub):
                    if pattern.match(name) or (name.startswith(".part-") and ".tmp-" in name) or \
                            (not sub and name.startswith(f".{MANIFEST}.tmp-")):
                        self._remove("/".join([*sub, name]))
                if sub and self.fs.exists(self._join(*sub)) and not self._names(*sub):
                    self.fs.rmdir(self._join(*sub))
            if self.fs.exists(self.path) and not self._names():
                self.fs.rmdir(self.path)
        except OSError as e:
            raise self._write_error(e) from None
        self._checked_writable = False

    # ------------------------------------------------------------------------------- reading

    def _read_parquet(self, relative: str) -> pl.DataFrame:
        path = self._join(relative)
        if self.is_local:
            return pl.read_parquet(path)
        with self.fs.open(path, "rb") as f:
            return pl.read_parquet(f)

    def read_shard(self, index: int, rejected: bool = False) -> pl.DataFrame:
        name = shard_name(index)
        if not self.has_shard(index):
            raise FileNotFoundError(f"shard {index} of {self.url} is not committed ({name} missing)")
        if rejected:
            relative = f"{REJECTED_DIR}/{name}"
            if not self.fs.exists(self._join(relative)):
                return pl.DataFrame(schema={"drop_reason": pl.Utf8})
            return self._read_parquet(relative)
        return self._read_parquet(name)

    def scan(self, rejected: bool = False) -> pl.LazyFrame:
        """All committed shards in shard order (schemas unioned: a column missing in one shard is null)."""
        frames = []
        for index in self.shard_indices():
            relative = f"{REJECTED_DIR}/{shard_name(index)}" if rejected else shard_name(index)
            if rejected and not self.fs.exists(self._join(relative)):
                continue
            if self.is_local:
                frames.append(pl.scan_parquet(self._join(relative)))
            else:
                frames.append(self._read_parquet(relative).lazy())
        if not frames:
            return pl.DataFrame(schema={"drop_reason": pl.Utf8} if rejected else {}).lazy()
        return pl.concat(frames, how="diagonal_relaxed")

    def read(self, rejected: bool = False) -> pl.DataFrame:
        return self.scan(rejected=rejected).collect()

    def num_rows(self, rejected: bool = False) -> int:
        stats = self.shard_stats()
        return sum(s.get("rows_dropped" if rejected else "rows_kept", 0) for s in stats.values())

    def shard_stats(self) -> dict[int, dict[str, Any]]:
        out = {}
        for index in self.shard_indices():
            path = self._join(STATS_DIR, shard_name(index).replace(".parquet", ".json"))
            try:
                with self.fs.open(path, "rb") as f:
                    out[index] = json.loads(f.read())
            except FileNotFoundError:
                out[index] = {}
        return out

    def manifest(self) -> dict[str, Any] | None:
        try:
            with self.fs.open(self._join(MANIFEST), "rb") as f:
                return json.loads(f.read())
        except FileNotFoundError:
            return None


def _short(indices: list[int], limit: int = 10) -> str:
    shown = ", ".join(str(i) for i in indices[:limit])
    return shown + (f" ... ({len(indices)} in all)" if len(indices) > limit else "")
