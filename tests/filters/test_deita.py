"""Deita scorers and the diversity filter.

Unit tests script the engine's logprobs (parsing, flags, multi-turn maths, greedy semantics); the
`engine`-marked test checks the real vLLM scores against a transformers forward pass."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest

from engines.base import Completion, GenerationResult
from filters.deita import (
    COMPLEXITY_TEMPLATE,
    DROP_OVER_BUDGET,
    DROP_REDUNDANT,
    DROP_UNSCORED,
    QUALITY_TEMPLATE,
    DeitaComplexity,
    DeitaError,
    DeitaFilter,
    DeitaQuality,
    deita_select,
    expected_score,
    score_token_ids,
)


class CharTokenizer:
    """One token per character (id = code point): digits are single tokens."""

    unk_token_id = 0

    def encode(self, text, add_special_tokens=True):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids)

    def convert_tokens_to_ids(self, token):
        return ord(token) if len(token) == 1 else self.unk_token_id


class ScoreScriptEngine:
    """Returns, for each prompt, the logprob dict `script(prompt)` at the first position (top-k path)."""

    model_id = "scripted-deita"

    def __init__(self, script):
        self.script = script
        self.tokenizer = CharTokenizer()
        self.calls: list[list[str]] = []

    def complete(self, prompts, sampling, *, desc=None):
        self.calls.append(list(prompts))
        assert sampling.max_tokens == 1 and sampling.logprobs >= 6
        out = []
        for p in prompts:
            lps = self.script(p)
            top = max(lps, key=lps.get)
            out.append(GenerationResult(prompt=p, completions=[Completion(text=chr(top), token_ids=[top], logprobs=[lps])]))
        return out


def digits(*logprobs):
    """{token id of "1".."6": logprob}; None leaves that digit out of the returned top-k."""
    return {ord(str(k + 1)): lp for k, lp in enumerate(logprobs) if lp is not None}


def reference_score(logprobs):
    w = [math.exp(x) for x in logprobs]
    return sum((k + 1) * v for k, v in enumerate(w)) / sum(w)


def test_expected_score_is_softmax_weighted_mean():
    assert expected_score([0.0] * 6) == pytest.approx(3.5)
    assert expected_score([-1e9, -1e9, -1e9, -1e9, -1e9, 0.0]) == pytest.approx(6.0)
    lps = [-3.0, -1.0, -0.5, -2.0, -4.0, -6.0]
    assert expected_score(lps) == pytest.approx(reference_score(lps))
    # shift invariance: logprobs and logits give the same softmax
    assert expected_score([x - 7.3 for x in lps]) == pytest.approx(reference_score(lps))
    assert expected_score([None, 0, 0, 0, 0, 0]) is None


def test_missing_score_token_is_flagged_not_three():
    def script(prompt):
        if "rare" in prompt:  # "4" falls outside the top-k
            return {**digits(-1.0, -2.0, -3.0, None, -2.5, -2.2), ord("x"): -0.1}
        return digits(-1.0, -2.0, -3.0, -1.5, -2.5, -2.2)

    df = pl.DataFrame({"id": ["a", "b", "c"], "instruction": ["common one", "a rare one", "common two"],
                       "response": ["r1", "r2", "r3"]})
    step = DeitaComplexity(engine=ScoreScriptEngine(script))
    out = step(df)
    assert out["deita_complexity"].to_list()[1] is None
    assert out["deita_complexity_turns"].to_list()[1] == [None]
    assert out["deita_missing_tokens"].to_list() == [0, 1, 0]
    assert out["deita_complexity"][0] == pytest.approx(reference_score([-1.0, -2.0, -3.0, -1.5, -2.5, -2.2]))
    assert 3.0 not in out["deita_complexity"].drop_nulls().to_list()
    assert step.stats["rows_missing_tokens"] == 1 and step.stats["missing_tokens"] == 1
    assert step.stats["logprob_source"] == "top_k"
    # annotate, never delete
    assert out.height == 3 and out["keep"].to_list() == [True, True, True]


def test_prompts_are_the_released_formats_in_one_engine_call():
    engine = ScoreScriptEngine(lambda p: digits(0, 0, 0, 0, 0, 0))
    df = pl.DataFrame({"id": ["a", "b"], "instruction": ["Q1", "Q2"], "response": ["A1", "A2"]})
    DeitaComplexity(engine=engine)(df)
    DeitaQuality(engine=engine)(df)
    assert len(engine.calls) == 2
    assert engine.calls[0] == [COMPLEXITY_TEMPLATE.format(instruction="Q1"), COMPLEXITY_TEMPLATE.format(instruction="Q2")]
    assert engine.calls[1][1] == QUALITY_TEMPLATE.format(instruction="Q2", output="A2")
    assert engine.calls[0][0] == ("You are a helpful assistant. Please identify the complexity score of the following "
                                  "user query. \n##Query: Q1  \n##Complexity: ")
    assert engine.calls[1][0] == ("You are a helpful assistant. Please identify the quality score of the Response "
                                  "corresponding to the Question. \n #Question#:\nQ1\n#Response#:\nA1 \n##Quality: ")


def test_multi_turn_scores_and_evol_score():
    # The logprob of "6" encodes which turn is being scored, so every per-turn score is known.
    table = {"u1": -1.0, "u2": -3.0, "u3": -0.2, "a1": -2.0, "a2": -0.5, "a3": -4.0}

    def script(prompt):
        if "##Quality" in prompt:
            key = next(k for k in ("a1", "a2", "a3") if f"#Response#:\n{k}" in prompt)
        else:
            key = next(k for k in ("u1", "u2", "u3") if f"##Query: {k} " in prompt)
        return digits(-2.0, -2.0, -2.0, -2.0, -2.0, table[key])

    def score(key):
        return reference_score([-2.0] * 5 + [table[key]])

    msgs = pl.Series("messages", [
        [{"role": "system", "content": "be nice"}, {"role": "user", "content": "u1"},
         {"role": "assistant", "content": "a1"}, {"role": "user", "content": "u2"},
         {"role": "assistant", "content": "a2"}],
        [{"role": "user", "content": "u3"}, {"role": "assistant", "content": "a3"}],
    ])
    df = pl.DataFrame({"id": ["m", "s"]}).with_columns(msgs)
    engine = ScoreScriptEngine(script)
    out = DeitaQuality(engine=engine)(DeitaComplexity(engine=engine)(df))
    assert [len(c) for c in engine.calls] == [3, 3]  # one call per step over all turns of the shard
    c = out["deita_complexity_turns"].to_list()
    q = out["deita_quality_turns"].to_list()
    assert c[0] == pytest.approx([score("u1"), score("u2")]) and c[1] == pytest.approx([score("u3")])
    assert q[0] == pytest.approx([score("a1"), score("a2")]) and q[1] == pytest.approx([score("a3")])
    assert out["deita_complexity"][0] == pytest.approx((score("u1") + score("u2")) / 2)
    assert out["deita_quality"][1] == pytest.approx(score("a3"))
    evol = out["deita_evol_score"].to_list()
    assert evol[0] == pytest.approx(score("u1") * score("a1") + score("u2") * score("a2"))
    assert evol[1] == pytest.approx(score("u3") * score("a3"))
    first = DeitaComplexity(engine=engine, aggregate="first")(df)
    assert first["deita_complexity"][0] == pytest.approx(score("u1"))


def test_exact_readers_are_preferred_when_the_engine_offers_them():
    expected = reference_score([-1.0 - 0.1 * k for k in range(6)])

    class ByIdEngine(ScoreScriptEngine):
        def token_logprobs(self, prompts, token_ids):
            self.calls.append(list(prompts))
            return [{t: -1.0 - 0.1 * k for k, t in enumerate(token_ids)} for _ in prompts]

    class ByTextEngine(ScoreScriptEngine):
        def next_token_logprobs(self, prompts, candidates):
            self.calls.append(list(prompts))
            return [{c: -1.0 - 0.1 * k for k, c in enumerate(candidates)} for _ in prompts]

    df = pl.DataFrame({"id": ["a"], "instruction": ["q"]})
    for engine_type, source in ((ByIdEngine, "token_logprobs"), (ByTextEngine, "next_token_logprobs")):
        engine = engine_type(lambda p: {})  # top-k path would find nothing
        step = DeitaComplexity(engine=engine)
        out = step(df)
        assert step.stats["logprob_source"] == source and out["deita_missing_tokens"][0] == 0
        assert out["deita_complexity"][0] == pytest.approx(expected)

    class SentencePieceLike(CharTokenizer):
        """Encodes "1" as a prefix-space piece + "1" (Llama): the text method could pick the wrong id."""

        def encode(self, text, add_special_tokens=True):
            return [0x2581, *super().encode(text)] if text.isdigit() else super().encode(text)

    engine = ByTextEngine(lambda p: digits(-1.0, -1.1, -1.2, -1.3, -1.4, -1.5))
    engine.tokenizer = SentencePieceLike()
    step = DeitaComplexity(engine=engine)
    out = step(df)
    assert step.stats["logprob_source"] == "top_k"
    assert out["deita_complexity"][0] == pytest.approx(expected)


def test_long_prompts_are_cut_inside_the_user_text_not_the_template_tail():
    engine = ScoreScriptEngine(lambda p: digits(0, 0, 0, 0, 0, 0))
    step = DeitaQuality(engine=engine, max_prompt_tokens=300)
    step(pl.DataFrame({"id": ["a"], "instruction": ["q" * 50], "response": ["r" * 5000]}))
    prompt = engine.calls[0][0]
    assert len(prompt) <= 300 and prompt.endswith("r \n##Quality: ") and ("q" * 50) in prompt
    assert step.stats["truncated_prompts"] == 1


def test_bad_inputs_raise_clear_errors():
    engine = ScoreScriptEngine(lambda p: digits(0, 0, 0, 0, 0, 0))
    with pytest.raises(DeitaError, match="needs a response"):
        DeitaQuality(engine=engine)(pl.DataFrame({"id": ["a"], "instruction": ["q"]}))
    with pytest.raises(DeitaError, match="no user turn"):
        DeitaComplexity(engine=engine)(pl.DataFrame({"id": ["a"], "messages": [[{"role": "assistant", "content": "x"}]]}))
    with pytest.raises(DeitaError, match="messages.*instruction"):
        DeitaComplexity(engine=engine)(pl.DataFrame({"id": ["a"], "text": ["q"]}))

    class WordTokenizer(CharTokenizer):
        def convert_tokens_to_ids(self, token):
            return 0

        def encode(self, text, add_special_tokens=True):
            return [1, 2] if text else []

    with pytest.raises(DeitaError, match="not a single token"):
        score_token_ids(WordTokenizer())


# ---------------------------------------------------------------------------------------------
# Diversity selection
# ---------------------------------------------------------------------------------------------

def brute_force_select(vectors, scores, ids, budget, threshold):
    """The rule written as plainly as possible: one candidate at a time against everything kept."""
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    order = sorted(range(len(ids)), key=lambda i: (-scores[i], ids[i]))
    kept: list[int] = []
    reasons = {}
    for i in order:
        if budget is not None and len(kept) >= budget:
            reasons[i] = DROP_OVER_BUDGET
        elif kept and max(float(unit[i] @ unit[j]) for j in kept) > threshold:
            reasons[i] = DROP_REDUNDANT
        else:
            kept.append(i)
    return kept, reasons


def clustered(rng, n, d=8, centers=6, noise=0.25):
    c = rng.normal(size=(centers, d))
    return (c[rng.integers(0, centers, n)] + noise * rng.normal(size=(n, d))).astype(np.float32)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("block_size", [1, 3, 16, 1000])
def test_greedy_matches_brute_force(seed, block_size):
    rng = np.random.default_rng(seed)
    n = 120
    vectors = clustered(rng, n)
    scores = rng.integers(0, 10, n).astype(float)  # many ties -> id order decides
    ids = [f"r{int(k):04d}" for k in rng.permutation(n)]
    budget = [None, 5, 20, 1000][seed % 4]
    df = pl.DataFrame({"id": ids, "deita_evol_score": scores})
    got = deita_select(df, budget, 0.9, embeddings=vectors, block_size=block_size)
    kept, reasons = brute_force_select(vectors, scores, ids, budget, 0.9)
    assert sorted(np.flatnonzero(got["keep"].to_numpy()).tolist()) == sorted(kept)
    assert got["keep"].sum() == (len(kept) if budget is None else min(budget, len(kept)))
    for i, reason in reasons.items():
        assert got["drop_reason"][i] == reason
    assert got["drop_reason"].filter(got["keep"]).null_count() == got["keep"].sum()
    # redundancy exists in this data, so the test exercises rejections
    assert DROP_REDUNDANT in got["drop_reason"].to_list()
    kept_sims = got.filter(pl.col("keep"))["deita_max_sim"].drop_nulls()
    assert (kept_sims <= 0.9).all()
    assert (got.filter(pl.col("drop_reason") == DROP_REDUNDANT)["deita_max_sim"] > 0.9).all()


def test_inside_a_block_candidates_see_earlier_accepted_ones():
    # Three near-identical rows in one block: only the best survives even with nothing kept before.
    v = np.array([[1, 0], [1, 0.01], [0, 1], [1, 0.02]], dtype=np.float32)
    df = pl.DataFrame({"id": ["a", "b", "c", "d"], "deita_evol_score": [4.0, 3.0, 2.0, 1.0]})
    got = deita_select(df, None, 0.9, embeddings=v, block_size=64)
    assert got["keep"].to_list() == [True, False, True, False]
    assert got["drop_reason"].to_list() == [None, DROP_REDUNDANT, None, DROP_REDUNDANT]
    assert got["deita_max_sim"][0] is None and got["deita_rank"].to_list() == [0, 1, 2, 3]


def test_ties_budget_and_unscored_rows():
    v = np.eye(5, dtype=np.float32)  # all orthogonal: only the budget limits
    df = pl.DataFrame({"id": ["e", "d", "c", "b", "a"], "deita_evol_score": [1.0, 2.0, 2.0, 2.0, None]})
    got = deita_select(df, 2, embeddings=v)
    # ties on 2.0 broken by id: b, c kept; d over budget; e over budget; a has no score
    assert dict(zip(got["id"], got["drop_reason"])) == {
        "e": DROP_OVER_BUDGET, "d": DROP_OVER_BUDGET, "c": None, "b": None, "a": DROP_UNSCORED}
    assert deita_select(df, 0, embeddings=v)["keep"].sum() == 0
    # same input, shuffled rows -> same decisions per id
    perm = [3, 0, 4, 2, 1]
    again = deita_select(df[perm], 2, embeddings=v[perm])
    assert dict(zip(again["id"], again["keep"])) == dict(zip(got["id"], got["keep"]))


def test_select_rejects_zero_embeddings_and_missing_columns():
    df = pl.DataFrame({"id": ["a", "b"], "deita_evol_score": [1.0, 2.0]})
    with pytest.raises(DeitaError, match="zero or not finite"):
        deita_select(df, 1, embeddings=np.array([[1.0, 0.0], [0.0, 0.0]]))
    with pytest.raises(DeitaError, match="deita_evol_score"):
        deita_select(df.drop("deita_evol_score"), 1, embeddings=np.eye(2))


# ---------------------------------------------------------------------------------------------
# Real engine: alignforge's scores == the formula on a transformers forward pass
# ---------------------------------------------------------------------------------------------

ROWS = [
    ("What is 2 + 2?", "4."),
    ("Write a sonnet about the sea in strict iambic pentameter, with a volta after line 8.",
     "Upon the grey and restless water's face..."),
    ("hi", "Hello! How can I help you today?"),
    ("Explain quantum entanglement twice: once to a five-year-old and once to a physicist, "
     "then compare the two explanations.", "Imagine two magic coins..."),
    ("Translate 'good morning' into French, Spanish and German.", "Bonjour, Buenos días, Guten Morgen."),
]


def transformers_scores(model_dir, prompts):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = score_token_ids(tokenizer)
    out, token_lists = [], []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the engine's CPU worker spins on the cores: oversubscription is 10x slower
    try:
        return _forward_scores(model, tokenizer, ids, prompts, out, token_lists)
    finally:
        torch.set_num_threads(threads)


def _forward_scores(model, tokenizer, ids, prompts, out, token_lists):
    import torch

    with torch.no_grad():
        for p in prompts:
            enc = tokenizer.encode(p, return_tensors="pt")  # default special tokens, as the official scorer
            token_lists.append(enc[0].tolist())
            logits = model(enc).logits[0, -1, ids]
            probs = torch.softmax(logits.double(), dim=-1)
            out.append(float((probs * torch.arange(1, 7, dtype=torch.float64)).sum()))
    return out, token_lists


@pytest.mark.engine
def test_scores_match_a_transformers_forward_pass(engine):
    df = pl.DataFrame({"id": [f"r{i}" for i in range(len(ROWS))],
                       "instruction": [r[0] for r in ROWS], "response": [r[1] for r in ROWS]})
    complexity, quality = DeitaComplexity(engine=engine), DeitaQuality(engine=engine)
    out = quality(complexity(df))
    assert complexity.stats["rows_missing_tokens"] == 0 and quality.stats["rows_missing_tokens"] == 0
    # the exact reader (vLLM logprob_token_ids): a score token can't be missing
    assert complexity.stats["logprob_source"] in ("token_logprobs", "next_token_logprobs")
    prompts_c = [COMPLEXITY_TEMPLATE.format(instruction=i) for i, _ in ROWS]
    prompts_q = [QUALITY_TEMPLATE.format(instruction=i, output=r) for i, r in ROWS]
    from engines.embedded import resolve_model

    model_dir = resolve_model(None)  # the fixture's engine runs the embedded model
    ref_c, toks = transformers_scores(model_dir, prompts_c)
    ref_q, _ = transformers_scores(model_dir, prompts_q)
    # same tokenisation as the engine (BOS handling included)
    assert [engine.tokenizer.encode(p) for p in prompts_c] == toks
    assert out["deita_complexity"].to_list() == pytest.approx(ref_c, abs=1e-4)
    assert out["deita_quality"].to_list() == pytest.approx(ref_q, abs=1e-4)
    assert all(1.0 <= s <= 6.0 for s in ref_c + ref_q)
    # not a constant: the scorer tells the prompts apart
    assert max(ref_c) - min(ref_c) > 1e-3
    evol = out["deita_evol_score"].to_list()
    assert evol == pytest.approx([c * q for c, q in zip(ref_c, ref_q)], abs=1e-3)

    class TopKOnly:  # the Engine protocol's generic path: complete(logprobs=k)
        tokenizer = engine.tokenizer
        model_id = engine.model_id

        def complete(self, prompts, sampling, *, desc=None):
            return engine.complete(prompts, sampling, desc=desc)

    topk = DeitaComplexity(engine=TopKOnly())
    via_topk = topk(df)
    assert topk.stats["logprob_source"] == "top_k"
    got = via_topk["deita_complexity"].to_list()  # a digit outside the top-20 would be null + flagged
    assert [g for g, m in zip(got, via_topk["deita_missing_tokens"]) if m == 0] == pytest.approx(
        [r for r, m in zip(ref_c, via_topk["deita_missing_tokens"]) if m == 0], abs=1e-4)
    assert all((g is None) == (m > 0) for g, m in zip(got, via_topk["deita_missing_tokens"]))


def test_deita_filter_scores_selects_and_marks_across_shards(monkeypatch):
    """GlobalFilter contract: score each shard, select over all, mark each shard's slice."""
    from alignforge.step import shard_decisions

    def script(prompt):  # longer instructions look more complex; every response scores alike
        if "##Complexity" in prompt:
            n = len(prompt.split("##Query: ")[1])
            return digits(-2.0, -2.0, -2.0, -2.0, -2.0, -4.0 + n / 10)
        return digits(0, 0, 0, 0, 0, 0)

    engine = ScoreScriptEngine(script)
    filt = DeitaFilter(engine=engine, budget=2)
    embed = {"alpha": [1.0, 0.0], "alpha!": [1.0, 0.05], "beta": [0.0, 1.0], "gamma": [0.7, -0.7]}
    import engines.embedder as embedder_module

    class FakeEmbedder:
        def embed(self, texts):
            return np.array([embed[t.split("\n")[0]] for t in texts], dtype=np.float32)

    monkeypatch.setattr(embedder_module, "get_embedder", lambda *a, **k: FakeEmbedder())
    shards = [pl.DataFrame({"id": ["a", "b"], "instruction": ["alpha!", "beta"], "response": ["x", "y"]}),
              pl.DataFrame({"id": ["c", "d"], "instruction": ["alpha", "gamma"], "response": ["z", "w"]})]
    scored = [filt(s) for s in shards]
    assert len(engine.calls) == 4  # one complexity + one quality call per shard
    decisions = filt.select(pl.concat([s.select("id", *filt.score_columns) for s in scored]))
    marked = pl.concat([filt.mark(s, d) for s, d in zip(scored, shard_decisions(decisions, [2, 2]))])
    # evol order: alpha! (a) > alpha (c) = gamma (d), tie by id > beta (b). c is a near-copy of a
    # (cos 0.999 > 0.9); d is kept; the budget of 2 is then full, so b is over budget.
    reasons = dict(zip(marked["id"], marked["drop_reason"]))
    assert reasons == {"a": None, "d": None, "c": DROP_REDUNDANT, "b": DROP_OVER_BUDGET}
    assert marked["keep"].sum() == 2 and "deita_max_sim" in marked.columns


def test_lm_embeddings_last_token_ignores_padding():
    """Official Deita embedding: batching (right padding) must not change a row's vector."""
    from filters.deita import lm_embeddings

    texts = ["A short one.", "A much longer text that forces the first one to be padded in the batch."]
    batched = lm_embeddings(texts, batch_size=2)
    alone = lm_embeddings(texts[:1], batch_size=1)
    assert batched.shape == (2, alone.shape[1]) and alone.shape[1] > 100
    np.testing.assert_allclose(batched[0], alone[0], rtol=1e-4, atol=1e-4)
    assert not np.allclose(batched[0], batched[1], atol=1e-3)
    mean = lm_embeddings(texts, pooling="mean", batch_size=2)
    np.testing.assert_allclose(mean[0], lm_embeddings(texts[:1], pooling="mean")[0], rtol=1e-4, atol=1e-4)
