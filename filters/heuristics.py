"""Cheap per-row quality heuristics, each with its own score column and drop reason.

| check                      | score column                     | drop reason                   |
|----------------------------|----------------------------------|-------------------------------|
| unreadable / blank text    | -                                | invalid_utf8 / empty_text     |
| instruction length         | heur_instruction_chars / _words  | instruction_too_short / _long |
| response length            | heur_response_chars / _words     | response_too_short / _long    |
| instruction ends with ":"  | heur_instruction_colon           | instruction_ends_with_colon   |
| chat-template token leak   | heur_template_leak (token found) | template_token_leak           |
| repeated lines (Gopher)    | heur_repeated_line_ratio         | repeated_lines                |
| repeated n-grams (Gopher)  | heur_repeated_ngram_ratio        | repeated_ngrams               |
| language (lingua)          | heur_language                    | language_mismatch             |

Repetition is measured per message and the row's score is its worst message: a response that
quotes its instruction (code review, "fix this sentence") repeats nothing. Repeated-line ratio
= share of content lines that duplicate an earlier line of the same message; structural lines
(blank, only brackets / punctuation like `{`, `},`, `]`, `---`, code fences, a lone closing tag,
block ends like `end` / `fi`) are not content, so pretty-printed JSON or code is not
"repetitive". Repeated n-gram ratio = share of characters covered by word n-grams (n = `ngram`,
default 5) that occur more than once (Gopher's duplicate n-gram fraction).
Bounds are compared exactly (integer fractions against the decimal bound as written): 3
duplicated lines of 10 under `max_repeated_line_ratio: 0.3` is exactly 0.3 and is kept.
A row failing several checks gets the first reason in the table order. A bound set to None is
not checked. Repetition is counted in Python only for rows that `repeat_candidates` (polars and
numpy over the whole shard) finds may repeat something; every other row has no repeat and scores 0.
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import ClassVar

import polars as pl
from pydantic import Field

from alignforge.step import Step, StepConfig

from .text import EMPTY_TEXT, INVALID_UTF8, conversation_expr, instruction_expr, mark_drops, message_texts, \
    message_texts_expr, response_expr, row_text, unusable_text_reason

TEMPLATE_TOKENS = (
    "<|im_start|>", "<|im_end|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|begin_of_text|>", "<|end_of_text|>", "[INST]", "[/INST]", "<<SYS>>", "<</SYS>>",
    "<start_of_turn>", "<end_of_turn>", "<|endoftext|>", "<|user|>", "<|assistant|>", "<|system|>",
    "<|end|>", "</s>", "<s>",
)
_LANG_SAMPLE_CHARS = 2000  # language of the first 2000 chars: enough, and 1 MB rows stay fast


class HeuristicsConfig(StepConfig):
    min_instruction_chars: int | None = 3
    max_instruction_chars: int | None = 8000
    min_instruction_words: int | None = 1
    max_instruction_words: int | None = None
    min_response_chars: int | None = 1
    max_response_chars: int | None = 32000
    min_response_words: int | None = None
    max_response_words: int | None = None
    drop_colon_ending: bool = True
    template_tokens: tuple[str, ...] = TEMPLATE_TOKENS
    max_repeated_line_ratio: float | None = Field(0.3, ge=0.0, le=1.0)
    max_repeated_ngram_ratio: float | None = Field(0.2, ge=0.0, le=1.0)
    ngram: int = Field(5, ge=1)
    # Allowed languages (lingua names, e.g. "ENGLISH"); None: no language check.
    languages: tuple[str, ...] | None = None
    # Languages lingua chooses among (fewer = faster); None: the allowed ones plus a few common ones.
    candidate_languages: tuple[str, ...] | None = None
    min_language_chars: int = Field(20, ge=0, description="shorter texts are not language-checked")


# Lines that carry layout, not content: ASCII punctuation only (`{`, `},`, `]`, `---`, `|---|`;
# an emoji or symbol line is content), a code fence (```python), a lone closing tag (</div>), a
# bare block end, or a key that only opens a nested value (`"langs": [`, `items = {`: its content
# is on the following lines). Cheap string tests first: this runs on every line of every row.
_PUNCTUATION_AND_SPACE = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~ \t\r\n\f\v"
_FENCE = re.compile(r"(?:```|~~~)[\w+#.-]*")
_CLOSING_TAG = re.compile(r"</[\w:.-]+>")
_BLOCK_ENDS = frozenset({"end", "fi", "done", "esac", "else", "pass", "break", "continue", "return"})
_KEY_OPENER = re.compile(r"[\"']?[\w .$-]*[\"']?\s*[:=]\s*[\[{(]")


def is_structural_line(line: str) -> bool:
    text = line.strip()
    if not text.strip(_PUNCTUATION_AND_SPACE):
        return True
    if text.startswith(("```", "~~~")):
        return _FENCE.fullmatch(text) is not None
    if text.startswith("</"):
        return _CLOSING_TAG.fullmatch(text) is not None
    if text[-1] in "[{(":
        return _KEY_OPENER.fullmatch(text) is not None
    return text.rstrip(":;,") in _BLOCK_ENDS and len(text) - len(text.rstrip(":;,")) <= 1


def repeated_line_counts(text: str | None) -> tuple[int, int]:
    """(content lines that duplicate an earlier content line, content lines) of one message."""
    lines = [ln.strip() for ln in (text or "").splitlines()]
    content = [ln for ln in lines if not is_structural_line(ln)]
    return len(content) - len(set(content)), len(content)


def repeated_ngram_counts(text: str | None, n: int = 5) -> tuple[int, int]:
    """(word characters covered by word n-grams that occur more than once, word characters)."""
    words = (text or "").split()
    total = sum(len(w) for w in words)
    if len(words) < n:
        return 0, total
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    counts: dict[tuple, int] = {}
    for g in grams:
        counts[g] = counts.get(g, 0) + 1
    covered = [False] * len(words)
    for i, g in enumerate(grams):
        if counts[g] > 1:
            for k in range(i, i + n):
                covered[k] = True
    return sum(len(w) for w, c in zip(words, covered) if c), total


def _line_repeats(text: str | None) -> tuple[int, int]:
    """repeated_line_counts where it can be non-zero; (0, 1) when no stripped line repeats (then no
    content line does either): one set per message instead of a structural test per line."""
    lines = [ln.strip() for ln in (text or "").splitlines()]
    if len(set(lines)) == len(lines):
        return 0, 1
    return repeated_line_counts(text)


def _ngram_repeats(text: str | None, n: int) -> tuple[int, int]:
    """repeated_ngram_counts where it can be non-zero; (0, 1) when no word n-gram repeats (most
    messages: one C-level set of zipped tuples instead of the per-gram Python loop)."""
    words = (text or "").split()
    if len(words) < n:
        return 0, 1
    grams = list(zip(*(words[i:] for i in range(n))))
    if len(set(grams)) == len(grams):
        return 0, 1
    return repeated_ngram_counts(text, n)


def _fraction(counts: tuple[int, int]) -> Fraction:
    part, whole = counts
    return Fraction(part, whole) if whole else Fraction(0)


def repeated_line_ratio(text: str | None) -> float:
    """Share of content lines of one text that duplicate an earlier line (structural lines ignored)."""
    return float(_fraction(repeated_line_counts(text)))


def repeated_ngram_ratio(text: str | None, n: int = 5) -> float:
    """Share of word characters covered by word n-grams that occur more than once."""
    return float(_fraction(repeated_ngram_counts(text, n)))


def exact_bound(value: float) -> Fraction:
    """A bound as the decimal the user wrote (0.3 -> 3/10), not its binary float (0.2999...989)."""
    return Fraction(repr(float(value)))


def worst_message(messages: list[str], measure) -> Fraction:
    """The highest exact ratio over a row's messages (0 for a row without messages)."""
    best_part, best_whole = 0, 1
    for text in messages:
        part, whole = measure(text)
        if part and part * best_whole > best_part * whole:  # exact: cross-multiplied integers
            best_part, best_whole = part, whole
    return Fraction(best_part, best_whole)


# A stripped line made only of these is structural (is_structural_line's first test).
_PUNCTUATION_LINE = r"^[!-/:-@\[-`{-~ \t\r\n\x0b\x0c]*$"
# Characters where polars' "\n" split / strip_chars / " " split differ from Python's splitlines /
# strip / split: such messages are always counted in Python.
_ODD_LINES = r"[\r\x0b\x0c\x1c-\x1f\x85\u2028\u2029]"
_ODD_WORDS = r"[\x1c-\x1f]|[^\S \n]"
_MIX = 0x9E3779B97F4A7C15  # spreads message numbers over 64 bits before they are xor-ed into keys


def repeat_candidates(df: pl.DataFrame, n: int) -> tuple[pl.Series, pl.Series]:
    """Per row: may a message repeat a content line / a word n-gram? False is exact (no repeat);
    True only means "count it". Found with polars and numpy over all messages of the shard at once:
    a (message, line) or (message, n-gram) hash key seen twice. Hash collisions only add rows."""
    import numpy as np

    rows = df.select(message_texts_expr(df).alias("m")).with_row_index("row").explode("m") \
        .with_columns(pl.col("m").fill_null("")).with_row_index("msg")
    lines = rows.select("msg", pl.col("m").str.split("\n").alias("line")).explode("line") \
        .select("msg", pl.col("line").str.strip_chars()).filter(~pl.col("line").str.contains(_PUNCTUATION_LINE))
    line_msgs = _repeated(lines["msg"].to_numpy(), lines["line"].hash().to_numpy())
    words = rows.select("msg", pl.col("m").str.replace_all("\n", " ", literal=True).str.split(" ").alias("w")) \
        .explode("w").filter(pl.col("w") != "")
    msg, word = words["msg"].to_numpy(), words["w"].hash().to_numpy()
    span = len(word) - n + 1
    ngram_msgs = msg[:0]
    if span > 0:
        gram = word[:span].copy()
        for k in range(1, n):
            gram = gram * np.uint64(1_000_003) ^ word[k:k + span]  # wraps mod 2^64, as intended
        inside = msg[:span] == msg[n - 1:]  # n-grams within one message only
        ngram_msgs = _repeated(msg[:span][inside], gram[inside])
    flags = rows.select(
        "row",
        (pl.col("msg").is_in(pl.Series(line_msgs).implode()) | pl.col("m").str.contains(_ODD_LINES)).alias("lines"),
        (pl.col("msg").is_in(pl.Series(ngram_msgs).implode()) | pl.col("m").str.contains(_ODD_WORDS)).alias("ngrams"),
    ).group_by("row").agg(pl.col("lines").any(), pl.col("ngrams").any()).sort("row")
    return flags["lines"], flags["ngrams"]


def _repeated(owner, key):
    """The owners (message numbers) holding some key twice: one sort of (owner, key) packed into
    64 bits (the key loses its low bits: a collision only adds a message)."""
    import numpy as np

    if not len(owner):
        return owner
    bits = max(1, int(owner.max()).bit_length())
    packed = (owner.astype(np.uint64) << np.uint64(64 - bits)) | (key >> np.uint64(bits))
    packed = np.sort(packed.view(np.int64))  # any total order puts equal words side by side
    return np.unique(packed[1:][packed[1:] == packed[:-1]].view(np.uint64) >> np.uint64(64 - bits))


def _ratios(df: pl.DataFrame, maybe: pl.Series, measure, bound: Fraction | None) -> tuple[pl.Series, pl.Series]:
    """(ratio, ratio > bound) per row: worst_message over the rows flagged in `maybe`, 0 elsewhere."""
    ratio, over = [0.0] * df.height, [False] * df.height
    flagged = maybe.arg_true().to_list()
    for i, texts in zip(flagged, message_texts(df[flagged]) if flagged else ()):
        exact = worst_message(texts, measure)
        ratio[i], over[i] = float(exact), bound is not None and exact > bound
    return pl.Series(ratio, dtype=pl.Float64), pl.Series(over, dtype=pl.Boolean)


class _Language:
    def __init__(self, allowed: tuple[str, ...], candidates: tuple[str, ...] | None):
        try:
            from lingua import Language, LanguageDetectorBuilder
        except ImportError as exc:
            raise ImportError("the heuristics language check needs lingua: pip install lingua-language-detector "
                              "(or pip install -e '.[curate]'), or set heuristics.languages=null") from exc
        names = set(allowed) | set(candidates or ("ENGLISH", "FRENCH", "GERMAN", "SPANISH", "CHINESE",
                                                   "RUSSIAN", "PORTUGUESE", "JAPANESE"))
        unknown = sorted(n for n in names if not hasattr(Language, n.upper()))
        if unknown:
            raise ValueError(f"unknown lingua language name(s) {unknown}; use upper-case English names "
                             "like 'ENGLISH', 'GERMAN'")
        self.detector = LanguageDetectorBuilder.from_languages(*(getattr(Language, n.upper()) for n in names)).build()

    def detect(self, texts: list[str | None]) -> list[str | None]:
        samples = [(t or "")[:_LANG_SAMPLE_CHARS] for t in texts]
        found = self.detector.detect_languages_in_parallel_of(samples)
        return [lang.name if lang is not None else None for lang in found]


class Heuristics(Step):
    name: ClassVar[str] = "heuristics"
    # 2: repetition per message, structural lines ignored, bounds compared exactly.
    version: ClassVar[int] = 2
    Config: ClassVar[type[StepConfig]] = HeuristicsConfig
    config: HeuristicsConfig

    def __init__(self, config: HeuristicsConfig | None = None, **overrides):
        super().__init__(config, **overrides)
        self._language: _Language | None = None

    def __call__(self, df: pl.DataFrame) -> pl.DataFrame:
        cfg = self.config
        if df.height == 0:
            return mark_drops(df, pl.Series("r", [], dtype=pl.Utf8))
        convo = row_text(df, "conversation")
        unusable = unusable_text_reason(df, convo)
        instruction = df.select(instruction_expr(df)).to_series().fill_null("")
        resp_expr = response_expr(df)
        response = df.select(resp_expr).to_series().fill_null("") if resp_expr is not None else None

        scores = {
            "heur_instruction_chars": instruction.str.len_chars(),
            "heur_instruction_colon": instruction.str.strip_chars_end().str.ends_with(":"),
        }
        words_of = lambda s: s.str.count_matches(r"\S+")  # noqa: E731
        scores["heur_instruction_words"] = words_of(instruction)
        if response is not None:
            scores["heur_response_chars"] = response.str.len_chars()
            scores["heur_response_words"] = words_of(response)
        leak = pl.Series([None] * df.height, dtype=pl.Utf8)
        if cfg.template_tokens:
            found = convo.fill_null("").str.extract_many(list(cfg.template_tokens), overlapping=False)
            leak = found.list.first()
        scores["heur_template_leak"] = leak
        # Exact counts in Python only for rows whose messages may repeat a line / an n-gram; the
        # rest score 0 (worst_message ignores zero counts, so the fast paths give (0, 1)).
        maybe_lines, maybe_ngrams = repeat_candidates(df, cfg.ngram)
        bounds = [None if b is None else exact_bound(b) for b in (cfg.max_repeated_line_ratio, cfg.max_repeated_ngram_ratio)]
        scores["heur_repeated_line_ratio"], too_many_lines = _ratios(df, maybe_lines, _line_repeats, bounds[0])
        scores["heur_repeated_ngram_ratio"], too_many_ngrams = _ratios(
            df, maybe_ngrams, lambda t: _ngram_repeats(t, cfg.ngram), bounds[1])
        if cfg.languages:
            if self._language is None:
                self._language = _Language(cfg.languages, cfg.candidate_languages)
            convo_list = convo.fill_null("").to_list()  # lingua takes Python strings; only built when asked
            langs = self._language.detect(convo_list)
            scores["heur_language"] = pl.Series(langs, dtype=pl.Utf8)

        out = df.drop([c for c in scores if c in df.columns]).with_columns(
            [s.alias(name) for name, s in scores.items()])
        checks: list[tuple[pl.Expr, str]] = []

        def bound(col: str, lo: int | None, hi: int | None, short: str, long: str) -> None:
            if col not in out.columns:
                return
            if lo is not None:
                checks.append((pl.col(col) < lo, short))
            if hi is not None:
                checks.append((pl.col(col) > hi, long))

        bound("heur_instruction_chars", cfg.min_instruction_chars, cfg.max_instruction_chars,
              "instruction_too_short", "instruction_too_long")
        bound("heur_instruction_words", cfg.min_instruction_words, cfg.max_instruction_words,
              "instruction_too_short", "instruction_too_long")
        bound("heur_response_chars", cfg.min_response_chars, cfg.max_response_chars,
              "response_too_short", "response_too_long")
        bound("heur_response_words", cfg.min_response_words, cfg.max_response_words,
              "response_too_short", "response_too_long")
        if cfg.drop_colon_ending:
            checks.append((pl.col("heur_instruction_colon"), "instruction_ends_with_colon"))
        checks.append((pl.col("heur_template_leak").is_not_null(), "template_token_leak"))
        # Exact comparisons (Fractions), never float ratios against float bounds.
        if cfg.max_repeated_line_ratio is not None:
            checks.append((pl.lit(too_many_lines), "repeated_lines"))
        if cfg.max_repeated_ngram_ratio is not None:
            checks.append((pl.lit(too_many_ngrams), "repeated_ngrams"))
        if cfg.languages:
            allowed = [lang.upper() for lang in cfg.languages]
            long_enough = pl.lit(pl.Series([len(t.strip()) >= cfg.min_language_chars for t in convo_list]))
            checks.append((long_enough & ~pl.col("heur_language").fill_null("UNKNOWN").is_in(allowed),
                           "language_mismatch"))

        reason = pl.lit(unusable)
        expr = pl.when(reason.is_not_null()).then(reason)
        for cond, why in checks:
            expr = expr.when(cond.fill_null(False)).then(pl.lit(why))
        reasons = out.select(expr.otherwise(pl.lit(None, dtype=pl.Utf8)).alias("r")).to_series()
        self.stats = {"rows": df.height, "dropped": int(reasons.is_not_null().sum())}
        return mark_drops(out, reasons)


__all__ = ["Heuristics", "HeuristicsConfig", "TEMPLATE_TOKENS", "repeated_line_ratio", "repeated_ngram_ratio",
           "repeated_line_counts", "repeated_ngram_counts", "is_structural_line", "exact_bound", "EMPTY_TEXT",
           "INVALID_UTF8", "conversation_expr"]
