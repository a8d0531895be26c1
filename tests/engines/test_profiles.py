"""engines.profiles: model defaults under explicit values (recipe file, --set), on the card (issue 15)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engines.profiles import EMBEDDED, PROFILES, describe, profile_for, profile_name, without_neutral_penalties
from flows.recipe import build_steps, load_recipe


@pytest.mark.parametrize("model, name", [
    (None, EMBEDDED), ("embedded", EMBEDDED), ("SmolLM2-135M-Instruct", EMBEDDED),
    ("HuggingFaceTB/SmolLM2-135M-Instruct", EMBEDDED), ("/home/me/models/smollm2-135m-instruct/", EMBEDDED),
    ({"openai": ["http://h:8000"], "name": "SmolLM2-135M-Instruct"}, EMBEDDED),
    ("meta-llama/Llama-3.1-8B-Instruct", None), ({"openai": "http://h:8000"}, None),
])
def test_profile_names(model, name):
    assert profile_name(model) == name


# The embedded model's profile as measured (README "Model profiles"); a change there is a change here.
EMBEDDED_PROFILE = {"magpie_instructions": {"max_tokens": 256},
                    "magpie_responses": {"repetition_penalty": 1.1, "temperature": 0.3, "top_p": 0.9,
                                         "max_tokens": 768, "followup_max_tokens": 256}}


def test_embedded_profile_and_other_models_get_the_papers_defaults():
    assert profile_for(None) == EMBEDDED_PROFILE
    assert profile_for("meta-llama/Llama-3.1-8B-Instruct") == {}
    profile_for(None)["magpie_responses"]["repetition_penalty"] = 9.0  # a copy: PROFILES untouched
    assert PROFILES[EMBEDDED]["magpie_responses"]["repetition_penalty"] == 1.1
    assert describe(None, {"repetition_penalty": 1.05}) == "SmolLM2-135M-Instruct profile: repetition_penalty=1.05"


def test_without_neutral_penalties():
    config = {"seed": 0, "repetition_penalty": 1.0, "frequency_penalty": 0.0, "presence_penalty": 0.0,
              "followup_repetition_penalty": 1.0, "followup_presence_penalty": 0.5, "max_tokens": 512}
    assert without_neutral_penalties(config) == {"seed": 0, "followup_presence_penalty": 0.5, "max_tokens": 512}
    assert without_neutral_penalties({"repetition_penalty": 1.05}) == {"repetition_penalty": 1.05}


def _steps(recipe):
    return {s.name: s for s in build_steps(recipe)}


def test_profile_applies_to_the_embedded_model():
    steps = _steps(load_recipe("magpie-sft", sets=["n=4"]))
    for name, fields in EMBEDDED_PROFILE.items():
        assert {k: getattr(steps[name].config, k) for k in fields} == fields
        assert steps[name].model_profile == (None, fields)
    # Fields the profile does not name keep the paper's values: first and follow-up queries are
    # still sampled at T 1.0 / top_p 1.0 without penalties.
    instructions, responses = steps["magpie_instructions"].config, steps["magpie_responses"].config
    assert (instructions.temperature, instructions.top_p, instructions.repetition_penalty) == (1.0, 1.0, 1.0)
    followup = (responses.followup_temperature, responses.followup_top_p, responses.followup_repetition_penalty)
    assert followup == (1.0, 1.0, 1.0)


@pytest.mark.parametrize("sets, field, value", [
    (["steps.magpie_responses.repetition_penalty=1.0"], "repetition_penalty", 1.0),
    (["magpie_responses.repetition_penalty=1.2"], "repetition_penalty", 1.2),
    (["temperature_response=0"], "temperature", 0.0),  # the paper's greedy answers, through the recipe's param
    (["steps.magpie_responses.top_p=1.0"], "top_p", 1.0),
])
def test_explicit_set_wins_even_at_the_papers_value(sets, field, value):
    step = _steps(load_recipe("magpie-sft", sets=["n=4", *sets]))["magpie_responses"]
    assert getattr(step.config, field) == value
    # Only that field: the profile's other values still apply, and the stats name only those.
    rest = {k: v for k, v in EMBEDDED_PROFILE["magpie_responses"].items() if k != field}
    assert {k: getattr(step.config, k) for k in rest} == rest and step.model_profile == (None, rest)


def test_explicit_query_max_tokens_wins_for_first_and_follow_up_queries():
    steps = _steps(load_recipe("magpie-sft", sets=["n=4", "max_tokens_instruction=128"]))
    assert steps["magpie_instructions"].config.max_tokens == steps["magpie_responses"].config.followup_max_tokens == 128
    assert not hasattr(steps["magpie_instructions"], "model_profile")


def test_explicit_recipe_file_value_wins(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("name: mine\nmodel: embedded\nsteps:\n  - magpie_instructions: {n: 2, max_tokens: 64}\n"
                    "  - magpie_responses: {repetition_penalty: 1.0, frequency_penalty: 0.1, temperature: 0.0,\n"
                    "                       top_p: 1.0, max_tokens: 512, followup_max_tokens: 128}\n")
    steps = _steps(load_recipe(str(path)))
    config = steps["magpie_responses"].config
    assert (config.repetition_penalty, config.frequency_penalty, config.temperature, config.top_p, config.max_tokens,
            config.followup_max_tokens) == (1.0, 0.1, 0.0, 1.0, 512, 128)
    assert steps["magpie_instructions"].config.max_tokens == 64
    assert not any(hasattr(step, "model_profile") for step in steps.values())


def test_other_models_keep_the_papers_defaults():
    steps = _steps(load_recipe("magpie-sft", sets=["n=4", "model=meta-llama/Llama-3.1-8B-Instruct"]))
    config = steps["magpie_responses"].config
    assert (config.repetition_penalty, config.temperature, config.top_p, config.max_tokens,
            config.followup_max_tokens) == (1.0, 0.0, 1.0, 512, 128)
    assert steps["magpie_instructions"].config.max_tokens == 128
    assert not any(hasattr(step, "model_profile") for step in steps.values())


def test_profile_reaches_sampling_and_the_card(tmp_path, monkeypatch):
    """End to end on the runner with a scripted engine: the profile's values are what the engine is
    asked for (a 200-token query fits the profile's 256, not the paper's 128), and the card names
    the profile and shows the values in the step configs; explicit values win."""
    from engines.scripted import ScriptedEngine
    from flows.runner import execute

    monkeypatch.setenv("ALIGNFORGE_QUIET", "1")
    queries, answers = [], []

    def respond(prompt, s, i):
        if prompt.endswith("<|im_start|>user\n"):
            queries.append(s.max_tokens)
            return "How do tides work?" if len(queries) % 3 == 1 else "Why " + "really " * 200 + "?"  # 2 long
        answers.append((s.repetition_penalty, s.temperature, s.top_p, s.max_tokens))
        return "Because of the moon."

    recipe = load_recipe("magpie-sft", sets=["n=3", "steps.exact_dedup.enabled=false"])
    result = execute(recipe, str(tmp_path / "run"), engine=ScriptedEngine(respond))
    assert result["rows_kept"] == 3 and queries == [256] * 3 and answers == [(1.1, 0.3, 0.9, 768)] * 3
    card = (Path(result["dataset"]) / "README.md").read_text()
    assert ("SmolLM2-135M-Instruct profile: followup_max_tokens=256, max_tokens=768, repetition_penalty=1.1, "
            "temperature=0.3, top_p=0.9") in card
    configs = json.loads(card.split("Full configs and stats of every step:")[1].split("```json")[1].split("```")[0])
    for name, fields in EMBEDDED_PROFILE.items():
        config = next(c for c in configs if c["step"] == name)["config"]
        assert {k: config[k] for k in fields} == fields

    queries.clear(), answers.clear()
    explicit = load_recipe("magpie-sft", sets=["n=3", "steps.exact_dedup.enabled=false", "max_tokens_instruction=128",
                                               "magpie_responses.repetition_penalty=1.0", "temperature_response=0"])
    result = execute(explicit, str(tmp_path / "explicit"), engine=ScriptedEngine(respond))
    # The long queries are cut at the explicit 128 and dropped with their reason; top_p is not sent
    # with greedy answers (1.0), so the profile's 0.9 has no effect there.
    assert queries == [128] * 3 and result["dropped"] == {"truncated": 2} and answers == [(1.0, 0.0, 1.0, 768)]


# ------------------------------------------------------------------ run summary (flows.cli.print_result)

def _result(dataset, dropped, steps, kept=28):
    return {"dataset": str(dataset), "rows_kept": kept, "rows_requested": 50, "dropped": dropped,
            "steps": [{"step": s, "rows_in": 50, "rows_kept": 0, "dropped": d} for s, d in steps]}


def _published(tmp_path, penalty):
    folder = tmp_path / "publish"
    folder.mkdir(exist_ok=True)
    (folder / "_manifest.json").write_text(json.dumps({"lineage": [
        {"name": "magpie_responses", "config": {"repetition_penalty": penalty, "max_tokens": 512}}]}))
    return folder


def test_summary_prints_kept_share_and_which_setting_to_raise(tmp_path, capsys):
    from flows.cli import print_result

    dropped = {"truncated": 2, "truncated_response": 20}
    steps = [("magpie_instructions", {"truncated": 2}), ("magpie_responses", {"truncated_response": 20})]
    print_result("magpie-sft", _result(_published(tmp_path, 1.0), dropped, steps), 1.0)
    out = capsys.readouterr().out
    assert "28 kept of 50 (56%)" in out
    assert "most drops are truncations (22 of 22 drops; truncated_response 20 in magpie_responses)" in out
    assert "raise steps.magpie_responses.repetition_penalty from 1 " in out
    assert "--set steps.magpie_responses.repetition_penalty=1.1" in out


def test_summary_says_lower_a_strong_penalty_and_max_tokens_for_queries(tmp_path):
    from flows.cli import truncation_hint

    steps = [("magpie_responses", {"truncated_response": 15})]
    hint = truncation_hint(_result(_published(tmp_path, 1.2), {"truncated_response": 15}, steps))
    assert "lower steps.magpie_responses.repetition_penalty (now 1.2" in hint
    hint = truncation_hint(_result(_published(tmp_path, 1.1), {"truncated_response": 15}, steps))
    assert "already 1.1: raise steps.magpie_responses.max_tokens if the answers are long" in hint
    hint = truncation_hint(_result(tmp_path / "gone", {"truncated": 5, "empty_response": 1},
                                   [("magpie_instructions", {"truncated": 5})]))
    assert "raise steps.magpie_instructions.max_tokens" in hint and "repetition_penalty" not in hint


def test_summary_is_quiet_when_truncations_are_not_most_drops(tmp_path):
    from flows.cli import truncation_hint

    assert truncation_hint(_result(tmp_path, {"truncated_response": 3, "exact_duplicate": 3},
                                   [("magpie_responses", {"truncated_response": 3})])) is None
    assert truncation_hint(_result(tmp_path, {}, [])) is None
