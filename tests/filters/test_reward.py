import polars as pl
import pytest

from engines.reward import RewardModel, build_random_reward_model
from filters import reward as reward_filter
from filters.reward import RewardLabel
from schemas import MESSAGES, SchemaError


def candidate_rows(pairs, keep=None) -> pl.DataFrame:
    df = pl.DataFrame({
        "id": [f"c{i}" for i in range(len(pairs))],
        "parent_id": ["p"] * len(pairs),
        "candidate_index": list(range(len(pairs))),
        "messages": pl.Series([[{"role": "user", "content": q}, {"role": "assistant", "content": a}]
                               for q, a in pairs], dtype=MESSAGES),
    })
    if keep is not None:
        df = df.with_columns(keep=pl.Series(keep, dtype=pl.Boolean),
                             drop_reason=pl.Series([None if k else "truncated_response" for k in keep], dtype=pl.Utf8))
    return df


@pytest.fixture(scope="module")
def tiny_rm(tmp_path_factory):
    return build_random_reward_model(tmp_path_factory.mktemp("rm") / "tiny", max_length=128)


def test_adds_reward_and_drops_unscorable_rows_with_reasons(tiny_rm):
    scorer = RewardModel(tiny_rm, backend="transformers", batch_size=2)
    df = candidate_rows([("What is 2+2?", "4"), ("Say hi", "  "), ("Long " * 300, "ok"), ("Name a fruit", "Apple"),
                         ("skip me", "already dropped")], keep=[True, True, True, True, False])
    out = RewardLabel(scorer=scorer)(df)
    assert out.columns[: df.width] == df.columns and out["reward"].dtype == pl.Float64
    assert out["keep"].to_list() == [True, False, False, True, False]
    assert out["drop_reason"].to_list() == [None, "empty_response", "too_long", None, "truncated_response"]
    assert out["reward"][0] is not None and out["reward"][3] is not None
    assert out["reward"][4] is None  # dropped rows are not scored
    # Same values as scoring the pairs directly.
    direct = scorer.score([[{"role": "user", "content": "Name a fruit"}]], ["Apple"])[0].score
    assert abs(out["reward"][3] - direct) < 1e-4


def test_reward_model_from_config_is_loaded_once_per_process(tiny_rm):
    reward_filter._SCORERS.clear()
    step = RewardLabel(model=str(tiny_rm), backend="transformers")
    assert step.scorer_id == str(tiny_rm)
    df = candidate_rows([("a question", "an answer")])
    first = step(df)
    second = RewardLabel(model=str(tiny_rm), backend="transformers")(df)
    assert len(reward_filter._SCORERS) == 1
    assert first["reward"].to_list() == second["reward"].to_list()


def test_missing_chat_template_becomes_counted_drops_not_a_crash(tmp_path):
    folder = build_random_reward_model(tmp_path / "no-template", max_length=128, chat_template=False)
    step = RewardLabel(model=str(folder), backend="transformers")
    out = step(candidate_rows([("q1", "a1"), ("q2", "a2")]))
    assert out["keep"].to_list() == [False, False]
    assert out["drop_reason"].to_list() == ["reward_no_chat_template"] * 2
    assert out["reward"].null_count() == 2
    assert step.stats["dropped"] == {"reward_no_chat_template": 2}
    assert "template='plain'" in step.stats["reward_error"]


def test_prompt_response_columns_and_bad_input(tiny_rm):
    scorer = RewardModel(tiny_rm, backend="transformers")
    df = pl.DataFrame({"id": ["x"], "prompt": pl.Series([[{"role": "user", "content": "hi"}]], dtype=MESSAGES),
                       "response": ["hello"]})
    out = RewardLabel(scorer=scorer)(df)
    assert out["keep"].to_list() == [True] and out["reward"][0] is not None
    with pytest.raises(SchemaError, match="messages"):
        RewardLabel(scorer=scorer)(pl.DataFrame({"id": ["x"], "text": ["hi"]}))


def test_conversation_without_answer_is_an_empty_response(tiny_rm):
    scorer = RewardModel(tiny_rm, backend="transformers")
    df = pl.DataFrame({"id": ["x"], "messages": pl.Series([[{"role": "user", "content": "hi"}]], dtype=MESSAGES)})
    out = RewardLabel(scorer=scorer)(df)
    assert out["drop_reason"].to_list() == ["empty_response"]
