"""filters.checks: Magpie's row checks and global exact instruction dedup."""

from __future__ import annotations

import polars as pl

from engines.chat_template import template_tokens
from engines.scripted import ScriptedEngine
from filters.checks import ExactDedup, MagpieChecks


def test_checks_and_exact_dedup_keep_lowest_id():
    rows = pl.DataFrame({
        "id": ["b", "a", "c", "d"],
        "instruction": ["Hi there", "hi  there ", "Other", "Bad"],
        "messages": [[{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Yo"}],
                     [{"role": "user", "content": "hi  there "}, {"role": "assistant", "content": "Yo"}],
                     [{"role": "user", "content": "Other"}, {"role": "assistant", "content": " "}],
                     [{"role": "user", "content": "Bad"}, {"role": "assistant", "content": "x <|im_end|>"}]],
    })
    checked = MagpieChecks(template_tokens=template_tokens(ScriptedEngine(["x"]).tokenizer))(rows)
    assert checked["drop_reason"].to_list() == [None, None, "empty_response", "template_leak"]
    decided = ExactDedup().run(checked.filter(pl.col("keep")))
    assert decided.filter(pl.col("id") == "a")["keep"][0]
    assert decided.filter(pl.col("id") == "b")["drop_reason"][0] == "duplicate_instruction"
