import polars as pl
import pytest

from schemas import MESSAGES
from stages.best_of_n import BestOfN, prompts_of


def instructions(texts, ids=None) -> pl.DataFrame:
    return pl.DataFrame({"id": ids or [f"i{n}" for n in range(len(texts))], "instruction": texts})


def test_prompts_from_instruction_or_messages():
    df = instructions(["Say hi"])
    assert prompts_of(df) == [[{"role": "user", "content": "Say hi"}]]
    assert prompts_of(df, system_prompt="Be kind.")[0][0] == {"role": "system", "content": "Be kind."}
    conv = pl.DataFrame({"id": ["m"], "messages": pl.Series(
        [[{"role": "user", "content": "q"}, {"role": "assistant", "content": "old answer"}]], dtype=MESSAGES)})
    assert prompts_of(conv) == [[{"role": "user", "content": "q"}]]
    with pytest.raises(ValueError, match="instruction"):
        prompts_of(pl.DataFrame({"id": ["x"], "text": ["q"]}))


def test_needs_an_engine_and_ids():
    with pytest.raises(ValueError, match="no engine"):
        BestOfN()(instructions(["q"]))
    with pytest.raises(ValueError, match="`id`"):
        BestOfN(engine=object())(pl.DataFrame({"instruction": ["q"]}))


@pytest.mark.engine
def test_k_candidates_per_row_deterministic_whatever_the_batch(engine):
    step = BestOfN(engine=engine, k=3, max_tokens=48, drop_truncated=False)
    df = instructions(["Name a fruit.", "Give me a word that rhymes with cat.", "What colour is the sky?"])
    out = step(df)
    assert out.height == 9
    assert out["parent_id"].to_list() == ["i0"] * 3 + ["i1"] * 3 + ["i2"] * 3
    assert out["candidate_index"].to_list() == [0, 1, 2] * 3
    assert out["id"].n_unique() == 9 and (out["origin"] == "best_of_n@1").all()
    first = out.row(0, named=True)
    assert first["messages"][0] == {"role": "user", "content": "Name a fruit."}
    assert first["messages"][-1]["role"] == "assistant"
    texts = [m[-1]["content"] for m in out["messages"].to_list()]
    # Sampled at T 0.8 with distinct seeds: a row's candidates are not all the same text.
    assert any(len(set(texts[i:i + 3])) > 1 for i in (0, 3, 6)), texts
    # The same row alone (different batch) and in another order gives the same candidates.
    alone = step(df.slice(1, 1))
    assert [m[-1]["content"] for m in alone["messages"].to_list()] == texts[3:6]
    assert alone["id"].to_list() == out["id"].to_list()[3:6]
    reordered = step(df.reverse())
    by_id = dict(zip(reordered["id"].to_list(), [m[-1]["content"] for m in reordered["messages"].to_list()]))
    assert [by_id[i] for i in out["id"].to_list()] == texts
    # More candidates keep the first ones.
    more = BestOfN(engine=engine, k=4, max_tokens=48, drop_truncated=False)(df.slice(0, 1))
    assert more.height == 4 and [m[-1]["content"] for m in more["messages"].to_list()][:3] == texts[:3]
    assert step.stats["requests"] == 9 and step.stats["generated_tokens"] > 0


@pytest.mark.engine
def test_truncated_candidates_are_marked(engine):
    out = BestOfN(engine=engine, k=2, max_tokens=2)(instructions(["Write a long essay about the ocean."]))
    assert out["keep"].to_list() == [False, False]
    assert set(out["drop_reason"].to_list()) == {"truncated_response"}


# ------------------------------------------------------------------ sampling penalties (issue 15)

def test_penalties_reach_every_candidate_request():
    from engines.scripted import ScriptedEngine

    seen = []
    engine = ScriptedEngine(lambda p, s, i: seen.append(s) or "An answer.")
    BestOfN(engine=engine, k=2, repetition_penalty=1.1, frequency_penalty=0.2, presence_penalty=0.3)(
        instructions(["q1", "q2"]))
    assert [(s.repetition_penalty, s.frequency_penalty, s.presence_penalty) for s in seen] == [(1.1, 0.2, 0.3)] * 4
    seen.clear()
    BestOfN(engine=engine, k=1)(instructions(["q1"]))
    assert (seen[0].repetition_penalty, seen[0].frequency_penalty, seen[0].presence_penalty) == (1.0, 0.0, 0.0)


def test_ids_with_neutral_penalties_are_those_of_the_code_before_the_fields():
    from engines.scripted import ScriptedEngine

    engine = ScriptedEngine(["An answer."])
    df = pl.DataFrame({"id": ["p0", "p1"], "instruction": ["Q one?", "Q two?"]})
    # Computed with the code before the penalty fields existed (commit bfbe9bd).
    before = ["a7c21642a2e8ea13", "fa729f631d601e27", "e3958621ea046c41", "862901843fbf9315"]
    assert BestOfN(engine=engine, k=2)(df)["id"].to_list() == before
    assert BestOfN(engine=engine, k=2, presence_penalty=0.0)(df)["id"].to_list() == before
    assert set(BestOfN(engine=engine, k=2, presence_penalty=0.5)(df)["id"].to_list()).isdisjoint(before)
