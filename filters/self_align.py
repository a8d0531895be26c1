"""Self-Align answer filter: what of a principled / verbose raw completion is kept (arXiv 2305.03047).

Follows IBM/Dromedary's merge-and-filter scripts (branch dromedary_v1); every drop has a reason.

Principled rows (`subset` "default", from `principled_answers`), rules in order (drop reason):

1. the output starts with the fixed self-identification thought (no_self_identification) and has
   the answer marker "<name>:" after the thoughts (no_answer_marker);
2. the thoughts are stripped; the answer ends at the next turn (a user marker, or a new thought /
   answer marker of the model) and before its first repeated sentence piece of 3+ words (the
   reference's `dedup`);
3. an answer that ended by itself (next turn or end of sequence) needs >= 160 chars
   (answer_too_short); one that ran out of tokens is cut at the last space, no minimum
   (empty_answer if nothing is left);
4. it holds nothing of the prompt (exemplar_leak): the `Blacklist` DERIVED from the configured
   prompt: markers, exemplar names and number runs, rule citations "N (name)", and any 8-word run
   of an exemplar answer or a rule;
5. it does not start with an apology (apology).

Verbose rows (`subset` "verbose", from `verbose_answers`): cut at the next turn marker, at the
first repeated piece, and at list item 13 ("\\n13. "); ran out of tokens -> cut at the last space;
< 128 chars -> verbose_too_short; markers / prompt copies -> verbose_prompt_leak.

The cleaned answer replaces the assistant turn of `messages`; `self_align_checked` marks a row as
done, so a second instance after `verbose_answers` only checks the new verbose rows. Columns
added: `self_align_leak` (the matched blacklist entry), `self_align_rules_cited` /
`self_align_rules_consistent` (rule citations in the thoughts, and how many name the configured
rule of that number). `stats` holds summable counts; `SelfAlignFilter.summarise(stats)` turns
summed counts into kept share (paper: 70.6%), thought consistency and mean lengths.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Sequence

import polars as pl
from pydantic import Field

from alignforge.step import Step, StepConfig, StepError, carry_drops, require_columns
from schemas import MESSAGES
from stages.self_align_data import SelfAlignPrompt, cited_rules

PAPER_KEPT_SHARE = {"all": 0.706, "self_instruct": 0.716, "tgrt": 0.678}
_REPEAT_DELIMITERS = "\n.?!;:,`"
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z0-9]+)*")


# ---------------------------------------------------------------- the blacklist, derived from the prompt

@dataclass(frozen=True)
class Blacklist:
    """What a kept answer must not contain, derived from a SelfAlignPrompt (never typed per exemplar).

    - markers (exact text): the user / thoughts / answer / verbose markers, "internal thoughts"
      and the self-identification sentence;
    - names (case-sensitive whole words): proper names in the exemplar queries (capitalised words
      not opening a sentence, possessive "'s" dropped), e.g. the person or event an exemplar asks about;
    - number runs: the first three numbers of any list of 3+ numbers in an exemplar query;
    - rule citations: "N (name)" naming one of the configured rules (thoughts leaking into the answer);
    - ngrams: every `n`-word run (lower case) of the exemplar answers and the rule texts."""

    markers: tuple[str, ...]
    names: tuple[str, ...]
    number_runs: tuple[str, ...]
    rule_names: frozenset[str]
    ngrams: frozenset[tuple[str, ...]]
    n: int

    @classmethod
    def derive(cls, prompt: SelfAlignPrompt, *, n: int = 8, extra: Sequence[str] = ()) -> "Blacklist":
        markers = [prompt.user_marker, prompt.thoughts_marker, prompt.answer_marker, prompt.verbose_user_marker,
                   prompt.verbose_marker, "(extensive)", "internal thoughts", prompt.self_identification, *extra]
        own = {prompt.assistant_name, prompt.user_name}
        names: list[str] = []
        runs: list[str] = []
        for ex in prompt.exemplars:
            names += [name for name in proper_names(ex.user) if name not in own]
            for run in re.findall(r"\d+(?:\s*,\s*\d+){2,}", ex.user):
                runs.append(", ".join(re.findall(r"\d+", run)[:3]))
        sources = [ex.answer for ex in prompt.exemplars] + [prompt.fill(p.text) for p in prompt.principles]
        grams = frozenset(g for text in sources for g in word_ngrams(text, n))
        return cls(tuple(dict.fromkeys(m for m in markers if m)), tuple(dict.fromkeys(names)),
                   tuple(dict.fromkeys(runs)), frozenset(p.name.lower() for p in prompt.principles), grams, n)

    def find(self, text: str, *, names: bool = True) -> str | None:
        """The first blacklist entry found in `text` (None: clean). `names=False` skips names and number
        runs (for verbose answers, whose prompt holds no exemplars)."""
        lowered = text.lower()
        for marker in self.markers:
            if (marker.lower() in lowered) if marker == "internal thoughts" else (marker in text):
                return marker
        if names:
            for name in self.names:
                if re.search(rf"(?<!\w){re.escape(name)}(?!\w)", text):
                    return name
            for run in self.number_runs:
                if re.search(r"(?<!\d)" + r"\s*,\s*".join(re.escape(x) for x in run.split(", ")) + r"(?!\d)", text):
                    return run
        for num, name in cited_rules(text):
            if name.lower() in self.rule_names:
                return f"{num} ({name})"
        for gram in word_ngrams(text, self.n):
            if gram in self.ngrams:
                return " ".join(gram)
        return None


def proper_names(text: str) -> list[str]:
    """Runs of capitalised words that do not open a sentence ("Tell me about Ada Lovelace." -> ["Ada Lovelace"])."""
    names = []
    for sentence in re.split(r"(?<=[.!?])\s+|\n+", text):
        words = re.findall(r"[A-Za-z][\w'’-]*", sentence)
        run: list[str] = []
        for i, word in enumerate(words + [""]):
            capital = i > 0 and word[:1].isupper() and len(word) > 1 and not re.match(r"I(['’]|$)", word)
            if capital:
                run.append(re.sub(r"['’]s$", "", word))
            elif run:
                names.append(" ".join(run))
                run = []
    return names


def word_ngrams(text: str, n: int) -> list[tuple[str, ...]]:
    words = _WORD.findall(text.lower().replace("’", "'"))
    return [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]


# ---------------------------------------------------------------- cleaning rules

def cut_repeats(text: str, delimiters: str = _REPEAT_DELIMITERS, min_words: int = 3) -> tuple[str, bool]:
    """Cut before the first sentence piece (text up to and including a delimiter) that repeats an
    earlier piece: the reference's `dedup` against degenerate loops. Unlike the reference, pieces
    compare without surrounding blanks, and only pieces of `min_words`+ words count (so "1," or a
    code fence may repeat). Returns (text, was_cut)."""
    pieces = re.split(f"(?<=[{re.escape(delimiters)}])", text)
    seen: set[str] = set()
    kept: list[str] = []
    for piece in pieces:
        key = piece.strip()
        if len(key.split()) >= min_words:
            if key in seen:
                return "".join(kept).strip(), True
            seen.add(key)
        kept.append(piece)
    return text.strip(), False


def _cut_at(text: str, *markers: str) -> tuple[str, bool]:
    """Text before the first line starting with one of `markers` (the next turn)."""
    alternatives = "|".join(re.escape(m) for m in markers)
    match = re.search(rf"(?:^|\n)[ \t]*(?:{alternatives})", text)
    return (text[:match.start()], True) if match else (text, False)


def _cut_last_space(text: str) -> str:
    """A budget-exhausted answer ends mid-word: keep up to the last space (reference: rsplit(' ', 1))."""
    text = text.rstrip()
    return text.rsplit(" ", 1)[0].rstrip() if " " in text else text


@dataclass
class Verdict:
    answer: str | None
    reason: str | None
    leak: str | None = None
    cited: int | None = None
    consistent: int | None = None
    repeat_cut: bool = False
    budget_cut: bool = False
    list_cut: bool = False


def check_principled(raw: str, finish_reason: str | None, prompt: SelfAlignPrompt, blacklist: Blacklist, *,
                     min_chars: int = 160, apology_starts: Sequence[str] = (), repeats: bool = True) -> Verdict:
    """One principled completion (the text after "<name> (internal thoughts):") -> Verdict."""
    text = raw.lstrip()
    if not text.startswith(prompt.self_identification):
        return Verdict(None, "no_self_identification")
    marker = re.search(rf"\n[ \t]*{re.escape(prompt.answer_marker)}", text)
    if marker is None:
        return Verdict(None, "no_answer_marker")
    names = [p.name.lower() for p in prompt.principles]
    cites = cited_rules(text[:marker.start()])
    consistent = sum(1 for num, name in cites if 1 <= num <= len(names) and names[num - 1] == name.lower())
    verdict = Verdict(None, None, cited=len(cites), consistent=consistent)
    # The answer ends where the next turn starts: the user's, or a new thought / answer of the model's.
    answer, ended = _cut_at(text[marker.end():], prompt.user_marker, prompt.thoughts_marker, prompt.answer_marker)
    ended = ended or finish_reason != "length"
    if repeats:
        answer, verdict.repeat_cut = cut_repeats(answer)
    if not ended and not verdict.repeat_cut:
        answer, verdict.budget_cut = _cut_last_space(answer), True
    answer = answer.strip()
    verdict.answer = answer
    if ended and len(answer) < min_chars:
        verdict.reason = "answer_too_short"
    elif not answer:
        verdict.reason = "empty_answer"
    elif (leak := blacklist.find(answer)) is not None:
        verdict.reason, verdict.leak = "exemplar_leak", leak
    elif answer.replace("’", "'").lower().startswith(tuple(a.replace("’", "'").lower() for a in apology_starts)):
        verdict.reason = "apology"
    return verdict


def check_verbose(raw: str, finish_reason: str | None, prompt: SelfAlignPrompt, blacklist: Blacklist, *,
                  min_chars: int = 128, list_cut: int | None = 13, repeats: bool = True) -> Verdict:
    """One verbose completion (the text after "### <name> (extensive)") -> Verdict."""
    answer, ended = _cut_at(raw, prompt.verbose_user_marker, prompt.verbose_marker)
    ended = ended or finish_reason != "length"
    verdict = Verdict(None, None)
    if repeats:
        answer, verdict.repeat_cut = cut_repeats(answer)
    if list_cut is not None and f"\n{list_cut}. " in answer:
        answer, verdict.list_cut = answer.split(f"\n{list_cut}. ", 1)[0], True
    if not ended and not verdict.repeat_cut and not verdict.list_cut:
        answer, verdict.budget_cut = _cut_last_space(answer), True
    verdict.answer = answer = answer.strip()
    if len(answer) < min_chars:
        verdict.reason = "verbose_too_short"
    elif (leak := blacklist.find(answer, names=False)) is not None:
        verdict.reason, verdict.leak = "verbose_prompt_leak", leak
    return verdict


# ---------------------------------------------------------------- the step

class SelfAlignFilterConfig(StepConfig):
    prompt: SelfAlignPrompt = Field(default_factory=SelfAlignPrompt,
                                    description="the prompt principled_answers / verbose_answers used (checked)")
    min_answer_chars: int = Field(160, ge=0, description="answers that ended by themselves need this many chars")
    cut_repeats: bool = Field(True, description="cut at the first repeated sentence piece (reference: on)")
    leak_ngram: int = Field(8, ge=3, description="word-run length counted as copying an exemplar answer or a rule")
    extra_blacklist: tuple[str, ...] = Field((), description="more exact strings no kept answer may contain")
    apology_starts: tuple[str, ...] = ("I'm sorry", "I am sorry", "Sorry", "I apologize", "I apologise")
    verbose_min_chars: int = Field(128, ge=0)
    verbose_list_cut: int | None = Field(13, ge=2, description="cut verbose lists before this item number")


class SelfAlignFilter(Step):
    """principled_answers / verbose_answers rows -> cleaned `messages`, keep / drop_reason."""

    name: ClassVar[str] = "self_align_filter"
    version: ClassVar[int] = 1
    Config: ClassVar[type[StepConfig]] = SelfAlignFilterConfig
    config: SelfAlignFilterConfig

    def __init__(self, config: StepConfig | None = None, **overrides: Any):
        super().__init__(config, **overrides)
        cfg = self.config
        self.blacklist = Blacklist.derive(cfg.prompt, n=cfg.leak_ngram, extra=cfg.extra_blacklist)
        self._fingerprint = cfg.prompt.fingerprint()

    def __call__(self, df: pl.DataFrame) -> pl.DataFrame:
        require_columns(df, self.name, ["self_align_raw", "messages"],
                        fix="run principled_answers (and verbose_answers) before self_align_filter")
        made_with = {p for p in df["self_align_prompt"].drop_nulls().unique().to_list()} \
            if "self_align_prompt" in df.columns else set()
        if made_with - {self._fingerprint}:
            raise StepError(f"{self.name}: rows were generated with another Self-Align prompt than this filter's "
                            "(different principles, exemplars or names)", column="self_align_prompt",
                            fix="give principled_answers, verbose_answers and self_align_filter the same `prompt`")
        cfg, n = self.config, df.height
        raw, finish = df["self_align_raw"].to_list(), _col(df, "finish_reason")
        subset, sources = _col(df, "subset", "default"), _col(df, "prompt_source")
        checked = [bool(c) for c in _col(df, "self_align_checked", False)]
        alive = [k is not False for k in _col(df, "keep", True)]
        messages = df["messages"].to_list()
        leaks, cited, consistent = _col(df, "self_align_leak"), _col(df, "self_align_rules_cited"), \
            _col(df, "self_align_rules_consistent")
        reasons: list[str | None] = [None] * n
        stats = {k: 0 for k in ("principled_checked", "principled_kept", "tgrt_checked", "tgrt_kept",
                                "self_instruct_checked", "self_instruct_kept", "rules_cited", "rules_consistent",
                                "principled_chars", "verbose_checked", "verbose_kept", "verbose_chars",
                                "repeat_cuts", "budget_cuts", "list_cuts")}
        for i in range(n):
            if checked[i] or raw[i] is None:
                continue
            checked[i] = True
            verbose = subset[i] == "verbose"
            kind = "verbose" if verbose else "principled"
            stats[f"{kind}_checked"] += 1
            if not verbose and sources[i] in ("tgrt", "self_instruct"):
                stats[f"{sources[i]}_checked"] += 1
            if verbose:
                v = check_verbose(raw[i], finish[i], cfg.prompt, self.blacklist, min_chars=cfg.verbose_min_chars,
                                  list_cut=cfg.verbose_list_cut, repeats=cfg.cut_repeats)
            else:
                v = check_principled(raw[i], finish[i], cfg.prompt, self.blacklist, min_chars=cfg.min_answer_chars,
                                     apology_starts=cfg.apology_starts, repeats=cfg.cut_repeats)
                cited[i], consistent[i] = v.cited, v.consistent
                stats["rules_cited"] += v.cited or 0
                stats["rules_consistent"] += v.consistent or 0
            leaks[i], reasons[i] = v.leak, v.reason
            stats["repeat_cuts"] += v.repeat_cut
            stats["budget_cuts"] += v.budget_cut
            stats["list_cuts"] += v.list_cut
            if v.answer is not None and messages[i]:
                messages[i] = [*messages[i][:-1], {"role": "assistant", "content": v.answer}]
            if v.reason is None and alive[i]:
                stats[f"{kind}_kept"] += 1
                stats[f"{kind}_chars"] += len(v.answer or "")
                if not verbose and sources[i] in ("tgrt", "self_instruct"):
                    stats[f"{sources[i]}_kept"] += 1
        self.stats = {"generated_tokens": 0, **stats}
        out = df.with_columns(
            pl.Series("messages", messages, dtype=MESSAGES),
            pl.Series("self_align_checked", checked, dtype=pl.Boolean),
            pl.Series("self_align_leak", leaks, dtype=pl.Utf8),
            pl.Series("self_align_rules_cited", cited, dtype=pl.Int64),
            pl.Series("self_align_rules_consistent", consistent, dtype=pl.Int64))
        return carry_drops(out, pl.Series("_reason", reasons, dtype=pl.Utf8))

    @staticmethod
    def summarise(stats: Mapping[str, Any]) -> dict[str, Any]:
        """Kept share (vs the paper's), thought consistency and mean answer lengths from summed stats."""
        def ratio(a: str, b: str) -> float | None:
            return round(stats[a] / stats[b], 4) if stats.get(b) else None

        out = {"kept_share": ratio("principled_kept", "principled_checked"), "paper_kept_share": PAPER_KEPT_SHARE["all"],
               "kept_share_self_instruct": ratio("self_instruct_kept", "self_instruct_checked"),
               "paper_kept_share_self_instruct": PAPER_KEPT_SHARE["self_instruct"],
               "kept_share_tgrt": ratio("tgrt_kept", "tgrt_checked"), "paper_kept_share_tgrt": PAPER_KEPT_SHARE["tgrt"],
               "thought_consistency": ratio("rules_consistent", "rules_cited"),
               "mean_answer_chars": ratio("principled_chars", "principled_kept"),
               "verbose_kept_share": ratio("verbose_kept", "verbose_checked"),
               "mean_verbose_chars": ratio("verbose_chars", "verbose_kept")}
        if out["mean_answer_chars"] and out["mean_verbose_chars"]:
            out["verbose_to_plain_length"] = round(out["mean_verbose_chars"] / out["mean_answer_chars"], 3)
        return out


def _col(df: pl.DataFrame, name: str, default: Any = None) -> list:
    return df[name].to_list() if name in df.columns else [default] * df.height
