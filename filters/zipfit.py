"""ZIP-FIT: select data aligned to a target set by compression (METHODS §6, arXiv 2410.18194).

    NCD(x, y)    = (C(x+y) - min(C(x), C(y))) / max(C(x), C(y))
    alignment(x) = 1 - mean over target texts y of NCD(x, y)

C = compressed length in bytes, x+y = plain byte concatenation of the UTF-8 texts (source first).

Compressor: zlib at level 6 by default (zlib's own default and the speed/ratio middle; the paper
uses gzip). "gzip" is the same DEFLATE stream in a gzip container (18 header/trailer bytes instead
of zlib's 6), which matters only to reproduce gzip-based scores exactly. Level 0 is refused:
it stores bytes uncompressed, so C(x) = len(x) + constant and the score measures length only.
"lz4" (block format, no frame) is the fast option.

Cost is N x n compressions of x+y; C(x) and C(y) are computed once each. Two exact shortcuts,
both checked byte for byte against zlib.compress(x + y) in tests/filters/test_zipfit.py:
- Prefix priming (zlib/gzip, sources >= PRIME_MIN_SOURCE_BYTES): x is fed once into a compressor
  without flushing, and each target continues a copy of that state. With Z_NO_FLUSH deflate's
  output does not depend on how the input is split, so every length is identical; what is saved
  is re-matching all but the last 262 bytes of x (deflate keeps that much lookahead). The state
  copy costs ~4-6 us, so it pays only from ~1 KB sources (measured, level 6, ~450 B targets:
  400 B sources 17.1 vs 18.8 us/pair, 1 KB 21.9 vs 21.5, 4 KB 39 vs 27, 16 KB 124 vs 43).
- The primed compressor uses the smallest window (wbits 9..15) whose reach covers x+y
  (len(x+y) + 262 <= 2**wbits): no match distance or window slide can then differ from wbits 15,
  and the header's window field changes value, not length. It halves the state copied per pair.
Pairs run in a pool of worker processes (forked, reused across shards; each gets the targets
once). Each worker raises glibc's mmap and trim thresholds before any work: zlib allocates
~270 KB of state per call, above glibc's default 128 KB mmap threshold, so every call otherwise
maps, faults in and unmaps fresh pages (measured: 3.4 s -> 2.3 s single-core for 30k pairs).
What is left per pair is deflate's own work on y and the tail of x, plus per-block Huffman trees:
~17 us for a 900-byte pair at level 6 here, so short texts cannot go much faster exactly.

Score column: `zipfit_alignment`. Select: top-K rows by alignment, or rows in alignment order
until a token budget is spent (tokens = whitespace words unless a `num_tokens` column exists),
or rows above `min_alignment`. Drop reason: `zipfit_not_selected`.
"""

from __future__ import annotations

import ctypes
import os
import sys
import zlib
from typing import ClassVar, Literal, Sequence

import numpy as np
import polars as pl
from pydantic import Field, field_validator, model_validator

from schemas import SchemaError, stable_hash
from alignforge.step import StepConfig

from alignforge.step import GlobalStep, ordered_scores
from .text import TextOn, mark_drops, row_text, unusable_text_reason

ALIGNMENT = "zipfit_alignment"
NOT_SELECTED = "zipfit_not_selected"
_IN_PROCESS_PAIRS = 20_000  # below this many pairs a worker pool costs more than it saves


# ---------------------------------------------------------------- compression (worker side too)

_MIN_LOOKAHEAD = 262  # zlib's MAX_MATCH + MIN_MATCH + 1: bytes deflate holds back without a flush
PRIME_MIN_SOURCE_BYTES = 1024  # measured crossover where priming beats recompressing x (see above)
_GZIP_WBITS_OFFSET = 16  # wbits + 16 = same DEFLATE stream in a gzip container

if sys.version_info >= (3, 11):
    def _deflate_len(data: bytes, level: int, wbits: int) -> int:
        return len(zlib.compress(data, level, wbits))
else:  # zlib.compress takes wbits only from 3.11
    def _deflate_len(data: bytes, level: int, wbits: int) -> int:
        c = zlib.compressobj(level, zlib.DEFLATED, wbits)
        return len(c.compress(data)) + len(c.flush())


def _container_wbits(compressor: str) -> int:
    if compressor == "zlib":
        return 15
    if compressor == "gzip":
        return 15 + _GZIP_WBITS_OFFSET  # same lengths as gzip.compress
    raise ValueError(f"unknown compressor {compressor!r}; use 'zlib', 'gzip' or 'lz4'")


def compressed_size(data: bytes, compressor: str, level: int) -> int:
    if compressor == "lz4":
        import lz4.block

        return len(lz4.block.compress(data, mode="default", store_size=False)) if data else 0
    return _deflate_len(data, level, _container_wbits(compressor))


def smallest_exact_window_bits(total_bytes: int) -> int:
    """Smallest wbits (9..15) giving byte-identical deflate lengths to wbits 15 for inputs of
    total_bytes: every match distance stays within the window and it never slides."""
    return min(15, max(9, (total_bytes + _MIN_LOOKAHEAD - 1).bit_length()))


def pair_sizes(x: bytes, targets: Sequence[bytes], compressor: str, level: int,
               max_target_len: int | None = None) -> np.ndarray:
    """C(x + y) for every target y, exactly as compressed_size(x + y) would give."""
    n = len(targets)
    if compressor == "lz4" or len(x) < PRIME_MIN_SOURCE_BYTES:
        if compressor == "lz4":
            return np.fromiter((compressed_size(x + y, "lz4", level) for y in targets), np.float64, n)
        wbits = _container_wbits(compressor)
        return np.fromiter((_deflate_len(x + y, level, wbits) for y in targets), np.float64, n)
    if max_target_len is None:
        max_target_len = max(map(len, targets), default=0)
    wbits = smallest_exact_window_bits(len(x) + max_target_len)
    if compressor == "gzip":
        wbits += _GZIP_WBITS_OFFSET
    elif compressor != "zlib":
        raise ValueError(f"unknown compressor {compressor!r}; use 'zlib', 'gzip' or 'lz4'")
    primed = zlib.compressobj(level, zlib.DEFLATED, wbits)
    emitted = len(primed.compress(x))
    out = np.empty(n, dtype=np.float64)
    for j, y in enumerate(targets):
        c = primed.copy()
        out[j] = emitted + len(c.compress(y)) + len(c.flush())
    return out


def ncd(cx: int, cy: int, cxy: int) -> float:
    hi = max(cx, cy)
    return (cxy - min(cx, cy)) / hi if hi else 0.0


def alignment_scores(sources: Sequence[bytes], targets: Sequence[bytes], compressor: str, level: int,
                     target_sizes: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(alignment, C(x)) for each source against all targets, in this process."""
    ct = np.asarray(target_sizes if target_sizes is not None else
                    [compressed_size(y, compressor, level) for y in targets], dtype=np.float64)
    max_target_len = max(map(len, targets), default=0)
    out = np.empty(len(sources), dtype=np.float64)
    cxs = np.empty(len(sources), dtype=np.int64)
    for i, x in enumerate(sources):
        cx = compressed_size(x, compressor, level)
        cxy = pair_sizes(x, targets, compressor, level, max_target_len)
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
    """Texts of a ZIP-FIT target file, read and checked: call it before any stage runs, it raises
    SchemaError naming the file, row, column and fix.

    .txt: one text per non-empty line (split on "\\n" only; U+2028 inside a line is text). Other
    files (parquet / JSONL / JSON, local or fsspec URL) go through the same import as run inputs,
    schemas.mapping.load_rows: a `text` column is used as it is; else the rows are imported as
    preference, sft or instructions rows (the first whose layout the columns match: ShareGPT
    `conversations`, `messages`, Alpaca `instruction`/`output`, `prompt`/`chosen`/`rejected`...)
    and `on` picks the text, as for sources. Rows the import quarantines are not targets, except a
    conversation without an answer (a target needs only its text)."""
    import fsspec

    from schemas.mapping import kind_of, load_rows, read_records

    shown = f"zipfit target {path}"
    if str(path).lower().endswith(".txt"):
        fs, local = fsspec.core.url_to_fs(str(path))
        if not fs.exists(local):
            raise SchemaError(f"no such file: {path}", dataset=shown,
                              fix="pass zipfit.target=<parquet/jsonl/json/txt file>")
        with fs.open(local, "rb") as f:
            data = f.read()
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            line = data.count(b"\n", 0, e.start) + 1
            raise SchemaError(f"file is not valid UTF-8: byte 0x{data[e.start]:02x} at line {line}", dataset=shown,
                              row=f"line {line}", fix=f"re-encode it as UTF-8, e.g. `iconv -f latin1 -t utf-8 {path}`") from None
        texts = [line.removesuffix("\r") for line in text.split("\n")]
        texts = [t for t in texts if t.strip()]
    else:
        rows, columns = read_records(path, dataset=shown)
        if "text" in columns:
            kind, mapping = "instructions", {"instruction": "text"}
        else:
            kind, mapping = kind_of(columns, ("preference", "sft", "instructions")), None
            if kind is None:
                raise SchemaError(f"cannot find target texts in columns {columns}", dataset=shown, column=None,
                                  fix="give a 'text' column, or rows in an importable layout: messages, ShareGPT "
                                      "conversations, instruction [+ output], prompt + chosen + rejected")
        df = load_rows(rows, mapping=mapping, kind=kind, dataset=shown)
        usable = df.filter(pl.col("keep") | (pl.col("drop_reason") == "import:no_assistant_turn"))
        texts = [t for t in row_text(usable, on).to_list() if t is not None and t.strip()]
    if not texts:
        raise SchemaError(f"zipfit target set {path!r} has no non-empty texts", dataset=shown,
                          fix="give a target file with at least one text (column 'text', 'instruction' or 'messages')")
    return texts


class ZipFit(GlobalStep):
    parallel_shards = False  # drives a model / its own worker pool: one shard at a time
    name: ClassVar[str] = "zipfit"
    version: ClassVar[int] = 1
    Config: ClassVar[type[StepConfig]] = ZipFitConfig
    score_fields: ClassVar[tuple[str, ...]] = ("on", "compressor", "level")
    score_columns: ClassVar[tuple[str, ...]] = (ALIGNMENT,)
    config: ZipFitConfig


    def preflight(self) -> None:
        """The target goes through the same import as inputs and is validated before any step runs."""
        if self.config.target is not None:
            load_target_texts(self.config.target, self.config.on)

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
