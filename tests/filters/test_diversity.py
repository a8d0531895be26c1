import numpy as np
import polars as pl
import pytest

from alignforge.step import StepError
from engines.scripted import ScriptedEngine
from filters.diversity import (Diversity, bootstrap_ci, comparison_markdown, distinct_n, equal_length,
                               mean_cosine_distance, paired_comparison, vendi_score)
from schemas import MESSAGES
from stages.nc_sampling import CANDIDATE_ENTRY

QUESTION = "My parents are getting old. Should I move back to my hometown to look after them, or stay in the city for my career?"
# Four answers that take different stances...
STANCES = [
    "Family comes first. Your parents raised you and now it is your duty to be with them; a career can be rebuilt, "
    "but the years you have left with them cannot.",
    "Stay where your work is. Hire professional carers and visit often; giving up your own future helps nobody, and "
    "your parents would not want that for you.",
    "Think about money and security before anything else. A steady salary in the city protects you and them, and "
    "moving back without a job is a risk you cannot afford.",
    "Ask yourself what kind of life you actually want. If the city no longer makes you happy, going home could free "
    "you to build something of your own there.",
]
# ...and four paraphrases of the first one.
PARAPHRASES = [
    STANCES[0],
    "Your parents took care of you, so now you should take care of them. Jobs come and go, but the time you still "
    "have with them does not come back.",
    "Move back home. Looking after your mother and father is your duty, and you can find work again later, while "
    "their remaining years are limited.",
    "Put your parents before your job: they raised you, and your career can wait, but the time you have with them "
    "will not.",
]
OFF_TOPIC = ["Bananas are rich in potassium and grow in warm climates.",
             "The offside rule in football is often misunderstood by new fans.",
             "Compile the kernel with make and install the modules afterwards.",
             "Saturn has more than eighty known moons orbiting it."]


def sets_frame(sets, *, methods=None, keep=None, conv=None, turns=None) -> pl.DataFrame:
    n = len(sets)
    return pl.DataFrame({
        "id": [f"s{i}" for i in range(n)],
        "conversation_id": conv or [f"c{i}" for i in range(n)],
        "turn": turns or [1] * n,
        "method": methods or ["nc"] * n,
        "prompt": pl.Series([[{"role": "user", "content": QUESTION}]] * n, dtype=MESSAGES),
        "candidates": pl.Series([[{"content": t, "score": None, "index": j} for j, t in enumerate(s)] for s in sets],
                                dtype=pl.List(CANDIDATE_ENTRY)),
        "keep": keep or [True] * n,
    })


# ---------------------------------------------------------------- pure metrics

def test_metric_edges_on_toy_vectors():
    same = np.tile(np.array([[1.0, 0.0, 0.0]], dtype=np.float32), (4, 1))
    ortho = np.eye(4, dtype=np.float32)
    assert mean_cosine_distance(same) == pytest.approx(0.0, abs=1e-6)
    assert mean_cosine_distance(ortho) == pytest.approx(1.0)
    assert vendi_score(same) == pytest.approx(1.0, abs=1e-5)
    assert vendi_score(ortho) == pytest.approx(4.0, abs=1e-5)
    with pytest.raises(ValueError):
        mean_cosine_distance(ortho[:1])


def test_distinct2_on_equal_length_truncations():
    texts = ["a b c d e f g h", "a b c x"]
    assert equal_length(texts, 32) == 4
    # Cut to 4 words each: bigrams ab bc cd | ab bc cx -> 4 unique of 6.
    assert distinct_n(texts, 2, equal_length(texts, 32)) == pytest.approx(4 / 6)
    # Without the cut the longer text alone inflates the score.
    assert distinct_n(texts, 2) > distinct_n(texts, 2, 4)
    assert distinct_n(["one"], 2) == 0.0


def test_bootstrap_ci_brackets_the_mean_and_is_seeded():
    diffs = np.random.default_rng(0).normal(0.3, 0.1, 50)
    low, high = bootstrap_ci(diffs, seed=1)
    assert low < diffs.mean() < high and high - low < 0.1
    assert bootstrap_ci(diffs, seed=1) == (low, high)
    assert np.isnan(bootstrap_ci([])[0])


# ---------------------------------------------------------------- MiniLM (offline wheel)

def test_different_stances_score_more_diverse_than_paraphrases():
    step = Diversity()
    out = step(sets_frame([STANCES, PARAPHRASES]))
    stance, para = out.to_dicts()
    # Measured with all-MiniLM-L6-v2: cosine distance 0.615 vs 0.396, Vendi 3.19 vs 2.52 (issue author,
    # other texts: 0.651 vs 0.331, 3.37 vs 2.29).
    assert stance["diversity_cosine"] > para["diversity_cosine"] + 0.1
    assert stance["diversity_vendi"] > para["diversity_vendi"] + 0.4
    assert 1.0 <= para["diversity_vendi"] < stance["diversity_vendi"] <= 4.0
    assert stance["diversity_distinct2"] > para["diversity_distinct2"]
    assert stance["diversity_on_topic"] == para["diversity_on_topic"] == 1.0
    assert step.stats["embedded_texts"] == 10  # 8 candidates + 2 prompts, one embed call


def test_off_topic_sets_look_diverse_but_fail_the_gate():
    out = Diversity(min_on_topic_rate=0.5)(sets_frame([STANCES, OFF_TOPIC]))
    on, off = out.to_dicts()
    assert off["diversity_cosine"] > on["diversity_cosine"]  # "diverse" by wandering off
    assert off["diversity_on_topic"] == 0.0 and on["diversity_on_topic"] == 1.0
    assert out["keep"].to_list() == [True, False] and out["drop_reason"].to_list() == [None, "off_topic"]
    # Default: annotate only.
    assert Diversity()(sets_frame([OFF_TOPIC]))["keep"].to_list() == [True]


def test_dropped_and_tiny_sets_get_null_metrics():
    out = Diversity()(sets_frame([STANCES, STANCES[:1], []], keep=[False, True, False]))
    assert out["diversity_cosine"].is_null().all() and out["keep"].to_list() == [False, True, False]


# ---------------------------------------------------------------- value-pole judge

def test_judge_labels_each_candidate_on_both_axes_in_one_call():
    def respond(prompt, s, i):
        reply = prompt.split("<reply>")[1].split("</reply>")[0]
        if "traditional" in s.choice:
            return "traditional" if "duty" in reply else "neither"
        return "survival" if "security" in reply else "self-expression"

    engine = ScriptedEngine(respond)
    step = Diversity(engine=engine, judge=True)
    out = step(sets_frame([STANCES, PARAPHRASES[1:3], STANCES], keep=[True, True, False]))
    assert len(engine.calls) == 1 and step.stats["judge_requests"] == 2 * (4 + 2)
    first = out.row(0, named=True)
    assert first["value_tradsec"] == ["traditional", "neither", "neither", "neither"]
    assert first["value_survself"] == ["self-expression", "self-expression", "survival", "self-expression"]
    assert (first["pole_traditional"], first["pole_secular"], first["pole_survival"], first["pole_self_expression"]) \
        == (True, False, True, True)
    assert out["pole_traditional"].to_list() == [True, True, None]
    # The judge sees the poles; sampling is a structured choice.
    assert "secular-rational" in engine.calls[0][1][0]


def test_judge_needs_an_engine():
    with pytest.raises(StepError, match="judge=true needs an engine"):
        Diversity(judge=True)(sets_frame([STANCES]))


# ---------------------------------------------------------------- paired comparison

def test_paired_comparison_pairs_by_conversation_and_turn():
    frame = pl.DataFrame({
        "conversation_id": ["a", "b", "c", "a", "b", "c", "d"],
        "turn": [1, 1, 1, 1, 1, 1, 1],
        "method": ["nc"] * 3 + ["iid"] * 4,
        "keep": [True, True, False, True, True, True, True],
        "diversity_cosine": [0.6, 0.5, None, 0.3, 0.4, 0.2, 0.9],
        "pole_traditional": [True, False, None, False, False, False, True],
    })
    table = paired_comparison(frame, resamples=500)
    rows = {r["metric"]: r for r in table.to_dicts()}
    assert rows["parse_rate"]["pairs"] == 3  # "d" has no NC partner
    assert rows["parse_rate"]["nc"] == pytest.approx(2 / 3) and rows["parse_rate"]["iid"] == 1.0
    cos = rows["diversity_cosine"]
    assert cos["pairs"] == 2 and cos["diff"] == pytest.approx(((0.6 - 0.3) + (0.5 - 0.4)) / 2)
    assert cos["ci_low"] <= cos["diff"] <= cos["ci_high"]
    assert rows["coverage_traditional"]["nc"] == 0.5 and rows["coverage_traditional"]["iid"] == 0.0
    md = comparison_markdown(table)
    assert md.splitlines()[0].startswith("| metric | pairs | NC | IID |") and "| parse_rate | 3 |" in md


def test_comparison_end_to_end_on_stage_output():
    from stages.nc_sampling import IIDCandidates, NCCandidates
    from tests.stages.test_nc_sampling import nc_engine, prompts

    nc = NCCandidates(engine=nc_engine())(prompts())
    both = IIDCandidates(engine=nc_engine(), pair_with_input=True)(nc)
    table = paired_comparison(Diversity()(both))
    assert table["pairs"].to_list()[:2] == [2, 2] and not table["diff"].is_null().any()
