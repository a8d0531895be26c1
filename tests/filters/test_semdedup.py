import numpy as np
import polars as pl
import pytest

from alignforge.step import shard_decisions
from filters.semdedup import DUPLICATE, SemDedup, greedy_dedup


class HashEmbedder:
    """Deterministic bag-of-words vectors (for search/selection logic; real model tested below)."""
    dim = 64

    def __init__(self):
        self.calls = 0

    def embed(self, texts):
        self.calls += 1
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, t in enumerate(texts):
            for w in t.lower().split():
                out[i, hash(w) % self.dim] += 1.0
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.where(norms == 0, 1, norms)


def brute_force(emb, threshold):
    kept = []
    for i in range(len(emb)):
        if not kept or (emb[kept] @ emb[i]).max() < threshold:
            kept.append(i)
    return kept


@pytest.mark.parametrize("block,kept_slice", [(1, 1), (7, 5), (4096, 65536)])
def test_blocked_greedy_equals_brute_force(block, kept_slice):
    rng = np.random.default_rng(0)
    base = rng.normal(size=(200, 16)).astype(np.float32)
    emb = np.concatenate([base, base[:80] + 0.1 * rng.normal(size=(80, 16)).astype(np.float32)])
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    emb = emb[rng.permutation(len(emb))]
    keep, best, best_of = greedy_dedup(emb, 0.9, block, kept_slice)
    assert list(np.flatnonzero(keep)) == brute_force(emb, 0.9)
    for i in np.flatnonzero(~keep):
        assert keep[best_of[i]] and best_of[i] < i and emb[i] @ emb[best_of[i]] == pytest.approx(best[i], abs=1e-5)
        assert best[i] >= 0.9


def test_real_minilm_drops_paraphrases_and_keeps_by_score():
    df = pl.DataFrame({
        "id": ["a", "b", "c", "d"],
        "instruction": ["How do I bake bread at home?", "how do I bake bread at home", "Explain how vaccines work.",
                        "Write a haiku about autumn leaves."],
        "quality": [1.0, 5.0, 3.0, 2.0],
    })
    out = SemDedup(threshold=0.95).run(df)
    assert out["keep"].to_list() == [True, False, True, True]
    assert out["drop_reason"][1] == DUPLICATE and out["semdedup_duplicate_of"][1] == "a"
    assert out["semdedup_max_sim"][1] >= 0.95
    by_score = SemDedup(threshold=0.95, order_by="quality").run(df)
    assert by_score["keep"].to_list() == [False, True, True, True]


def test_threshold_rerun_reuses_embeddings_and_sharding_does_not_matter():
    emb = HashEmbedder()
    texts = ["red apple pie", "apple pie red", "blue sky today", "green grass field", "field of green grass",
             "sky blue today", "unique words only"]
    df = pl.DataFrame({"id": [f"r{i}" for i in range(len(texts))], "instruction": texts})
    f = SemDedup(threshold=0.99, embedder=emb)
    shards = [df[:3], df[3:]]
    scored = [f(s) for s in shards]
    assert emb.calls == 2
    strict = f.select(pl.concat(scored).lazy())
    loose = SemDedup(threshold=0.5, embedder=emb).select(pl.concat(scored))
    assert emb.calls == 2  # select never embeds
    assert loose["_reason"].is_not_null().sum() > strict["_reason"].is_not_null().sum() == 2
    out = pl.concat([f.mark(s, d) for s, d in zip(scored, shard_decisions(strict, [3, 4]))])
    assert out.sort("id")["keep"].to_list() == f.run(df).sort("id")["keep"].to_list()


def test_bad_rows_and_empty_dataset():
    df = pl.DataFrame({"id": ["a", "b", "c", "d"], "instruction": ["", None, "word " * 200_000, "word"]})
    out = SemDedup(embedder=HashEmbedder()).run(df)
    assert out["drop_reason"].to_list() == ["empty_text", "empty_text", None, DUPLICATE]
    empty = pl.DataFrame({"id": [], "instruction": []}, schema={"id": pl.Utf8, "instruction": pl.Utf8})
    assert SemDedup(embedder=HashEmbedder()).run(empty).height == 0


def test_texts_without_words_are_never_semantic_duplicates_of_each_other():
    """Issue 8 kind 2: distinct symbol-only texts embed alike ([UNK]); they must all be kept."""
    import polars as pl

    from filters.semdedup import SemDedup

    df = pl.DataFrame({"id": [f"r{i}" for i in range(5)],
                       "instruction": ["🙂🙂🙂", "😀😀", "???", "!!!", "How do plants make food from sunlight?"]})
    step = SemDedup()
    out = step.run(df)
    assert out["keep"].to_list() == [True] * 5
    scored = SemDedup()(df)
    assert scored["semdedup_embedding"].null_count() == 4  # symbol-only rows are not compared at all
