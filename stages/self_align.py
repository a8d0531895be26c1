"""Self-Align: principle-driven self-alignment from (almost) nothing (arXiv 2305.03047, Dromedary).

Matches IBM/Dromedary (branch dromedary_v1) in structure, counts and decoding; every prompt text,
principle, exemplar and seed is ours (stages/self_align_data.py). Five steps:

    tgrt_topics        source: topic brainstorm per question type over `rounds` rounds (reference:
                       9, questions drawn from round 5's pool, rounds counted from 0), case-insensitive
                       dedup, validity (<= 3 words, capital first letter, no trailing punctuation),
                       every type cut to the smallest type's count; seed row j -> the j-th
                       (type, topic) pair, types interleaved. With `share` < 1 only that share of the
                       seeds becomes TGRT rows; the rest pass through for `self_instruct`.
    tgrt_questions     (type, topic) rows -> `instruction`: one prompt per `hints_per_prompt` rows with
                       in-context seed questions; a row keeps the line whose hint matches it.
    self_instruct      source (`n`) or, with `n: null`, fills the rows left without an instruction:
                       Alpaca-style prompt with 5 seed tasks; word-count / keyword / first-character
                       filters; exact normalised dedup within the shard and against the seeds.
    principled_answers instruction -> raw completion of the principle prompt (16 rules + 5
                       exemplars; works on base and chat models). Rows get `messages`
                       [user, assistant = raw output] and `self_align_raw`; `self_align_filter`
                       (filters/self_align.py) strips the thoughts and applies the paper's rules.
    verbose_answers    kept rows -> an extra row each (`subset` "verbose") answered by the
                       "extensive" persona, with trigram / 4-gram frequency penalties
                       (engines/ngram_penalty.py); a second `self_align_filter` checks them.

Deliberate differences from the reference: topic brainstorming sends `requests_per_type`
requests per type and round (the reference sent one per pool topic, which grows geometrically);
the "Sorry" bias covers both BPE forms ("Sorry", " Sorry"); answers stop at the next user marker
(vLLM stop string) instead of always running to the token budget; self-instruct keeps one task
per request (stop at "###"); TGRT question prompts pre-fill the first target hint.
"""

from __future__ import annotations

import random
import re
import string
from typing import Any, ClassVar, Sequence

import polars as pl
from pydantic import Field, model_validator

from alignforge.step import EngineStep, StepConfig, StepError, sample_seed
from engines.base import Sampling
from engines.ngram_penalty import NGramPenalties
from engines.vllm_engine import PROMPT_TOO_LONG
from schemas import MESSAGES, row_id, stable_hash
from stages.self_align_data import (DEFAULT_QUESTION_TYPES, DEFAULT_SEED_QUESTIONS, DEFAULT_SEED_TASKS,
                                    PRINCIPLED_HEADER, QUESTION_GENERATION_PROMPT, SELF_INSTRUCT_BLOCKLIST,
                                    SELF_INSTRUCT_PROMPT, TOPIC_BRAINSTORM_PROMPT, VERBOSE_INTRO_ANSWER,
                                    VERBOSE_INTRO_QUESTION, VERBOSE_PERSONA, QuestionType, SeedQuestion, SeedTask,
                                    SelfAlignPrompt)

TGRT, SELF_INSTRUCT = "tgrt", "self_instruct"
DEFAULT_SUBSET, VERBOSE_SUBSET = "default", "verbose"


# ---------------------------------------------------------------- small shared helpers

def _column(df: pl.DataFrame, name: str, default: Any = None) -> list:
    return df[name].to_list() if name in df.columns else [default] * df.height


def _alive(df: pl.DataFrame) -> list[bool]:
    return [k is not False for k in _column(df, "keep", True)]


def _rebuild(df: pl.DataFrame, columns: dict[str, pl.Series]) -> pl.DataFrame:
    """`df` with `columns` replaced / added; lineage first, keep / drop_reason last."""
    out = df.drop([c for c in columns if c in df.columns]).with_columns(list(columns.values()))
    head = [c for c in ("id", "parent_id", "origin") if c in out.columns]
    tail = [c for c in ("keep", "drop_reason") if c in out.columns]
    return out.select([*head, *[c for c in out.columns if c not in head and c not in tail], *tail])


def _keep_columns(keep: list[bool], reasons: list[str | None]) -> dict[str, pl.Series]:
    return {"keep": pl.Series("keep", keep, dtype=pl.Boolean),
            "drop_reason": pl.Series("drop_reason", reasons, dtype=pl.Utf8)}


def normalise_instruction(text: str) -> str:
    """The reference's exact-dedup key: lower case, anything not a letter or digit -> space."""
    return " ".join(re.sub(r"[^a-zA-Z0-9]", " ", text or "").lower().split())


def _tokens(results) -> int:
    return sum(c.num_tokens for r in results for c in r.completions)


# ---------------------------------------------------------------- TGRT: topics

def topic_reason(line: str) -> tuple[str, str | None]:
    """(topic, None) for a valid brainstormed topic line, else (text, reason). Rules of the reference:
    at most 3 words, not empty, first character an ASCII capital, no trailing punctuation."""
    topic = re.sub(r"^\s*\d+\s*[.)]\s*", "", line).strip()
    if not topic:
        return topic, "empty"
    if len(topic.split()) > 3:
        return topic, "too_long"
    if topic[0] not in string.ascii_uppercase:
        return topic, "not_capitalised"
    if topic[-1] in string.punctuation:
        return topic, "trailing_punctuation"
    return topic, None


def dedup_topics(topics: Sequence[str]) -> list[str]:
    """Case-insensitive dedup, first spelling and order kept."""
    seen, out = set(), []
    for topic in topics:
        if topic.lower() not in seen:
            seen.add(topic.lower())
            out.append(topic)
    return out


def balance(pools: dict[str, list[str]]) -> dict[str, list[str]]:
    """Every type cut to the smallest type's count (the reference's balancing)."""
    smallest = min((len(v) for v in pools.values()), default=0)
    return {k: v[:smallest] for k, v in pools.items()}


class TGRTTopicsConfig(StepConfig):
    n: int = Field(100, ge=0, description="seed rows (source step): each becomes one (type, topic) row, or, "
                                          "outside `share`, a row left for self_instruct")
    seed: int = 0
    share: float = Field(1.0, ge=0.0, le=1.0, description="share of seed rows that become TGRT rows (the paper: "
                         "99,121 of 366,718 prompts = 0.27); the others pass through for self_instruct {n: null}")
    question_types: tuple[QuestionType, ...] = Field(DEFAULT_QUESTION_TYPES, min_length=1,
                                                     description="types with their seed topics (default: the 20 TGRT types)")
    rounds: int = Field(9, ge=1, description="brainstorm rounds (reference: 9)")
    question_round: int = Field(5, ge=0, description="rows are drawn from the pool after this round, counted "
                                                     "from 0 (reference: 5)")
    requests_per_type: int = Field(2, ge=1, description="brainstorm requests per type and round")
    shown_topics: int = Field(5, ge=1, description="existing topics shown in each brainstorm request (reference: 5)")
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(0.98, gt=0.0, le=1.0)
    max_tokens: int = Field(128, ge=1)

    @model_validator(mode="after")
    def _round_in_range(self) -> "TGRTTopicsConfig":
        if self.question_round >= self.rounds:
            raise ValueError(f"question_round={self.question_round} but only rounds 0..{self.rounds - 1} run. "
                             "Fix: set question_round below rounds")
        labels = [t.label for t in self.question_types]
        if len(set(labels)) != len(labels):
            raise ValueError("question_types has a label twice. Fix: give each type once")
        return self


def is_tgrt_seed(seed: int, share: float) -> bool:
    """Seeds spread evenly: seed s is TGRT when floor((s+1)*share) > floor(s*share)."""
    return int((seed + 1) * share + 1e-9) > int(seed * share + 1e-9)


class TGRTTopics(EngineStep):
    """Seed rows -> (question_type, topic) rows from a balanced, brainstormed topic pool."""

    name = "tgrt_topics"
    version = 1
    Config = TGRTTopicsConfig
    config: TGRTTopicsConfig
    source: ClassVar[bool] = True

    def __init__(self, config: StepConfig | None = None, *, engine: Any = None, **overrides: Any):
        super().__init__(config, engine=engine, **overrides)
        self._pool: tuple[str, list[dict[str, list[str]]], dict[str, int]] | None = None

    def brainstorm(self) -> tuple[list[dict[str, list[str]]], dict[str, int]]:
        """The balanced pool after every round and the work counters; computed once per engine."""
        engine = self.require_engine()
        key = str(getattr(engine, "model_id", ""))
        if self._pool is not None and self._pool[0] == key:
            return self._pool[1], {}
        cfg = self.config
        labels = [t.label for t in cfg.question_types]
        pools = {t.label: dedup_topics([s.strip() for s in t.seed_topics]) for t in cfg.question_types}
        counters = {"brainstorm_requests": 0, "generated_tokens": 0, "topics_valid": 0, "topics_duplicate": 0}
        history: list[dict[str, list[str]]] = []
        for rnd in range(cfg.rounds):
            shown_pools = balance(pools)
            requests, prompts, samplings = [], [], []
            for t, label in enumerate(labels):
                for k in range(cfg.requests_per_type):
                    pool = shown_pools[label] or pools[label]
                    rng = random.Random(sample_seed(cfg.seed, "tgrt_topics", t, rnd, k))
                    shown = rng.sample(pool, min(cfg.shown_topics, len(pool)))
                    listed = "".join(f"\n{i}. {topic}" for i, topic in enumerate(shown, 1))
                    prompts.append(TOPIC_BRAINSTORM_PROMPT.replace("{question_type}", label) + listed
                                   + f"\n{len(shown) + 1}.")
                    samplings.append(Sampling(temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens,
                                              seed=sample_seed(cfg.seed, "tgrt_topics", t, rnd, k, "sample"),
                                              stop=("\n\n",)))
                    requests.append(label)
            results = engine.complete(prompts, samplings, desc=f"{self.name} round {rnd}")
            counters["brainstorm_requests"] += len(prompts)
            counters["generated_tokens"] += _tokens(results)
            new: dict[str, list[str]] = {label: [] for label in labels}
            for label, result in zip(requests, results):
                for line in result.completions[0].text.split("\n")[:20]:
                    topic, reason = topic_reason(line)
                    if reason is None:
                        new[label].append(topic)
                        counters["topics_valid"] += 1
                    else:
                        counters[f"topics_{reason}"] = counters.get(f"topics_{reason}", 0) + 1
            for label in labels:
                merged = shown_pools[label] + new[label]
                pools[label] = dedup_topics(merged)
                counters["topics_duplicate"] += len(merged) - len(pools[label])
            history.append(balance(pools))
        self._pool = (key, history, counters)
        return history, counters

    def __call__(self, df: pl.DataFrame) -> pl.DataFrame:
        if "seed" not in df.columns:
            raise StepError(f"{self.name}: input needs an integer `seed` column (one row per wanted row); got "
                            f"{df.columns}", fix="make tgrt_topics the first step of the recipe (the runner feeds it "
                                                 "seed rows built from its `n`)")
        cfg = self.config
        seeds = [int(s) for s in df["seed"].to_list()]
        tgrt = [is_tgrt_seed(s, cfg.share) for s in seeds]
        history, counters = self.brainstorm() if any(tgrt) else ([], {})
        pool = history[cfg.question_round] if history else {}
        labels = [t.label for t in cfg.question_types]
        per_type = len(pool[labels[0]]) if pool else 0
        ids, parents, origins = _column(df, "id"), _column(df, "parent_id"), _column(df, "origin")
        cols: dict[str, list] = {k: [] for k in ("id", "parent_id", "origin", "prompt_source", "question_type",
                                                 "topic", "keep", "drop_reason")}
        for i, (s, is_tgrt) in enumerate(zip(seeds, tgrt)):
            if not is_tgrt:  # left for self_instruct {n: null}: the seed row passes through
                row = (ids[i], parents[i], origins[i], None, None, None, True, None)
            else:
                j = int(s * cfg.share + 1e-9)  # this seed's index among the TGRT seeds
                if j < per_type * len(labels):
                    label, topic = labels[j % len(labels)], pool[labels[j % len(labels)]][j // len(labels)]
                    row = (row_id(self.origin, cfg.seed, s, label, topic), None, self.origin, TGRT, label, topic,
                           True, None)
                else:
                    row = (row_id(self.origin, cfg.seed, s), None, self.origin, TGRT, None, None, False,
                           "tgrt_pool_exhausted")
            for key, value in zip(cols, row):
                cols[key].append(value)
        self.stats = {**counters, "tgrt_rows": sum(tgrt), "passed_to_self_instruct": len(seeds) - sum(tgrt),
                      # per-type pool size after each round (a list: reported, not summed over shards)
                      "tgrt_pool_per_type_by_round": [len(h[labels[0]]) for h in (self._pool or ("", []))[1]]}
        return pl.DataFrame({
            "id": pl.Series(cols["id"], dtype=pl.Utf8), "parent_id": pl.Series(cols["parent_id"], dtype=pl.Utf8),
            "origin": pl.Series(cols["origin"], dtype=pl.Utf8), "seed": pl.Series(seeds, dtype=pl.Int64),
            "prompt_source": pl.Series(cols["prompt_source"], dtype=pl.Utf8),
            "question_type": pl.Series(cols["question_type"], dtype=pl.Utf8),
            "topic": pl.Series(cols["topic"], dtype=pl.Utf8),
            "keep": pl.Series(cols["keep"], dtype=pl.Boolean),
            "drop_reason": pl.Series(cols["drop_reason"], dtype=pl.Utf8),
        })


# ---------------------------------------------------------------- TGRT: questions

def _hint(question_type: str, topic: str) -> str:
    # The reference phrases hints as "Instructions that require ..." (its types say "Questions").
    return f"type: {question_type.replace('Questions', 'Instructions', 1)}, topic: {topic}"


def _squash(text: str) -> str:
    return " ".join(text.split())


def match_questions(text: str, targets: Sequence[tuple[int, str, str]], *, truncated: bool) -> dict[int, str]:
    """{hint number: question} for output lines that start with a target's hint "N. type: T, topic: X".

    `text` is the completion with its pre-filled start; a truncated completion loses its last line
    (cut mid-sentence). The first line per hint wins."""
    lines = text.split("\n")
    if truncated:
        lines = lines[:-1]
    prefixes = {num: _squash(f"{num}. {_hint(qt, topic)}") for num, qt, topic in targets}
    found: dict[int, str] = {}
    for line in lines:
        line = _squash(line)
        for num, prefix in prefixes.items():
            if num not in found and line.startswith(prefix):
                question = line[len(prefix):]
                question = question.split("instruction:", 1)[1] if "instruction:" in question else ""
                found[num] = question.strip().strip('"').strip()
                break
    return found


class TGRTQuestionsConfig(StepConfig):
    seed: int = 0
    seed_questions: tuple[SeedQuestion, ...] = Field(DEFAULT_SEED_QUESTIONS, min_length=1,
                                                     description="in-context examples (default: one per TGRT type)")
    examples_per_prompt: int = Field(5, ge=0, description="seed questions shown per prompt (reference: 5)")
    hints_per_prompt: int = Field(5, ge=1, description="(type, topic) rows asked per prompt (reference: 5)")
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    max_tokens: int = Field(384, ge=1, description="reference: 384")


class TGRTQuestions(EngineStep):
    """(question_type, topic) rows -> `instruction`; other rows pass through unchanged."""

    name = "tgrt_questions"
    version = 1
    Config = TGRTQuestionsConfig
    config: TGRTQuestionsConfig

    def prompt(self, examples: Sequence[SeedQuestion], targets: Sequence[tuple[str, str]]) -> tuple[str, str, list]:
        """(prompt, pre-filled start of the completion, [(hint number, type, topic)] of the targets)."""
        hints = [(e.question_type, e.topic) for e in examples] + list(targets)
        hint_lines = "\n".join(f"{i}. {_hint(qt, topic)}" for i, (qt, topic) in enumerate(hints, 1))
        example_lines = "".join(f"{i}. {_hint(e.question_type, e.topic)}, instruction: {e.question}\n"
                                for i, e in enumerate(examples, 1))
        numbered = [(len(examples) + k + 1, qt, topic) for k, (qt, topic) in enumerate(targets)]
        first = numbered[0]
        start = f"{first[0]}. {_hint(first[1], first[2])}, instruction:"
        body = QUESTION_GENERATION_PROMPT.replace("{hints}", hint_lines).replace("{examples}", example_lines)
        return body + start, start, numbered

    def __call__(self, df: pl.DataFrame) -> pl.DataFrame:
        cfg = self.config
        engine = self.require_engine()
        alive = _alive(df)
        types, topics = _column(df, "question_type"), _column(df, "topic")
        sources = _column(df, "prompt_source")
        rows = [i for i in range(df.height) if alive[i] and sources[i] == TGRT and types[i] and topics[i]]
        ids = _column(df, "id")
        groups = [rows[k:k + cfg.hints_per_prompt] for k in range(0, len(rows), cfg.hints_per_prompt)]
        prompts, starts, numbered, samplings = [], [], [], []
        for group in groups:
            rng = random.Random(sample_seed(cfg.seed, "tgrt_questions", ids[group[0]], "examples"))
            examples = rng.sample(list(cfg.seed_questions), min(cfg.examples_per_prompt, len(cfg.seed_questions)))
            prompt, start, nums = self.prompt(examples, [(types[i], topics[i]) for i in group])
            prompts.append(prompt)
            starts.append(start)
            numbered.append(nums)
            samplings.append(Sampling(temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens,
                                      seed=sample_seed(cfg.seed, "tgrt_questions", ids[group[0]]),
                                      stop=(f"\n{nums[-1][0] + 1}.",)))
        results = engine.complete(prompts, samplings, desc=self.name) if prompts else []

        instructions = _column(df, "instruction")
        keep, reasons = alive[:], _column(df, "drop_reason")
        new_ids, new_parents, new_origins = ids[:], _column(df, "parent_id"), _column(df, "origin")
        seen: set[str] = set()
        for group, start, nums, result in zip(groups, starts, numbered, results):
            completion = result.completions[0]
            found = match_questions(start + completion.text, nums, truncated=completion.finish_reason == "length")
            for i, (num, _, _) in zip(group, nums):
                question = found.get(num)
                reason = None
                if completion.finish_reason == PROMPT_TOO_LONG:
                    reason = PROMPT_TOO_LONG
                elif question is None:
                    reason = "no_matching_question"
                elif not question:
                    reason = "empty_question"
                elif normalise_instruction(question) in seen:
                    reason = "duplicate_instruction"
                else:
                    seen.add(normalise_instruction(question))
                instructions[i] = question or None
                new_ids[i] = row_id(self.origin, ids[i], question)
                new_parents[i], new_origins[i] = ids[i], self.origin
                keep[i], reasons[i] = reason is None, reason
        self.stats = {"requests": len(prompts), "generated_tokens": _tokens(results), "tgrt_rows_in": len(rows)}
        return _rebuild(df, {
            "id": pl.Series("id", new_ids, dtype=pl.Utf8), "parent_id": pl.Series("parent_id", new_parents, dtype=pl.Utf8),
            "origin": pl.Series("origin", new_origins, dtype=pl.Utf8),
            "instruction": pl.Series("instruction", instructions, dtype=pl.Utf8), **_keep_columns(keep, reasons)})


# ---------------------------------------------------------------- plain Self-Instruct

def parse_task(text: str, number: int, finish_reason: str | None) -> tuple[str, str, str | None]:
    """(instruction, input, reason) of one generated task "N. Instruction: ...\\nN. Input:\\n...".

    `text` continues the prompt's "N. Instruction:". A completion cut by the token budget is dropped
    (the reference drops its last, unfinished task)."""
    if finish_reason == PROMPT_TOO_LONG:
        return "", "", PROMPT_TOO_LONG
    if finish_reason == "length":
        return "", "", "truncated_task"
    parts = re.split(rf"{number}\.\s+(Instruction|Input):", f"{number}. Instruction:" + text.split("###")[0])
    if len(parts) != 5:
        return "", "", "unparsable_task"
    instruction, task_input = parts[2].strip(), parts[4].strip()
    if task_input.lower() == "<noinput>":
        task_input = ""
    return instruction, task_input, None


def task_reason(instruction: str, task_input: str, *, min_words: int, max_words: int,
                blocklist: Sequence[str]) -> str | None:
    """The reference's Self-Instruct filters, in its order."""
    words = len(instruction.split())
    if words < min_words:
        return "task_too_short"
    if words > max_words:
        return "task_too_long"
    for word in blocklist:
        pattern = re.compile(rf"\b{re.escape(word)}\b", re.IGNORECASE)
        if pattern.search(instruction) or pattern.search(task_input):
            return "blocked_keyword"
    if instruction[0] in string.punctuation:
        return "starts_with_punctuation"
    if not instruction[0].isascii():
        return "starts_non_ascii"
    return None


class SelfInstructConfig(StepConfig):
    n: int | None = Field(100, ge=0, description="seed rows (source step); null: fill the rows an earlier step "
                                                 "left without an instruction (tgrt_topics with share < 1)")
    seed: int = 0
    seed_tasks: tuple[SeedTask, ...] = Field(DEFAULT_SEED_TASKS, min_length=1, description="in-context seed tasks "
                                             "(default: 40 of ours; the reference used Alpaca's 175)")
    examples_per_prompt: int = Field(5, ge=1, description="seed tasks shown per request (reference: 5)")
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(0.98, gt=0.0, le=1.0)
    max_tokens: int = Field(256, ge=1)
    min_words: int = Field(4, ge=1, description="the reference drops instructions of <= 3 words")
    max_words: int = Field(150, ge=1)
    blocklist: tuple[str, ...] = Field(SELF_INSTRUCT_BLOCKLIST, description="keywords of tasks a text model can't do")


class SelfInstruct(EngineStep):
    """Seed rows (or rows without an instruction) -> one generated task each (`instruction`)."""

    name = "self_instruct"
    version = 1
    Config = SelfInstructConfig
    config: SelfInstructConfig
    source: ClassVar[bool] = True

    def __init__(self, config: StepConfig | None = None, *, engine: Any = None, **overrides: Any):
        super().__init__(config, engine=engine, **overrides)
        self.source = self.config.n is not None  # n: null -> a map step filling earlier rows
        self._seed_keys = {normalise_instruction(self._task_text(t.instruction, t.input)) for t in self.config.seed_tasks}

    @staticmethod
    def _task_text(instruction: str, task_input: str) -> str:
        return f"{instruction}\n\n{task_input}" if task_input else instruction

    def prompt(self, examples: Sequence[SeedTask]) -> str:
        parts = [SELF_INSTRUCT_PROMPT]
        for i, task in enumerate(examples, 1):
            instruction = " ".join(task.instruction.split()).rstrip(":")
            parts.append(f"###\n{i}. Instruction: {instruction}\n{i}. Input:\n{task.input or '<noinput>'}\n")
        parts.append(f"###\n{len(examples) + 1}. Instruction:")
        return "".join(parts)

    def __call__(self, df: pl.DataFrame) -> pl.DataFrame:
        if "seed" not in df.columns:
            raise StepError(f"{self.name}: input needs an integer `seed` column; got {df.columns}",
                            fix="make self_instruct the first step (with n), or put it after tgrt_topics with n: null")
        cfg = self.config
        engine = self.require_engine()
        alive, seeds = _alive(df), _column(df, "seed")
        instructions = _column(df, "instruction")
        rows = [i for i in range(df.height) if alive[i] and instructions[i] is None and seeds[i] is not None]
        k = min(cfg.examples_per_prompt, len(cfg.seed_tasks))
        prompts, samplings = [], []
        for i in rows:
            rng = random.Random(sample_seed(cfg.seed, "self_instruct", int(seeds[i]), "examples"))
            prompts.append(self.prompt(rng.sample(list(cfg.seed_tasks), k)))
            samplings.append(Sampling(temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens,
                                      seed=sample_seed(cfg.seed, "self_instruct", int(seeds[i])), stop=("###",)))
        results = engine.complete(prompts, samplings, desc=self.name) if prompts else []

        ids, parents, origins = _column(df, "id"), _column(df, "parent_id"), _column(df, "origin")
        sources, keep, reasons = _column(df, "prompt_source"), alive[:], _column(df, "drop_reason")
        seen: set[str] = set()
        for i, result in zip(rows, results):
            completion = result.completions[0]
            instruction, task_input, reason = parse_task(completion.text, k + 1, completion.finish_reason)
            if reason is None:
                reason = task_reason(instruction, task_input, min_words=cfg.min_words, max_words=cfg.max_words,
                                     blocklist=cfg.blocklist)
            text = self._task_text(instruction, task_input) if instruction else None
            key = normalise_instruction(text or "")
            if reason is None and key in self._seed_keys:
                reason = "copies_seed_task"
            elif reason is None and key in seen:
                reason = "duplicate_instruction"
            if reason is None:
                seen.add(key)
            instructions[i], sources[i] = text, SELF_INSTRUCT
            ids[i], parents[i], origins[i] = row_id(self.origin, cfg.seed, int(seeds[i]), text), None, self.origin
            keep[i], reasons[i] = reason is None, reason
        self.stats = {"requests": len(prompts), "generated_tokens": _tokens(results)}
        return _rebuild(df, {
            "id": pl.Series("id", ids, dtype=pl.Utf8), "parent_id": pl.Series("parent_id", parents, dtype=pl.Utf8),
            "origin": pl.Series("origin", origins, dtype=pl.Utf8),
            "prompt_source": pl.Series("prompt_source", sources, dtype=pl.Utf8),
            "instruction": pl.Series("instruction", instructions, dtype=pl.Utf8), **_keep_columns(keep, reasons)})


# ---------------------------------------------------------------- principle-driven answers

def principled_prefix(prompt: SelfAlignPrompt) -> str:
    """The principle prompt up to (not including) the user's query: rules, then the worked exemplars."""
    rules = "\n".join(f"{i} ({p.name}). {prompt.fill(p.text)}" for i, p in enumerate(prompt.principles, 1))
    header = prompt.fill(PRINCIPLED_HEADER).replace("{rules}", rules)
    turns = [f"{prompt.user_marker} {ex.user}\n\n{prompt.thoughts_marker} {prompt.self_identification} "
             f"{ex.thoughts}\n\n{prompt.answer_marker} {ex.answer}" for ex in prompt.exemplars]
    return header + "\n\n" + "\n\n".join(turns) + "\n\n"


def principled_prompt(prompt: SelfAlignPrompt, instruction: str, prefix: str | None = None) -> str:
    return (prefix or principled_prefix(prompt)) + f"{prompt.user_marker} {instruction}\n\n{prompt.thoughts_marker}"


def first_token_ids(tokenizer: Any, words: Sequence[str]) -> tuple[int, ...]:
    """First token of each word in both BPE forms ("Sorry" and " Sorry" tokenise differently)."""
    ids: list[int] = []
    for word in words:
        for form in (word, " " + word):
            encoded = tokenizer.encode(form, add_special_tokens=False)
            if encoded:
                ids.append(int(encoded[0]))
    return tuple(dict.fromkeys(ids))


class PrincipledAnswersConfig(StepConfig):
    seed: int = 0
    prompt: SelfAlignPrompt = Field(default_factory=SelfAlignPrompt,
                                    description="principles, exemplars and names (self_align_filter needs the same)")
    temperature: float = Field(0.5, ge=0.0)
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    max_tokens: int = Field(256, ge=1)
    sorry_bias: float = Field(-100.0, description="logit bias on the first token of each `sorry_words` entry "
                                                  "(both BPE forms), at every position as in the reference; 0 = off")
    sorry_words: tuple[str, ...] = ("Sorry",)
    stop_at_user_marker: bool = Field(True, description="stop at the next user turn (saves the tokens the "
                                                        "reference generated and then cut off)")


class _Answers(EngineStep):
    """Shared row handling of the two answer steps."""

    def _cfg_key(self) -> str:
        if getattr(self, "_key", None) is None:
            self._key = stable_hash(self.config.model_dump(mode="json"), length=12)
        return self._key

    @staticmethod
    def questions(df: pl.DataFrame) -> list[str | None]:
        """The user query of each row: `instruction`, else the first user turn of `messages`."""
        if "instruction" in df.columns:
            return df["instruction"].to_list()
        if "messages" in df.columns:
            return [next((m["content"] for m in (msgs or []) if m["role"] == "user"), None)
                    for msgs in df["messages"].to_list()]
        raise StepError("input has neither an `instruction` nor a `messages` column",
                        fix="run tgrt_questions / self_instruct first, or load instruction rows as input")


class PrincipledAnswers(_Answers):
    """Instruction rows -> `messages` [user, assistant = raw output] + `self_align_raw` for self_align_filter.

    The principles and exemplars are only in the prompt, never in `messages` (principle engraving)."""

    name = "principled_answers"
    version = 1
    Config = PrincipledAnswersConfig
    config: PrincipledAnswersConfig

    def __call__(self, df: pl.DataFrame) -> pl.DataFrame:
        cfg, engine = self.config, self.require_engine()
        questions = self.questions(df)
        alive, reasons = _alive(df), _column(df, "drop_reason")
        for i, q in enumerate(questions):
            if alive[i] and not (q or "").strip():
                alive[i], reasons[i] = False, "no_instruction"
        rows = [i for i in range(df.height) if alive[i]]
        ids = _column(df, "id")
        prefix = principled_prefix(cfg.prompt)
        bias = tuple((t, cfg.sorry_bias) for t in first_token_ids(engine.tokenizer, cfg.sorry_words)) \
            if cfg.sorry_bias else ()
        stop = (f"\n{cfg.prompt.user_marker}",) if cfg.stop_at_user_marker else ()
        samplings = [Sampling(temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens,
                              seed=sample_seed(cfg.seed, ids[i], "principled"), stop=stop, logit_bias=bias)
                     for i in rows]
        results = engine.complete([principled_prompt(cfg.prompt, questions[i].strip(), prefix) for i in rows],
                                  samplings, desc=self.name) if rows else []
        raw: list[str | None] = [None] * df.height
        finish: list[str | None] = [None] * df.height
        tokens = [0] * df.height
        for i, result in zip(rows, results):
            c = result.completions[0]
            raw[i], finish[i], tokens[i] = c.text, c.finish_reason, c.num_tokens
            if c.finish_reason == PROMPT_TOO_LONG:
                alive[i], reasons[i] = False, PROMPT_TOO_LONG
        messages = [[{"role": "user", "content": (q or "").strip()}, {"role": "assistant", "content": (r or "").strip()}]
                    for q, r in zip(questions, raw)]
        key = self._cfg_key()
        self.stats = {"requests": len(rows), "generated_tokens": sum(tokens)}
        return _rebuild(df, {
            "id": pl.Series("id", [row_id(self.origin, key, p) for p in ids], dtype=pl.Utf8),
            "parent_id": pl.Series("parent_id", ids, dtype=pl.Utf8),
            "origin": pl.Series("origin", [self.origin] * df.height, dtype=pl.Utf8),
            "messages": pl.Series("messages", messages, dtype=MESSAGES),
            "self_align_raw": pl.Series("self_align_raw", raw, dtype=pl.Utf8),
            "finish_reason": pl.Series("finish_reason", finish, dtype=pl.Utf8),
            "gen_tokens": pl.Series("gen_tokens", tokens, dtype=pl.Int64),
            "subset": pl.Series("subset", [DEFAULT_SUBSET] * df.height, dtype=pl.Utf8),
            "self_align_prompt": pl.Series("self_align_prompt", [cfg.prompt.fingerprint()] * df.height, dtype=pl.Utf8),
            "self_align_checked": pl.Series("self_align_checked", [False] * df.height, dtype=pl.Boolean),
            **_keep_columns(alive, reasons)})


# ---------------------------------------------------------------- verbose cloning

def verbose_prompt(prompt: SelfAlignPrompt, persona: str, intro_question: str, intro_answer: str,
                   question: str) -> str:
    return (prompt.fill(persona) + "\n\n"
            + f"{prompt.verbose_user_marker}\n{intro_question}\n\n{prompt.verbose_marker}\n{prompt.fill(intro_answer)}"
            + f"\n\n{prompt.verbose_user_marker}\n{question}\n\n{prompt.verbose_marker}\n")


class VerboseAnswersConfig(StepConfig):
    seed: int = 0
    prompt: SelfAlignPrompt = Field(default_factory=SelfAlignPrompt, description="names and cut-off (the same "
                                    "prompt as principled_answers and self_align_filter)")
    persona: str = Field(VERBOSE_PERSONA, description="the 'extensive' persona; {assistant} and {cutoff} are filled")
    intro_question: str = VERBOSE_INTRO_QUESTION
    intro_answer: str = VERBOSE_INTRO_ANSWER
    temperature: float = Field(0.3, ge=0.0)
    top_p: float = Field(0.7, gt=0.0, le=1.0)
    max_tokens: int = Field(512, ge=1)
    ngram_penalties: NGramPenalties = Field(
        ((3, 1.0), (4, 2.0)), description="(n, penalty): logit -= penalty x count of the n-gram the token would "
                                          "repeat (reference: trigram 1.0, 4-gram 2.0); () = off")
    stop_at_user_marker: bool = True


class VerboseAnswers(_Answers):
    """Kept default-subset rows -> + one verbose row each (`subset` "verbose", parent = the plain row)."""

    name = "verbose_answers"
    version = 1
    Config = VerboseAnswersConfig
    config: VerboseAnswersConfig

    def __call__(self, df: pl.DataFrame) -> pl.DataFrame:
        cfg, engine = self.config, self.require_engine()
        questions = self.questions(df)
        subset = _column(df, "subset", DEFAULT_SUBSET)
        alive = _alive(df)
        rows = [i for i in range(df.height) if alive[i] and (subset[i] or DEFAULT_SUBSET) == DEFAULT_SUBSET
                and (questions[i] or "").strip()]
        ids = _column(df, "id")
        stop = (f"\n{cfg.prompt.verbose_user_marker}",) if cfg.stop_at_user_marker else ()
        samplings = [Sampling(temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens,
                              seed=sample_seed(cfg.seed, ids[i], "verbose"), stop=stop,
                              ngram_penalties=tuple(cfg.ngram_penalties)) for i in rows]
        prompts = [verbose_prompt(cfg.prompt, cfg.persona, cfg.intro_question, cfg.intro_answer, questions[i].strip())
                   for i in rows]
        results = engine.complete(prompts, samplings, desc=self.name) if rows else []
        base = _rebuild(df, {"subset": pl.Series("subset", [s or DEFAULT_SUBSET for s in subset], dtype=pl.Utf8)})
        self.stats = {"requests": len(rows), "generated_tokens": _tokens(results)}
        if not rows:
            return base
        parents = base[rows]
        key = self._cfg_key()
        raw = [r.completions[0].text for r in results]
        finish = [r.completions[0].finish_reason for r in results]
        reasons = [PROMPT_TOO_LONG if f == PROMPT_TOO_LONG else None for f in finish]
        verbose = _rebuild(parents, {
            "id": pl.Series("id", [row_id(self.origin, key, ids[i]) for i in rows], dtype=pl.Utf8),
            "parent_id": pl.Series("parent_id", [ids[i] for i in rows], dtype=pl.Utf8),
            "origin": pl.Series("origin", [self.origin] * len(rows), dtype=pl.Utf8),
            "messages": pl.Series("messages", [[{"role": "user", "content": questions[i].strip()},
                                                {"role": "assistant", "content": t.strip()}]
                                               for i, t in zip(rows, raw)], dtype=MESSAGES),
            "self_align_raw": pl.Series("self_align_raw", raw, dtype=pl.Utf8),
            "finish_reason": pl.Series("finish_reason", finish, dtype=pl.Utf8),
            "gen_tokens": pl.Series("gen_tokens", [r.completions[0].num_tokens for r in results], dtype=pl.Int64),
            "subset": pl.Series("subset", [VERBOSE_SUBSET] * len(rows), dtype=pl.Utf8),
            "self_align_prompt": pl.Series("self_align_prompt", [cfg.prompt.fingerprint()] * len(rows), dtype=pl.Utf8),
            "self_align_checked": pl.Series("self_align_checked", [False] * len(rows), dtype=pl.Boolean),
            **_keep_columns([r is None for r in reasons], reasons)})
        return pl.concat([base, verbose], how="diagonal_relaxed")
