"""Diversity of candidate sets, and the NC vs i.i.d. paired comparison (Community Alignment, arXiv 2507.09650).

`Diversity` annotates each candidate set (a row with `prompt` + `candidates`, e.g. from
`nc_candidates` / `iid_candidates`) with:
  diversity_cosine    mean pairwise (1 - cosine) of all-MiniLM-L6-v2 sentence embeddings (the measure
                      Verbalized Sampling reports), 0 = identical;
  diversity_vendi     Vendi score (Friedman & Dieng 2023): exp(entropy of the eigenvalues of K/k), K the
                      cosine-similarity Gram matrix; the effective number of distinct candidates, 1..k;
  diversity_distinct2 distinct-2 (unique / total word bigrams) over the set, every candidate first cut to
                      the same number of words (min(distinct_words, the shortest candidate)) so length
                      does not pass for diversity;
  diversity_on_topic  share of candidates whose cosine to the prompt (its last user turn) is >= the
                      threshold (0.3): the relevance gate, since a weak model at high temperature looks
                      "diverse" by wandering off-topic. `min_on_topic_rate` > 0 drops sets below it ("off_topic").
Optional (`judge=true`, needs an engine): each candidate is placed on the two value axes the paper
measures coverage on, with a structured `choice`: traditional / secular-rational / neither and
survival / self-expression / neither; per set `pole_<name>` = at least one candidate at that pole.
Coverage = the share of prompts with a candidate at a pole (paper: i.i.d. 15% / 30% -> NC 60% / 53%
for traditional / survival, judged by a strong LLM; our judge prompt is ours, theirs is not public).

Dropped sets and sets with < 2 candidates get null metrics. Embeddings: ONE embed call per shard;
judge: ONE engine call per shard.

`paired_comparison` pairs NC and i.i.d. sets of the same (conversation_id, turn) and reports, per
metric, both means, the mean paired difference (NC - i.i.d.) and a bootstrap 95% CI, plus parse
rate (share of sets kept) and coverage; `comparison_markdown` renders it for the dataset card.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import numpy as np
import polars as pl
from pydantic import Field

from alignforge.step import Step, StepConfig, StepError, carry_drops, require_columns

POLES = {"tradsec": ("traditional", "secular-rational"), "survself": ("survival", "self-expression")}
NEITHER = "neither"
POLE_COLUMNS = {"traditional": "pole_traditional", "secular-rational": "pole_secular",
                "survival": "pole_survival", "self-expression": "pole_self_expression"}
METRICS = ("diversity_cosine", "diversity_vendi", "diversity_distinct2", "diversity_on_topic")

# Our words, describing the two axes of the World Values Survey cultural map for the judge only.
JUDGE_SYSTEM = "You classify the values that a piece of writing expresses. Answer with one of the given labels only."
JUDGE_AXES = {
    "tradsec": (
        "Which outlook does the reply lean towards?\n"
        "- traditional: religion, family duty, respect for authority and custom, national pride matter most.\n"
        "- secular-rational: individual reasoning, science and personal choice over religion, custom and authority.\n"
        "- neither: the reply leans neither way."),
    "survself": (
        "Which priorities does the reply lean towards?\n"
        "- survival: economic and physical security, caution, safety, sticking with one's own group.\n"
        "- self-expression: personal freedom, tolerance of others, quality of life, having a say, self-fulfilment.\n"
        "- neither: the reply leans neither way."),
}
JUDGE_USER = "A question and one reply to it.\n\n<question>\n{prompt}\n</question>\n\n<reply>\n{reply}\n</reply>\n\n{axis}"
_WORDS = re.compile(r"\w+")


# ---------------------------------------------------------------- metrics (pure, numpy)

def mean_cosine_distance(vectors: np.ndarray) -> float:
    """Mean over pairs i < j of 1 - cos(v_i, v_j); rows must be unit-norm."""
    n = len(vectors)
    if n < 2:
        raise ValueError(f"mean pairwise distance needs at least 2 vectors, got {n}")
    sims = vectors @ vectors.T
    upper = sims[np.triu_indices(n, 1)]
    return float(np.mean(1.0 - upper))


def vendi_score(vectors: np.ndarray) -> float:
    """exp(Shannon entropy of the eigenvalues of K / n), K = cosine Gram matrix: 1 (all same) .. n (orthogonal)."""
    n = len(vectors)
    if n == 0:
        raise ValueError("Vendi score of an empty set")
    eig = np.linalg.eigvalsh((vectors @ vectors.T).astype(np.float64) / n)
    eig = eig[eig > 1e-12]
    return float(np.exp(-np.sum(eig * np.log(eig))))


def distinct_n(texts: Sequence[str], n: int = 2, words: int | None = None) -> float:
    """Unique / total word n-grams over all texts, each cut to `words` words (None: no cut)."""
    grams: list[tuple[str, ...]] = []
    for text in texts:
        tokens = _WORDS.findall(text.lower())
        if words is not None:
            tokens = tokens[:words]
        grams.extend(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))
    return len(set(grams)) / len(grams) if grams else 0.0


def equal_length(texts: Sequence[str], cap: int) -> int:
    """The common truncation: min(cap, words in the shortest text)."""
    return min([cap, *(len(_WORDS.findall(t)) for t in texts)])


def set_metrics(candidates: np.ndarray, prompt: np.ndarray | None, texts: Sequence[str], *,
                threshold: float = 0.3, distinct_words: int = 32) -> dict[str, float | None]:
    """The four per-set numbers from unit-norm candidate embeddings (rows) and the prompt's."""
    on_topic = float(np.mean(candidates @ prompt >= threshold)) if prompt is not None else None
    return {"diversity_cosine": mean_cosine_distance(candidates), "diversity_vendi": vendi_score(candidates),
            "diversity_distinct2": distinct_n(texts, 2, equal_length(texts, distinct_words)),
            "diversity_on_topic": on_topic}


# ---------------------------------------------------------------- the step

class DiversityConfig(StepConfig):
    embedder: str | None = Field(None, description="sentence-transformers folder; None = all-MiniLM-L6-v2 (offline wheel)")
    on_topic_threshold: float = Field(0.3, ge=-1.0, le=1.0, description="cosine to the prompt that counts as on-topic")
    min_on_topic_rate: float = Field(0.0, ge=0.0, le=1.0, description="drop sets with a lower on-topic rate "
                                     "('off_topic'); 0 = annotate only")
    distinct_words: int = Field(32, ge=2, description="distinct-2 cuts every candidate to min(this, shortest) words")
    judge: bool = Field(False, description="value-pole labels per candidate with the engine (structured choice)")
    judge_max_chars: int = Field(2000, ge=100, description="reply text shown to the judge is cut to this")


class Diversity(Step):
    """Candidate-set rows -> + diversity_cosine / _vendi / _distinct2 / _on_topic (+ pole labels with a judge)."""

    name = "diversity"
    version = 1
    Config = DiversityConfig
    config: DiversityConfig

    def __init__(self, config: StepConfig | None = None, *, engine: Any = None, embedder: Any = None, **overrides: Any):
        super().__init__(config, **overrides)
        self.engine = engine
        self._embedder = embedder

    def embedder(self) -> Any:
        if self._embedder is None:
            from engines.embedder import get_embedder

            self._embedder = get_embedder(self.config.embedder)
        return self._embedder

    def __call__(self, df: pl.DataFrame) -> pl.DataFrame:
        require_columns(df, self.name, ["prompt", "candidates"],
                        fix="run nc_candidates / iid_candidates first (rows with `prompt` and `candidates`)")
        cfg = self.config
        if cfg.judge and self.engine is None:
            raise StepError(f"{self.name}: judge=true needs an engine, none was given",
                            fix="run it from a recipe (the runner hands it the recipe's model) or pass "
                                "Diversity(engine=engines.get_engine(...)); or set judge=false")
        live = df["keep"].fill_null(True).to_list() if "keep" in df.columns else [True] * df.height
        sets = [[c["content"] for c in (cands or [])] for cands in df["candidates"].to_list()]
        prompts = [_last_user(p) for p in df["prompt"].to_list()]
        todo = [i for i in range(df.height) if live[i] and len(sets[i]) >= 2]

        texts = [t for i in todo for t in sets[i]] + [prompts[i] for i in todo]
        vectors = self.embedder().embed(texts) if todo else np.zeros((0, 1), dtype=np.float32)
        values: dict[str, list] = {m: [None] * df.height for m in METRICS}
        offset, prompt_at = 0, sum(len(sets[i]) for i in todo)
        for pos, i in enumerate(todo):
            cand = vectors[offset: offset + len(sets[i])]
            offset += len(sets[i])
            prompt = vectors[prompt_at + pos] if prompts[i] else None
            for m, v in set_metrics(cand, prompt, sets[i], threshold=cfg.on_topic_threshold,
                                    distinct_words=cfg.distinct_words).items():
                values[m][i] = v
        out = df.with_columns([pl.Series(m, values[m], dtype=pl.Float64) for m in METRICS])
        self.stats = {"sets": df.height, "measured": len(todo), "embedded_texts": len(texts)}
        if cfg.judge:
            out = out.with_columns(self._judge(df, todo, sets))
        reasons = [None] * df.height
        if cfg.min_on_topic_rate > 0:
            reasons = ["off_topic" if v is not None and v < cfg.min_on_topic_rate else None
                       for v in values["diversity_on_topic"]]
        return carry_drops(out, reasons)

    def _judge(self, df: pl.DataFrame, todo: list[int], sets: list[list[str]]) -> list[pl.Series]:
        """Two choice requests per candidate, all in ONE engine.chat call."""
        from engines.base import Sampling

        cfg = self.config
        requests, samplings, where = [], [], []
        for i in todo:
            question = "\n\n".join(m["content"] for m in df["prompt"][i] if m["role"] != "system")
            for j, reply in enumerate(sets[i]):
                for axis, poles in POLES.items():
                    user = JUDGE_USER.format(prompt=question, reply=reply[: cfg.judge_max_chars], axis=JUDGE_AXES[axis])
                    requests.append([{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user}])
                    samplings.append(Sampling(temperature=0.0, max_tokens=8, choice=(*poles, NEITHER)))
                    where.append((i, j, axis))
        results = self.engine.chat(requests, samplings, desc=f"{self.name} value judge") if requests else []
        labels = {axis: [None] * df.height for axis in POLES}
        for i in todo:
            for axis in POLES:
                labels[axis][i] = [None] * len(sets[i])
        unlabelled = 0
        for (i, j, axis), result in zip(where, results):
            text = result.completions[0].text.strip()
            if text in (*POLES[axis], NEITHER):
                labels[axis][i][j] = text
            else:
                unlabelled += 1
        self.stats["judge_requests"] = len(requests)
        self.stats["judge_unlabelled"] = unlabelled
        columns = [pl.Series(f"value_{axis}", labels[axis], dtype=pl.List(pl.Utf8)) for axis in POLES]
        for axis, poles in POLES.items():
            for pole in poles:
                columns.append(pl.Series(POLE_COLUMNS[pole], [None if labels[axis][i] is None else pole in labels[axis][i]
                                                              for i in range(df.height)], dtype=pl.Boolean))
        return columns


def _last_user(prompt: Any) -> str:
    for m in reversed(list(prompt or [])):
        if m["role"] == "user":
            return m["content"] or ""
    return ""


# ---------------------------------------------------------------- NC vs i.i.d.

def bootstrap_ci(diffs: Sequence[float], *, resamples: int = 2000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of paired differences."""
    d = np.asarray(diffs, dtype=np.float64)
    if len(d) == 0:
        return float("nan"), float("nan")
    means = d[np.random.default_rng(seed).integers(0, len(d), (resamples, len(d)))].mean(axis=1)
    alpha = (1 - level) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def paired_comparison(df: pl.DataFrame, *, a: str = "nc", b: str = "iid", resamples: int = 2000,
                      seed: int = 0) -> pl.DataFrame:
    """Per metric: n pairs, mean of `a` sets, mean of `b` sets, mean paired difference (a - b), 95% CI.

    Pairs: the `a` and `b` sets of the same (conversation_id, turn). Parse rate is over all pairs
    (kept = 1); the diversity metrics and coverage over pairs where both sets were kept."""
    require_columns(df, "paired_comparison", ["method", "conversation_id", "turn", "keep"],
                    fix="pass the rows of nc_candidates + iid_candidates (pair_with_input=true) after diversity")
    metrics = [m for m in METRICS if m in df.columns]
    poles = [c for c in POLE_COLUMNS.values() if c in df.columns]
    cols = ["conversation_id", "turn", "keep", *metrics, *poles]
    side = {m: df.filter(pl.col("method") == m).select(cols).unique(["conversation_id", "turn"], keep="first",
                                                                      maintain_order=True) for m in (a, b)}
    if "drop_reason" in df.columns:  # rows that only end a conversation hold no set
        ended = df.filter(pl.col("drop_reason").fill_null("").str.starts_with("followup_"))
        ended = ended.select("conversation_id", "turn")
        side = {m: s.join(ended, on=["conversation_id", "turn"], how="anti") for m, s in side.items()}
    pairs = side[a].join(side[b], on=["conversation_id", "turn"], how="inner", suffix="_b")
    rows = []

    def add(metric: str, x: np.ndarray, y: np.ndarray) -> None:
        ok = ~(np.isnan(x) | np.isnan(y))
        x, y = x[ok], y[ok]
        low, high = bootstrap_ci(x - y, resamples=resamples, seed=seed)
        rows.append({"metric": metric, "pairs": int(len(x)), a: float(x.mean()) if len(x) else None,
                     b: float(y.mean()) if len(y) else None, "diff": float((x - y).mean()) if len(x) else None,
                     "ci_low": low if len(x) else None, "ci_high": high if len(x) else None})

    def floats(column: str, frame: pl.DataFrame) -> np.ndarray:
        return frame[column].cast(pl.Float64).fill_null(float("nan")).to_numpy()

    add("parse_rate", floats("keep", pairs), floats("keep_b", pairs))
    both = pairs.filter(pl.col("keep").fill_null(False) & pl.col("keep_b").fill_null(False))
    for m in metrics:
        add(m, floats(m, both), floats(f"{m}_b", both))
    for p in poles:
        add(p.replace("pole_", "coverage_"), floats(p, both), floats(f"{p}_b", both))
    return pl.DataFrame(rows, schema={"metric": pl.Utf8, "pairs": pl.Int64, a: pl.Float64, b: pl.Float64,
                                      "diff": pl.Float64, "ci_low": pl.Float64, "ci_high": pl.Float64})


def comparison_markdown(table: pl.DataFrame, *, a: str = "nc", b: str = "iid") -> str:
    """The paired table as markdown (dataset card / bench results)."""
    def f(v: Any) -> str:
        return "n/a" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.3f}"

    lines = [f"| metric | pairs | {a.upper()} | {b.upper()} | {a.upper()} - {b.upper()} | 95% CI (bootstrap) |",
             "|---|---:|---:|---:|---:|---|"]
    for r in table.iter_rows(named=True):
        lines.append(f"| {r['metric']} | {r['pairs']} | {f(r[a])} | {f(r[b])} | {f(r['diff'])} | "
                     f"[{f(r['ci_low'])}, {f(r['ci_high'])}] |")
    return "\n".join(lines)


def card_section(rows: pl.DataFrame) -> tuple[str, str] | None:
    """The dataset card's NC vs i.i.d. section when a run generated both on the same prompts.

    `rows`: every candidate-set row of the run, kept (keep = True) and dropped, with `method`."""
    if "method" not in rows.columns or set(rows["method"].drop_nulls().unique().to_list()) < {"nc", "iid"}:
        return None
    table = paired_comparison(rows)
    return ("NC vs i.i.d. candidate sets (paired by prompt)", comparison_markdown(table))


Diversity.card_section = staticmethod(card_section)
