from pathlib import Path

import polars as pl
import pytest



def test_recipe_defaults_and_nested_reward_overrides():
    from flows.recipe import build_steps, load_recipe

    recipe = load_recipe("magpie-dpo", sets=["n=200", "samples=5", "reward.model=Skywork/Skywork-Reward-V2-Llama-3.1-8B"])
    steps = {s.name: s for s in build_steps(recipe)}
    bon = steps["best_of_n"].config
    assert bon.k == 5 and bon.temperature == 0.8 and bon.top_p == 1.0
    assert recipe.publish.test_size == 0.02 and recipe.publish.margin == 0.0 and recipe.publish.format == "preference"
    reward = steps["reward_label"].config
    assert reward.model == "Skywork/Skywork-Reward-V2-Llama-3.1-8B" and reward.template == "chat"


def stage_dirs(run: Path, name: str) -> list[str]:
    return sorted(p.name for p in (run / "stages").iterdir() if p.name.startswith(name))


@pytest.mark.engine
def test_magpie_dpo_end_to_end_judge_then_reward_model(engine, tmp_path, monkeypatch):
    from datasets import load_dataset
    from trl.data_utils import is_conversational, maybe_apply_chat_template

    from engines.reward import build_random_reward_model
    from flows.publishing import NothingSurvived
    from flows.runner import run

    monkeypatch.setenv("ALIGNFORGE_QUIET", "1")
    out = tmp_path / "run"
    base = dict(n=6, samples=3, shard_size=3, max_tokens_instruction=48, max_tokens_response=48,
                drop_truncated=False, out=str(out))
    result = run("magpie-dpo", base, engine=engine)
    assert result["dataset"] == f"{out}/publish", result
    groups = result["configs"]["candidates"]
    assert result["rows_kept"] >= 1 and groups >= result["rows_kept"]
    # Every instruction that got candidates is either a pair or a counted pair drop.
    pair_drops = sum(v for k, v in result["dropped"].items() if k.startswith("pair:"))
    instructions = pl.read_parquet(out / "stages" / stage_dirs(out, "exact_dedup")[0] / "part-*.parquet")
    assert result["rows_kept"] + pair_drops == instructions.height

    prefs = load_dataset("parquet", data_dir=f"{out}/publish/data")["train"]
    assert {"prompt", "chosen", "rejected", "score_chosen", "score_rejected"} <= set(prefs.column_names)
    for row in prefs:
        assert is_conversational(row)
        assert row["score_chosen"] > row["score_rejected"]
        assert 1.0 <= row["score_rejected"] and row["score_chosen"] <= 5.0  # judge: expected 1..5 rating
        rendered = maybe_apply_chat_template({k: row[k] for k in ("prompt", "chosen", "rejected")},
                                             engine.tokenizer)
        assert rendered["chosen"].startswith(row["chosen"][0]["content"])
    cands = load_dataset("parquet", data_dir=f"{out}/publish/candidates")["train"]
    assert len(cands) == groups
    for row in cands:
        assert 2 <= len(row["candidates"]) <= 3
        assert [c["index"] for c in row["candidates"]] == sorted(c["index"] for c in row["candidates"])
    assert "magpie-dpo" in (out / "publish" / "README.md").read_text()

    # Same params again: every stage resumes from its committed output, same pairs.
    again = run("magpie-dpo", base, engine=engine)
    assert again["rows_kept"] == result["rows_kept"]
    assert list(load_dataset("parquet", data_dir=f"{out}/publish/data")["train"]["id"]) == list(prefs["id"])

    # Swap in a reward model: generation is reused (same stage folders), only labelling reruns.
    candidates_before = stage_dirs(out, "best_of_n")
    folder = build_random_reward_model(tmp_path / "rm", max_length=512)
    with_rm = run("magpie-dpo", {**base, "reward": {"model": str(folder), "backend": "transformers"}}, engine=engine)
    assert stage_dirs(out, "best_of_n") == candidates_before
    assert len(stage_dirs(out, "reward_label")) == 2
    scores = load_dataset("parquet", data_dir=f"{out}/publish/data")["train"]
    assert with_rm["rows_kept"] >= 1
    assert any(s < 1.0 or s > 5.0 for s in list(scores["score_chosen"]) + list(scores["score_rejected"]))  # raw logits now

    # An unusable reward model (no chat template): counted drops and a clear report, no crash.
    bad = build_random_reward_model(tmp_path / "rm-no-template", max_length=512, chat_template=False)
    with pytest.raises(NothingSurvived) as failed:
        run("magpie-dpo", {**base, "reward": {"model": str(bad), "backend": "transformers"}}, engine=engine)
    assert "reward_no_chat_template" in str(failed.value) and "template='plain'" in str(failed.value)
    # publish/ holds this run (empty pairs, its rejected rows and card), never the previous run's pairs.
    assert pl.read_parquet(out / "publish" / "data" / "*.parquet").height == 0
    assert "reward_no_chat_template" in (out / "publish" / "README.md").read_text()
