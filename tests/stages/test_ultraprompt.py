import json
import math
import random
import re

import polars as pl
import pytest

from engines.scripted import ScriptedEngine, ScriptedTokenizer, _rng
from stages.ultraprompt import (ANSWERED, EMPTY_REWRITE, TRUNCATED_REWRITE, UNCHANGED_REWRITE, UNPARSED_REWRITE,
                                MCTSCategory, MCTSPairs, MCTSRewrite, Node, Tree, backup, check_rewrite, free_actions,
                                is_open, q_value, read_json_rewrite, select, split_configs, uct)
from stages.ultraprompt_data import BY_NAME, PRINCIPLES, actions_for, canonical_category


# ---------------------------------------------------------------- a scripted world

class _Tokenizer(ScriptedTokenizer):
    def __call__(self, text, add_special_tokens=False):  # what the judge and the tagger call
        return {"input_ids": self.encode(text)}


class World(ScriptedEngine):
    """Rewriter, answerer and judge in one scripted engine.

    Rewrite of X by principle P = "X [P]" (or whatever `rewrite(instruction, principle, seed)`
    returns), wrapped as {"request": ...} when the request carries a JSON schema and `enforce`
    (as vLLM's structured outputs would); answer i to Y = "answer i: Y"; the judge rates an answer 1..5 from a hash of it, plus
    0.5 per principle tag, and the rating is an exact expected value of two adjacent digits."""

    def __init__(self, rewrite=None, rate=None, enforce=True):
        self.enforce = enforce
        self.schemas: list = []  # (rewrite request?, json_schema) per request
        self.rewrite = rewrite or (lambda instruction, principle, seed: f"{instruction} [{principle}]")
        self.rate = rate or (lambda request, answer: 1.0 + 3.0 * _rng(0, answer).random() + 0.5 * answer.count("["))
        super().__init__(self._respond, next_token=self._judge)
        self._tokenizer = _Tokenizer()

    def _respond(self, prompt, sampling, i):
        match = re.search(r"<request>\n(.*?)\n</request>\n\nRewrite the request by (.*?)\. Keep", prompt, re.S)
        if i == 0:
            self.schemas.append((match is not None, sampling.json_schema))
        if match:
            how = match.group(2)
            principle = next(p.name for p in PRINCIPLES if p.how == how)
            text = self.rewrite(match.group(1), principle, sampling.seed)
            return json.dumps({"request": text}) if sampling.json_schema and self.enforce else text
        if "Which domain does this request" in prompt:
            request = re.search(r"<request>\n(.*?)\n</request>", prompt, re.S).group(1)
            return "Math" if "equation" in request else "other"
        instruction = re.search(r"<\|im_start\|>user\n(.*?)<\|im_end\|>\n<\|im_start\|>assistant\n$", prompt, re.S)
        return f"answer {i} (seed {sampling.seed % 97}): {instruction.group(1)}"

    def _judge(self, prompt, candidates):
        request = re.search(r"<request>\n(.*?)\n</request>", prompt, re.S).group(1)
        answer = re.search(r"<answer>\n(.*?)\n</answer>", prompt, re.S).group(1)
        value = min(5.0, max(1.0, self.rate(request, answer)))
        low = min(int(value), 4)
        p = value - low
        out = {c: None for c in candidates}
        out[str(low)] = math.log(1 - p) if p < 1 else None
        out[str(low + 1)] = math.log(p) if p > 0 else None
        return out


SEEDS = ["Solve the equation x + 3 = 5.", "Write a short poem about rain.", "My Python loop never ends, why?",
         "Who was the first person on the moon?", "Plan a birthday party for a 6-year-old."]
CATS = ["Math", None, "coding & debugging", "Honesty", "unknown-label"]


def seeds(n=len(SEEDS)) -> pl.DataFrame:
    return pl.DataFrame({"id": [f"s{i}" for i in range(n)], "instruction": SEEDS[:n], "category": CATS[:n]})


def flaky(instruction, principle, seed):
    """A rewriter that often fails: repeats the request, answers it, or says nothing."""
    r = random.Random(seed).random()
    if r < 0.15:
        return instruction
    if r < 0.25:
        return "Sure! Here is the answer: 42."
    if r < 0.3:
        return ""
    return f"Rewritten request: {instruction} [{principle}]"


# ---------------------------------------------------------------- principles

def test_action_sets_follow_the_category():
    helpful = ("clarification request", "information augmentation", "tone improvement")
    assert actions_for(None) == helpful and actions_for("other") == helpful and actions_for("Poetry") == helpful
    assert actions_for("Math") == helpful + ("hint addition", "solution verification")
    assert actions_for("coding & debugging") == helpful + ("error simulation", "debugging guidance")
    assert actions_for("Honesty") == helpful + ("factuality enhancement",)
    assert actions_for("Harmlessness") == helpful + ("safe intent declaration", "boundary enforcement")
    assert canonical_category(" math ") == "Math" and canonical_category("") is None
    assert canonical_category("reasoning") == "other"


# ---------------------------------------------------------------- UCT and backup arithmetic

def hand_tree() -> Tree:
    """root(2.0) -> A(3.0) -> C(1.0); root -> B(4.0). Visits after 3 iterations: root 3, A 2, B 1, C 1."""
    tree = Tree(key="t", instruction="r", category=None, actions=("x", "y"), rng=random.Random(0))
    tree.nodes = [Node(0, "r", value=2.0, visits=3, best=4.0, children=[1, 2]),
                  Node(1, "a", parent=0, action="x", depth=1, value=3.0, visits=2, best=3.0, children=[3]),
                  Node(2, "b", parent=0, action="y", depth=1, value=4.0, visits=1, best=4.0),
                  Node(3, "c", parent=1, action="x", depth=2, value=1.0, visits=1, best=1.0)]
    return tree


def test_q_is_the_recursive_mean_of_own_value_and_children_q():
    tree = hand_tree()
    root, a, b, c = tree.nodes
    assert q_value(tree, c) == 1.0 and q_value(tree, b) == 4.0
    assert q_value(tree, a) == pytest.approx((3.0 + 1.0) / 2)
    assert q_value(tree, root) == pytest.approx((2.0 + 2.0 + 4.0) / 3)
    a.children.append(4)  # a second child of A with its own child: Q(A) = mean(3, Q(C)=1, Q(D)=mean(5, 0))
    tree.nodes += [Node(4, "d", parent=1, action="y", depth=2, value=5.0, visits=2, children=[5]),
                   Node(5, "e", parent=4, action="x", depth=3, value=0.0, visits=1)]
    assert q_value(tree, a) == pytest.approx((3.0 + 1.0 + 2.5) / 3)


def test_uct_and_selection_by_hand():
    tree = hand_tree()
    root, a, b, _ = tree.nodes
    # UCT(A) = 2.0 + 0.1 * sqrt(ln 3 / 2) = 2.07413;  UCT(B) = 4.0 + 0.1 * sqrt(ln 3 / 1) = 4.10481
    assert uct(tree, root, a, 0.1) == pytest.approx(2.0 + 0.1 * math.sqrt(math.log(3) / 2))
    assert uct(tree, root, b, 0.1) == pytest.approx(4.10481, abs=1e-5)
    assert free_actions(tree, root) == [] and free_actions(tree, b) == ["x", "y"]
    assert select(tree, 0.1) is b  # root fully expanded -> argmax UCT -> B has unused actions
    # Exploration can overturn Q: with c = 30, A gets 2 + 30*0.741 = 24.2 < B 4 + 30*1.048 = 35.4: still B;
    # lower B's Q below A's + bonus gap instead.
    b.value = 1.9
    assert select(tree, 0.1) is a  # A: 2.074 > B: 2.005; A has unused action "y"
    assert select(tree, 0.0) is a
    # The root's own value never changes selection.
    root.value = 100.0
    assert select(tree, 0.1) is a
    root.value = None
    assert select(tree, 0.1) is a


def test_ties_go_to_the_first_child_and_closed_subtrees_are_skipped():
    tree = hand_tree()
    root, a, b, c = tree.nodes
    a.value, b.value, c.value = 1.0, 1.0, 1.0
    a.visits = 1  # equal Q and visits -> equal UCT -> first child
    root.visits = 2
    assert select(tree, 0.1) is a
    # Every action of A's subtree dead or used: A is closed, selection goes to B even though A wins UCT.
    a.dead["y"] = "unchanged_rewrite"
    c.dead.update({"x": "empty_rewrite", "y": "empty_rewrite"})
    assert not is_open(tree, a) and is_open(tree, root)
    assert select(tree, 0.1) is b


def test_backup_counts_visits_and_keeps_the_max_without_the_root_value():
    tree = hand_tree()
    root, a, b, _ = tree.nodes
    root.value = 10.0  # must not enter root.best
    d = Node(4, "d", parent=2, action="x", depth=2, value=5.0)
    tree.nodes.append(d)
    b.children.append(4)
    backup(tree, d)
    assert (d.visits, b.visits, a.visits, root.visits) == (1, 2, 2, 4)
    assert (d.best, b.best, root.best) == (5.0, 5.0, 5.0)
    e = Node(5, "e", parent=2, action="y", depth=2, value=0.5)
    tree.nodes.append(e)
    b.children.append(5)
    backup(tree, e)
    assert (b.visits, root.visits) == (3, 5)
    assert b.best == 5.0 and root.best == 5.0  # a worse leaf lowers nothing
    b.value, d.value, d.best = 6.0, 5.0, 5.0  # own value counts for non-root nodes
    backup(tree, e)
    assert b.best == 6.0 and root.best == 6.0


# ---------------------------------------------------------------- rewrite checks

def test_check_rewrite_cleans_and_rejects():
    parent = "Explain tides."
    assert check_rewrite('Rewritten request: "Explain tides to a 10-year-old."', "stop", parent) == \
        ("Explain tides to a 10-year-old.", None)
    assert check_rewrite("Here is the improved prompt:\nPlease explain tides.", "stop", parent)[1] is None
    assert check_rewrite("<request>\nPlease explain tides.\n</request>", "stop", parent) == ("Please explain tides.", None)
    assert check_rewrite("  explain TIDES!  ", "stop", parent)[1] == UNCHANGED_REWRITE
    assert check_rewrite("", "stop", parent)[1] == EMPTY_REWRITE
    assert check_rewrite("Rewritten request:", "stop", parent)[1] == EMPTY_REWRITE
    assert check_rewrite("Please explain tides in", "length", parent)[1] == TRUNCATED_REWRITE
    assert check_rewrite("Sure! Tides are caused by the moon.", "stop", parent)[1] == ANSWERED
    assert check_rewrite("Here is the explanation: the moon pulls water.", "stop", parent)[1] == ANSWERED
    assert check_rewrite("Tides " * 100, "stop", parent)[1] == ANSWERED  # far longer than any rewrite
    assert check_rewrite("Explain tides.<|im_end|>junk", "stop", "Explain waves.", leak=("<|im_end|>",)) == \
        ("Explain tides.", None)


def test_read_json_rewrite():
    assert read_json_rewrite('{"request": "Explain tides, \\"simply\\"."}', "stop") == ('Explain tides, "simply".', None)
    assert read_json_rewrite('{\n  "request": ""\n}', "stop") == ("", None)  # then check_rewrite: empty
    assert read_json_rewrite('{"request": "Explain tides to', "length") == ('{"request": "Explain tides to',
                                                                          TRUNCATED_REWRITE)
    assert read_json_rewrite("Explain tides.", "stop")[1] == UNPARSED_REWRITE
    assert read_json_rewrite('{"prompt": "Explain tides."}', "stop")[1] == UNPARSED_REWRITE
    assert read_json_rewrite('["Explain tides."]', "stop")[1] == UNPARSED_REWRITE


def test_json_replies_are_unwrapped_and_checked_like_text():
    world = World(flaky)
    step = MCTSRewrite(engine=world, iterations=6, expand_attempts=2)
    out = step(seeds())
    rewrites = [schema for is_rewrite, schema in world.schemas if is_rewrite]
    assert rewrites and all(schema["required"] == ["request"] for schema in rewrites)
    assert all(schema is None for is_rewrite, schema in world.schemas if not is_rewrite)  # answers: free text
    # The same searches as free text: the wrapper changes the wire format, not the rewrite or its checks.
    text = MCTSRewrite(engine=World(flaky), iterations=6, expand_attempts=2, rewrite_format="text")
    out_text = text(seeds())
    instructions = lambda df: [[n["instruction"] for n in nodes] for nodes in df["nodes"].to_list()]
    assert instructions(out) == instructions(out_text)
    assert step.stats["failed_expansions"] == text.stats["failed_expansions"]
    assert set(step.stats["failed_expansions"]) == {UNCHANGED_REWRITE, ANSWERED, EMPTY_REWRITE}


def test_json_replies_cut_or_unparsed_fail_with_their_reason():
    long = lambda instruction, principle, seed: " ".join([instruction] * 40)  # > rewrite_max_tokens words
    step = MCTSRewrite(engine=World(long), iterations=2, expand_attempts=1, rewrite_max_tokens=30)
    out = step(seeds(1).with_columns(pl.lit(None, dtype=pl.Utf8).alias("category")))
    assert step.stats["failed_expansions"] == {TRUNCATED_REWRITE: 3} and out["iterations"].to_list() == [0]
    # An engine that ignores the schema (no structured outputs): every reply is unparsed, never taken as text.
    step = MCTSRewrite(engine=World(enforce=False), iterations=2, expand_attempts=1)
    out = step(seeds(1).with_columns(pl.lit(None, dtype=pl.Utf8).alias("category")))
    assert step.stats["dead_actions"] == {UNPARSED_REWRITE: 3} and len(out["nodes"][0]) == 1
    assert MCTSRewrite(engine=World(enforce=False), iterations=2, rewrite_format="text")(seeds(1))["iterations"][0] == 2


# ---------------------------------------------------------------- the search

def test_one_round_is_three_engine_calls_for_all_trees():
    world = World()
    step = MCTSRewrite(engine=world, iterations=4)
    out = step(seeds())
    assert step.stats["engine_calls"] == {"rewrite": 4, "generate": 4, "reward": 4}
    assert [kind for kind, _ in world.calls] == ["complete", "complete", "next_token_logprobs"] * 4
    # Round 1 answers every root and every first child at once: 5 + 5 requests, 3 answers each.
    assert len(world.calls[0][1]) == 5 and len(world.calls[1][1]) == 10 and len(world.calls[2][1]) == 30
    assert out["iterations"].to_list() == [4] * 5 and out["keep"].all()
    assert step.stats["nodes"] == 20 and step.stats["trees"] == 5


def test_tree_invariants_after_a_search():
    out = MCTSRewrite(engine=World(), iterations=12)(seeds())
    for row in out.iter_rows(named=True):
        nodes = {n["index"]: n for n in row["nodes"]}
        root = nodes[0]
        assert len(nodes) == 13 and root["visits"] == 12 and root["parent"] is None and root["action"] is None
        assert row["actions"] == list(actions_for(row["category"]))
        for n in nodes.values():
            assert n["value"] == pytest.approx(sum(n["rewards"]) / 3)
            kids = [m for m in nodes.values() if m["parent"] == n["index"]]
            assert len({m["action"] for m in kids}) == len(kids)  # at most one child per principle
            assert all(m["action"] in row["actions"] and m["depth"] == n["depth"] + 1 for m in kids)
            if n["index"]:
                assert n["visits"] == 1 + sum(m["visits"] for m in kids)
                assert n["best"] == pytest.approx(max([n["value"]] + [m["best"] for m in kids]))
                assert n["q"] == pytest.approx((n["value"] + sum(m["q"] for m in kids)) / (1 + len(kids)))
                assert n["instruction"].startswith(nodes[n["parent"]]["instruction"])
        assert root["best"] == pytest.approx(max(n["value"] for i, n in nodes.items() if i))


@pytest.mark.parametrize("rewrite", [None, flaky], ids=["clean", "flaky"])
def test_lockstep_equals_one_tree_at_a_time(rewrite):
    lock, seq = World(rewrite), World(rewrite)
    a = MCTSRewrite(engine=lock, iterations=9, expand_attempts=2)
    b = MCTSRewrite(engine=seq, iterations=9, expand_attempts=2, lockstep=False)
    out_a, out_b = a(seeds()), b(seeds())
    assert out_a.equals(out_b)
    assert a.stats["failed_expansions"] == b.stats["failed_expansions"]
    assert a.stats["nodes"] == b.stats["nodes"]
    # ... with far fewer engine calls: one per round and phase, not one per tree.
    assert a.stats["engine_calls"]["rewrite"] == a.stats["rounds"]
    assert b.stats["engine_calls"]["rewrite"] == out_b["rounds"].sum()
    if rewrite is flaky:
        assert sum(a.stats["failed_expansions"].values()) > 0
        assert out_a["rounds"].to_list() != out_a["iterations"].to_list()  # failed rounds are redone
    # A tree's search does not depend on its shard-mates.
    alone = MCTSRewrite(engine=World(rewrite), iterations=9, expand_attempts=2)(seeds().slice(2, 1))
    assert alone.row(0) == out_a.row(2)


def test_deterministic_and_seed_dependent():
    run = lambda **kw: MCTSRewrite(engine=World(flaky), iterations=8, **kw)(seeds())
    first = run()
    assert first.equals(run())
    other = run(seed=1)
    assert other["id"].to_list() != first["id"].to_list()
    assert other["nodes"].to_list() != first["nodes"].to_list()


def test_failed_expansions_retry_then_the_action_dies():
    def stubborn(instruction, principle, seed):  # tone improvement always comes back unchanged
        return instruction if principle == "tone improvement" else f"{instruction} [{principle}]"

    step = MCTSRewrite(engine=World(stubborn), iterations=6, expand_attempts=2)
    out = step(seeds(2).with_columns(pl.lit(None, dtype=pl.Utf8).alias("category")))
    for row in out.iter_rows(named=True):
        assert "tone improvement" not in {n["action"] for n in row["nodes"]}
        assert {"node": 0, "action": "tone improvement", "reason": UNCHANGED_REWRITE} in row["dead_actions"]
        assert row["iterations"] == 6
        assert {d["action"] for d in row["dead_actions"]} == {"tone improvement"}
        # Each dead action cost expand_attempts (2) failures; a node may hold one more pending failure.
        pending = row["failed_expansions"] - 2 * len(row["dead_actions"])
        assert 0 <= pending <= len(row["nodes"]) - len(row["dead_actions"])
        assert row["rounds"] == row["iterations"] + row["failed_expansions"]
    dead = sum(len(d) for d in out["dead_actions"])
    assert step.stats["dead_actions"] == {UNCHANGED_REWRITE: dead}
    assert step.stats["failed_expansions"] == {UNCHANGED_REWRITE: out["failed_expansions"].sum()}


def test_a_rewriter_that_only_answers_exhausts_the_tree():
    step = MCTSRewrite(engine=World(lambda i, p, s: "Sure! The answer is 4."), iterations=20, expand_attempts=3)
    out = step(seeds(1).with_columns(pl.lit(None, dtype=pl.Utf8).alias("category")))
    row = out.row(0, named=True)
    assert len(row["nodes"]) == 1 and row["nodes"][0]["value"] is not None  # the root is still valued
    assert row["iterations"] == 0 and row["rounds"] == 9 and row["failed_expansions"] == 9  # 3 actions x 3 tries
    assert sorted(d["action"] for d in row["dead_actions"]) == sorted(actions_for(None))
    assert step.stats["trees_exhausted"] == 1 and step.stats["dead_actions"] == {ANSWERED: 3}
    assert row["keep"]  # the tree is kept; mcts_pairs drops its pair for having one node
    pairs = MCTSPairs()(out)
    assert pairs.filter(pl.col("kind") == "pair")["drop_reason"].to_list() == ["too_few_nodes"]


def test_unscored_nodes_fail_and_unscored_trees_are_dropped():
    class NoJudge(World):
        def _judge(self, prompt, candidates):  # the judge never finds a rating digit
            return {c: None for c in candidates}

    step = MCTSRewrite(engine=NoJudge(), iterations=2, expand_attempts=1)
    out = step(seeds(1).with_columns(pl.lit(None, dtype=pl.Utf8).alias("category")))
    assert out["keep"].to_list() == [False] and out["drop_reason"].to_list() == ["unscored_tree"]
    assert step.stats["roots_unscored"] == 1 and step.stats["dead_actions"] == {"unscored_node": 3}
    assert step.stats["unscored_responses"] == {"no_rating_token": 3 * 4}  # root + 3 failed nodes, 3 answers each


def test_skips_dropped_and_empty_seeds_and_reads_messages():
    df = pl.DataFrame({"id": ["a", "b", "c"], "instruction": ["Say hi.", "  ", "Count to 3."],
                       "keep": [True, True, False]})
    step = MCTSRewrite(engine=World(), iterations=1)
    out = step(df)
    assert out["parent_id"].to_list() == ["a"] and step.stats["skipped_inputs"] == 2
    conv = pl.DataFrame({"id": ["m"], "messages": [[{"role": "user", "content": "Say hi."}]]})
    assert MCTSRewrite(engine=World(), iterations=1)(conv)["instruction"].to_list() == ["Say hi."]
    with pytest.raises(ValueError, match="no engine"):
        MCTSRewrite()(df)
    with pytest.raises(ValueError, match="instruction"):
        MCTSRewrite(engine=World())(pl.DataFrame({"id": ["x"], "text": ["q"]}))


def test_reward_model_config_reaches_the_scorer():
    class Constant:
        model_id = "constant"

        def score(self, prompts, responses):
            from engines.reward import RewardResult
            assert all(p == [{"role": "user", "content": SEEDS[0]}] for p in prompts)  # the ORIGINAL instruction
            return [RewardResult(1.5) for _ in responses]

    out = MCTSRewrite(engine=World(), scorer=Constant(), iterations=2)(seeds(1))
    assert [n["value"] for n in out["nodes"][0]] == [1.5, 1.5, 1.5]
    step = MCTSRewrite(engine=World(), reward={"judge_scale": 9})
    assert step.scorer().scale == 9 and step.scorer().model_id == "judge:scripted"


# ---------------------------------------------------------------- pairs, sft, steps, trees

def tree_row(tree_id, raw, nodes, keep=True):
    full = [{"index": i, "parent": p, "action": a, "instruction": t, "value": v, "rewards": [v] * 3, "visits": 1,
             "best": v, "q": v, "depth": d} for i, p, a, t, v, d in nodes]
    return {"id": tree_id, "instruction": raw, "nodes": full, "keep": keep}


def test_pairs_sft_steps_and_trees_from_hand_made_trees():
    rows = [
        tree_row("t1", "raw one", [(0, None, None, "raw one", 2.0, 0),
                                   (1, 0, "tone improvement", "raw one please", 3.0, 1),
                                   (2, 0, "hint addition", "raw one hint", 1.0, 1),
                                   (3, 1, "hint addition", "raw one please hint", 2.5, 2)]),
        tree_row("t2", "raw two", [(0, None, None, "raw two", 4.0, 0),
                                   (1, 0, "tone improvement", "raw two please", 4.0, 1)]),
        tree_row("t3", "raw three", [(0, None, None, "raw three", 1.0, 0)], keep=False),
    ]
    from stages.ultraprompt import NODE
    df = pl.DataFrame(rows, schema={"id": pl.Utf8, "instruction": pl.Utf8, "nodes": pl.List(NODE), "keep": pl.Boolean})
    step = MCTSPairs()
    out = step(df)
    configs = split_configs(out)
    pair = configs["default"].row(0, named=True)
    assert pair["parent_id"] == "t1" and "raw one" in pair["prompt"][0]["content"]
    assert pair["chosen"] == [{"role": "assistant", "content": "raw one please"}]
    assert pair["rejected"] == [{"role": "assistant", "content": "raw one hint"}]
    assert (pair["score_chosen"], pair["score_rejected"], pair["best_is_root"]) == (3.0, 1.0, False)
    # t2: root and child tie at 4.0 -> the root is best (lowest index), the child worst: margin 0 -> dropped.
    t2 = out.filter((pl.col("parent_id") == "t2") & (pl.col("kind") == "pair")).row(0, named=True)
    assert (t2["keep"], t2["drop_reason"], t2["best_is_root"]) == (False, "low_margin", True)
    assert configs["default"].height == 1
    sft = configs["sft"]
    assert sft["parent_id"].to_list() == ["t1", "t2"] and sft["best_is_root"].to_list() == [False, True]
    assert sft["messages"][0].to_list()[1] == {"role": "assistant", "content": "raw one please"}
    assert sft["score_root"].to_list() == [2.0, 4.0]
    # Improving edges: 0->1 (2 < 3) and 1->3? no (3 > 2.5); 0->2 no; t2 0->1 tie: no.
    steps = configs["steps"]
    assert steps[["source", "target", "action"]].rows() == [("raw one", "raw one please", "tone improvement")]
    assert "raw one" in steps["messages"][0][0]["content"] and BY_NAME["tone improvement"].how in \
        steps["messages"][0][0]["content"]
    assert configs["trees"].height == 6 and configs["trees"]["node"].to_list() == [0, 1, 2, 3, 0, 1]
    assert step.stats["edges"] == 4 and step.stats["improving_edges"] == 1 and step.stats["improving_share"] == 0.25
    assert step.stats["best_is_root"] == 1 and step.stats["skipped_trees"] == 1
    assert out["id"].n_unique() == out.height and (out["origin"] == "mcts_pairs@1").all()
    assert MCTSPairs(drop_root_best=True)(df).filter(pl.col("kind") == "sft")["drop_reason"].to_list() == \
        [None, "best_is_root"]


def test_search_then_pairs_end_to_end():
    trees = MCTSRewrite(engine=World(flaky), iterations=8)(seeds())
    step = MCTSPairs()
    configs = split_configs(step(trees))
    assert configs["default"].height == 5 and configs["sft"].height == 5
    assert configs["trees"].height == sum(len(n) for n in trees["nodes"].to_list())
    pairs = configs["default"]
    assert (pairs["score_chosen"] > pairs["score_rejected"]).all()
    assert (steps := configs["steps"]).height == step.stats["improving_edges"] > 0
    assert (steps["score_target"] > steps["score_source"]).all()
    assert 0 < step.stats["improving_share"] < 1


# ---------------------------------------------------------------- category tagger

def test_category_tagger_fills_missing_categories_only():
    df = pl.DataFrame({"id": ["a", "b", "c", "d"], "category": [None, "math", None, "poetry"],
                       "instruction": ["Solve the equation 2x = 4.", "Add 2 and 2.", "Write a poem.", "A haiku."]})
    world = World()
    step = MCTSCategory(engine=world)
    out = step(df)
    assert out["category"].to_list() == ["Math", "Math", "other", "other"]
    assert len(world.calls) == 1 and len(world.calls[0][1]) == 2  # one call, only the two untagged rows
    assert step.stats["tagged"] == 2 and step.stats["given"] == 2
    assert MCTSCategory(engine=World(), overwrite=True)(df)["category"].to_list() == ["Math", "other", "other", "other"]
    no_column = MCTSCategory(engine=World())(df.drop("category"))
    assert no_column["category"].to_list() == ["Math", "other", "other", "other"]


# ---------------------------------------------------------------- the real engine

@pytest.mark.engine
def test_small_search_on_the_embedded_model(engine):
    df = pl.DataFrame({"id": ["a", "b"], "instruction": ["How do I boil an egg?", "What is 12 times 7?"],
                       "category": [None, "Math"]})
    step = MCTSRewrite(engine=engine, iterations=2, max_tokens=48, rewrite_max_tokens=96, expand_attempts=2)
    out = step(df)
    assert out.height == 2 and out["keep"].all()
    rounds = step.stats["rounds"]
    assert step.stats["engine_calls"]["rewrite"] == rounds and step.stats["engine_calls"]["reward"] <= rounds
    for row in out.iter_rows(named=True):
        root = row["nodes"][0]
        assert root["instruction"] == row["instruction"] and 1.0 <= root["value"] <= 5.0  # judge rates 1..5
        assert row["iterations"] + row["failed_expansions"] == row["rounds"]
        for node in row["nodes"][1:]:
            assert node["instruction"] != root["instruction"] and node["action"] in row["actions"]
            assert 1.0 <= node["value"] <= 5.0 and len(node["rewards"]) == 3
    assert step.stats["generated_tokens"] > 0
    pairs = MCTSPairs()(out)
    assert pairs.filter(pl.col("kind") == "node").height == sum(len(n) for n in out["nodes"].to_list())
