"""Self-Align filter: every rule with its edge values, the derived blacklist, stats and idempotence."""

from __future__ import annotations

import polars as pl
import pytest

from alignforge.step import StepError
from filters.self_align import (Blacklist, SelfAlignFilter, check_principled, check_verbose, cut_repeats,
                                proper_names)
from schemas import MESSAGES
from stages.self_align_data import Exemplar, SelfAlignPrompt

P = SelfAlignPrompt()
BL = Blacklist.derive(P)
SELF_ID = P.self_identification
THOUGHT = f" {SELF_ID} The user asks a question. I should follow rules 2 (informative), 7 (candor).\n\n"


def sentences(count: int, start: int = 0) -> str:
    """Distinct sentences (no repeated piece), ~32 chars each."""
    return " ".join(f"Fact number {k} is worth a note." for k in range(start, start + count))


def raw(answer: str, thought: str = THOUGHT) -> str:
    return f"{thought}{P.answer_marker} {answer}"


def principled(text: str, finish: str | None = "stop", **kw):
    return check_principled(text, finish, P, BL, apology_starts=SelfAlignFilter.Config().apology_starts, **kw)


# ------------------------------------------------------------------ principled rules

def test_kept_answer_strips_the_thoughts():
    v = principled(raw(sentences(6)))
    assert v.reason is None and v.answer == sentences(6)
    assert SELF_ID not in v.answer and "internal thoughts" not in v.answer


def test_needs_the_self_identification_thought():
    assert principled(raw(sentences(6), thought=" Hello there.\n\n")).reason == "no_self_identification"
    assert principled("\n  " + raw(sentences(6)).lstrip()).reason is None  # leading blanks are fine


def test_needs_the_answer_marker():
    assert principled(f" {SELF_ID} I should follow rules 2 (informative). " + sentences(6)).reason == "no_answer_marker"


def test_cut_at_next_user_marker_then_160_chars():
    body = "x" * 150 + " " + "y" * 9  # 160 chars
    v = principled(raw(body + f"\n\n{P.user_marker} and now something else"))
    assert v.reason is None and v.answer == body
    v = principled(raw(body[:-1] + f"\n\n{P.user_marker} more"))  # 159 chars
    assert v.reason == "answer_too_short"


@pytest.mark.parametrize("next_turn", [f"\n\n{P.answer_marker} Another answer.", f"\n\n{P.thoughts_marker} Hmm.",
                                       f"\n{P.user_marker} next"])
def test_answer_ends_at_the_next_turn_of_either_side(next_turn):
    v = principled(raw(sentences(6) + next_turn), finish="length")
    assert v.reason is None and v.answer == sentences(6) and not v.budget_cut  # the turn ended it


def test_rule_citations_in_the_answer_are_thoughts_leaking():
    v = principled(raw(sentences(6) + " I should follow rules 2 (informative), 3 (helpful)."))
    assert v.reason == "exemplar_leak" and v.leak == "2 (informative)"
    assert principled(raw(sentences(6) + " See step 2 (below) and table 3 (right).")).reason is None


def test_an_answer_that_ended_by_itself_needs_160_chars_too():
    assert principled(raw("Short but complete."), finish="stop").reason == "answer_too_short"


def test_budget_ran_out_cut_at_last_space_without_minimum():
    v = principled(raw("Rome is the capital of Ita"), finish="length")
    assert v.reason is None and v.answer == "Rome is the capital of" and v.budget_cut


def test_budget_ran_out_and_nothing_left():
    assert principled(raw(""), finish="length").reason == "empty_answer"


def test_repeated_piece_is_cut():
    text, cut = cut_repeats("The first idea. Two more ideas. The first idea. Three.")
    assert (text, cut) == ("The first idea. Two more ideas.", True)
    assert cut_repeats("Take 1, 2, 1, 2 and 1, 2.") == ("Take 1, 2, 1, 2 and 1, 2.", False)  # short pieces may repeat
    code = "Here:\n```\nprint(1)\n```\nDone."
    assert cut_repeats(code) == (code, False)  # code fences and blank lines may repeat
    v = principled(raw(sentences(6) + " " + sentences(1)))  # loops back to "Fact number 0..."
    assert v.repeat_cut and v.answer == sentences(6)


@pytest.mark.parametrize("start", ["I'm sorry, but no.", "I’m sorry, but no.", "Sorry, I can't.", "I am sorry that",
                                   "I apologize for this."])
def test_apology_start_is_dropped(start):
    assert principled(raw(start + " " + sentences(6))).reason == "apology"


def test_apology_later_in_the_answer_is_fine():
    assert principled(raw(sentences(6) + " I am sorry to hear about your cat.")).reason is None


def test_thought_consistency_counts_matching_rule_names():
    thought = f" {SELF_ID} I should follow rules 2 (Informative), 7 (candid), 99 (ethical).\n\n"
    v = principled(raw(sentences(6), thought=thought))
    assert (v.cited, v.consistent) == (3, 1)  # names compare case-insensitively; 99 is no rule


# ------------------------------------------------------------------ the derived blacklist

def test_blacklist_is_derived_from_the_configured_exemplars():
    assert {"Kestrel Cup", "Marguerite Oyelaran", "Przewalski"} <= set(BL.names)
    assert BL.number_runs == ("8, 2, 15",)
    assert {P.user_marker, P.thoughts_marker, P.answer_marker, SELF_ID, "internal thoughts"} <= set(BL.markers)
    other = SelfAlignPrompt(exemplars=(Exemplar(user="Who is Zorblax Quintero?", thoughts="I should follow rules "
                                                "7 (candor).", answer="No idea who that is, sorry to say."),))
    derived = Blacklist.derive(other)
    assert derived.names == ("Zorblax Quintero",) and "Kestrel Cup" not in derived.names
    assert derived.number_runs == ()


@pytest.mark.parametrize("leak", ["The Kestrel Cup is next year.", "I met Marguerite Oyelaran once.",
                                  "Sorted: 8, 2, 15 are the numbers.", "Przewalski horses are wild.",
                                  "User: another question", "Dromedary (internal thoughts): hmm",
                                  "my internal thoughts say so", SELF_ID,
                                  # an 8-word run of an exemplar answer
                                  "please contact your neighbour, the building manager or the emergency services now"])
def test_leaks_are_dropped(leak):
    v = principled(raw(sentences(6) + " " + leak))
    assert v.reason == "exemplar_leak" and v.leak


def test_no_false_leak_on_ordinary_text():
    assert BL.find("The cup of tea was 8 degrees. A kestrel flew by. Przewalskian logic.") is None
    assert BL.find("contact your neighbour") is None  # 3 words: not an 8-word copy


def test_proper_names_skip_sentence_starts_and_I():
    assert proper_names("Tell me about Ada Lovelace. I think Ada was great. Is Paris big?") == \
        ["Ada Lovelace", "Ada", "Paris"]


# ------------------------------------------------------------------ verbose rules

def test_verbose_list_cut_at_item_13():
    items = "\n".join(f"{k}. Item number {k} explained in words." for k in range(1, 16))
    v = check_verbose("Intro.\n" + items, "stop", P, BL)
    assert v.list_cut and "\n12. Item number 12" in v.answer and "13." not in v.answer.splitlines()[-1]


def test_verbose_128_chars():
    body = "z" * 120 + " abcdefg"  # 128 chars
    assert check_verbose(body, "stop", P, BL).reason is None
    assert check_verbose(body[:-1], "stop", P, BL).reason == "verbose_too_short"


def test_verbose_cut_at_next_user_header_and_markers():
    text = sentences(6) + f"\n\n{P.verbose_user_marker}\nNext question"
    assert check_verbose(text, "stop", P, BL).answer == sentences(6)
    assert check_verbose(sentences(6) + " As Dromedary (extensive) I say", "stop", P, BL).reason == \
        "verbose_prompt_leak"
    # names of the principled exemplars are not checked in verbose answers
    assert check_verbose(sentences(6) + " Przewalski horses are wild.", "stop", P, BL).reason is None


def test_verbose_ends_at_a_new_turn_of_the_persona():
    v = check_verbose(sentences(6) + f"\n\n{P.verbose_marker}\nMore.", "length", P, BL)
    assert v.reason is None and v.answer == sentences(6)


def test_verbose_budget_cut():
    v = check_verbose(sentences(6) + " unfinishe", "length", P, BL)
    assert v.budget_cut and v.answer == sentences(6)


# ------------------------------------------------------------------ the step

def frame(raws, *, subset=None, finish=None, source=None, keep=None, prompt=P):
    n = len(raws)
    return pl.DataFrame({
        "id": [f"r{i}" for i in range(n)],
        "prompt_source": source or ["self_instruct"] * n,
        "messages": pl.Series([[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": r or ""}]
                               for i, r in enumerate(raws)], dtype=MESSAGES),
        "self_align_raw": pl.Series(raws, dtype=pl.Utf8),
        "finish_reason": finish or ["stop"] * n,
        "subset": subset or ["default"] * n,
        "self_align_prompt": [prompt.fingerprint()] * n,
        "self_align_checked": [False] * n,
        "keep": keep or [True] * n,
        "drop_reason": pl.Series([None if k else "earlier" for k in (keep or [True] * n)], dtype=pl.Utf8),
    })


def test_step_cleans_messages_marks_drops_and_counts():
    df = frame([raw(sentences(6)), raw("too short"), "no thought", raw(sentences(6), thought=" x\n\n"),
                raw(sentences(7)), None], source=["tgrt", "tgrt", "self_instruct", "self_instruct", "self_instruct",
                                                  "self_instruct"])
    step = SelfAlignFilter()
    out = step(df)
    assert out["keep"].to_list() == [True, False, False, False, True, True]  # no raw: not this filter's row
    assert out["drop_reason"].to_list()[:4] == [None, "answer_too_short", "no_self_identification",
                                                "no_self_identification"]
    assert out["messages"][0].to_list()[1]["content"] == sentences(6)
    assert out.filter(pl.col("keep") & pl.col("self_align_raw").is_not_null())["messages"].to_list() != []
    for messages in out.filter(pl.col("keep"))["messages"].to_list():
        assert all("internal thoughts" not in m["content"] and SELF_ID not in m["content"] for m in messages)
    assert out.filter(~pl.col("keep"))["drop_reason"].null_count() == 0
    s = step.stats
    assert (s["principled_checked"], s["principled_kept"], s["tgrt_checked"], s["tgrt_kept"]) == (5, 2, 2, 1)
    assert (s["self_instruct_checked"], s["self_instruct_kept"]) == (3, 1)
    assert (s["rules_cited"], s["rules_consistent"]) == (6, 6)  # 3 rows with thoughts x 2 rules
    summary = SelfAlignFilter.summarise(s)
    assert summary["kept_share"] == 0.4 and summary["paper_kept_share"] == 0.706
    assert summary["kept_share_tgrt"] == 0.5 and summary["thought_consistency"] == 1.0
    assert SelfAlignFilter.summarise({})["kept_share"] is None


def test_earlier_drop_keeps_its_reason_and_is_not_counted_kept():
    out = SelfAlignFilter()(frame([raw(sentences(6))], keep=[False]))
    assert out["drop_reason"].to_list() == ["earlier"] and not out["keep"][0]


def test_second_pass_only_checks_new_rows():
    step = SelfAlignFilter()
    first = step(frame([raw(sentences(6)), raw("short")]))
    verbose = frame([sentences(8)], subset=["verbose"]).with_columns(pl.lit("v0").alias("id"))
    both = pl.concat([first, verbose], how="diagonal_relaxed")
    second = step(both)
    assert second["drop_reason"].to_list()[:2] == first["drop_reason"].to_list()
    assert second["messages"].to_list()[:2] == first["messages"].to_list()
    assert step.stats["principled_checked"] == 0 and step.stats["verbose_checked"] == 1
    assert step.stats["verbose_kept"] == 1 and step.stats["verbose_chars"] == len(sentences(8))


def test_rows_from_another_prompt_are_refused():
    other = SelfAlignPrompt(assistant_name="Camel")
    with pytest.raises(StepError, match="another Self-Align prompt"):
        SelfAlignFilter()(frame([raw(sentences(6))], prompt=other))
    # the filter with the same prompt accepts them, and uses that prompt's markers
    text = f" {SELF_ID} I should follow rules 2 (informative).\n\n{other.answer_marker} {sentences(6)}"
    out = SelfAlignFilter(prompt=other)(frame([text], prompt=other))
    assert out["keep"].to_list() == [True]


def test_missing_columns_is_a_clear_error():
    with pytest.raises(StepError, match="self_align_raw"):
        SelfAlignFilter()(pl.DataFrame({"messages": pl.Series([[]], dtype=MESSAGES)}))
