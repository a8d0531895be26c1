"""ZIP-FIT: select data aligned to a target set by compression (METHODS §6, arXiv 2410.18194).

    NCD(x, y)    = (C(x+y) - min(C(x), C(y))) / max(C(x), C(y))
    alignment(x) = 1 - mean over target texts y of NCD(x, y)

C = compressed length in bytes, x+y = plain byte concatenation of the UTF-8 texts (source first).

Compressor: zlib at level 6 by default (zlib's own default and the speed/ratio middle; the paper
uses gzip). "gzip" is the same DEFLATE stream in a gzip container (18 header/trailer bytes instead
of zlib's 6), which matters only to reproduce gzip-based scores exactly. Level 0 is refused:
it stores bytes uncompressed, so C(x) = len(x) + constant and the score measures length only.
"lz4" (block format, no frame) is the fast option.

Cost is N x n compressions of x+y; C(x) and C(y) are computed once each. Pairs run in a pool of
worker processes (forked, reused across shards). Each worker raises glibc's mmap and trim
thresholds before any work: zlib allocates ~270 KB of state per call, which is above glibc's
default 128 KB mmap threshold, so every call otherwise maps, faults in and unmaps fresh pages
(measured here: 3.4 s -> 2.3 s single-core for 30k pairs, system time 0.9 s -> 0). Reusing one
compressor through `compressobj().copy()` was not faster (the state copy costs as much).

Score column: `zipfit_alignment`. Select: top-K rows by alignment, or rows in alignment order
until a token budget is spent (tokens = whitespace words unless a `num_tokens` column exists),
or rows above `min_alignment`. Drop reason: `zipfit_not_selected`.
"""

from __future__ import annotations

import ctypes
import os
import zlib
from pathlib import Path
from typing import ClassVar, Literal, Sequence

import numpy as np
import polars as pl
from pydantic import Field, field_validator, model_validator

from schemas import SchemaError, stable_hash
from stages.base import StepConfig

from .base import GlobalFilter, ordered_scores
from .text import TextOn, mark_drops, row_text, unusable_text_reason

ALIGNMENT = "zipfit_alignment"
NOT_SELECTED = "zipfit_not_selected"
_IN_PROCESS_PAIRS = 20_000  # below this many pairs a worker pool costs more than it saves


# ---------------------------------------------------------------- compression (worker side too)

def compressed_size(data: bytes, compressor: str, level: int) -> int:
    if compressor == "zlib":
        return len(zlib.compress(data, level))
    if compressor == "gzip":
        c = zlib.compressobj(level, zlib.DEFLATED, 31)  # wbits 31 = gzip container, same lengths as gzip.compress
        return len(c.compress(data)) + len(c.flush())
    if compressor == "lz4":
        import lz4.block

        return len(lz4.block.compress(data, mode="default", store_size=False)) if data else 0
    raise ValueError(f"unknown compressor {compressor!r}; use 'zlib', 'gzip' or 'lz4'")


def ncd(cx: int, cy: int, cxy: int) -> float:
    hi = max(cx, cy)
    return (cxy - min(cx, cy)) / hi if hi else 0.0


def alignment_scores(sources: Sequence[bytes], targets: Sequence[bytes], compressor: str, level: int,
                     target_sizes: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(alignment, C(x)) for each source against all targets, in this process."""
    ct = np.asarray(target_sizes if target_sizes is not None else
                    [compressed_size(y, compressor, level) for y in targets], dtype=np.float64)
    out = np.empty(len(sources), dtype=np.float64)
    cxs = np.empty(len(sources), dtype=np.int64)
    for i, x in enumerate(sources):
        cx = compressed_size(x, compressor, level)
        cxy = np.fromiter((compressed_size(x + y, compressor, level) for y in targets),
                          dtype=np.float64, count=len(targets))
        hi = np.maximum(cx, ct)
        d = np.divide(cxy - np.minimum(cx, ct), hi, out=np.zeros_like(hi), where=hi > 0)
        out[i] = 1.0 - d.mean()
        cxs[i] = cx
    return out, cxs


_WORKER: dict = {}


def _raise_malloc_thresholds() -> None:
    """Keep freed compressor state in the heap (no mmap/munmap/trim per call); glibc only."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 64 << 20)
    libc.mallopt(m_trim_threshold, 256 << 20)


def _init_worker(targets: list[bytes], compressor: str, level: int) -> None:
    _raise_malloc_thresholds()
    _WORKER["targets"] = targets
    _WORKER["compressor"] = compressor
    _WORKER["level"] = level
    _WORKER["target_sizes"] = [compressed_size(y, compressor, level) for y in targets]


def _score_chunk(sources: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    return alignment_scores(sources, _WORKER["targets"], _WORKER["compressor"], _WORKER["level"],
                            _WORKER["target_sizes"])


# ---------------------------------------------------------------- config and filter

class ZipFitConfig(StepConfig):
    # The target set: a file (parquet / jsonl / json / txt, one text per line) or inline texts.
    target: str | None = None
    target_texts: tuple[str, ...] | None = None
    # Which text of a row is compared (sources; file targets in our row layouts too).
    on: TextOn = "conversation"
    compressor: Literal["zlib", "gzip", "lz4"] = "zlib"
    level: int = Field(6, description="zlib/gzip 1..9; lz4 ignores it")
    # Selection (at most one of top_k / token_budget; min_alignment may be combined).
    top_k: int | None = Field(None, ge=0)
    token_budget: int | None = Field(None, ge=0)
    min_alignment: float | None = None
    workers: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1)
    chunk_size: int = Field(64, ge=1, description="sources per worker task")

    @field_validator("level")
    @classmethod
    def _level(cls, level: int) -> int:
        if level == 0:
            raise ValueError(
                "zipfit level 0 stores the text without compressing it, so C(x) is just len(x) and "
                "the alignment measures length, not content; use level 1..9 (default 6)")
        if not 1 <= level <= 9:
            raise ValueError(f"zipfit level must be 1..9, got {level}")
        return level

    @model_validator(mode="after")
    def _checks(self):
        if (self.target is None) == (self.target_texts is None):
            raise ValueError("zipfit needs exactly one target set: `target` (a file path) or `target_texts`")
        if self.target_texts is not None and len(self.target_texts) == 0:
            raise ValueError("zipfit target set is empty: alignment is a mean over target texts, give at least one")
        if self.top_k is not None and self.token_budget is not None:
            raise ValueError("set zipfit top_k or token_budget, not both")
        return self


def load_target_texts(path: str, on: TextOn = "conversation") -> list[str]:
    """Texts of a target file: a `text` column if present, else our row layouts (messages /
    instruction / prompt+chosen); .txt files give one text per non-empty line."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"zipfit target file {path!r} does not exist; pass zipfit.target=<parquet/jsonl/txt>")
    suffix = p.suffix.lower()
    if suffix == ".txt":
        texts = [line for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        if suffix == ".parquet":
            df = pl.read_parquet(p)
        elif suffix in (".jsonl", ".ndjson"):
            df = pl.read_ndjson(p)
        elif suffix == ".json":
            df = pl.read_json(p)
        else:
            raise SchemaError(f"zipfit target {path!r}: unsupported file type {suffix!r}",
                              fix="use .parquet, .jsonl, .json or .txt")
        texts = (df["text"].cast(pl.Utf8) if "text" in df.columns else row_text(df, on)).drop_nulls().to_list()
        texts = [t for t in texts if t.strip()]
    if not texts:
        raise SchemaError(f"zipfit target set {path!r} has no non-empty texts",
                          fix="give a target file with at least one text (column 'text', 'instruction' or 'messages')")
    return texts


class ZipFit(GlobalFilter):
    name: ClassVar[str] = "zipfit"
    version: ClassVar[int] = 1
    Config: ClassVar[type[StepConfig]] = ZipFitConfig
    score_fields: ClassVar[tuple[str, ...]] = ("on", "compressor", "level")
    score_columns: ClassVar[tuple[str, ...]] = (ALIGNMENT,)
    config: ZipFitConfig

    def __init__(self, config: ZipFitConfig | None = None, **overrides):
        super().__init__(config, **overrides)
        self._targets: list[bytes] | None = None
        self._pool = None

    @property
    def targets(self) -> list[bytes]:
        if self._targets is None:
            texts = (list(self.config.target_texts) if self.config.target_texts is not None
                     else load_target_texts(self.config.target, self.config.on))
            self._targets = [t.encode("utf-8", "surrogatepass") for t in texts]
        return self._targets

    def score_config(self) -> dict:
        # Scores depend on the target CONTENT, not on where it was read from.
        return {**super().score_config(), "targets": stable_hash([t.hex() for t in self.targets])}

    def _get_pool(self):
        if self._pool is None:
            import multiprocessing as mp

            # fork starts in milliseconds (spawn re-imports polars etc., ~1-2 s per pool). Workers
            # run only zlib/lz4 and numpy, never polars, so polars' fork caveat does not apply.
            method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
            ctx = mp.get_context(method)
            self._pool = ctx.Pool(self.config.workers, initializer=_init_worker,
                                  initargs=(self.targets, self.config.compressor, self.config.level))
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def score_texts(self, texts: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray]:
        """(alignment, C(x)) for source byte strings; parallel when there is enough work."""
        targets, cfg = self.targets, self.config
        if not texts:
            return np.empty(0), np.empty(0, dtype=np.int64)
        if cfg.workers == 1 or len(texts) * len(targets) < _IN_PROCESS_PAIRS:
            return alignment_scores(texts, targets, cfg.compressor, cfg.level)
        chunks = [list(texts[i:i + cfg.chunk_size]) for i in range(0, len(texts), cfg.chunk_size)]
        parts = self._get_pool().map(_score_chunk, chunks, chunksize=1)
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def __call__(self, df: pl.DataFrame) -> pl.DataFrame:
        texts = row_text(df, self.config.on)
        unusable = unusable_text_reason(df, texts)
        usable = unusable.is_null().to_numpy()
        sources = [t.encode("utf-8", "surrogatepass") for t, ok in zip(texts.to_list(), usable) if ok]
        scores, _ = self.score_texts(sources)
        full = np.full(df.height, np.nan)
        full[usable] = scores
        column = pl.Series(ALIGNMENT, full, dtype=pl.Float64).fill_nan(None)
        self.stats = {"rows": df.height, "pairs": len(sources) * len(self.targets)}
        return mark_drops(df.drop(ALIGNMENT, strict=False).with_columns(column), unusable)

    def select(self, scores: pl.DataFrame | pl.LazyFrame) -> pl.DataFrame:
        cfg = self.config
        lf = scores.lazy() if isinstance(scores, pl.DataFrame) else scores
        names = lf.collect_schema().names()
        extra = [c for c in ("num_tokens",) if c in names]
        if cfg.token_budget is not None and not extra:
            extra = ["_text"]
            df = lf.collect()
            lf = df.with_columns(row_text(df, cfg.on).alias("_text")).lazy()
        table = ordered_scores(lf, [ALIGNMENT, *extra], self.name)
        # Best first; ties broken by id (table is id-ordered; stable sort keeps it).
        order = table.with_row_index("_rank_in").sort(ALIGNMENT, descending=True, nulls_last=True,
                                                      maintain_order=True)
        scored = order[ALIGNMENT].is_not_null()
        selected = scored.clone()
        if cfg.min_alignment is not None:
            selected = selected & (order[ALIGNMENT] >= cfg.min_alignment).fill_null(False)
        if cfg.top_k is not None:
            selected = selected & (selected.cast(pl.Int64).cum_sum() <= cfg.top_k)
        if cfg.token_budget is not None:
            if "num_tokens" in order.columns:
                tokens = order["num_tokens"].fill_null(0).cast(pl.Int64)
            else:
                tokens = order["_text"].fill_null("").str.split(" ").list.len().cast(pl.Int64)
            spent = (tokens * selected.cast(pl.Int64)).cum_sum()
            selected = selected & (spent <= cfg.token_budget)
        decided = order.with_columns(
            pl.when(pl.Series(selected) | pl.Series(~scored)).then(None).otherwise(pl.lit(NOT_SELECTED))
            .cast(pl.Utf8).alias("_reason"),
            pl.int_range(1, pl.len() + 1).alias("zipfit_rank"),
        )
        self.stats = {"selected": int(selected.sum()), "scored": int(scored.sum())}
        return decided.sort("_pos").select("id", "zipfit_rank", "_reason")
