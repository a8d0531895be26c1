"""Negatively-correlated (NC) candidate sets and their i.i.d. baseline (Community Alignment, arXiv 2507.09650).

`nc_candidates`: ONE request per prompt asks the model for k replies at once that deliberately
differ in the values / outlook they express (the request never names value axes), and the reply
is parsed into a candidate set. `iid_candidates`: k independent samples of the plain prompt, same
model and temperature: the baseline the paper compares against.

Output: one row per (conversation, turn): `prompt` (messages up to the user turn), `candidates`
list<struct<content, score, index>> (schemas CANDIDATE + index), `joint` (the set laid out as
"# Response A:" ... blocks, as the released data stores it), `raw_output` (the model's raw NC
text; null for i.i.d.), `method` ("nc" / "iid"), `conversation_id`, `turn`, `continued_from`.

Format is guaranteed where the engine can: `structured="json"` sends `Sampling.json_schema` for an
object with exactly k keys `response_a`.. whose values are strings of bounded length (vLLM and the
OpenAI client support it; the scripted engine does not enforce it). `structured="headers"` asks
for "# Response A:" header lines and parses them tolerantly ("**Reply 2.**", "## Response b -");
JSON output is also recognised in that mode and vice versa. A set with fewer than k usable
candidates (empty, < `min_words` words, duplicate of an earlier one, cut by max_tokens) is dropped
with a counted reason; it is never padded from other samples. More than k parsed: the first k.

Multi-turn (up to 4 turns, as the released data): the next turn continues from a designated
candidate (`continue_from`: first, best by score (reward model or the judge on the engine), or
random with the seed), then a follow-up user turn is sampled Magpie-MT style (pre-query template
under a follow-up system prompt, `stages.magpie`). A follow-up that fails its checks ends the
conversation with a row whose drop_reason is "followup_<reason>" (no candidates).

Where we differ from the paper: the NC prompt and the judge prompt are ours (theirs are not
public); the designated candidate of the released data is the human-preferred one, here it is
chosen by rule; candidate sets may come from one small model (the paper pools several LLMs).

One engine call per phase per turn for the whole shard; every request has its own seed
(`stages.magpie.sample_seed`), so a set does not depend on what else is in the batch.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from typing import Any, ClassVar, Literal, Sequence

import polars as pl
from pydantic import Field

from alignforge.step import EngineStep, StepConfig, StepError
from engines.base import Sampling
from schemas import MESSAGES, row_id
from stages.best_of_n import prompts_of
from stages.magpie import (FOLLOWUP_SYSTEM_PROMPT, check_query, pre_query_prefix, sample_seed, stop_strings,
                           stop_token_ids, template_tokens)

CANDIDATE_ENTRY = pl.Struct({"content": pl.Utf8, "score": pl.Float64, "index": pl.Int64})
LETTERS = "ABCDEFGH"
FOLLOWUP_PREFIX = "followup_"  # drop reasons of rows that end a conversation (no candidate set)

# Our words. Deliberately names no value axis (the paper's prompt does not either).
NC_INSTRUCTION = (
    "Here is a message someone sent:\n\n<message>\n{message}\n</message>\n\n"
    "Write {k} different replies to it, as {k} different people would write them. These people hold "
    "different beliefs about what matters most in life, so their replies reach different conclusions or "
    "give different advice; they do not say the same thing in other words. Each reply answers the message "
    "directly, stands on its own and does not mention the other replies.\n\n{format}"
)
FORMAT_JSON = "Return a JSON object with the keys {keys}; each value is one complete reply."
FORMAT_HEADERS = "Start each reply on its own line with its header: {headers}."

# Tolerant header: "# Response A:", "**Reply 2.**", "## response b -", "Option C)".
_HEADER = re.compile(
    r"^[ \t]*(?P<mark>#{1,6}[ \t]*|\*\*|__)?[ \t]*(?:response|reply|answer|option|perspective|candidate)[ \t]*#?"
    r"(?P<label>[A-Ha-h]|[1-8])(?![\w'])[ \t]*(?:\*\*|__)?[ \t]*(?P<punct>[:.)\-\u2013\u2014])?[ \t]*(?:\*\*|__)?[ \t]*",
    re.IGNORECASE | re.MULTILINE)
_JSON_PAIR = re.compile(r'"(?:response|reply)_?([a-hA-H1-8])"\s*:\s*"((?:[^"\\]|\\.)*)"')
_WORD = re.compile(r"\w+")


def keys_for(k: int) -> list[str]:
    return [f"response_{LETTERS[i].lower()}" for i in range(k)]


def json_schema_for(k: int, *, min_chars: int = 1, max_chars: int = 2000) -> dict[str, Any]:
    """An object with exactly k required string keys response_a.. (bounded length, no other keys)."""
    prop = {"type": "string", "minLength": min_chars, "maxLength": max_chars}
    return {"type": "object", "properties": {key: dict(prop) for key in keys_for(k)},
            "required": keys_for(k), "additionalProperties": False}


def nc_request(history: list[dict[str, str]], k: int, structured: str) -> list[dict[str, str]]:
    """The conversation sent for one NC set: the history, its last user turn wrapped in the NC instruction."""
    if structured == "json":
        fmt = FORMAT_JSON.format(keys=", ".join(keys_for(k)))
    else:
        fmt = FORMAT_HEADERS.format(headers=", ".join(f"'# Response {LETTERS[i]}:'" for i in range(k)))
    last = history[-1]
    return [*history[:-1], {"role": "user", "content": NC_INSTRUCTION.format(message=last["content"], k=k, format=fmt)}]


def render_joint(texts: Sequence[str]) -> str:
    """A candidate set in the released data's layout: "# Response A:\\n..." blocks."""
    return "\n\n".join(f"# Response {LETTERS[i] if i < len(LETTERS) else i + 1}:\n{t}" for i, t in enumerate(texts))


def parse_headers(text: str) -> list[str]:
    """Blocks after header lines ("# Response A:"); text before the first header is ignored.

    A line counts as a header only with a markup mark (#, **) or punctuation after the label, so
    "Answer a few questions" in a reply is not a header."""
    heads = [m for m in _HEADER.finditer(text) if m.group("mark") or m.group("punct")]
    return [text[m.end(): nxt.start() if nxt is not None else len(text)].strip()
            for m, nxt in zip(heads, [*heads[1:], None])]


def parse_json(text: str, k: int) -> list[str] | None:
    """Values of a JSON object (response_a.. order) or array; None when no JSON is found.

    A cut-off object still yields its complete "response_x": "..." pairs."""
    start = min((i for i in (text.find("{"), text.find("[")) if i >= 0), default=-1)
    if start < 0:
        return None
    try:
        value, _ = json.JSONDecoder().raw_decode(text[start:])
    except ValueError:
        pairs = _JSON_PAIR.findall(text)
        if not pairs:
            return None
        out = []
        for _, raw in pairs:
            try:
                out.append(json.loads(f'"{raw}"'))
            except ValueError:
                out.append(raw)
        return out
    if isinstance(value, dict):
        ordered = [value[key] for key in keys_for(k) if key in value]
        rest = [v for key, v in value.items() if key not in keys_for(k)]
        return [v if isinstance(v, str) else json.dumps(v, ensure_ascii=False) for v in [*ordered, *rest]]
    if isinstance(value, list):
        return [v if isinstance(v, str) else json.dumps(v, ensure_ascii=False) for v in value]
    return None


def parse_set(text: str, k: int, structured: str) -> tuple[list[str], str]:
    """(candidate texts, how they were found: "json" | "headers" | "none"); the configured format first."""
    tries = ("json", "headers") if structured == "json" else ("headers", "json")
    for how in tries:
        found = parse_json(text, k) if how == "json" else parse_headers(text)
        if found:
            return list(found), how
    return [], "none"


_LABEL = re.compile(r"^\s*(?:#{1,6}\s*)?(?:\*\*)?\s*(?:response|reply)\s*[A-Ha-h1-8]\s*(?:\*\*)?\s*[:.)\-]\s*(?:\*\*)?\s*",
                    re.IGNORECASE)


def _normal(text: str) -> str:
    return " ".join(_WORD.findall(text.lower()))


def usable_candidates(texts: Sequence[str], k: int, *, min_words: int, leak: Sequence[str] = (),
                      truncated: Sequence[bool] = ()) -> tuple[list[str], Counter]:
    """The first k usable candidates and why the others were removed.

    Removed: "empty_candidate", "short_candidate" (< min_words words), "duplicate_candidate" (same
    words as an earlier usable one, case and punctuation ignored), "truncated_candidate"."""
    usable: list[str] = []
    removed: Counter = Counter()
    seen: set[str] = set()
    for i, text in enumerate(texts):
        text = text or ""
        for tok in leak:
            if tok in text:
                text = text[: text.index(tok)]
        text = _LABEL.sub("", text, count=1).strip()
        words = len(_WORD.findall(text))
        if i < len(truncated) and truncated[i]:
            removed["truncated_candidate"] += 1
        elif not text:
            removed["empty_candidate"] += 1
        elif words < min_words:
            removed["short_candidate"] += 1
        elif _normal(text) in seen:
            removed["duplicate_candidate"] += 1
        elif len(usable) < k:
            usable.append(text)
            seen.add(_normal(text))
        else:
            removed["extra_candidate"] += 1
    return usable, removed


def set_drop_reason(usable: list[str], removed: Counter, k: int, *, parsed: int, cut: bool) -> str | None:
    """Why a set is dropped (None: it has k usable candidates)."""
    if len(usable) >= k:
        return None
    if parsed == 0:
        return "truncated" if cut else "unparsed"
    if (cut and parsed < k) or removed["truncated_candidate"]:
        return "truncated"
    reasons = [(n, r) for r, n in removed.items() if r != "extra_candidate"]
    if reasons:
        return max(reasons, key=lambda item: item[0])[1]  # the most frequent removal (first on ties)
    return "too_few_candidates"


# ---------------------------------------------------------------- config

class CandidateSetsConfig(StepConfig):
    k: int = Field(4, ge=2, le=8, description="candidates per set (paper: 4)")
    turns: int = Field(1, ge=1, le=4, description="turns per conversation (paper: up to 4)")
    seed: int = 0
    temperature: float = Field(0.8, ge=0.0, description="same for NC and i.i.d. in a comparison")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens_per_candidate: int = Field(256, ge=8, description="i.i.d.: max_tokens per sample; NC: k times this "
                                          "(+ format overhead) for the one joint reply")
    repetition_penalty: float = Field(1.0, gt=0.0)
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    system_prompt: str | None = Field(None, description="system turn put before the conversation (None: none)")
    min_words: int = Field(5, ge=1, description="a candidate with fewer words is not usable")
    drop_truncated: bool = Field(True, description="a candidate cut by max_tokens is not usable")
    continue_from: Literal["first", "best", "random"] = Field(
        "first", description="candidate the next turn continues from: first, best by score, random (seeded)")
    score_model: str | None = Field(None, description="continue_from=best: reward model folder / hub id; None = the "
                                    "judge on the engine (engines.reward.JudgeReward)")
    judge_scale: int = Field(5, ge=2, le=9)
    followup_temperature: float = Field(1.0, ge=0.0)
    followup_top_p: float = Field(1.0, gt=0.0, le=1.0)
    followup_max_tokens: int = Field(128, ge=1)
    followup_system_prompt: str = FOLLOWUP_SYSTEM_PROMPT


class NCCandidatesConfig(CandidateSetsConfig):
    structured: Literal["json", "headers"] = Field(
        "json", description="json: Sampling.json_schema for exactly k strings (engines with structured outputs); "
                            "headers: free text with '# Response A:' headers, parsed tolerantly")


class IIDCandidatesConfig(CandidateSetsConfig):
    pair_with_input: bool = Field(
        False, description="input rows are nc_candidates sets: keep them and add an i.i.d. set for each "
                           "prompt (same conversation_id / turn: the compare_iid layout)")


# ---------------------------------------------------------------- the shared turn loop

class _CandidateSets(EngineStep):
    method: ClassVar[str] = ""
    config: CandidateSetsConfig

    def __init__(self, config: StepConfig | None = None, *, engine: Any = None, scorer: Any = None,
                 **overrides: Any):
        super().__init__(config, engine=engine, **overrides)
        self._scorer = scorer

    # Subclasses: ONE engine call for all sets of a turn -> per set (raw text|None, texts, truncated flags, cut, tokens).
    def _sample(self, histories: list[list[dict[str, str]]], keys: list[tuple[str, int]]) -> list[tuple]:
        raise NotImplementedError

    def __call__(self, df: pl.DataFrame) -> pl.DataFrame:
        if "id" not in df.columns:
            raise StepError(f"{self.name}: input has no `id` column (the parent of each candidate set); got {df.columns}",
                            column="id", fix="load rows with schemas.mapping.load_rows or run magpie_instructions first")
        self.require_engine()
        live = df["keep"].fill_null(True).to_list() if "keep" in df.columns else [True] * df.height
        prompts = prompts_of(df, self.config.system_prompt, self.name)
        rows = [i for i in range(df.height) if live[i] and prompts[i] and prompts[i][-1]["role"] == "user"
                and (prompts[i][-1]["content"] or "").strip()]
        self.stats = {"rows_in": df.height, "skipped_inputs": df.height - len(rows)}
        out = self.run_conversations([df["id"][i] for i in rows], [prompts[i] for i in rows])
        return self.frame(out)

    def run_conversations(self, conv_ids: list[str], histories: list[list[dict[str, str]]]) -> list[dict]:
        """`cfg.turns` turns of candidate sets for each conversation (ids = the input rows' ids)."""
        cfg = self.config
        histories = [[dict(m) for m in h] for h in histories]
        parents = list(conv_ids)
        alive = list(range(len(conv_ids)))
        records: list[dict] = []
        removed_total: Counter = Counter()
        stats = Counter()
        last_turn = cfg.turns
        for turn in range(1, last_turn + 1):
            if not alive:
                break
            sampled = self._sample([histories[c] for c in alive], [(conv_ids[c], turn) for c in alive])
            turn_records = {}
            for c, sample in zip(alive, sampled):
                record = self._record(conv_ids[c], turn, parents[c], histories[c], sample, stats, removed_total)
                records.append(record)
                turn_records[c] = record
            kept = [c for c in alive if turn_records[c]["drop_reason"] is None]
            if cfg.continue_from == "best" and kept:
                self._score([turn_records[c] for c in kept])
            if turn == last_turn:
                break
            # Continue each kept conversation from its designated candidate, then sample the follow-up query.
            for c in kept:
                record = turn_records[c]
                chosen = self._designated(record)
                record["continued_from"] = chosen
                histories[c].append({"role": "assistant", "content": record["candidates"][chosen]["content"]})
            queries = self._followups([histories[c] for c in kept], [(conv_ids[c], turn) for c in kept])
            alive = []
            for c, (text, reason, tokens) in zip(kept, queries):
                stats["generated_tokens"] += tokens
                histories[c].append({"role": "user", "content": text})
                parents[c] = self.record_id(conv_ids[c], turn)
                if reason:  # the conversation ends here: a row says why
                    stats["followups_failed"] += 1
                    records.append({"conversation_id": conv_ids[c], "turn": turn + 1, "parent_id": parents[c],
                                    "prompt": [dict(m) for m in histories[c]], "candidates": [], "raw_output": None,
                                    "n_parsed": 0, "gen_tokens": tokens, "drop_reason": FOLLOWUP_PREFIX + reason,
                                    "continued_from": None})
                else:
                    alive.append(c)
        self.stats.update(stats)
        self.stats["candidates_removed"] = dict(sorted(removed_total.items()))
        return records

    def _record(self, conversation_id: str, turn: int, parent: str, prompt: list[dict[str, str]], sample: tuple,
                stats: Counter, removed_total: Counter) -> dict:
        """One sampled set -> its row (usable candidates, drop reason), counting removals."""
        cfg = self.config
        raw, texts, truncated, cut, tokens = sample
        usable, removed = usable_candidates(texts, cfg.k, min_words=cfg.min_words,
                                            leak=self._leak_tokens(),
                                            truncated=truncated if cfg.drop_truncated else ())
        removed_total.update(removed)
        reason = set_drop_reason(usable, removed, cfg.k, parsed=len(texts), cut=cut)
        stats["generated_tokens"] += tokens
        stats["sets"] += 1
        stats["sets_kept"] += reason is None
        return {"conversation_id": conversation_id, "turn": turn, "parent_id": parent,
                "prompt": [dict(m) for m in prompt],
                "candidates": [{"content": t, "score": None, "index": j} for j, t in enumerate(usable)],
                "raw_output": raw, "n_parsed": len(texts), "gen_tokens": tokens, "drop_reason": reason,
                "continued_from": None}

    def _leak_tokens(self) -> tuple[str, ...]:
        if getattr(self, "_leak", None) is None or self._leak[0] is not self.engine:
            self._leak = (self.engine, template_tokens(self.engine.tokenizer))
        return self._leak[1]

    def _designated(self, record: dict) -> int:
        cfg, cands = self.config, record["candidates"]
        if cfg.continue_from == "random":
            return sample_seed(cfg.seed, record["conversation_id"], record["turn"], "continue") % len(cands)
        if cfg.continue_from == "best":
            scored = [(c["score"], -c["index"]) for c in cands if c["score"] is not None]
            if scored:
                return -max(scored)[1]
            self.stats["best_unscored"] = self.stats.get("best_unscored", 0) + 1
        return 0

    def _score(self, records: list[dict]) -> None:
        """Fill candidate scores (reward model or the judge on the engine): ONE scorer call."""
        if self._scorer is None:
            from engines.reward import make_scorer

            self._scorer = make_scorer(self.config.score_model, engine=self.engine, scale=self.config.judge_scale)
        pairs = [(r, c) for r in records for c in r["candidates"]]
        results = self._scorer.score([r["prompt"] for r, _ in pairs], [c["content"] for _, c in pairs])
        for (_, cand), result in zip(pairs, results):
            cand["score"] = result.score

    def _followups(self, histories: list[list[dict[str, str]]], keys: list[tuple[str, int]]) -> list[tuple]:
        """Magpie-MT follow-up queries: ONE engine.complete call -> (text, drop reason, tokens) each."""
        if not histories:
            return []
        cfg, tok = self.config, self.engine.tokenizer
        stops, stop_ids, leak = stop_strings(tok, early_stop=True), stop_token_ids(tok), template_tokens(tok)
        prompts = [pre_query_prefix(tok, system=cfg.followup_system_prompt, history=h) for h in histories]
        samplings = [Sampling(temperature=cfg.followup_temperature, top_p=cfg.followup_top_p,
                              max_tokens=cfg.followup_max_tokens, seed=sample_seed(cfg.seed, cid, turn, "followup"),
                              stop=stops, stop_token_ids=stop_ids, skip_special_tokens=False,
                              repetition_penalty=cfg.repetition_penalty, frequency_penalty=cfg.frequency_penalty,
                              presence_penalty=cfg.presence_penalty) for cid, turn in keys]
        results = self.engine.complete(prompts, samplings, desc=f"{self.name} follow-up queries")
        out = []
        for result in results:
            c = result.completions[0]
            text, reason = check_query(c.text, c.finish_reason, leak, sanitize=True, stops=stops)
            out.append((text, reason, c.num_tokens))
        return out

    def record_id(self, conversation_id: str, turn: int) -> str:
        return row_id(self.origin, self.config.model_dump(mode="json"), conversation_id, turn)

    def frame(self, records: list[dict]) -> pl.DataFrame:
        """Rows in conversation order (then turn), the candidates layout."""
        order = {}
        for r in records:
            order.setdefault(r["conversation_id"], len(order))
        records = sorted(records, key=lambda r: (order[r["conversation_id"]], r["turn"]))
        n = len(records)
        col = lambda key: [r[key] for r in records]  # noqa: E731
        return pl.DataFrame({
            "id": pl.Series([self.record_id(r["conversation_id"], r["turn"]) for r in records], dtype=pl.Utf8),
            "parent_id": pl.Series(col("parent_id"), dtype=pl.Utf8),
            "origin": pl.Series([self.origin] * n, dtype=pl.Utf8),
            "conversation_id": pl.Series(col("conversation_id"), dtype=pl.Utf8),
            "turn": pl.Series(col("turn"), dtype=pl.Int64),
            "method": pl.Series([self.method] * n, dtype=pl.Utf8),
            "prompt": pl.Series(col("prompt"), dtype=MESSAGES),
            "candidates": pl.Series(col("candidates"), dtype=pl.List(CANDIDATE_ENTRY)),
            "joint": pl.Series([render_joint([c["content"] for c in r["candidates"]]) for r in records], dtype=pl.Utf8),
            "raw_output": pl.Series(col("raw_output"), dtype=pl.Utf8),
            "n_parsed": pl.Series(col("n_parsed"), dtype=pl.Int64),
            "continued_from": pl.Series(col("continued_from"), dtype=pl.Int64),
            "gen_tokens": pl.Series(col("gen_tokens"), dtype=pl.Int64),
            "keep": pl.Series([r["drop_reason"] is None for r in records], dtype=pl.Boolean),
            "drop_reason": pl.Series(col("drop_reason"), dtype=pl.Utf8),
        })

    def _sampling(self, max_tokens: int, seed: int, **extra: Any) -> Sampling:
        cfg = self.config
        return Sampling(temperature=cfg.temperature, top_p=cfg.top_p if cfg.temperature > 0 else 1.0,
                        max_tokens=max_tokens, seed=seed, stop_token_ids=stop_token_ids(self.engine.tokenizer),
                        repetition_penalty=cfg.repetition_penalty, frequency_penalty=cfg.frequency_penalty,
                        presence_penalty=cfg.presence_penalty, **extra)


class NCCandidates(_CandidateSets):
    """Prompt rows -> one NC candidate set per (conversation, turn), from ONE joint request each."""

    name = "nc_candidates"
    version = 1
    method = "nc"
    Config = NCCandidatesConfig
    config: NCCandidatesConfig

    def _sample(self, histories, keys):
        cfg = self.config
        per = cfg.max_tokens_per_candidate
        extra: dict[str, Any] = {}
        if cfg.structured == "json":
            # ~4 characters a token bounds each string so the object closes within max_tokens.
            extra["json_schema"] = json_schema_for(cfg.k, min_chars=2 * cfg.min_words, max_chars=4 * per)
        samplings = [self._sampling(cfg.k * (per + 16) + 16, sample_seed(cfg.seed, cid, turn, "nc"), **extra)
                     for cid, turn in keys]
        requests = [nc_request(h, cfg.k, cfg.structured) for h in histories]
        results = self.engine.chat(requests, samplings, desc=self.name) if requests else []
        out = []
        for result in results:
            c = result.completions[0]
            cut = c.finish_reason == "length"
            texts, how = parse_set(c.text, cfg.k, cfg.structured)
            self.stats[f"parsed_{how}"] = self.stats.get(f"parsed_{how}", 0) + 1
            # A cut joint reply: its last parsed block is incomplete (complete JSON strings are not).
            truncated = [cut and how == "headers" and j == len(texts) - 1 for j in range(len(texts))]
            out.append((c.text, texts, truncated, cut, c.num_tokens))
        return out


class IIDCandidates(_CandidateSets):
    """Prompt rows -> k independent samples per (conversation, turn): the NC baseline."""

    name = "iid_candidates"
    version = 1
    method = "iid"
    Config = IIDCandidatesConfig
    config: IIDCandidatesConfig

    def _sample(self, histories, keys):
        cfg = self.config
        requests = [(h, cid, turn, j) for h, (cid, turn) in zip(histories, keys) for j in range(cfg.k)]
        samplings = [self._sampling(cfg.max_tokens_per_candidate, sample_seed(cfg.seed, cid, turn, j, "iid"))
                     for _, cid, turn, j in requests]
        results = self.engine.chat([h for h, *_ in requests], samplings, desc=self.name) if requests else []
        out = []
        for i in range(len(histories)):
            block = [r.completions[0] for r in results[i * cfg.k:(i + 1) * cfg.k]]
            truncated = [c.finish_reason == "length" for c in block]
            out.append((None, [c.text for c in block], truncated, False, sum(c.num_tokens for c in block)))
        return out

    def __call__(self, df: pl.DataFrame) -> pl.DataFrame:
        if not self.config.pair_with_input:
            return super().__call__(df)
        for column in ("id", "prompt", "conversation_id", "turn"):
            if column not in df.columns:
                raise StepError(f"{self.name} with pair_with_input=true pairs with nc_candidates sets, but the input "
                                f"has no {column!r} column (columns: {df.columns})", column=column,
                                fix="put iid_candidates right after nc_candidates, or set pair_with_input=false")
        self.require_engine()
        reasons = df["drop_reason"].to_list() if "drop_reason" in df.columns else [None] * df.height
        # Every NC set gets a partner, kept or dropped (parse rate is compared too); rows that end a
        # conversation (failed follow-up) hold no set.
        todo = [i for i in range(df.height) if not (reasons[i] or "").startswith(FOLLOWUP_PREFIX)]
        self.stats = {"rows_in": df.height, "skipped_inputs": df.height - len(todo)}
        stats, removed_total = Counter(), Counter()
        conv = [df["conversation_id"][i] for i in todo]
        turns = [int(df["turn"][i]) for i in todo]
        prompts = [[dict(m) for m in df["prompt"][i]] for i in todo]
        # One turn per NC set, all in ONE engine call; seeds depend on (conversation, turn) only.
        sampled = self._sample(prompts, list(zip(conv, turns)))
        records = [self._record(cid, turn, df["id"][i], prompt, sample, stats, removed_total)
                   for cid, turn, i, prompt, sample in zip(conv, turns, todo, prompts, sampled)]
        self.stats.update(stats)
        self.stats["candidates_removed"] = dict(sorted(removed_total.items()))
        paired = self.frame(records)
        return pl.concat([df, paired], how="diagonal_relaxed")


def candidate_rows(sets: pl.DataFrame, *, method: str | None = "nc") -> pl.DataFrame:
    """Kept candidate sets -> one row per candidate, the layout reward_label + schemas.preference take:
    `id`, `parent_id` (= the set's id), `origin`, `candidate_index`, `messages` (prompt + the candidate).

        rows = candidate_rows(sets)                       # nc_candidates (+ diversity) output
        scored = RewardLabel(engine=engine)(rows)         # or a reward model
        pairs = build_preferences(scored)                 # chosen = max reward, rejected = min, per set

    `method`: keep only sets of that method (None: all, e.g. to score i.i.d. sets too)."""
    live = sets.filter(pl.col("keep").fill_null(True)) if "keep" in sets.columns else sets
    if method is not None and "method" in live.columns:
        live = live.filter(pl.col("method") == method)
    out: dict[str, list] = {"id": [], "parent_id": [], "candidate_index": [], "messages": []}
    for set_id, prompt, cands in zip(live["id"].to_list(), live["prompt"].to_list(), live["candidates"].to_list()):
        for c in cands or []:
            out["id"].append(row_id("nc_candidate@1", set_id, c["index"]))
            out["parent_id"].append(set_id)
            out["candidate_index"].append(int(c["index"]))
            out["messages"].append([*[dict(m) for m in prompt], {"role": "assistant", "content": c["content"]}])
    n = len(out["id"])
    return pl.DataFrame({"id": pl.Series(out["id"], dtype=pl.Utf8), "parent_id": pl.Series(out["parent_id"], dtype=pl.Utf8),
                         "origin": pl.Series(["nc_candidate@1"] * n, dtype=pl.Utf8),
                         "candidate_index": pl.Series(out["candidate_index"], dtype=pl.Int64),
                         "messages": pl.Series(out["messages"], dtype=MESSAGES)})
