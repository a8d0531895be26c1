"""UltraPrompt / P-Aligner: principle-guided MCTS over instruction rewrites (arXiv 2508.04626).

Matches the official code (F2-Song/P-Aligner, `online_synthesis/mcts_utils.py`,
`online_synthesis/run_synthesis.sh`, `online_synthesis/parse_output_for_train*.py`):

- A node is one instruction (root = the raw seed). An action is one principle of the seed's domain
  set (Helpfulness's 3 + its category's, `stages/ultraprompt_data.py`); a node has at most one
  child per principle; expansion applies a random unused principle (per-tree RNG).
- Value of a node = mean reward of `responses` (3) answers sampled at T 1.0 for the node's
  instruction, each scored against the ORIGINAL instruction, with the reward model or the
  generative judge of `filters/reward.py` (`reward.model` null = judge on the chat engine).
- Selection: while a node has no unused action, go to argmax Q(child) + c*sqrt(ln N(node)/N(child)),
  c = 0.1 (the official run script's --exploration_weight); Q(node) = mean of its own value and
  its children's Q (recursive); ties go to the first child. Backup: visits += 1 on the path,
  best = max(children's best, own value); the root's own value is left out of `best` and never
  reaches selection (the reference simulates the root only after the search). 20 iterations.
- Outputs (`MCTSPairs`): chosen = the best node of the whole tree, rejected = the worst (the root
  competes; best ties -> lowest node, worst ties -> highest node, as the reference's stable sort),
  SFT raw -> best, step data = every edge whose child's value beats its parent's.

Where we differ, and why:
- Lock-step batching: round r runs iteration r of every unfinished tree of the shard: selection per
  tree, ONE rewrite call for all trees, ONE generation call for all new nodes (n = `responses` per
  request), ONE reward call. Each tree has its own RNG (seed, tree id) and each request its own seed
  (tree, expansion number, purpose), so the result equals a one-tree-at-a-time run (`lockstep:
  false`, the reference's schedule). The root is simulated in round 1 with the first new nodes.
- Failed expansions: the reference drops the node and redoes the iteration with a new random
  principle, with no cap (a deterministic rewriter can loop forever). Ours: an empty, truncated,
  unchanged, answering or unparsed rewrite, or a node none of whose answers could be scored, fails
  the expansion; the iteration is redone next round (new seed); after `expand_attempts` failures of the
  same (node, principle) the action is dead, counted by its last reason. A node whose every action
  is dead or closed is closed; selection descends only into open children (the reference can't
  get there), and a tree whose root is closed stops early (`trees_exhausted`).
- Rewrite format: the reference asks for the bare rewritten query. By default (`rewrite_format:
  json`) ours asks for {"request": "<rewrite>"} and has the engine enforce that schema
  (`Sampling.json_schema`): measured on the embedded 135M model at T 1.0, free-text rewrites ran
  past 96 tokens in 32 of 50 requests, mostly incoherent from the first sentence rather than a
  good rewrite followed by chatter (asked to close a </request> tag, with that tag as a stop
  string, 27 of 50 still ran on; 26 with the tag prefilled; a repetition penalty of 1.2: 36 of 36),
  while it closed the JSON string by itself in 44 of 50, at half the tokens (37 vs 76). The rewrite is still one instruction and passes the same checks;
  a reply cut by `rewrite_max_tokens` is `truncated_rewrite` (no schema `maxLength`: a string the
  grammar closes at the limit would look complete), a reply that is not such an object is
  `unparsed_rewrite`. `rewrite_format: text` keeps the reference's free text (engines without
  structured outputs).
- Prompts are our wording (`stages/ultraprompt_data.py`); the rewriter is the recipe's chat model.
"""

from __future__ import annotations

import json
import math
import random
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import polars as pl
from pydantic import Field

from alignforge.step import EngineStep, Step, StepConfig, StepError, derive_ids
from engines.base import Sampling
from filters.reward import RewardLabel, RewardLabelConfig
from schemas import MESSAGES
from stages.magpie import check_response, sample_seed, stop_token_ids, template_tokens
from stages.ultraprompt_data import (BY_NAME, CATEGORIES, CATEGORY_SYSTEM, CATEGORY_USER, OPTIMISER_REQUEST,
                                     REWRITE_REPLY, REWRITE_SCHEMA, REWRITE_SYSTEM, REWRITE_USER, STEP_REQUEST,
                                     actions_for, canonical_category)

# Why an expansion failed (counted per tree; the last one names a dead action).
EMPTY_REWRITE = "empty_rewrite"
TRUNCATED_REWRITE = "truncated_rewrite"
UNPARSED_REWRITE = "unparsed_rewrite"
UNCHANGED_REWRITE = "unchanged_rewrite"
ANSWERED = "answered_not_rewritten"
UNSCORED_NODE = "unscored_node"

NODE = pl.Struct({"index": pl.Int64, "parent": pl.Int64, "action": pl.Utf8, "instruction": pl.Utf8,
                  "value": pl.Float64, "rewards": pl.List(pl.Float64), "visits": pl.Int64, "best": pl.Float64,
                  "q": pl.Float64, "depth": pl.Int64})
DEAD = pl.Struct({"node": pl.Int64, "action": pl.Utf8, "reason": pl.Utf8})


# ---------------------------------------------------------------- the tree

@dataclass
class Node:
    index: int
    instruction: str
    parent: int | None = None
    action: str | None = None
    depth: int = 0
    value: float | None = None  # mean reward of the node's answers (the reference's local_avg_reward)
    rewards: list[float | None] = field(default_factory=list)
    visits: int = 0
    best: float | None = None  # max over the subtree (root: children only), the reference's `reward`
    children: list[int] = field(default_factory=list)
    dead: dict[str, str] = field(default_factory=dict)  # action -> reason


@dataclass
class Tree:
    key: str  # the seed row's id: names the tree in seeds and its RNG
    instruction: str
    category: str | None
    actions: tuple[str, ...]
    rng: random.Random
    nodes: list[Node] = field(default_factory=list)
    iterations: int = 0  # successful iterations
    expansions: int = 0  # expansion attempts (numbers the requests' seeds)
    rounds: int = 0
    root_done: bool = False
    attempts: Counter = field(default_factory=Counter)  # (node, action) -> failed attempts
    failures: Counter = field(default_factory=Counter)  # reason -> failed expansions

    @property
    def root(self) -> Node:
        return self.nodes[0]


def new_tree(key: str, instruction: str, category: str | None, seed: int) -> Tree:
    return Tree(key=key, instruction=instruction, category=category, actions=actions_for(category),
                rng=random.Random(sample_seed(seed, key, "tree")), nodes=[Node(0, instruction)])


def free_actions(tree: Tree, node: Node) -> list[str]:
    """Actions of `node` that have neither a child nor been declared dead, in the seed's action order."""
    used = {tree.nodes[c].action for c in node.children}
    return [a for a in tree.actions if a not in used and a not in node.dead]


def is_open(tree: Tree, node: Node) -> bool:
    """Something below `node` (or `node` itself) can still be expanded."""
    return bool(free_actions(tree, node)) or any(is_open(tree, tree.nodes[c]) for c in node.children)


def q_value(tree: Tree, node: Node) -> float:
    """Q(node) = mean of its own value and its children's Q (recursive), as the reference's compute_Q_fn."""
    values = [node.value] + [q_value(tree, tree.nodes[c]) for c in node.children]
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else 0.0


def uct(tree: Tree, parent: Node, child: Node, c: float) -> float:
    return q_value(tree, child) + c * math.sqrt(math.log(parent.visits) / child.visits)


def select(tree: Tree, c: float) -> Node:
    """Descend from the root while the node has no unused action: argmax UCT over its open children
    (first on ties). Call only on an open tree."""
    node = tree.root
    while not free_actions(tree, node):
        children = [tree.nodes[i] for i in node.children if is_open(tree, tree.nodes[i])]
        scores = [uct(tree, node, child, c) for child in children]
        node = children[scores.index(max(scores))]
    return node


def backup(tree: Tree, leaf: Node) -> None:
    """visits += 1 from the new leaf to the root; best = max(children's best, own value) (root: children only)."""
    leaf.visits += 1
    leaf.best = leaf.value
    index = leaf.parent
    while index is not None:
        node = tree.nodes[index]
        node.visits += 1
        values = [tree.nodes[c].best for c in node.children]
        if node.index != 0:
            values.append(node.value)
        node.best = max(v for v in values if v is not None)
        index = node.parent


# ---------------------------------------------------------------- rewrite checks

_LABEL = re.compile(
    r"^\s*(?:\*\*)?(?:here(?:'s| is)\s+(?:the|a|an|my|your)\s+)?(?:rewritten|optimi[sz]ed|improved|revised|new|"
    r"updated|edited)\s+(?:version\s+of\s+the\s+)?(?:user'?s?\s+)?(?:request|query|prompt|version|instruction)"
    r"(?:\s+(?:is|would be))?\s*(?:\*\*)?\s*:\s*(?:\*\*)?\s*", re.IGNORECASE)
_OPENER = re.compile(
    r"^\s*(?:sure\b|certainly\b|of course\b|absolutely\b|great question|i'?d be (?:happy|glad)|i would be (?:happy|glad)|"
    r"i can help|as an ai\b|here (?:is|are) (?:the |an |a |some |my )?(?:answer|solution|response|explanation|steps|"
    r"code|list|example|overview|summary)s?\b)", re.IGNORECASE)
_TAGS = re.compile(r"</?(?:request|prompt|query)>", re.IGNORECASE)


def _norm(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.casefold()).split())


def check_rewrite(text: str, finish_reason: str | None, parent: str, *, leak: Sequence[str] = (),
                  max_growth: float = 8.0) -> tuple[str, str | None]:
    """Clean one rewrite; return (text, failure reason or None).

    Cut at template tokens, drop our <request> tags, a leading "Rewritten request:" label and
    wrapping quotes. Fails: truncated (cut by max_tokens), empty, unchanged (same words as the
    parent), answered (starts like an answer: "Sure", "Here is the solution"..., or grows past
    `max_growth` x the parent's length + 200 characters)."""
    for token in leak:
        if token and token in text:
            text = text[: text.index(token)]
    text = _TAGS.sub("", text).strip()
    text = _LABEL.sub("", text, count=1).strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'`":
        text = text[1:-1].strip()
    if finish_reason == "length":
        return text, TRUNCATED_REWRITE
    if not text:
        return text, EMPTY_REWRITE
    if _norm(text) == _norm(parent):
        return text, UNCHANGED_REWRITE
    if _OPENER.match(text) or len(text) > max_growth * len(parent) + 200:
        return text, ANSWERED
    return text, None


def read_json_rewrite(text: str, finish_reason: str | None) -> tuple[str, str | None]:
    """The "request" string of a JSON reply (REWRITE_SCHEMA) -> (string, None). Not such an object:
    (raw text, "truncated_rewrite") when max_tokens cut it, else (raw text, "unparsed_rewrite")."""
    try:
        reply = json.loads(text)
    except ValueError:
        reply = None
    if isinstance(reply, dict) and isinstance(reply.get("request"), str):
        return reply["request"], None
    return text, TRUNCATED_REWRITE if finish_reason == "length" else UNPARSED_REWRITE


# ---------------------------------------------------------------- the search step

def _seed_instructions(df: pl.DataFrame, where: str) -> list[str]:
    if "instruction" in df.columns:
        return [t or "" for t in df["instruction"].to_list()]
    if "messages" in df.columns:  # the last user turn
        out = []
        for messages in df["messages"].to_list():
            users = [m["content"] for m in (messages or []) if m["role"] == "user"]
            out.append((users[-1] if users else "") or "")
        return out
    raise StepError(f"{where}: input needs an `instruction` (string) or `messages` column; got {df.columns}",
                    column="instruction", fix="load seeds with `alignforge run ultraprompt --set input=seeds.jsonl` "
                                              "(any instruction file the importer reads) or run magpie_instructions")


class MCTSRewriteConfig(StepConfig):
    iterations: int = Field(20, ge=0, description="successful iterations (new nodes) per tree (P-Aligner: 20)")
    exploration: float = Field(0.1, ge=0.0, description="UCT constant c (P-Aligner run script: 0.1)")
    responses: int = Field(3, ge=1, description="answers sampled per node; its value is their mean reward")
    temperature: float = Field(1.0, ge=0.0, description="answer sampling temperature (P-Aligner: 1.0)")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int = Field(512, ge=1, description="answer length limit")
    rewrite_temperature: float = Field(1.0, ge=0.0, description="rewriter temperature (reference: API default 1.0)")
    rewrite_top_p: float = Field(1.0, gt=0.0, le=1.0)
    rewrite_max_tokens: int = Field(512, ge=1, description="a rewrite cut by this limit fails ('truncated_rewrite')")
    rewrite_format: Literal["json", "text"] = Field(
        "json", description='json: the rewriter replies {"request": ...} under the engine\'s structured outputs '
                            "(Sampling.json_schema) and stops when the string closes; text: free text, as the "
                            "reference (engines without structured outputs)")
    expand_attempts: int = Field(3, ge=1, description="failed rewrites of one (node, principle) before it is dead")
    max_growth: float = Field(8.0, gt=1.0, description="a rewrite longer than max_growth x its parent + 200 chars "
                                                       "is taken for an answer")
    repetition_penalty: float = Field(1.0, gt=0.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    seed: int = 0
    lockstep: bool = Field(True, description="all trees of a shard in lock-step (3 engine calls per round); "
                                             "false = one tree at a time (the reference's schedule, same result)")
    reward: RewardLabelConfig = Field(default_factory=RewardLabelConfig,
                                      description="how answers are scored (model null = judge on the chat engine)")


class MCTSRewrite(EngineStep):
    """Seed rows (`instruction`, optional `category`) -> one row per tree: `nodes`, `dead_actions`, counts."""

    name = "mcts_rewrite"
    version = 2
    Config = MCTSRewriteConfig
    config: MCTSRewriteConfig

    def __init__(self, config: StepConfig | None = None, *, engine: Any = None, scorer: Any = None, **overrides: Any):
        super().__init__(config, engine=engine, **overrides)
        self._scorer = scorer

    def scorer(self) -> Any:
        if self._scorer is None:
            self._scorer = RewardLabel(self.config.reward, engine=self.engine).scorer()
        return self._scorer

    # -- one shard ------------------------------------------------------------------------------
    def __call__(self, df: pl.DataFrame) -> pl.DataFrame:
        cfg = self.config
        self.require_engine()
        if "id" not in df.columns:
            raise StepError(f"{self.name}: input needs an `id` column (each tree's name and RNG seed); got {df.columns}",
                            column="id", fix="load seeds with schemas.mapping.load_rows (it assigns ids)")
        texts = _seed_instructions(df, self.name)
        live = df["keep"].fill_null(True).to_list() if "keep" in df.columns else [True] * df.height
        given = df["category"].to_list() if "category" in df.columns else [None] * df.height
        rows = [i for i in range(df.height) if live[i] and texts[i].strip()]
        keys = [str(k) for k in df["id"].to_list()]
        trees = [new_tree(keys[i], texts[i].strip(), canonical_category(given[i]), cfg.seed) for i in rows]
        self._reset_stats(df.height, skipped=df.height - len(rows))
        started = time.perf_counter()
        if cfg.lockstep:
            self.search(trees)
        else:
            for tree in trees:
                self.search([tree])
        self.stats["seconds"] = round(time.perf_counter() - started, 3)
        return self._rows(trees)

    # -- the search -----------------------------------------------------------------------------
    def search(self, trees: list[Tree]) -> None:
        """Run `trees` to `iterations` successful iterations (or exhaustion), all in lock-step."""
        cfg = self.config
        while True:
            active = [t for t in trees if t.iterations < cfg.iterations and is_open(t, t.root)]
            roots = [t for t in trees if not t.root_done]
            if not active and not roots:
                break
            plans = []  # (tree, leaf, action, expansion number)
            for tree in active:
                tree.rounds += 1
                leaf = select(tree, cfg.exploration)
                action = tree.rng.choice(free_actions(tree, leaf))
                tree.expansions += 1
                plans.append((tree, leaf, action, tree.expansions))
            new: list[tuple[Tree, Node, str, int, str]] = []
            for (tree, leaf, action, number), (text, reason) in zip(plans, self._rewrite(plans)):
                if reason:
                    self._fail(tree, leaf, action, reason)
                else:
                    new.append((tree, leaf, action, number, text))
            # Simulation: roots not yet valued (round 1) + every new node, one generation + one reward call.
            sims = [(t, t.instruction, sample_seed(cfg.seed, t.key, 0, "respond")) for t in roots] + \
                   [(t, text, sample_seed(cfg.seed, t.key, number, "respond")) for t, _, _, number, text in new]
            values = self._simulate(sims)
            for tree, (value, rewards) in zip(roots, values[: len(roots)]):
                tree.root.value, tree.root.rewards, tree.root_done = value, rewards, True
                if value is None:
                    self.stats["roots_unscored"] += 1
            for (tree, leaf, action, _, text), (value, rewards) in zip(new, values[len(roots):]):
                if value is None:
                    self._fail(tree, leaf, action, UNSCORED_NODE)
                    continue
                node = Node(len(tree.nodes), text, parent=leaf.index, action=action, depth=leaf.depth + 1,
                            value=value, rewards=rewards)
                tree.nodes.append(node)
                leaf.children.append(node.index)
                backup(tree, node)
                tree.iterations += 1
                self.stats["nodes"] += 1

    def _fail(self, tree: Tree, leaf: Node, action: str, reason: str) -> None:
        tree.failures[reason] += 1
        self.stats["failed_expansions"][reason] = self.stats["failed_expansions"].get(reason, 0) + 1
        tree.attempts[(leaf.index, action)] += 1
        if tree.attempts[(leaf.index, action)] >= self.config.expand_attempts:
            leaf.dead[action] = reason
            self.stats["dead_actions"][reason] = self.stats["dead_actions"].get(reason, 0) + 1

    def _sampling(self, **kw: Any) -> Sampling:
        cfg = self.config
        return Sampling(stop_token_ids=self._stop_ids, repetition_penalty=cfg.repetition_penalty,
                        frequency_penalty=cfg.frequency_penalty, presence_penalty=cfg.presence_penalty, **kw)

    def _rewrite(self, plans: list) -> list[tuple[str, str | None]]:
        """ONE chat call: every plan's rewrite of its leaf by its principle."""
        if not plans:
            return []
        cfg = self.config
        json_reply = cfg.rewrite_format == "json"
        conversations = [[{"role": "system", "content": REWRITE_SYSTEM},
                          {"role": "user", "content": REWRITE_USER.format(
                              instruction=leaf.instruction, how=BY_NAME[action].how,
                              reply=REWRITE_REPLY[cfg.rewrite_format])}]
                         for _, leaf, action, _ in plans]
        samplings = [self._sampling(temperature=cfg.rewrite_temperature, top_p=cfg.rewrite_top_p,
                                    max_tokens=cfg.rewrite_max_tokens,
                                    seed=sample_seed(cfg.seed, tree.key, number, "rewrite"),
                                    json_schema=REWRITE_SCHEMA if json_reply else None)
                     for tree, _, _, number in plans]
        started = time.perf_counter()
        results = self.engine.chat(conversations, samplings, desc=f"{self.name} rewrites")
        self._count_call("rewrite", started, results)
        out = []
        for (_, leaf, _, _), result in zip(plans, results):
            c = result.completions[0]
            text, finish = c.text, c.finish_reason
            if json_reply:
                text, reason = read_json_rewrite(text, finish)
                if reason:
                    out.append((text, reason))
                    continue
                finish = "stop"  # a closed object holds a complete string
            out.append(check_rewrite(text, finish, leaf.instruction, leak=self._leak, max_growth=cfg.max_growth))
        return out

    def _simulate(self, sims: list[tuple[Tree, str, int]]) -> list[tuple[float | None, list[float | None]]]:
        """ONE generation call (n answers per instruction) + ONE reward call against the ORIGINAL instructions."""
        if not sims:
            return []
        cfg = self.config
        samplings = [self._sampling(temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens,
                                    n=cfg.responses, seed=seed) for _, _, seed in sims]
        started = time.perf_counter()
        results = self.engine.chat([[{"role": "user", "content": text}] for _, text, _ in sims], samplings,
                                   desc=f"{self.name} answers")
        self._count_call("generate", started, results)
        prompts, answers = [], []
        for (tree, _, _), result in zip(sims, results):
            for c in result.completions:
                text, reason = check_response(c.text, c.finish_reason, self._leak)
                if reason == "truncated_response":  # still an answer to the request: scored, counted
                    self.stats["truncated_responses"] += 1
                prompts.append([{"role": "user", "content": tree.instruction}])
                answers.append(text)
        started = time.perf_counter()
        scored = self.scorer().score(prompts, answers)
        self.stats["engine_calls"]["reward"] += 1
        self.stats["seconds_reward"] += time.perf_counter() - started
        out, k = [], 0
        for result in results:
            rewards = []
            for _ in result.completions:
                r = scored[k]
                k += 1
                rewards.append(r.score)
                if r.score is None:
                    reason = r.reason or "unscored"
                    self.stats["unscored_responses"][reason] = self.stats["unscored_responses"].get(reason, 0) + 1
            valid = [r for r in rewards if r is not None]
            out.append((sum(valid) / len(valid) if valid else None, rewards))
        return out

    def _count_call(self, kind: str, started: float, results: list) -> None:
        self.stats["engine_calls"][kind] += 1
        self.stats[f"seconds_{kind}"] += time.perf_counter() - started
        self.stats["generated_tokens"] += sum(c.num_tokens for r in results for c in r.completions)

    def _reset_stats(self, rows_in: int, skipped: int) -> None:
        tok = self.engine.tokenizer
        self._leak = template_tokens(tok)
        self._stop_ids = stop_token_ids(tok)
        self.stats = {"rows_in": rows_in, "skipped_inputs": skipped, "trees": 0, "nodes": 0, "rounds": 0,
                      "engine_calls": {"rewrite": 0, "generate": 0, "reward": 0}, "failed_expansions": {},
                      "dead_actions": {}, "unscored_responses": {}, "roots_unscored": 0, "truncated_responses": 0,
                      "trees_exhausted": 0, "generated_tokens": 0, "seconds_rewrite": 0.0, "seconds_generate": 0.0,
                      "seconds_reward": 0.0}

    # -- rows -----------------------------------------------------------------------------------
    def _rows(self, trees: list[Tree]) -> pl.DataFrame:
        cfg = self.config
        self.stats["trees"] = len(trees)
        self.stats["rounds"] = max((t.rounds for t in trees), default=0)
        self.stats["trees_exhausted"] = sum(1 for t in trees if t.iterations < cfg.iterations)
        for key in ("seconds_rewrite", "seconds_generate", "seconds_reward"):
            self.stats[key] = round(self.stats[key], 3)
        # `lockstep` changes the schedule, not the result: it is not part of a tree's id.
        lineage = derive_ids(self.origin, [t.key for t in trees], cfg.model_dump(mode="json", exclude={"lockstep"}),
                             [t.instruction for t in trees])
        nodes = [[{"index": n.index, "parent": n.parent, "action": n.action, "instruction": n.instruction,
                   "value": n.value, "rewards": n.rewards, "visits": n.visits, "best": n.best,
                   "q": q_value(t, n) if n.value is not None or n.children else None, "depth": n.depth}
                  for n in t.nodes] for t in trees]
        dead = [[{"node": n.index, "action": a, "reason": r} for n in t.nodes for a, r in n.dead.items()] for t in trees]
        scored = [sum(1 for n in t.nodes if n.value is not None) for t in trees]
        return lineage.hstack(pl.DataFrame({
            "instruction": pl.Series([t.instruction for t in trees], dtype=pl.Utf8),
            "category": pl.Series([t.category for t in trees], dtype=pl.Utf8),
            "actions": pl.Series([list(t.actions) for t in trees], dtype=pl.List(pl.Utf8)),
            "nodes": pl.Series(nodes, dtype=pl.List(NODE)),
            "dead_actions": pl.Series(dead, dtype=pl.List(DEAD)),
            "iterations": pl.Series([t.iterations for t in trees], dtype=pl.Int64),
            "rounds": pl.Series([t.rounds for t in trees], dtype=pl.Int64),
            "failed_expansions": pl.Series([sum(t.failures.values()) for t in trees], dtype=pl.Int64),
            "keep": pl.Series([s > 0 for s in scored], dtype=pl.Boolean),
            "drop_reason": pl.Series([None if s > 0 else "unscored_tree" for s in scored], dtype=pl.Utf8),
        }))


# ---------------------------------------------------------------- trees -> published rows

KINDS = ("pair", "sft", "step", "node")
# Published config -> (row kind, columns). `split_configs` applies it; the recipe publishes these four.
PUBLISH_CONFIGS: dict[str, tuple[str, tuple[str, ...]]] = {
    "default": ("pair", ("id", "parent_id", "origin", "prompt", "chosen", "rejected", "score_chosen",
                         "score_rejected", "best_is_root")),
    "sft": ("sft", ("id", "parent_id", "origin", "messages", "score", "score_root", "best_is_root")),
    "steps": ("step", ("id", "parent_id", "origin", "messages", "action", "source", "target", "score_source",
                       "score_target")),
    "trees": ("node", ("id", "parent_id", "origin", "node", "parent_node", "action", "instruction", "value",
                       "visits", "best", "q", "depth")),
}
OUTPUT_SCHEMA = {"id": pl.Utf8, "parent_id": pl.Utf8, "origin": pl.Utf8, "kind": pl.Utf8, "prompt": MESSAGES,
                 "chosen": MESSAGES, "rejected": MESSAGES, "score_chosen": pl.Float64, "score_rejected": pl.Float64,
                 "best_is_root": pl.Boolean, "messages": MESSAGES, "score": pl.Float64, "score_root": pl.Float64,
                 "action": pl.Utf8, "source": pl.Utf8, "target": pl.Utf8, "score_source": pl.Float64,
                 "score_target": pl.Float64, "node": pl.Int64, "parent_node": pl.Int64, "instruction": pl.Utf8,
                 "value": pl.Float64, "visits": pl.Int64, "best": pl.Float64, "q": pl.Float64, "depth": pl.Int64,
                 "keep": pl.Boolean, "drop_reason": pl.Utf8}


class MCTSPairsConfig(StepConfig):
    margin: float = Field(0.0, ge=0.0, description="keep a pair when score_chosen - score_rejected > margin "
                                                   "(0.0 drops exact ties)")
    drop_root_best: bool = Field(False, description="drop SFT rows whose best node is the raw instruction "
                                                    "(degenerate raw -> raw); default: keep, flagged best_is_root")


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def assistant(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


class MCTSPairs(Step):
    """Tree rows (mcts_rewrite) -> rows of four kinds (`kind`): pair, sft, step, node. See PUBLISH_CONFIGS."""

    name = "mcts_pairs"
    version = 1
    Config = MCTSPairsConfig
    config: MCTSPairsConfig

    def __call__(self, df: pl.DataFrame) -> pl.DataFrame:
        for column in ("id", "instruction", "nodes"):
            if column not in df.columns:
                raise StepError(f"{self.name}: input has no column {column!r} (columns: {df.columns})", column=column,
                                fix="run mcts_rewrite first; mcts_pairs reads its tree rows")
        cfg = self.config
        live = df["keep"].fill_null(True).to_list() if "keep" in df.columns else [True] * df.height
        out: list[dict[str, Any]] = []
        stats = Counter()
        for tree_id, raw, nodes, alive in zip(df["id"].to_list(), df["instruction"].to_list(), df["nodes"].to_list(),
                                              live):
            if not alive:
                stats["skipped_trees"] += 1
                continue
            stats["trees"] += 1
            nodes = sorted(nodes, key=lambda n: n["index"])
            scored = [n for n in nodes if n["value"] is not None]
            request = user(OPTIMISER_REQUEST.format(instruction=raw))
            base = {"parent_id": tree_id}
            if scored:
                best = max(scored, key=lambda n: (n["value"], -n["index"]))
                worst = min(scored, key=lambda n: (n["value"], -n["index"]))
                root_best = best["index"] == 0
                stats["best_is_root"] += root_best
                reason = ("too_few_nodes" if len(scored) < 2 else
                          "low_margin" if best["value"] - worst["value"] <= cfg.margin else None)
                out.append({**base, "kind": "pair", "prompt": request, "chosen": assistant(best["instruction"]),
                            "rejected": assistant(worst["instruction"]), "score_chosen": best["value"],
                            "score_rejected": worst["value"], "best_is_root": root_best, "drop_reason": reason})
                out.append({**base, "kind": "sft", "messages": request + assistant(best["instruction"]),
                            "score": best["value"], "score_root": nodes[0]["value"], "best_is_root": root_best,
                            "drop_reason": "best_is_root" if root_best and cfg.drop_root_best else None})
            by_index = {n["index"]: n for n in nodes}
            for n in nodes:
                out.append({**base, "kind": "node", "node": n["index"], "parent_node": n["parent"],
                            "action": n["action"], "instruction": n["instruction"], "value": n["value"],
                            "visits": n["visits"], "best": n["best"], "q": n["q"], "depth": n["depth"]})
                parent = by_index.get(n["parent"]) if n["parent"] is not None else None
                if parent is None or parent["value"] is None or n["value"] is None:
                    continue
                stats["edges"] += 1
                if n["value"] > parent["value"]:
                    stats["improving_edges"] += 1
                    how = BY_NAME[n["action"]].how if n["action"] in BY_NAME else n["action"]
                    out.append({**base, "kind": "step",
                                "messages": user(STEP_REQUEST.format(how=how, instruction=parent["instruction"]))
                                + assistant(n["instruction"]), "action": n["action"],
                                "source": parent["instruction"], "target": n["instruction"],
                                "score_source": parent["value"], "score_target": n["value"], "node": n["index"]})
        self.stats = {**{k: int(v) for k, v in stats.items()},
                      "improving_share": round(stats["improving_edges"] / stats["edges"], 4) if stats["edges"] else None,
                      "best_is_root_share": round(stats["best_is_root"] / stats["trees"], 4) if stats["trees"] else None}
        frame = pl.DataFrame([{c: row.get(c) for c in OUTPUT_SCHEMA if c not in ("id", "origin", "keep")}
                              for row in out], schema={c: t for c, t in OUTPUT_SCHEMA.items()
                                                      if c not in ("id", "origin", "keep")})
        lineage = derive_ids(self.origin, frame["parent_id"].to_list(), frame["kind"].to_list(),
                             frame["node"].to_list())
        frame = lineage.hstack(frame.drop("parent_id"))
        frame = frame.with_columns(pl.col("drop_reason").is_null().alias("keep"))
        return frame.select(list(OUTPUT_SCHEMA))


def split_configs(df: pl.DataFrame, *, kept_only: bool = True) -> dict[str, pl.DataFrame]:
    """mcts_pairs rows -> {published config: its rows and columns} (PUBLISH_CONFIGS)."""
    if kept_only and "keep" in df.columns:
        df = df.filter(pl.col("keep").fill_null(True))
    return {name: df.filter(pl.col("kind") == kind).select(list(columns))
            for name, (kind, columns) in PUBLISH_CONFIGS.items()}


# ---------------------------------------------------------------- category tagger

class MCTSCategoryConfig(StepConfig):
    overwrite: bool = Field(False, description="re-tag rows that already have a category")
    max_instruction_chars: int = Field(4000, ge=1, description="longer instructions are cut for the tagger prompt")


class MCTSCategory(EngineStep):
    """Rows with `instruction` -> + `category` (one of Math, Coding & Debugging, Honesty, Harmlessness,
    other), chosen by the chat model with structured output (`Sampling.choice`), greedy, ONE call per
    shard. Rows that already have a category keep it (canonicalised; unknown labels become "other")."""

    name = "mcts_category"
    version = 1
    Config = MCTSCategoryConfig
    config: MCTSCategoryConfig

    def __call__(self, df: pl.DataFrame) -> pl.DataFrame:
        engine = self.require_engine()
        texts = _seed_instructions(df, self.name)
        given = df["category"].to_list() if "category" in df.columns and not self.config.overwrite else [None] * df.height
        categories = [canonical_category(c) for c in given]
        todo = [i for i in range(df.height) if categories[i] is None and texts[i].strip()]
        longest = max(len(engine.tokenizer(c, add_special_tokens=False)["input_ids"]) for c in CATEGORIES)
        conversations = [[{"role": "system", "content": CATEGORY_SYSTEM},
                          {"role": "user", "content": CATEGORY_USER.format(
                              instruction=texts[i][: self.config.max_instruction_chars])}] for i in todo]
        results = engine.chat(conversations, Sampling(temperature=0.0, max_tokens=longest + 4, choice=CATEGORIES),
                              desc=self.name) if todo else []
        unparsed = 0
        for i, result in zip(todo, results):
            text = result.completions[0].text.strip()
            if text in CATEGORIES:
                categories[i] = text
            else:  # structured outputs make this unreachable on vLLM; counted, and the seed gets Helpfulness only
                unparsed += 1
        self.stats = {"rows_in": df.height, "tagged": len(todo), "unparsed": unparsed,
                      "given": sum(1 for c in given if canonical_category(c) is not None),
                      "categories": dict(Counter(c for c in categories if c is not None))}
        return df.with_columns(pl.Series("category", categories, dtype=pl.Utf8))
