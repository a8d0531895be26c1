"""MinHash near-duplicate removal (METHODS §7).

Score (per shard): a `minhash_signature` column (`num_perm` uint32 per row), computed
vectorised: every shingle of the shard is hashed once to 64 bits, all permutations are applied
at once as h_i(x) = a_i * x + b_i mod 2^32 on the shingle hash's top 32 bits (a_i odd; uint32
arithmetic runs 2.7x faster than 64-bit multiply-shift and, on well-mixed shingle hashes, the
estimates have the same bias and spread), and each document's minimum is taken with
`np.minimum.reduceat`. A heavy (unpublished) `minhash_shingles` column keeps each row's 64-bit
shingle hashes for the exact check.

Select (global): LSH banding -> candidate pairs -> (verify) keep pairs whose EXACT Jaccard of
their shingle-hash sets is >= threshold (the signatures only propose candidates; the estimate's
noise used to lose pairs just above the threshold and admit pairs below it) -> star clusters in
id order: the lowest-id row not yet assigned is kept and takes every unassigned row it is paired
with (`star_clusters`). So every dropped row is >= threshold from the row kept for it. datatrove
and NeMo Curator take connected components (union-find) of the pairs instead; those chain near
copies of near copies (A~B~C with J(A, C) < threshold): in bench.minhash 1.6% of the dropped
rows were below the threshold from the row kept for them. Only candidate rows' shingles are read.
Rows are put in canonical id order first, so clusters do not depend on shard count or order.
Output columns: `minhash_cluster` (id of the cluster's kept row), `minhash_cluster_size`;
drop reason `minhash_duplicate`.

Texts without word tokens (`🙂🙂🙂`, `???`, `+-*/`): word shingling finds nothing, and an empty
shingle set would give the all-max signature, so every such text would "duplicate" every other.
They fall back to character n-grams (Unicode code points, n = 5, whitespace collapsed): a text
shorter than 5 characters is one shingle (itself), so distinct short symbol texts never
cluster, and longer ones are compared on their characters (counted in `stats["char_fallback"]`).
Blank texts get no signature at all (drop reason `empty_text`).

Bands x rows default to the split minimising fp_weight * (false-positive area) + fn_weight *
(false-negative area) of the LSH S-curve. The weights lean to recall (0.05 / 0.95) because
candidates are verified afterwards, so a false positive costs a comparison, while a false
negative is a duplicate that survives. (With the symmetric 0.5/0.5 weights, 128 perms at 0.8
give 9 bands x 13 rows, which finds only about half of the pairs just above the threshold.)
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import ClassVar, Literal

import numpy as np
import polars as pl
from pydantic import Field, model_validator

from alignforge.step import StepConfig

from alignforge.step import GlobalStep, StepError, ordered_scores
from .text import TextOn, mark_drops, row_text, unusable_text_reason

DUPLICATE = "minhash_duplicate"
SIGNATURE = "minhash_signature"
SHINGLES = "minhash_shingles"  # heavy: each row's 64-bit shingle hashes (exact check in select)
_PAIRS_PER_CHUNK = 1 << 18
# Measured on 2 cores: (perms x shingles) blocks of ~8k shingles (8 MiB) run at ~1.3 ns per
# element; 32k-shingle blocks fell out of cache and ran 3-5x slower.
_MAX_SHINGLES_PER_CHUNK = 1 << 13
_MIX = np.uint64(0x9E3779B97F4A7C15)
# Character fallback for texts without word tokens (see the module docstring).
FALLBACK_CHAR_NGRAM = 5
_CHAR_SALT = np.uint64(0xC2B2AE3D27D4EB4F)  # keeps code-point units apart from word-token hashes


def optimal_bands(threshold: float, num_perm: int, fp_weight: float = 0.05,
                  fn_weight: float = 0.95) -> tuple[int, int]:
    """(bands, rows) with bands*rows <= num_perm minimising the weighted FP/FN areas under the
    LSH collision curve P(s) = 1 - (1 - s^rows)^bands."""
    below = np.linspace(0.0, threshold, 256)
    above = np.linspace(threshold, 1.0, 256)
    best, best_err = (1, num_perm), np.inf
    for bands in range(1, num_perm + 1):
        for rows in range(1, num_perm // bands + 1):
            fp = np.trapezoid(1 - (1 - below**rows) ** bands, below)
            fn = np.trapezoid((1 - above**rows) ** bands, above)
            err = fp_weight * fp + fn_weight * fn
            if err < best_err:
                best, best_err = (bands, rows), err
    return best


class MinHashConfig(StepConfig):
    on: TextOn = "instruction"
    shingle: Literal["word", "char"] = "word"
    # Word 3-grams: instructions are short (10-50 words); 5-grams would turn one edited word
    # into 5 lost shingles. "char" shingles are UTF-8 byte n-grams of the normalised text.
    ngram: int = Field(3, ge=1, le=64)
    num_perm: int = Field(128, ge=8, le=1024)
    threshold: float = Field(0.8, gt=0.0, le=1.0)
    bands: int | None = Field(None, ge=1)
    rows: int | None = Field(None, ge=1)
    # Drop candidate pairs whose exact Jaccard (of their shingle-hash sets) < threshold.
    verify: bool = True
    lowercase: bool = True
    seed: int = 1
    workers: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1)

    @model_validator(mode="after")
    def _bands_rows(self):
        if (self.bands is None) != (self.rows is None):
            raise ValueError("set both minhash bands and rows, or neither (then they are chosen for the threshold)")
        if self.bands is not None and self.bands * self.rows > self.num_perm:
            raise ValueError(f"bands*rows = {self.bands * self.rows} exceeds num_perm = {self.num_perm}")
        return self

    def band_split(self) -> tuple[int, int]:
        if self.bands is not None:
            return self.bands, self.rows  # type: ignore[return-value]
        return optimal_bands(self.threshold, self.num_perm)


def _normalise(texts: pl.Series, lowercase: bool, whitespace: bool) -> pl.Series:
    out = texts.fill_null("")
    if lowercase:
        out = out.str.to_lowercase()
    if whitespace:  # word shingles skip this: the \w+ tokenizer already ignores spacing
        out = out.str.replace_all(r"\s+", " ").str.strip_chars()
    return out


def _list_array(values: np.ndarray, offsets: np.ndarray):
    """A list<uint64> arrow array from flat values + offsets (no per-row Python objects)."""
    import pyarrow as pa

    return pa.LargeListArray.from_arrays(pa.array(offsets, type=pa.int64()), pa.array(values, type=pa.uint64()))


def exact_jaccard_pairs(values: np.ndarray, offsets: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Exact Jaccard of the value sets of row pairs.

    values / offsets: each row's values (any order, repeats allowed) back to back; pairs: (k, 2)
    row indices. Values are ranked densely first, so (pair, rank) keys fit one uint64 and one sort
    per chunk of pairs counts every intersection."""
    out = np.empty(len(pairs), dtype=np.float64)
    if not len(pairs):
        return out
    rows = _sorted_unique(pairs.ravel())
    lengths = (offsets[rows + 1] - offsets[rows]).astype(np.int64)
    flat = values[_ranges(offsets[rows], lengths)]
    # Dense ranks by one sort (np.unique's hash path is several times slower here).
    order = np.argsort(flat)
    ordered = flat[order]
    rank = np.empty(len(flat), dtype=np.uint64)
    rank[order] = np.concatenate([[0], np.cumsum(ordered[1:] != ordered[:-1])]).astype(np.uint64)
    del flat, order, ordered
    # Per candidate row: its sorted distinct ranks.
    keys = _sorted_unique((np.repeat(np.arange(len(rows), dtype=np.uint64), lengths) << np.uint64(32)) | rank)
    local_row = (keys >> np.uint64(32)).astype(np.int64)
    rank_of = (keys & np.uint64(0xFFFFFFFF))
    sizes = np.bincount(local_row, minlength=len(rows))
    starts = np.concatenate([[0], np.cumsum(sizes)])
    left, right = np.searchsorted(rows, pairs[:, 0]), np.searchsorted(rows, pairs[:, 1])
    for s in range(0, len(pairs), _PAIRS_PER_CHUNK):
        a, b = left[s:s + _PAIRS_PER_CHUNK], right[s:s + _PAIRS_PER_CHUNK]
        k = np.arange(len(a), dtype=np.uint64)
        both = np.concatenate([
            (np.repeat(k, sizes[a]) << np.uint64(32)) | rank_of[_ranges(starts[a], sizes[a])],
            (np.repeat(k, sizes[b]) << np.uint64(32)) | rank_of[_ranges(starts[b], sizes[b])]])
        both.sort()
        same = both[1:] == both[:-1]
        inter = np.bincount((both[1:][same] >> np.uint64(32)).astype(np.int64), minlength=len(a))
        union = sizes[a] + sizes[b] - inter
        out[s:s + len(a)] = np.divide(inter, union, out=np.ones(len(a)), where=union > 0)
    return out


def _sorted_unique(a: np.ndarray) -> np.ndarray:
    a = np.sort(a)
    return a[np.concatenate([[True], a[1:] != a[:-1]])] if len(a) else a


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenated index ranges [start, start + length) (vectorised)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    total = int(lengths.sum())
    shift = np.repeat(np.asarray(starts, dtype=np.int64) - (np.cumsum(lengths) - lengths), lengths)
    return np.arange(total, dtype=np.int64) + shift


def _mix64(h: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: spreads combined n-gram hashes over all 64 bits."""
    h = h ^ (h >> np.uint64(30))
    h = h * np.uint64(0xBF58476D1CE4E5B9)
    h = h ^ (h >> np.uint64(27))
    h = h * np.uint64(0x94D049BB133111EB)
    return h ^ (h >> np.uint64(31))


def _ngram_hashes(units: np.ndarray, lengths: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Hash all n-grams of concatenated documents at once.

    units: flat uint64 array (token hashes or bytes+1) of every document back to back;
    lengths: units per document. A document shorter than n gives one shingle (all its units).
    Returns (shingle hashes, shingles per document)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and ((lengths >= n) | (lengths == 0)).all():
        return _window_hashes(units, lengths, n)
    per_doc = np.where(lengths >= n, lengths - n + 1, np.minimum(lengths, 1))
    starts = np.cumsum(lengths) - lengths
    # Start position of every shingle: doc start + 0 .. per_doc-1.
    first = np.repeat(starts - (np.cumsum(per_doc) - per_doc), per_doc)
    pos = np.arange(first.shape[0], dtype=np.int64) + first
    end_of = np.repeat(starts + lengths, per_doc) if (lengths[lengths > 0] < n).any() else None
    padded = np.concatenate([units, np.zeros(n, dtype=np.uint64)])
    with np.errstate(over="ignore"):
        h = padded[pos]
        for k in range(1, n):
            nxt = padded[pos + k]
            if end_of is not None:  # documents shorter than n: pad their one shingle with zeros
                nxt[pos + k >= end_of] = 0
            h *= _MIX
            h += nxt
        h = _mix64(h)
    return h, per_doc


def star_clusters(n: int, pairs: np.ndarray) -> np.ndarray:
    """The kept row (representative) of each of n rows, given duplicate pairs (i < j).

    Greedy star clustering in row order: the first row not yet assigned becomes a representative
    and takes every unassigned row it is paired with. So each dropped row is paired with (is a
    near copy of) the row kept for it, and no pair has both rows kept. Connected components
    would instead chain near copies of near copies into one cluster whose kept row can be far
    from some dropped rows."""
    rep = np.arange(n, dtype=np.int64)
    if not len(pairs):
        return rep
    degree = np.bincount(pairs.ravel(), minlength=n)
    # Pairs whose rows have no other pair (most clusters): the lower row keeps the other.
    alone = (degree[pairs[:, 0]] == 1) & (degree[pairs[:, 1]] == 1)
    rep[pairs[alone, 1]] = pairs[alone, 0]
    rest = pairs[~alone]
    if not len(rest):
        return rep
    both = np.concatenate([rest, rest[:, ::-1]])
    both = both[np.lexsort((both[:, 1], both[:, 0]))]
    rows, starts = np.unique(both[:, 0], return_index=True)
    ends = np.append(starts[1:], len(both))
    assigned = np.zeros(n, dtype=bool)
    for row, lo, hi in zip(rows.tolist(), starts.tolist(), ends.tolist()):
        if assigned[row]:
            continue
        assigned[row] = True
        partners = both[lo:hi, 1]
        partners = partners[~assigned[partners]]  # lower partners are already decided
        assigned[partners] = True
        rep[partners] = row
    return rep


def _window_hashes(units: np.ndarray, lengths: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """_ngram_hashes when no document is shorter than n (or all are empty): hash every window of
    the flat array with shifted slices (no index arrays), then drop the windows that cross a
    document end. Same hashes, 3x faster."""
    span = len(units) - n + 1
    if span <= 0:
        return np.empty(0, dtype=np.uint64), np.zeros(len(lengths), dtype=np.int64)
    with np.errstate(over="ignore"):
        h = units[:span].copy()
        for k in range(1, n):
            h *= _MIX
            h += units[k:span + k]
        inside = np.ones(span, dtype=bool)
        ends = np.cumsum(lengths)[lengths > 0]
        for k in range(1, n):  # windows starting in the last n-1 units of a document
            inside[ends[ends - k < span] - k] = False
        return _mix64(h[inside]), np.maximum(lengths - n + 1, 0)


class MinHashDedup(GlobalStep):
    name: ClassVar[str] = "minhash"
    # 2: texts without word tokens get character shingles (were all-max signatures that collided).
    # 3: uint32 permutations; candidates verified by exact Jaccard (`minhash_shingles` score column).
    # 4: star clusters around the kept row (were connected components, which chain near copies).
    version: ClassVar[int] = 4
    Config: ClassVar[type[StepConfig]] = MinHashConfig
    score_fields: ClassVar[tuple[str, ...]] = ("on", "shingle", "ngram", "num_perm", "lowercase", "seed")
    score_columns: ClassVar[tuple[str, ...]] = (SIGNATURE, SHINGLES)
    heavy_columns: ClassVar[tuple[str, ...]] = (SHINGLES,)
    config: MinHashConfig

    def __init__(self, config: MinHashConfig | None = None, **overrides):
        super().__init__(config, **overrides)
        rng = np.random.default_rng(self.config.seed)
        p = self.config.num_perm
        self._a = (rng.integers(0, 2**31, size=p, dtype=np.uint32) * np.uint32(2) + np.uint32(1)).astype(np.uint32)
        self._b = rng.integers(0, 2**32, size=p, dtype=np.uint64).astype(np.uint32)
        self._char_fallback = 0  # texts of the last shingle_hashes() call that had no word token

    # ---- score -------------------------------------------------------------------------
    def shingle_hashes(self, texts: pl.Series) -> tuple[np.ndarray, np.ndarray]:
        """(flat 64-bit shingle hashes, shingles per text) for a series of texts.

        Every non-blank text gets at least one shingle: word mode falls back to code-point
        n-grams for texts without a word token."""
        cfg = self.config
        norm = _normalise(texts, cfg.lowercase, whitespace=cfg.shingle == "char")
        if cfg.shingle == "char":
            encoded = [t.encode("utf-8", "surrogatepass") for t in norm.to_list()]
            lengths = np.fromiter((len(b) for b in encoded), dtype=np.int64, count=len(encoded))
            units = np.frombuffer(b"".join(encoded), dtype=np.uint8).astype(np.uint64) + np.uint64(1)
            self._char_fallback = 0
            return _ngram_hashes(units, lengths, cfg.ngram)
        tokens = norm.str.extract_all(r"\w+")
        lengths = tokens.list.len().fill_null(0).to_numpy().astype(np.int64)
        flat = tokens.explode().drop_nulls()
        # Polars' hash differs between polars versions; signatures are recomputed then
        # (score_fingerprint includes the polars version).
        units = flat.hash(seed=cfg.seed).to_numpy().astype(np.uint64, copy=False)
        word_hashes, word_per_doc = _ngram_hashes(units, lengths, cfg.ngram)
        # No word token: code-point n-grams of the whitespace-collapsed text.
        no_word = np.flatnonzero(lengths == 0)
        collapsed = norm.gather(no_word).str.replace_all(r"\s+", " ").str.strip_chars()
        nonblank = collapsed.str.len_chars().fill_null(0).to_numpy() > 0
        fallback = no_word[nonblank]
        self._char_fallback = len(fallback)
        if not len(fallback):
            return word_hashes, word_per_doc
        chars = collapsed.filter(pl.Series(nonblank)).to_list()
        char_lengths = np.zeros(len(texts), dtype=np.int64)
        char_lengths[fallback] = [len(t) for t in chars]
        points = np.frombuffer("".join(chars).encode("utf-32-le", "surrogatepass"), dtype="<u4")
        char_units = (points.astype(np.uint64) + np.uint64(1)) ^ _CHAR_SALT
        char_hashes, char_per_doc = _ngram_hashes(char_units, char_lengths, FALLBACK_CHAR_NGRAM)
        # Merge back into document order (each document has shingles of one kind only).
        doc = np.arange(len(texts))
        order = np.argsort(np.concatenate([np.repeat(doc, word_per_doc), np.repeat(doc, char_per_doc)]),
                           kind="stable")
        return np.concatenate([word_hashes, char_hashes])[order], word_per_doc + char_per_doc

    def signatures(self, texts: pl.Series) -> np.ndarray:
        """uint32 signatures, one row per text (all 0xFFFFFFFF for a blank text, which has no shingles;
        __call__ gives blank rows a null signature and `empty_text`)."""
        return self._signatures(*self.shingle_hashes(texts))

    def _signatures(self, hashes: np.ndarray, per_doc: np.ndarray) -> np.ndarray:
        n_docs, p = len(per_doc), self.config.num_perm
        sig = np.full((n_docs, p), np.iinfo(np.uint32).max, dtype=np.uint32)
        x = (hashes >> np.uint64(32)).astype(np.uint32)  # 32-bit keys
        doc_start = np.concatenate([[0], np.cumsum(per_doc)])
        nonempty = np.flatnonzero(per_doc > 0)
        # Chunks of whole documents, ~_MAX_SHINGLES_PER_CHUNK shingles each.
        cuts = np.searchsorted(doc_start[nonempty + 1], np.arange(_MAX_SHINGLES_PER_CHUNK, doc_start[-1],
                                                                  _MAX_SHINGLES_PER_CHUNK), side="left") + 1
        chunks = [c for c in np.split(nonempty, np.unique(np.minimum(cuts, len(nonempty)))) if len(c)]

        def run(docs: np.ndarray) -> None:
            lo, hi = doc_start[docs[0]], doc_start[docs[-1] + 1]
            # (perms, shingles) layout: each document's shingles are contiguous per permutation.
            block = np.multiply(self._a[:, None], x[None, lo:hi])
            np.add(block, self._b[:, None], out=block)
            sig[docs] = np.minimum.reduceat(block, doc_start[docs] - lo, axis=1).T

        with np.errstate(over="ignore"):
            if self.config.workers > 1 and len(chunks) > 1:
                with ThreadPoolExecutor(self.config.workers) as pool:
                    list(pool.map(run, chunks))
            else:
                for c in chunks:
                    run(c)
        return sig

    def __call__(self, df: pl.DataFrame) -> pl.DataFrame:
        texts = row_text(df, self.config.on) if df.height else pl.Series("text", [], dtype=pl.Utf8)
        unusable = unusable_text_reason(df, texts)
        hashes, per_doc = self.shingle_hashes(texts)
        sig = self._signatures(hashes, per_doc)
        dtype = pl.Array(pl.UInt32, self.config.num_perm)
        column = pl.Series(SIGNATURE, sig, dtype=dtype)
        offsets = np.concatenate([[0], np.cumsum(per_doc)]).astype(np.int64)
        shingles = pl.Series(SHINGLES, _list_array(hashes, offsets))
        # No signature for rows that cannot be scored: they must not cluster with each other.
        if df.height:
            usable = unusable.is_null()
            column, shingles = pl.select(
                pl.when(usable).then(column).otherwise(None).alias(SIGNATURE),
                pl.when(usable).then(shingles).otherwise(None).alias(SHINGLES)).get_columns()
        out = df.drop([SIGNATURE, SHINGLES], strict=False).with_columns(column, shingles)
        self.stats = {"rows": df.height, "unusable": int(unusable.is_not_null().sum()),
                      "char_fallback": self._char_fallback}
        return mark_drops(out, unusable)

    def score_fingerprint(self, *input_fingerprints: str) -> str:
        return super().score_fingerprint(*input_fingerprints, f"polars=={pl.__version__}")

    # ---- select ------------------------------------------------------------------------
    def candidate_pairs(self, sig: np.ndarray) -> np.ndarray:
        """(k, 2) int64 row-index pairs sharing at least one LSH band (i < j, unique)."""
        bands, rows = self.config.band_split()
        n = sig.shape[0]
        if n < 2:
            return np.empty((0, 2), dtype=np.int64)
        rng = np.random.default_rng(12345)
        weights = rng.integers(1, 2**63, size=rows, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        edges = []
        # One plain sort per band of (top bits of the band key | row): rows with equal keys end up
        # side by side in row order, like a stable argsort, at a fraction of its cost. Keys equal
        # in their top bits only are extra candidates (about n^2 / 2^(65 - bits) per band).
        bits = max(1, (n - 1).bit_length())
        low = np.uint64((1 << bits) - 1)
        index = np.arange(n, dtype=np.uint64)
        with np.errstate(over="ignore"):
            for b in range(bands):
                band = sig[:, b * rows:(b + 1) * rows].astype(np.uint64)
                key = _mix64((band * weights).sum(axis=1, dtype=np.uint64) + np.uint64(b))
                packed = np.sort((key & ~low) | index)
                order = (packed & low).astype(np.int64)
                sk = packed & ~low
                same_as_prev = np.concatenate([[False], sk[1:] == sk[:-1]])
                if not same_as_prev.any():
                    continue
                run_start = np.maximum.accumulate(np.where(same_as_prev, 0, np.arange(n)))
                members = np.flatnonzero(same_as_prev)
                # Star (first of bucket -> member) and chain (previous -> member) edges: O(n) per
                # band, and a member that fails verification against the first can still link.
                edges.append(np.stack([order[run_start[members]], order[members]], axis=1))
                edges.append(np.stack([order[members - 1], order[members]], axis=1))
        if not edges:
            return np.empty((0, 2), dtype=np.int64)
        pairs = np.concatenate(edges).astype(np.int64)
        pairs.sort(axis=1)
        pairs = pairs[pairs[:, 0] != pairs[:, 1]]
        flat = _sorted_unique(pairs[:, 0] * n + pairs[:, 1])  # 1-D unique: several times faster than axis=0
        return np.stack([flat // n, flat % n], axis=1)

    def select(self, scores: pl.DataFrame | pl.LazyFrame) -> pl.DataFrame:
        lf = scores.lazy() if isinstance(scores, pl.DataFrame) else scores
        verify = self.config.verify
        if verify and SHINGLES not in lf.collect_schema().names():
            raise StepError(f"{self.name}.select checks candidates by exact Jaccard but the scores have no "
                            f"{SHINGLES!r} column (written by minhash version >= 3)", column=SHINGLES,
                            fix="re-run the minhash score phase, or set minhash.verify=false")
        # Canonical (id-sorted) order from the ids only; heavy columns are gathered, never sorted.
        table = ordered_scores(lf, [], self.name)
        n = table.height
        ids, order = table["id"], table["_pos"].to_numpy()
        column = lf.select(SIGNATURE).collect().to_series()
        has_sig = column.is_not_null().to_numpy()[order]
        sig_rows = np.flatnonzero(has_sig)
        if len(sig_rows):
            sig = column.gather(order[sig_rows]).to_numpy()
            if sig.ndim != 2 or sig.shape[1] != self.config.num_perm:
                raise ValueError(
                    f"minhash signatures have {sig.shape[-1]} values but num_perm={self.config.num_perm}; "
                    "re-score with the same num_perm")
            sig = np.ascontiguousarray(sig, dtype=np.uint32)
        else:
            sig = np.empty((0, self.config.num_perm), dtype=np.uint32)
        del column
        pairs = self.candidate_pairs(sig)
        del sig
        candidates = len(pairs)
        if verify and len(pairs):
            pairs = pairs[self.exact_jaccard(lf, order[sig_rows], pairs) >= self.config.threshold]
        # Back to positions in the canonical (id-sorted) table.
        pairs = sig_rows[pairs] if len(pairs) else np.empty((0, 2), dtype=np.int64)
        rep = star_clusters(n, pairs)
        counts = np.bincount(rep, minlength=n)
        sizes = counts[rep]
        self.stats = {"candidate_pairs": candidates, "verified_pairs": len(pairs),
                      "clusters_with_duplicates": int((counts > 1).sum()),
                      "duplicates": int((rep != np.arange(n)).sum())}
        decisions = pl.DataFrame({
            "_pos": table["_pos"],
            "id": ids,
            "minhash_cluster": ids.gather(rep) if n else ids,
            "minhash_cluster_size": pl.Series(sizes, dtype=pl.Int64),
            "_dup": pl.Series(rep != np.arange(n), dtype=pl.Boolean),
        }).with_columns(
            pl.when(pl.col("_dup")).then(pl.lit(DUPLICATE)).otherwise(pl.lit(None, dtype=pl.Utf8)).alias("_reason")
        ).drop("_dup")
        return decisions.sort("_pos").drop("_pos")

    def exact_jaccard(self, scores: pl.LazyFrame, positions: np.ndarray, pairs: np.ndarray) -> np.ndarray:
        """Exact Jaccard of candidate pairs (indices into `positions`, the rows' input positions),
        reading the shingle hashes of candidate rows only."""
        rows = _sorted_unique(pairs.ravel())
        lists = scores.select(SHINGLES).collect().to_series().gather(positions[rows])
        lengths = lists.list.len().fill_null(0).to_numpy().astype(np.int64)
        values = lists.explode().drop_nulls().to_numpy().astype(np.uint64, copy=False)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        local = np.searchsorted(rows, pairs)
        return exact_jaccard_pairs(values, offsets, local)
