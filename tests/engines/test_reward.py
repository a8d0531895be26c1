import math

import pytest
import torch

from engines.reward import (EMPTY_RESPONSE, NO_RATING_TOKEN, TOO_LONG, JudgeReward, RewardModel, RewardModelError,
                            build_random_reward_model, render_plain)

CONTEXT = 256

PROMPTS = [
    [{"role": "user", "content": "What is 2 + 2?"}],
    [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Name a colour."}],
    [{"role": "user", "content": "Write a haiku about rain " + "and wind " * 8}],
    [{"role": "user", "content": "hi"}],
    [{"role": "user", "content": "Explain recursion to a child, please."}],
]
RESPONSES = ["4", "Rouge.", "Soft rain on the roof / the wind hums along / puddles keep the sky",
             "Hello! How can I help you today?", "It is when something is defined using a smaller copy of itself."]


@pytest.fixture(scope="module")
def reward_folder(tmp_path_factory):
    return build_random_reward_model(tmp_path_factory.mktemp("rm") / "tiny-rm", max_length=CONTEXT)


@pytest.fixture(scope="module")
def hf_model(reward_folder):
    return RewardModel(reward_folder, backend="transformers", batch_size=4)


def reference_scores(model: RewardModel) -> list[float]:
    """Plain unbatched forward through transformers' own pooling: the ground truth."""
    out = []
    with torch.inference_mode():
        for prompt, response in zip(PROMPTS, RESPONSES):
            ids = torch.tensor([model.encode(prompt, response)])
            out.append(float(model._hf(input_ids=ids).logits[0, 0]))
    return out


def test_renders_with_the_reward_models_own_chat_template(hf_model):
    text = hf_model.render(PROMPTS[0], RESPONSES[0])
    # SmolLM2's template (copied into the tiny model) + the response as the last assistant turn,
    # no generation prompt after it.
    assert text.startswith("<|im_start|>system\n")
    assert text.endswith("<|im_start|>assistant\n4<|im_end|>\n")


def test_transformers_scores_are_deterministic_and_batch_size_independent(hf_model):
    reference = reference_scores(hf_model)
    assert len({round(s, 3) for s in reference}) == len(reference), "random model should score pairs differently"
    for batch_size in (1, 2, 3, 16):
        hf_model.batch_size = batch_size
        scores = [r.score for r in hf_model.score(PROMPTS, RESPONSES)]
        assert all(r is not None for r in scores)
        assert max(abs(a - b) for a, b in zip(scores, reference)) < 1e-4, batch_size
    hf_model.batch_size = 4
    again = [r.score for r in hf_model.score(PROMPTS, RESPONSES)]
    assert again == [r.score for r in hf_model.score(PROMPTS, RESPONSES)]


def test_too_long_and_empty_response_are_reported_not_truncated(hf_model):
    long_prompt = [{"role": "user", "content": "word " * (CONTEXT * 2)}]
    results = hf_model.score([long_prompt, PROMPTS[0], PROMPTS[0], PROMPTS[1]], ["ok", "", "   ", "Bleu."])
    assert [r.reason for r in results[:3]] == [TOO_LONG, EMPTY_RESPONSE, EMPTY_RESPONSE]
    assert all(r.score is None for r in results[:3])
    assert results[3].score is not None and results[3].reason is None
    # The scored row is unaffected by the unscorable ones around it.
    alone = hf_model.score([PROMPTS[1]], ["Bleu."])[0].score
    assert abs(alone - results[3].score) < 1e-4


def test_mismatched_lengths_is_an_error(hf_model):
    with pytest.raises(ValueError, match="1 prompts but 2 responses"):
        hf_model.score([PROMPTS[0]], ["a", "b"])


def test_no_chat_template_is_a_clear_error_unless_plain(tmp_path):
    folder = build_random_reward_model(tmp_path / "no-template", max_length=CONTEXT, chat_template=False)
    with pytest.raises(RewardModelError, match="no chat template") as error:
        RewardModel(folder, backend="transformers")
    assert error.value.reason == "reward_no_chat_template"
    assert "template='plain'" in str(error.value)
    plain = RewardModel(folder, backend="transformers", template="plain")
    assert plain.render(PROMPTS[1], "Rouge.") == "System: Answer in French.\nUser: Name a colour.\nAssistant: Rouge."
    assert render_plain(PROMPTS[0], "4") == "User: What is 2 + 2?\nAssistant: 4"
    scores = plain.score(PROMPTS, RESPONSES)
    assert all(r.score is not None and math.isfinite(r.score) for r in scores)


def test_multi_head_model_uses_the_score_head(tmp_path):
    folder = build_random_reward_model(tmp_path / "three-heads", max_length=CONTEXT, num_labels=3)
    head0 = RewardModel(folder, backend="transformers", batch_size=2)
    head2 = RewardModel(folder, backend="transformers", batch_size=2, score_head=2)
    with torch.inference_mode():
        logits = head0._hf(input_ids=torch.tensor([head0.encode(PROMPTS[0], RESPONSES[0])])).logits[0]
    assert abs(head0.score(PROMPTS[:1], RESPONSES[:1])[0].score - float(logits[0])) < 1e-4
    assert abs(head2.score(PROMPTS[:1], RESPONSES[:1])[0].score - float(logits[2])) < 1e-4


def test_missing_model_folder_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(RewardModelError, match="no config.json"):
        RewardModel(tmp_path / "empty", backend="transformers")


@pytest.mark.engine
def test_vllm_pooling_matches_transformers_and_is_batch_independent(reward_folder, hf_model):
    model = RewardModel(reward_folder, backend="vllm")
    try:
        assert model.backend == "vllm"
        batched = [r.score for r in model.score(PROMPTS, RESPONSES)]
        one_by_one = [model.score([p], [r])[0].score for p, r in zip(PROMPTS, RESPONSES)]
        hf_model.batch_size = 4
        hf = [r.score for r in hf_model.score(PROMPTS, RESPONSES)]
        assert max(abs(a - b) for a, b in zip(batched, hf)) < 1e-4, (batched, hf)
        assert max(abs(a - b) for a, b in zip(batched, one_by_one)) < 1e-4
        # Raw logits, not a sigmoid: the random model gives values outside (0, 1).
        assert any(s < 0 or s > 1 for s in batched)
        long_prompt = [{"role": "user", "content": "word " * (CONTEXT * 2)}]
        assert model.score([long_prompt], ["ok"])[0].reason == TOO_LONG
    finally:
        model.shutdown()


# ---------------------------------------------------------------- generative judge

class LogprobStub:
    """Returns fixed next-token logprobs: exercises the expected-rating arithmetic only."""

    model_id = "stub"

    def __init__(self, table):
        from transformers import AutoTokenizer

        from engines.embedded import resolve_model

        self.tokenizer = AutoTokenizer.from_pretrained(resolve_model(None))
        self.table = table
        self.prompts = []

    def next_token_logprobs(self, prompts, candidates):
        self.prompts.extend(prompts)
        return [dict(self.table) for _ in prompts]


def test_judge_expected_rating_and_missing_tokens():
    stub = LogprobStub({"1": None, "2": None, "3": math.log(0.25), "4": math.log(0.25), "5": math.log(0.5)})
    judge = JudgeReward(stub)
    results = judge.score([PROMPTS[0], PROMPTS[0]], ["4", ""])
    assert results[0].score == pytest.approx(3 * 0.25 + 4 * 0.25 + 5 * 0.5)
    assert results[1] == type(results[1])(None, EMPTY_RESPONSE)
    assert judge.stats["missing_rating_tokens"] == 2
    assert stub.prompts[0].endswith("Rating: ") and "What is 2 + 2?" in stub.prompts[0]
    none = JudgeReward(LogprobStub({str(i): None for i in range(1, 6)})).score(PROMPTS[:1], ["4"])
    assert none[0].score is None and none[0].reason == NO_RATING_TOKEN


def test_judge_reports_too_long_prompts():
    judge = JudgeReward(LogprobStub({"3": 0.0}), max_prompt_tokens=64)
    assert judge.score(PROMPTS[:1], ["word " * 200])[0].reason == TOO_LONG


@pytest.mark.engine
def test_judge_on_the_embedded_model(engine):
    judge = JudgeReward(engine)
    prompts = [[{"role": "user", "content": "What is the capital of France?"}]] * 2
    results = judge.score(prompts, ["The capital of France is Paris.", "Bananas are yellow and I like trains."])
    assert all(r.score is not None and 1.0 <= r.score <= 5.0 for r in results), results
    again = judge.score(prompts, ["The capital of France is Paris.", "Bananas are yellow and I like trains."])
    assert [r.score for r in again] == pytest.approx([r.score for r in results], abs=1e-4)


def test_judge_ratings_ignore_unusable_logprobs():
    """Issue 8: NaN / +inf / text / bools in a logprob table are missing digits, -inf is probability 0."""
    from engines.reward import expected_rating

    ratings = ["1", "2", "3", "4", "5"]
    result, missing = expected_rating({"1": math.nan, "2": math.inf, "3": "0.0", "4": True, "5": 0.0}, ratings)
    assert (result.score, result.reason, missing) == (5.0, None, 4)
    result, missing = expected_rating({"2": -math.inf, "4": math.log(0.5), "5": math.log(0.5)}, ratings)
    assert result.score == pytest.approx(4.5) and missing == 2
    for table in ({"3": -math.inf}, {"3": math.nan}, {}, None, ["3"], {"x": 0.0}):
        result, _ = expected_rating(table, ratings)
        assert (result.score, result.reason) == (None, NO_RATING_TOKEN), table
    judge = JudgeReward(LogprobStub({"1": math.nan, "2": None, "3": math.log(0.5), "4": math.log(0.5), "5": math.inf}))
    out = judge.score(PROMPTS[:1], ["4"])
    assert out[0].score == pytest.approx(3.5) and judge.stats["missing_rating_tokens"] == 3


def test_a_nan_or_infinite_model_output_is_not_a_score(reward_folder, monkeypatch):
    model = RewardModel(reward_folder, backend="transformers")
    monkeypatch.setattr(model, "_score_transformers", lambda ids: [math.nan, 0.5, math.inf][: len(ids)])
    results = model.score(PROMPTS[:3], ["a", "b", "c"])
    assert [(r.score, r.reason) for r in results] == [(None, "non_finite_score"), (0.5, None),
                                                       (None, "non_finite_score")]
    assert model.stats["scored"] == 1
