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


def test_embedded_profile_and_other_models_get_the_papers_defaults():
    assert profile_for(None) == {"magpie_responses": {"repetition_penalty": 1.1}}
    assert profile_for("meta-llama/Llama-3.1-8B-Instruct") == {}
    profile_for(None)["magpie_responses"]["repetition_penalty"] = 9.0  # a copy: PROFILES untouched
    assert PROFILES[EMBEDDED]["magpie_responses"]["repetition_penalty"] == 1.1
    assert describe(None, {"repetition_penalty": 1.05}) == "SmolLM2-135M-Instruct profile: repetition_penalty=1.05"


def test_without_neutral_penalties():
    config = {"seed": 0, "repetition_penalty": 1.0, "frequency_penalty": 0.0, "presence_penalty": 0.0,
              "followup_repetition_penalty": 1.0, "followup_presence_penalty": 0.5, "max_tokens": 512}
    assert without_neutral_penalties(config) == {"seed": 0, "followup_presence_penalty": 0.5, "max_tokens": 512}
    assert without_neutral_penalties({"repetition_penalty": 1.05}) == {"repetition_penalty": 1.05}


def _responses(recipe):
    return next(s for s in build_steps(recipe) if s.name == "magpie_responses")


def test_profile_applies_to_the_embedded_model():
    step = _responses(load_recipe("magpie-sft", sets=["n=4"]))
    assert step.config.repetition_penalty == 1.1
    assert step.model_profile == (None, {"repetition_penalty": 1.1})
    # Only the step the profile names: instructions keep the paper's sampling.
    instructions = build_steps(load_recipe("magpie-sft", sets=["n=4"]))[0]
    assert instructions.config.repetition_penalty == 1.0 and not hasattr(instructions, "model_profile")


@pytest.mark.parametrize("sets", [["steps.magpie_responses.repetition_penalty=1.0"],
                                  ["magpie_responses.repetition_penalty=1.2"]])
def test_explicit_set_wins_even_at_the_papers_value(sets):
    step = _responses(load_recipe("magpie-sft", sets=["n=4", *sets]))
    assert step.config.repetition_penalty == float(sets[0].split("=")[1])
    assert not hasattr(step, "model_profile")


def test_explicit_recipe_file_value_wins(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("name: mine\nmodel: embedded\nsteps:\n  - magpie_instructions: {n: 2}\n"
                    "  - magpie_responses: {repetition_penalty: 1.0, frequency_penalty: 0.1}\n")
    step = _responses(load_recipe(str(path)))
    assert (step.config.repetition_penalty, step.config.frequency_penalty) == (1.0, 0.1)
    assert not hasattr(step, "model_profile")


def test_other_models_keep_the_papers_defaults():
    step = _responses(load_recipe("magpie-sft", sets=["n=4", "model=meta-llama/Llama-3.1-8B-Instruct"]))
    assert step.config.repetition_penalty == 1.0 and not hasattr(step, "model_profile")


def test_profile_reaches_sampling_and_the_card(tmp_path, monkeypatch):
    """End to end on the runner with a scripted engine: the profile's penalty is what the engine is
    asked for, and the card names the profile and shows the value in the step config."""
    from engines.scripted import ScriptedEngine
    from flows.runner import execute

    monkeypatch.setenv("ALIGNFORGE_QUIET", "1")
    seen = []

    def respond(prompt, s, i):
        if prompt.endswith("<|im_start|>user\n"):
            return "How do tides work?" if i == 0 else "Why?"
        seen.append(s.repetition_penalty)
        return "Because of the moon."

    recipe = load_recipe("magpie-sft", sets=["n=3", "steps.exact_dedup.enabled=false"])
    result = execute(recipe, str(tmp_path / "run"), engine=ScriptedEngine(respond))
    assert result["rows_kept"] == 3 and seen == [1.1] * 3
    card = (Path(result["dataset"]) / "README.md").read_text()
    assert "SmolLM2-135M-Instruct profile: repetition_penalty=1.1" in card
    configs = json.loads(card.split("Full configs and stats of every step:")[1].split("```json")[1].split("```")[0])
    responses = next(c for c in configs if c["step"] == "magpie_responses")
    assert responses["config"]["repetition_penalty"] == 1.1

    seen.clear()
    explicit = load_recipe("magpie-sft", sets=["n=3", "steps.exact_dedup.enabled=false",
                                               "steps.magpie_responses.repetition_penalty=1.0"])
    execute(explicit, str(tmp_path / "explicit"), engine=ScriptedEngine(respond))
    assert seen == [1.0] * 3


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
