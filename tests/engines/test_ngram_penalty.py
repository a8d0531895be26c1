"""N-gram frequency penalties: the bookkeeping alone, the vLLM processor on a fake batch, and greedy
decoding on the real engine (penalty changes nothing before the first repeated n-gram)."""

from __future__ import annotations

import pytest

from engines.base import Sampling
from engines.ngram_penalty import NGRAM_PENALTY_KEY, NGramCounts, parse_penalties, word_start_ids


def counts(tokens, penalties=((3, 1.0), (4, 2.0))):
    c = NGramCounts(penalties)
    c.extend(tokens)
    return c


# ------------------------------------------------------------------ bookkeeping

def test_trigram_penalty_counts_the_completions_of_the_current_prefix():
    c = counts([1, 2, 3, 1, 2], [(3, 1.0)])
    assert c.bias() == {3: -1.0}  # "1 2" was followed by 3 once
    c.extend([3, 1, 2])
    assert c.bias() == {3: -2.0}  # ... now twice


def test_trigram_and_fourgram_add_up():
    c = counts([1, 2, 3, 1, 2, 3])
    # trigram prefix (2, 3) -> 1 once (-1.0); 4-gram prefix (1, 2, 3) -> 1 once (-2.0)
    assert c.bias() == {1: -3.0}


def test_nothing_before_an_ngram_repeats():
    assert counts([1, 2, 3, 4, 5]).bias() == {}
    assert counts([]).bias() == {}
    assert counts([7]).bias() == {}


def test_unigram_is_a_plain_frequency_penalty():
    assert counts([4, 4, 5], [(1, 0.5)]).bias() == {4: -1.0, 5: -0.5}


def test_only_eligible_tokens_are_penalised():
    c = counts([1, 2, 3, 1, 2, 9, 1, 2], [(3, 1.0)])
    assert c.bias() == {3: -1.0, 9: -1.0}
    assert c.bias(eligible={9}) == {9: -1.0}


def test_zero_penalties_are_ignored_and_bad_n_rejected():
    assert NGramCounts([(3, 0.0)]).penalties == ()
    with pytest.raises(ValueError, match="n >= 1"):
        NGramCounts([(0, 1.0)])


@pytest.mark.parametrize("value, ok", [([[3, 1.0], [4, 2.0]], True), ([[3, -1.0]], False), ([3, 1.0], False),
                                       ("3:1", False), ([[0, 1.0]], False)])
def test_parse_penalties(value, ok):
    if ok:
        assert parse_penalties(value) == [(3, 1.0), (4, 2.0)]
    else:
        with pytest.raises(ValueError, match=NGRAM_PENALTY_KEY):
            parse_penalties(value)


class _Vocab:
    def __init__(self, vocab):
        self.vocab = vocab

    def get_vocab(self):
        return self.vocab


def test_word_starts_from_bpe_and_sentencepiece_marks():
    vocab = {"Ġthe": 0, "the": 1, "Ġ": 2, "ĠĠ": 3, "▁word": 4, "ing": 5, "Ġ,": 6}
    assert word_start_ids(_Vocab(vocab)) == {0, 4, 6}
    assert word_start_ids(_Vocab({"a": 0, "b": 1})) is None  # no marks: every token eligible


def test_sampling_default_is_neutral():
    assert Sampling().ngram_penalties == ()


# ------------------------------------------------------------------ the vLLM processor (fake batch)

@pytest.mark.engine
def test_processor_applies_penalties_to_its_rows_only():
    import torch
    from vllm import SamplingParams
    from vllm.v1.sample.logits_processor import BatchUpdate

    from engines import ngram_penalty

    proc = ngram_penalty.NGramPenaltyLogitsProcessor(None, torch.device("cpu"), False)
    proc._eligible = None  # every token eligible (no tokenizer here)
    out0, out1 = [5, 6, 7, 5, 6], [5, 6, 7, 5, 6]
    proc.update_state(BatchUpdate(batch_size=2, removed=[], moved=[], added=[
        (0, SamplingParams(extra_args={NGRAM_PENALTY_KEY: [[3, 1.0]]}), [1, 2], out0),
        (1, SamplingParams(), [1, 2], out1)]))
    logits = proc.apply(torch.zeros(2, 10))
    assert logits[0, 7].item() == -1.0 and logits[0].sum().item() == -1.0
    assert logits[1].abs().sum().item() == 0.0  # a request without penalties is untouched
    out0 += [7, -1]  # the engine's live list grows; -1 = async placeholder, not counted yet
    logits = proc.apply(torch.zeros(2, 10))
    assert logits[0, 5].item() == -1.0  # (6, 7) was followed by 5 once; the placeholder is ignored
    proc.update_state(BatchUpdate(batch_size=1, removed=[0], moved=[], added=[]))
    assert proc.apply(torch.zeros(2, 10)).abs().sum().item() == 0.0
    with pytest.raises(ValueError):
        ngram_penalty.NGramPenaltyLogitsProcessor.validate_params(
            SamplingParams(extra_args={NGRAM_PENALTY_KEY: [[3, -2.0]]}))


# ------------------------------------------------------------------ real engine

def _repeated_trigrams(tokens):
    grams = [tuple(tokens[i:i + 3]) for i in range(len(tokens) - 2)]
    return len(grams) - len(set(grams))


def test_engine_maps_the_field(engine):
    params = engine.sampling_params(Sampling(ngram_penalties=((3, 1.0), (4, 2.0))))
    assert params.extra_args[NGRAM_PENALTY_KEY] == [[3, 1.0], [4, 2.0]]
    assert engine.sampling_params(Sampling()).extra_args is None


def test_penalty_changes_greedy_text_only_after_a_repeat(engine):
    prompt = "Repeat after me: red apple, green pear, red apple, green pear, red apple, green pear,"
    plain = engine.complete([prompt], Sampling(temperature=0.0, max_tokens=48))[0].completions[0].token_ids
    penalised = engine.complete([prompt], Sampling(temperature=0.0, max_tokens=48,
                                                   ngram_penalties=((3, 1.0), (4, 2.0))))[0].completions[0].token_ids
    eligible = word_start_ids(engine.tokenizer)
    # First position where the token greedy picked is itself penalised: before it, penalties only
    # lower other tokens, so greedy must choose the same.
    c, first = NGramCounts([(3, 1.0), (4, 2.0)]), len(plain)
    for j, token in enumerate(plain):
        if token in c.bias(eligible):
            first = j
            break
        c.extend([token])
    assert first < len(plain), "the prompt should make the model repeat itself"
    assert penalised[:first] == plain[:first]
    assert penalised != plain
    assert _repeated_trigrams(penalised) < _repeated_trigrams(plain)
