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
    from engines import lifetime

    lifetime.release_scorers()
    step = RewardLabel(model=str(tiny_rm), backend="transformers")
    assert step.scorer_id == str(tiny_rm)
    df = candidate_rows([("a question", "an answer")])
    first = step(df)
    second = RewardLabel(model=str(tiny_rm), backend="transformers")(df)
    assert len(lifetime._SCORERS) == 1
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


# ---------------------------------------------------------------- issue 8, fault kind 4

class FixedScorer:
    """A scorer that returns whatever it was given, in order (a broken model, a custom scorer)."""

    model_id = "fixed"

    def __init__(self, values):
        self.values = list(values)

    def score(self, prompts, responses):
        return self.values[: len(prompts)]

    def shutdown(self):
        pass


def test_non_finite_and_non_numeric_scores_are_never_published():
    import math

    from engines.reward import RewardResult

    values = [RewardResult(2.5), RewardResult(math.nan), RewardResult(math.inf), RewardResult(-math.inf),
              RewardResult(True), RewardResult("3.0"), RewardResult(None, "too_long"), RewardResult(None), 1.25,
              math.nan]
    df = candidate_rows([(f"q{i}", f"a{i}") for i in range(len(values))])
    step = RewardLabel(scorer=FixedScorer(values))
    out = step(df)
    assert out["reward"].to_list() == [2.5, None, None, None, None, None, None, None, 1.25, None]
    assert not out["reward"].is_nan().any()
    assert out["drop_reason"].to_list() == [
        None, "non_finite_score", "non_finite_score", "non_finite_score", "non_numeric_score", "non_numeric_score",
        "too_long", "unscored", None, "non_finite_score"]
    assert out["keep"].to_list() == [True] + [False] * 7 + [True, False]
    assert step.stats["scored"] == 2
    assert step.stats["dropped"] == {"non_finite_score": 4, "non_numeric_score": 2, "too_long": 1, "unscored": 1}


def test_a_scorer_returning_too_few_results_drops_the_shard_with_a_reason():
    df = candidate_rows([("q1", "a1"), ("q2", "a2"), ("q3", "a3")])
    step = RewardLabel(scorer=FixedScorer([1.0]))
    out = step(df)
    assert out["drop_reason"].to_list() == ["reward_scorer_error"] * 3
    assert out["reward"].null_count() == 3
    assert "1 results for 3 rows" in step.stats["reward_error"]
