import random

import numpy as np
import polars as pl
import pytest

from alignforge.step import shard_decisions
from alignforge.step import StepError
from filters.minhash import DUPLICATE, MinHashDedup, exact_jaccard_pairs, optimal_bands
from schemas import SchemaError

WORDS = [f"w{i}" for i in range(3000)]


def corpus(n_orig=120, seed=0):
    """Random docs plus near copies (1 substituted word in ~60) and exact copies."""
    rng = random.Random(seed)
    docs = [" ".join(rng.choices(WORDS, k=60)) for _ in range(n_orig)]
    pairs = []
    for i in range(0, n_orig, 3):
        words = docs[i].split()
        words[rng.randrange(60)] = "edited"
        docs.append(" ".join(words))
        pairs.append((i, len(docs) - 1))
    docs.append(docs[1])
    pairs.append((1, len(docs) - 1))
    ids = [f"id{rng.randrange(10**9):09d}" for _ in docs]
    return pl.DataFrame({"id": ids, "instruction": docs}), pairs


def exact_jaccard(a, b, n=3):
    def sh(t):
        w = t.lower().split()
        return {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}
    sa, sb = sh(a), sh(b)
    return len(sa & sb) / len(sa | sb)


def test_band_split_leans_to_recall():
    bands, rows = optimal_bands(0.8, 128)
    assert bands * rows <= 128
    p_at_threshold = 1 - (1 - 0.8**rows) ** bands
    assert p_at_threshold > 0.9  # datasketch's symmetric choice (9x13) gives ~0.5 here
    assert MinHashDedup(bands=9, rows=13).config.band_split() == (9, 13)
    with pytest.raises(ValueError):
        MinHashDedup(bands=20, rows=13)


def test_finds_planted_duplicates_and_keeps_lowest_id():
    df, pairs = corpus()
    out = MinHashDedup().run(df)
    ids, cluster = out["id"].to_list(), out["minhash_cluster"].to_list()
    for a, b in pairs:
        assert exact_jaccard(df["instruction"][a], df["instruction"][b]) >= 0.8
        assert cluster[a] == cluster[b], (a, b)
        assert cluster[a] == min(ids[a], ids[b])
    dropped = out.filter(~pl.col("keep"))
    assert dropped.height == len(pairs)
    assert set(dropped["drop_reason"]) == {DUPLICATE}
    # kept rows are exactly the cluster representatives
    assert (out.filter(pl.col("keep"))["id"] == out.filter(pl.col("keep"))["minhash_cluster"]).all()


def test_signatures_match_datasketch_estimates_in_spirit():
    from datasketch import MinHash

    a = " ".join(random.Random(1).choices(WORDS, k=200))
    words = a.split()
    b = " ".join(words[:150] + random.Random(2).choices(WORDS, k=50))
    f = MinHashDedup(num_perm=256)
    sig = f.signatures(pl.Series([a, b]))
    ours = float((sig[0] == sig[1]).mean())
    ds = []
    for t in (a, b):
        m = MinHash(num_perm=256, seed=1)
        w = t.split()
        for i in range(len(w) - 2):
            m.update(" ".join(w[i:i + 3]).encode())
        ds.append(m)
    exact = exact_jaccard(a, b)
    assert abs(ours - exact) < 0.1 and abs(ds[0].jaccard(ds[1]) - exact) < 0.1


@pytest.mark.parametrize("n_shards", [1, 3, 7])
def test_clusters_independent_of_sharding_and_order(n_shards):
    df, _ = corpus()
    reference = MinHashDedup().run(df).sort("id")
    shuffled = df.sample(fraction=1.0, shuffle=True, seed=n_shards)
    f = MinHashDedup()
    shards = [shuffled[i::n_shards] for i in range(n_shards)]
    scored = [f(s) for s in shards]
    decisions = f.select(pl.concat(scored).lazy())
    marked = [f.mark(s, d) for s, d in zip(scored, shard_decisions(decisions, [s.height for s in scored]))]
    out = pl.concat(marked).sort("id")
    assert out["minhash_cluster"].to_list() == reference["minhash_cluster"].to_list()
    assert out["keep"].to_list() == reference["keep"].to_list()


def test_new_threshold_reuses_signatures():
    df, _ = corpus()
    f = MinHashDedup(threshold=0.8)
    scored = f(df)
    loose = MinHashDedup(threshold=0.5, bands=32, rows=4)
    assert loose.score_fingerprint("x") == f.score_fingerprint("x")  # same stored scores
    d_loose = loose.select(scored.select("id", "minhash_signature", "minhash_shingles"))
    d_strict = f.select(scored.select("id", "minhash_signature", "minhash_shingles"))
    assert (d_loose["_reason"].is_not_null().sum()) >= (d_strict["_reason"].is_not_null().sum())
    assert d_strict.equals(f.select(f(df)))


def test_exact_duplicate_ids_keep_one_copy_across_shards():
    df = pl.DataFrame({"id": ["same", "other"], "instruction": ["a b c d e f g", "totally unrelated text here"]})
    both = pl.concat([df, df])
    f = MinHashDedup()
    scored = [f(df), f(df)]
    dec = shard_decisions(f.select(pl.concat(scored)), [2, 2])
    out = pl.concat([f.mark(s, d) for s, d in zip(scored, dec)])
    assert out["keep"].to_list() == [True, True, False, False]
    assert both.height == 4


def test_bad_input_rows_and_empty_dataset():
    df = pl.DataFrame({"id": ["a", "b", "c", "d"],
                       "instruction": ["", None, "x " * 500_000, "short text ok"]})
    out = MinHashDedup().run(df)
    assert out["drop_reason"].to_list()[:2] == ["empty_text", "empty_text"]
    assert out["keep"].to_list()[2:] == [True, True]
    assert out["minhash_cluster"].to_list()[:2] == ["a", "b"]  # blanks do not cluster together
    empty = MinHashDedup().run(pl.DataFrame({"id": [], "instruction": []}, schema={"id": pl.Utf8, "instruction": pl.Utf8}))
    assert empty.height == 0 and "keep" in empty.columns
    binary = pl.DataFrame({"id": ["a", "b"], "instruction": [b"\xff\xfe", b"fine words here"]},
                          schema={"id": pl.Utf8, "instruction": pl.Binary})
    assert MinHashDedup().run(binary)["drop_reason"].to_list() == ["invalid_utf8", None]


def test_char_shingles_and_missing_ids():
    df = pl.DataFrame({"id": ["a", "b", "c"], "instruction": ["Hello there, world!", "hello  there, world!", "bye"]})
    out = MinHashDedup(shingle="char", ngram=4).run(df)
    assert out["keep"].to_list() == [True, False, True]
    with pytest.raises(SchemaError, match="id"):
        MinHashDedup().select(pl.DataFrame({"minhash_signature": [[1] * 128]}))


def test_conversation_view():
    from schemas import MESSAGES
    m1 = [{"role": "user", "content": "same question"}, {"role": "assistant", "content": "answer one is long and different"}]
    m2 = [{"role": "user", "content": "same question"}, {"role": "assistant", "content": "a completely other reply text"}]
    df = pl.DataFrame({"id": ["a", "b"], "messages": [m1, m2]}, schema={"id": pl.Utf8, "messages": MESSAGES})
    assert MinHashDedup(on="instruction").run(df)["keep"].to_list() == [True, False]
    assert MinHashDedup(on="conversation").run(df)["keep"].to_list() == [True, True]
    assert np.array(MinHashDedup()(df)["minhash_signature"].to_list()).shape == (2, 128)


# ---------------------------------------------------------------- issue 8, fault kind 2

def test_texts_without_word_tokens_are_not_duplicates_of_each_other():
    df = pl.DataFrame({"id": ["a", "b", "c", "d"], "instruction": ["🙂🙂🙂", "???", "!!!", "+-*/"]})
    f = MinHashDedup()
    out = f.run(df)
    assert out["keep"].to_list() == [True, True, True, True]
    assert out["drop_reason"].to_list() == [None, None, None, None]
    assert out["minhash_cluster"].to_list() == ["a", "b", "c", "d"]
    assert out["minhash_cluster_size"].to_list() == [1, 1, 1, 1]
    scored = f(df)
    assert f.stats["char_fallback"] == 4
    sig = np.array(scored["minhash_signature"].to_list())
    assert not (sig == np.iinfo(np.uint32).max).all(axis=1).any()  # no degenerate all-max signature
    assert len({tuple(s) for s in sig}) == 4


def test_symbol_texts_still_dedup_exact_and_char_near_copies():
    long = "?!?! ... --> <-- ... !?!? ~~~ +++ " * 3
    df = pl.DataFrame({"id": ["a", "b", "c", "d", "e", "f"],
                       "instruction": ["???", "???", "🙂🙂🙂", " 🙂🙂🙂 ", long, long + "=="]})
    out = MinHashDedup().run(df)
    assert out["drop_reason"].to_list() == [None, DUPLICATE, None, DUPLICATE, None, DUPLICATE]
    assert out["minhash_cluster"].to_list() == ["a", "a", "c", "c", "e", "e"]
    # A word text and a symbol text never meet, and mixed rows keep the word path unchanged.
    words = pl.DataFrame({"id": ["x", "y"], "instruction": ["the cat sat on the mat", "???"]})
    sig = MinHashDedup().signatures(words["instruction"])
    alone = MinHashDedup().signatures(pl.Series(["the cat sat on the mat"]))
    assert (sig[0] == alone[0]).all()
    assert (sig[0] == sig[1]).mean() < 0.1



# ---------------------------------------------------------------- issue 14: exact Jaccard check

def test_exact_jaccard_pairs_counts_sets_not_multisets():
    values = np.array([5, 1, 1, 9, 1, 5, 7, 9, 9, 3], dtype=np.uint64)  # rows: {1,5,9} {1,5,7,9} {3,9}
    offsets = np.array([0, 4, 8, 10])
    pairs = np.array([[0, 1], [0, 2], [1, 2], [0, 0]])
    assert exact_jaccard_pairs(values, offsets, pairs).tolist() == [3 / 4, 1 / 4, 1 / 5, 1.0]


def test_candidates_are_checked_by_exact_jaccard():
    base = " ".join(random.Random(3).choices(WORDS, k=40)).split()
    # 38 word 3-grams each; one substitution in the middle changes 3 of them: J = 35/41 = 0.854.
    above = base[:20] + ["edited"] + base[21:]
    # J = 32/44 = 0.727 (two substitutions apart).
    below = base[:10] + ["edited"] + base[11:30] + ["again"] + base[31:]
    texts = [" ".join(base), " ".join(above), " ".join(below)]
    assert abs(exact_jaccard(texts[0], texts[1]) - 35 / 41) < 1e-9
    assert exact_jaccard(texts[0], texts[2]) < 0.8 and exact_jaccard(texts[1], texts[2]) < 0.8
    df = pl.DataFrame({"id": ["a", "b", "c"], "instruction": texts})
    # Every pair is an LSH candidate with 1-row bands; only the exact check decides.
    f = MinHashDedup(bands=128, rows=1)
    decisions = f.select(f(df))
    assert f.stats["candidate_pairs"] == 3 and f.stats["verified_pairs"] == 1
    assert decisions["_reason"].to_list() == [None, DUPLICATE, None]
    scored = f(df)
    assert "minhash_shingles" in f.heavy_columns
    assert scored["minhash_shingles"].list.len().to_list() == [38, 38, 38]
    with pytest.raises(StepError, match="minhash_shingles"):
        f.select(scored.drop("minhash_shingles"))
    assert MinHashDedup(bands=128, rows=1, verify=False).select(scored.drop("minhash_shingles"))[
        "_reason"].to_list() == [None, DUPLICATE, DUPLICATE]


def test_star_clusters_never_chain():
    from filters.minhash import star_clusters

    # 0~1, 1~2 (0 and 2 not near): 1 goes with 0, 2 stays; 3~4 alone; 5~6, 5~7, 6~7: all with 5.
    pairs = np.array([[0, 1], [1, 2], [3, 4], [5, 6], [5, 7], [6, 7]])
    assert star_clusters(9, pairs).tolist() == [0, 0, 2, 3, 3, 5, 5, 5, 8]
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = 60
        pairs = np.unique(np.sort(rng.integers(0, n, size=(80, 2)), axis=1), axis=0)
        pairs = pairs[pairs[:, 0] != pairs[:, 1]]
        rep = star_clusters(n, pairs)
        paired = {tuple(p) for p in pairs.tolist()}
        kept = rep == np.arange(n)
        assert kept[rep].all()  # representatives are kept
        for row in np.flatnonzero(~kept):  # each drop rests on a pair with its kept row
            assert (min(row, rep[row]), max(row, rep[row])) in paired and rep[row] < row
        assert not any(kept[a] and kept[b] for a, b in paired)  # no duplicate pair survives


def test_near_copy_of_a_near_copy_is_kept_when_far_from_the_kept_row():
    base = " ".join(random.Random(5).choices(WORDS, k=60)).split()
    b = base[:56] + random.Random(6).choices(WORDS, k=4)  # near base (J 0.87)
    c = b[:53] + random.Random(7).choices(WORDS, k=3) + b[56:]  # near b (0.84), not near base (0.79)
    texts = [" ".join(t) for t in (base, b, c)]
    assert exact_jaccard(texts[0], texts[1]) >= 0.8 and exact_jaccard(texts[1], texts[2]) >= 0.8
    assert exact_jaccard(texts[0], texts[2]) < 0.8
    out = MinHashDedup(bands=128, rows=1).run(pl.DataFrame({"id": ["a", "b", "c"], "instruction": texts}))
    assert out["minhash_cluster"].to_list() == ["a", "a", "c"]
    assert out["keep"].to_list() == [True, False, True]


def test_window_hashes_match_the_indexed_path():
    from filters.minhash import _ngram_hashes, _window_hashes

    rng = np.random.default_rng(3)
    for n in (1, 2, 3, 5):
        lengths = rng.integers(n, n + 12, size=40)
        lengths[::7] = 0  # empty documents too
        units = rng.integers(0, 2**63, size=int(lengths.sum()), dtype=np.uint64)
        fast = _window_hashes(units, lengths, n)
        # The indexed path, forced by appending one short document (its shingle comes last).
        slow = _ngram_hashes(np.concatenate([units, units[:1]]), np.append(lengths, 1), n) if n > 1 else None
        if slow is not None:
            assert np.array_equal(fast[0], slow[0][:-1]) and np.array_equal(fast[1], slow[1][:-1])
        assert fast[1].sum() == len(fast[0]) == sum(max(x - n + 1, 0) for x in lengths)
