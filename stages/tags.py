"""Magpie-style instruction tags and the official Magpie SFT filter.

`MagpieTags` asks the chat model three short questions per instruction (input quality,
difficulty, task category). Each answer is constrained with vLLM structured outputs
(`Sampling.choice`) to exactly one allowed label; decoding is greedy. All 3 x rows questions of
a shard go to the engine in ONE chat call. Engines without structured outputs (a remote server)
may answer `Good.`, `"good"`, `{"label": "good"}` or prose: `parse_label` reads the first three
(case, quotes, trailing punctuation, a `Label:` prefix and JSON wrappers are ignored) and never
guesses from prose. A tag it can't read stays null, and the row's `tag_error` says why
(`empty_instruction`, or `unparsed_tag:<tag,...>`); `stats["unparsed"]` counts them.

The official SFT selection over these tags lives in filters/magpie_filter.py (`magpie_filter` step):
quality >= average (option: good), reward >= -10 (if a `reward` column exists), instruction
not ending with ":", first (lowest id) of each near-duplicate group (if `minhash_cluster`
exists), then the n rows with the longest responses. Every row it removes gets keep=False and
the rule's reason; nothing is deleted.
"""

from __future__ import annotations

import json
import re
from typing import Any

import polars as pl
from pydantic import Field

from engines.base import Engine, Sampling
from alignforge.step import EngineStep, StepConfig
from stages.best_of_n import prompts_of

INPUT_QUALITY = ("very poor", "poor", "average", "good", "excellent")
DIFFICULTY = ("very easy", "easy", "medium", "hard", "very hard")
TASK_CATEGORY = ("information seeking", "reasoning", "planning", "editing", "coding & debugging", "math",
                 "role playing", "data analysis", "creative writing", "advice seeking", "brainstorming", "others")

TAG_LABELS = {"input_quality": INPUT_QUALITY, "difficulty": DIFFICULTY, "task_category": TASK_CATEGORY}

# Our wording. Each question shows the request and lists the allowed labels.
TAG_QUESTIONS = {
    "input_quality": ("Rate how clear, specific and well-formed this user request is: does it give enough "
                      "context and say what is wanted?"),
    "difficulty": "Rate how hard it would be for a capable assistant to answer this user request well.",
    "task_category": "Which kind of task is this user request mainly asking for?",
}
TAG_SYSTEM = ("You label user requests for a dataset. Answer with exactly one of the allowed labels and "
              "nothing else.")


def tag_prompt(column: str, instruction: str) -> list[dict[str, str]]:
    labels = ", ".join(TAG_LABELS[column])
    user = (f"{TAG_QUESTIONS[column]}\n\n<request>\n{instruction}\n</request>\n\n"
            f"Allowed labels: {labels}.\nLabel:")
    return [{"role": "system", "content": TAG_SYSTEM}, {"role": "user", "content": user}]


UNPARSED_TAG = "unparsed_tag"
EMPTY_INSTRUCTION = "empty_instruction"
_WRAPPING = " \t\r\n\"'`*_.!;,<>[](){}"


def _normal(text: str) -> str:
    text = re.sub(r"\s+", " ", text.strip(_WRAPPING)).casefold()
    return re.sub(r"\s*(?:&|\band\b)\s*", " & ", text)


def parse_label(text: Any, labels: tuple[str, ...], tag: str | None = None) -> tuple[str | None, str | None]:
    """(label, None) when `text` names exactly one of `labels`, else (None, "unparsed_tag").

    Accepts the label itself in any case, wrapped in quotes / markdown / trailing punctuation,
    after a `Label:` (or `<tag>:`) prefix, or as JSON: a string, a one-item list, or an object
    whose `label` / `tag` / `<tag>` key (or only value) is the label. Never raises, never
    guesses: prose that merely contains a label ("not poor") is unparsed."""
    if not isinstance(text, str):
        return None, UNPARSED_TAG
    by_normal = {_normal(label): label for label in labels}
    candidates = [text]
    stripped = text.strip()
    if stripped[:1] in ('{', '[', '"'):
        try:
            value = json.loads(stripped)
        except (ValueError, RecursionError):
            value = None
        if isinstance(value, list) and len(value) == 1:
            value = value[0]
        if isinstance(value, dict):
            keys = [k for k in ("label", "tag", tag) if k and isinstance(value.get(k), str)]
            value = value[keys[0]] if keys else (next(iter(value.values())) if len(value) == 1 else None)
        if isinstance(value, str):
            candidates.insert(0, value)
    for candidate in candidates:
        normal = _normal(candidate)
        prefix = re.match(r"(?:label|answer|tag|" + re.escape((tag or "label").replace("_", " ")) + r")\s*[:=-]\s*",
                          normal.replace("_", " "))
        if prefix:
            normal = _normal(normal[prefix.end():])
        if normal in by_normal:
            return by_normal[normal], None
    return None, UNPARSED_TAG


class MagpieTagsConfig(StepConfig):
    tags: tuple[str, ...] = Field(("input_quality", "difficulty", "task_category"),
                                  description="which tags to compute (subset of the three)")
    max_instruction_chars: int = Field(4000, ge=1, description="longer instructions are cut for the tagger prompt")


class MagpieTags(EngineStep):
    """Rows with `instruction` (or `messages`) -> + `input_quality`, `difficulty`, `task_category`, `tag_error`."""

    name = "magpie_tags"
    version = 2  # 2: lenient label parsing (JSON, quotes, case) and a `tag_error` reason per row
    Config = MagpieTagsConfig
    config: MagpieTagsConfig

    def __init__(self, config: StepConfig | None = None, *, engine: Engine | None = None, **overrides: Any):
        super().__init__(config, engine=engine, **overrides)
        unknown = set(self.config.tags) - set(TAG_LABELS)
        if unknown:
            raise ValueError(f"{self.name}: unknown tags {sorted(unknown)}. Fix: use a subset of {list(TAG_LABELS)}")

    def instructions(self, df: pl.DataFrame) -> list[str]:
        if "instruction" in df.columns:
            return [t or "" for t in df["instruction"].to_list()]
        # First user turn of the conversation (what Magpie tags).
        firsts = []
        for prompt in prompts_of(df, where=self.name):
            firsts.append(next((m["content"] for m in prompt if m["role"] == "user"), "") or "")
        return firsts

    def __call__(self, df: pl.DataFrame) -> pl.DataFrame:
        if self.engine is None:
            raise ValueError(f"{self.name}: no engine. Fix: MagpieTags(engine=get_engine(...))")
        texts = [t[: self.config.max_instruction_chars] for t in self.instructions(df)]
        live = [bool(t.strip()) for t in texts]
        requests = [(column, i) for column in self.config.tags for i in range(df.height) if live[i]]
        conversations = [tag_prompt(column, texts[i]) for column, i in requests]
        longest = {c: max(len(self.engine.tokenizer(label, add_special_tokens=False)["input_ids"]) for label in labels)
                   for c, labels in TAG_LABELS.items()}
        samplings = [Sampling(temperature=0.0, max_tokens=longest[column] + 4, choice=TAG_LABELS[column])
                     for column, _ in requests]
        results = self.engine.chat(conversations, samplings, desc=self.name) if requests else []
        values: dict[str, list[str | None]] = {c: [None] * df.height for c in self.config.tags}
        failed: list[list[str]] = [[] for _ in range(df.height)]
        unparsed = 0
        for (column, i), result in zip(requests, results):
            label, _ = parse_label(result.completions[0].text if result.completions else None, TAG_LABELS[column],
                                   column)
            values[column][i] = label
            if label is None:  # structured outputs make this rare on vLLM; counted, never guessed
                unparsed += 1
                failed[i].append(column)
        errors = [EMPTY_INSTRUCTION if not live[i] else (f"{UNPARSED_TAG}:{','.join(failed[i])}" if failed[i] else None)
                  for i in range(df.height)]
        self.stats = {"rows_in": df.height, "requests": len(requests), "unparsed": unparsed,
                      "empty_instruction": live.count(False),
                      "generated_tokens": sum(r.completions[0].num_tokens for r in results if r.completions)}
        return df.with_columns([pl.Series(c, v, dtype=pl.Utf8) for c, v in values.items()]
                               + [pl.Series("tag_error", errors, dtype=pl.Utf8)])


# ---------------------------------------------------------------- official SFT filter
